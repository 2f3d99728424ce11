"""igsearch: GRPO for search-augmented QA with step-level information-gain rewards.

    python igsearch.py --tiny                          # train the small preset (outcome reward)
    python igsearch.py --tiny --reward igsearch        # IG-Search: information gain on query tokens
    python igsearch.py --tiny --reward inforeasoner    # InfoReasoner: semantic information gain
    python igsearch.py --resume runs/outcome-s0 [--steps N]          # continue from the last checkpoint
    python igsearch.py show --run runs/igsearch-s0 --step 0          # tokens coloured by their advantage A[i, k]
    python igsearch.py plot --run runs/outcome-s0 runs/igsearch-s0   # training curves, overlaid
    python igsearch.py --tiny --lora-rank 16                         # low-rank adapters (lora.py)
    python igsearch.py merge runs/outcome-s0 merged/                 # a LoRA run as a plain model
    torchrun --nproc_per_node 2 igsearch.py --tiny                   # data-parallel over 2 GPUs (ranks.py)

One training step (train_step below) is the whole method: sample G rollouts per question with search,
score them, build the per-token advantage tensor A [B, T], take a PPO-clip step. METHOD.md has the math.
grpo.py holds the algorithm it calls (rollouts, advantages, the loss), rewards.py the rewards, and engine.py
how the forwards run (batched generation, token budgets, bf16, memory).
This file is the training script; its plumbing lives beside it: checks.py (settings refused in one line),
runs.py (model loading, checkpoints, the metrics files, merge), views.py (show, plot, tables), demo.py (--demo),
ranks.py (several processes under torchrun), lora.py (low-rank adapters).
experiments.py evaluates runs (eval) and compares the three rewards (compare).
"""
import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import checks
import demo
import engine
import grpo
import lora
import ranks
import retrieve
import rewards
import runs
import views
import warmup
from retrieve import DataError


@dataclass
class Config:
    # model and data
    model: str = runs.DEFAULT_MODEL   # hub id, local directory, .gguf file, or "tiny-random"
    corpus: str = "vital"             # vital | hotpotqa:PATH | jsonl:PATH
    stopwords: bool = False           # drop English stopwords in BM25's tokenizer (both documents and queries)
    data: str = "tiny"                # tiny (generated from the corpus) | hotpotqa:PATH | PATH (FlashRAG JSONL)
    split: str = "80/10/10"           # train/dev/test percent of a --data file without splits (a fixed shuffle)
    eval_split: str = "dev"           # dev | test: the questions evaluated before and after training
    reward: str = "outcome"           # outcome | igsearch | inforeasoner
    out: str = ""                     # run directory (default runs/<reward>-s<seed>)
    seed: int = 0                     # seeds sampling, question order and IG draws: on CPU, a seed repeats a run
    device: str = "auto"              # auto | cpu | cuda | cuda:N | mps
    parallel: str = "ddp"             # under torchrun: ddp | fsdp (weights, gradients, optimizer state sharded)
    pg_timeout: float = 0.0           # under torchrun: seconds a rank waits for the others before the run ends
                                      # (a rank that died or froze; 0 = ranks.PG_TIMEOUT: 1800 on CPU, 600 on GPU)
    precision: str = "auto"           # auto | bf16 | fp32: the forward matmuls (weights, optimizer, loss stay fp32)
    grad_checkpointing: bool = True   # recompute activations in the backward (engine.recompute): memory for compute
    # low-rank adapters (METHOD §3.5, lora.py): only A and B train, the reference is the policy with them off
    lora_rank: int = 0                # r; 0 = full fine-tuning
    lora_alpha: float = 0.0           # α: each adapted layer adds (α / r) B A x; 0 = 2r
    lora_targets: str = lora.TARGETS  # the adapted linear layers, by module name
    # rollouts (METHOD §1)
    steps: int = 200                  # GRPO steps
    questions_per_step: int = 8       # questions a step; each gets a group of G rollouts
    group_size: int = 5               # G
    temperature: float = 1.0          # sampling temperature of the rollouts (evaluation is greedy)
    max_turns: int = 4                # searches a rollout may make; then one last turn may only answer
    topk: int = 3                     # documents a search returns
    max_turn_tokens: int = 256        # tokens the policy may write in one turn
    max_response_tokens: int = 1536   # all tokens after the prompt, observations included
    # format warm-up (METHOD §6, our addition): supervised steps on oracle trajectories before GRPO
    warmup_steps: int = 0             # 0 = off
    warmup_batch: int = 8             # oracle trajectories per step (train questions only)
    warmup_lr: float = 1e-4           # AdamW learning rate of the warm-up
    # GRPO (METHOD §3)
    lr: float = 1e-6                  # AdamW learning rate of GRPO
    beta_kl: float = 0.001            # weight of the k3 KL to the frozen reference (METHOD §3.3; 0 = no reference)
    clip_eps: float = 0.2             # PPO ratio clip ε (METHOD §3.2)
    clip_ratio_c: float = 0.0         # verl's dual clip: the loss of a token with A < 0 is capped at -A * c (> 1; 0 = off)
    ppo_epochs: int = 1               # μ
    loss_agg: str = "token-mean"      # token-mean | seq-mean-token-mean
    grad_clip: float = 1.0            # gradient-norm clip of each optimizer step
    # memory: every batched forward holds at most a budget of tokens, rows × the chunk's longest row
    # (engine.token_chunks). token_budget: the forwards with a backward, the update's micro-batches and the warm-up's;
    # the default holds a few rows of a full response. forward_budget: the forwards without gradients, each turn's
    # generation (its KV cache) in rollouts and evaluation, reference log-probs, IG scoring, InfoReasoner's
    # sampling. A token there keeps no activations for a backward, so it costs far less memory than an update
    # token, and wide generation batches run faster (figures in docs/PERFORMANCE.md).
    token_budget: int = 6144          # tokens a forward with a backward may hold (update and warm-up micro-batches)
    forward_budget: int = 32768       # tokens a forward without gradients may hold (generation, reference, IG, beliefs)
    # evaluation
    eval_questions: int = 64          # questions of --eval-split evaluated greedily before and after training
    # runs: checkpoints and views
    save_every: int = 1               # write a checkpoint after every N steps (and after the last one)
    show_every: int = 10              # save the step's rollouts + A and views/step_N.html every N steps (0 = never)
    # IG-Search (METHOD §4)
    ig_alpha: float = 0.5             # α: weight of g(IG) on a query's tokens (METHOD §4.3)
    ig_delta: float = 0.05            # δ: dead zone of g (METHOD §4.3)
    ig_rho: float = 0.5               # ρ: scale of a negative IG (METHOD §4.3)
    ig_clip: float = 2.0              # c: IG clipped to [-c, c] before g (METHOD §4.3)
    ig_samples: int = 3               # N counterfactual blocks per step
    ig_baseline: str = "batch"        # batch | corpus
    ig_head_tokens: int = 3           # the first answer tokens weighted more in s(a* | C) (METHOD §4.1)
    ig_head_weight: float = 3.0       # their weight (METHOD §4.1)
    ig_max_context: int = 2048        # tokens of context kept (from the right) when scoring IG (METHOD §4.1)
    # InfoReasoner (METHOD §5)
    ir_samples: int = 10              # K
    ir_temperature: float = 1.0       # temperature of the belief samples (METHOD §5.1)
    ir_max_tokens: int = 32           # tokens a belief sample may hold (METHOD §5.1)
    ir_belief: str = "agent"          # agent | plain: ask the belief in the agent's format or a brief-answer prompt
    ir_estimator: str = "prob"        # prob | log | entropy
    ir_lambda: float = 0.6            # λ in R = EM + λ · IG (METHOD §5.4)
    nli_model: str = ""               # MNLI classifier for semantic classes (§5.2; empty = EM or containment)


# --tiny: the real offline model, a short format warm-up, then a few GRPO steps, evaluated before and after on 50
# dev questions: the whole loop end to end in minutes. --preset cpu: the learning experiment (compare --preset cpu),
# without gradient checkpointing (memory traded for speed). --preset hotpot: the same on HotpotQA. Turns of 128
# tokens leave room for queries longer than the warm-up's; each preset's token budgets keep its peak memory within
# its machine. Times, memory and how the budgets were chosen: docs/PERFORMANCE.md.
HOTPOTQA = "../shared/data/hotpotqa_dev_distractor_886.jsonl"  # or the full dev file: python data/prepare.py hotpotqa
PRESETS = {
    "tiny": dict(steps=4, questions_per_step=2, group_size=4, max_turns=2, topk=3, max_turn_tokens=128,
                 max_response_tokens=1024, lr=1e-5, eval_questions=50, token_budget=1024, forward_budget=8192,
                 show_every=1, warmup_steps=8, warmup_batch=4),
    "cpu": dict(steps=10, questions_per_step=4, group_size=4, max_turns=2, topk=3, max_turn_tokens=128,
                max_response_tokens=1024, lr=1e-5, eval_questions=300, token_budget=2048, forward_budget=16384,
                show_every=4, warmup_steps=12, warmup_batch=8, grad_checkpointing=False),
    # the regime the step-level rewards are for: 2-hop HotpotQA with hard distractors, where the second query
    # decides and most groups fail; a third of the file is held out as test and evaluated after training.
    # Two searches of three HotpotQA paragraphs each need room: a response cap that cuts them teaches one search.
    "hotpot": dict(data=f"hotpotqa:{HOTPOTQA}", corpus=f"hotpotqa:{HOTPOTQA}", split="55/10/35", eval_split="test",
                   steps=8, questions_per_step=4, group_size=4, max_turns=2, topk=3, max_turn_tokens=128,
                   max_response_tokens=1536, lr=1e-5, eval_questions=300, token_budget=2048, forward_budget=16384,
                   show_every=4, warmup_steps=30, warmup_batch=8, grad_checkpointing=False),
}


def parse_args(argv=None):
    p = runs.ArgParser(prog="igsearch.py", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the small preset (--preset tiny): " + json.dumps(PRESETS["tiny"]))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of settings (flags given beside it override them): "
                        + "; ".join(f"{k}: {json.dumps(v)}" for k, v in PRESETS.items()))
    p.add_argument("--demo", action="store_true", help="the IG-Search credit-assignment demo (CPU, seconds)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its last complete checkpoint (its config.json, "
                        "overridden by any flags given here, e.g. --steps)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds a run: its files are deleted first")
    runs.add_config_flags(p, Config)  # --lr ... for every field, its comment the help text
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        raise DataError("--resume continues a run and --overwrite replaces it: give one of them")
    cfg, source = Config(), None
    if args.resume:
        cfg, source = run_config(args.resume), Path(args.resume) / "config.json"
        cfg = dataclasses.replace(cfg, out=args.resume)
    elif args.tiny or args.preset:
        cfg = dataclasses.replace(cfg, **PRESETS[args.preset or "tiny"])
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **explicit)
    checks.check_config(cfg, source, explicit)
    return cfg, args


def run_config(run_dir):
    """The Config saved in RUN/config.json (keys this version does not know are ignored: a run of another
    version still loads; check_config then checks the values)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in runs.saved_config(run_dir).items() if k in known})


# ----------------------------------------------------------------------------------------------------
# Rewards of a batch of rollouts

def score_outcome(rollouts):
    """METHOD §2: EM and F1 of each rollout's answer (a truncated rollout has no answer)."""
    em = [rewards.exact_match(r.answer, r.question["golden_answers"]) for r in rollouts]
    f1 = [rewards.f1_score(r.answer, r.question["golden_answers"]) for r in rollouts]
    return em, f1


def rollout_kwargs(cfg, temperature, generator):
    return dict(max_turns=cfg.max_turns, topk=cfg.topk, max_turn_tokens=cfg.max_turn_tokens,
                max_response_tokens=cfg.max_response_tokens, temperature=temperature, generator=generator,
                token_budget=cfg.forward_budget)


# ----------------------------------------------------------------------------------------------------
# One training step

def train_step(model, ref_model, opt, tok, retriever, questions, cfg, generator, rng, rollouts=None, dp=None):
    """Rollouts -> rewards -> per-token advantages A [B, T] -> PPO-clip update. Returns (metrics, rollouts, A).
    `rollouts` skips sampling and learns from those (the step benchmark gives every variant the same ones).
    Under torchrun (ranks.py) every rank samples and scores its share of the step and the shares are gathered,
    so that every rank holds the whole step (A, metrics, the IG batch pool); it updates on its own rows."""
    clock = ranks.Clock("retrieval", "rollout", "scoring", "update")  # seconds, the slowest rank's
    with ranks.whole_weights(dp):  # FSDP: sampling and scoring use the whole weights
        if rollouts is None:
            rollouts = sample_rollouts(model, tok, retriever, questions, cfg, generator, clock)  # METHOD §1
        with clock("scoring"), precision(cfg, model):
            em, f1 = score_outcome(rollouts)                                                  # METHOD §2
            R, ig, extra = step_rewards(model, ref_model, tok, retriever, rollouts, em, cfg, generator, rng)

    with clock("update"):
        groups = [r.group for r in rollouts]
        adv = grpo.group_advantages(R, groups)                                     # [B]      METHOD §3.1
        batch = grpo.collate(rollouts, tok.pad_token_id)
        A = grpo.token_advantages(adv, batch.roles)                                # [B, T]   METHOD §3.2
        if cfg.reward == "igsearch":
            A = grpo.add_query_bonus(A, rollouts, ig, cfg.ig_alpha, cfg.ig_delta, cfg.ig_rho, cfg.ig_clip)  # §4.3
        lo, hi = ranks.span(len(rollouts))                                         # this rank's rows
        stats = update_policy(model, ref_model, opt, batch[lo:hi], A[lo:hi], cfg, dp)              # §3.3
    return {**step_metrics(rollouts, R, em, f1, adv, A), **stats, **extra, **clock.times()}, rollouts, A


def step_rewards(model, ref_model, tok, retriever, rollouts, em, cfg, generator, rng):
    """The reward R of each rollout (set on it too), IG-Search's gain of each search (None for the other
    rewards), and the reward's own metrics. Each rank scores its share of the rollouts; the shares are gathered."""
    lo, hi = ranks.span(len(rollouts))
    R, ig, extra = list(em), None, {}                                              # METHOD §2
    runs.release_memory()  # sampling's freed tensors handed back (its autocast context, and cache, have ended)
    if cfg.reward == "igsearch":                                                   # METHOD §4.1-§4.2
        scorer = lambda prefix: rewards.gold_scorer(model, prefix, cfg.ig_head_tokens, cfg.ig_head_weight,
                                                    cfg.forward_budget)
        ig, details = rewards.igsearch_information_gain(scorer, tok, rollouts, retriever, cfg.ig_samples,
                                                        cfg.ig_baseline, rng, cfg.ig_max_context, range(lo, hi))
        ig, details = ranks.gather(ig[lo:hi]), ranks.gather(details)
        extra = rewards.ig_metrics(details, cfg.ig_clip)
        for r, gains in zip(rollouts, ig):  # kept on the rollout for the per-token view
            for s, g in zip(r.searches, gains):
                s["ig"] = float(g)
    elif cfg.reward == "inforeasoner":                                             # METHOD §5
        with lora.reference(ref_model if ref_model is not None else model) as ir_model:
            ig, beliefs, n = rewards.inforeasoner_beliefs(ir_model, tok, rollouts[lo:hi], cfg, generator)
        ig, beliefs = ranks.gather(ig), ranks.gather(beliefs)
        extra = rewards.ir_metrics(ig, beliefs, ranks.all_sum(n))
        R = [e + cfg.ir_lambda * g for e, g in zip(em, ig)]                        # METHOD §5.4
    for r, x in zip(rollouts, R):
        r.reward = x
    return R, ig, extra


def update_policy(model, ref_model, opt, batch, A, cfg, dp=None):
    """μ epochs of PPO-clip over the batch, each one optimizer step accumulated over micro-batches of at most
    cfg.token_budget tokens. Under torchrun `batch` and A are this rank's rows and `dp` the data-parallel
    forward: the loss is normalized by the policy tokens (or sequences) of all ranks, so that K ranks take the
    update of one process. The normalization is the whole batch's, so how the rows are cut changes the
    gradient only by the order of float sums."""
    runs.release_memory()  # sampling's and scoring's freed tensors: the update's, of other sizes, would not reuse them
    device = next(model.parameters()).device
    ids, attn, mask, A = batch.ids.to(device), batch.attention_mask.to(device), batch.policy_mask.to(device), A.to(device)
    policy = dp if dp is not None else ranks.PolicyLogprobs(model)  # log π of one micro-batch [b, T]
    micro = ranks.same_count(engine.token_chunks(attn.sum(-1).tolist(), cfg.token_budget))  # row slices
    with torch.no_grad(), precision(cfg, model):
        with lora.reference(ref_model, dp) as reference:  # with adapters: the policy, its adapters off
            ref = (grpo.token_logprobs(reference, ids, attn, mask, cfg.forward_budget) if cfg.beta_kl > 0
                   else torch.zeros_like(A))
        # with one epoch the sampling policy is the current one, so old = current (detached, below)
        old = torch.cat([policy(ids[sl], attn[sl], mask[sl]) for sl in micro]) if cfg.ppo_epochs > 1 else None
    n_tokens = ranks.all_sum(mask.sum()).clamp(min=1)  # the policy tokens of the whole batch, all ranks
    norm = n_tokens if cfg.loss_agg == "token-mean" else ranks.all_sum(ids.shape[0])

    def loss_of(logp, sl):  # METHOD §3.3 on one micro-batch
        logp_old = old[sl] if old is not None else logp.detach()
        return grpo.grpo_loss(logp, logp_old, ref[sl], A[sl], mask[sl], cfg.clip_eps, cfg.beta_kl, cfg.loss_agg,
                              norm, cfg.clip_ratio_c)

    totals, grad_norm = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0}, 0.0
    for _ in range(cfg.ppo_epochs):
        parts = ranks.accumulate_gradients(model, micro, lambda sl: policy(ids[sl], attn[sl], mask[sl]), loss_of,
                                           cfg, dp, scale=ranks.world())  # ranks' gradients are averaged: sum
        for loss, st in parts:
            w = st["n_tokens"] / float(n_tokens)  # token-weighted mean of the micro-batch stats
            totals["loss"] += loss / cfg.ppo_epochs
            for k in ("kl", "clip_frac", "dual_clip_frac"):
                totals[k] += st[k] * w / cfg.ppo_epochs
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm += ranks.grad_norm(gn) / cfg.ppo_epochs
        opt.step()
    opt.zero_grad(set_to_none=True)  # not held through the next step's sampling and scoring: the model's size again
    return {**ranks.reduce_values(totals), "grad_norm": grad_norm}  # every rank's share of the batch's sums


# ----------------------------------------------------------------------------------------------------
# The step's plumbing: sampling on several ranks, precision, metrics

def sample_rollouts(model, tok, retriever, questions, cfg, generator, clock):
    """METHOD §1: G rollouts of each question at cfg.temperature. Under torchrun each rank samples its share of
    the questions (a group never spans ranks); the whole step's are gathered, in question order, on every rank."""
    lo, hi = ranks.span(len(questions))
    batch_q = [q for q in questions[lo:hi] for _ in range(cfg.group_size)]
    groups = [i for i in range(lo, hi) for _ in range(cfg.group_size)]  # a group = one question of this batch
    retriever.seconds = 0.0
    runs.release_memory()  # the last step's freed tensors handed back: each phase starts from a trimmed heap
    with clock("rollout"), precision(cfg, model):
        rollouts = grpo.generate_rollouts(model, tok, batch_q, groups, retriever,
                                          **rollout_kwargs(cfg, cfg.temperature, generator))
    clock.seconds["retrieval"] = retriever.seconds  # the search engine's share, apart from the model's
    clock.seconds["rollout"] -= retriever.seconds
    return ranks.gather(rollouts)


def precision(cfg, model):
    """The forwards in bf16 where the CPU or GPU runs it natively (--precision); log-softmax, loss and weights fp32."""
    return engine.autocast(cfg.precision, next(model.parameters()).device)


def step_metrics(rollouts, R, em, f1, adv, A):
    """One line of metrics.jsonl: the step's rewards, its rollouts' shape, and the groups GRPO cannot learn from."""
    groups = [r.group for r in rollouts]
    flat = torch.tensor([bool(torch.all(adv[torch.tensor(groups) == g] == 0)) for g in groups])  # [B] no spread
    return {
        "reward": float(np.mean(R)), "em": float(np.mean(em)), "f1": float(np.mean(f1)),
        "searches": float(np.mean([len(r.searches) for r in rollouts])),
        "response_len": float(np.mean([len(r.ids) - r.roles.count(grpo.PROMPT) for r in rollouts])),
        "policy_tokens": float(np.mean([r.n_policy for r in rollouts])),
        "answered": float(np.mean([r.answer is not None for r in rollouts])),
        "truncated": float(np.mean([r.truncated for r in rollouts])),
        "zero_adv_groups": len({g for g, f in zip(groups, flat.tolist()) if f}),
        "all_fail_groups": int(sum(all(e == 0 for e, g2 in zip(em, groups) if g2 == g) for g in set(groups))),
        "flat_group_credit_tokens": int(((A != 0) & flat[:, None]).sum()),  # IG-Search's bonus where Â = 0
    }


# ----------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, tok, retriever, questions, cfg, dp=None):
    """Greedy rollouts -> (summary, rollouts). The summary holds EM, F1, answered-in-format and searches per
    question, each with a 95% bootstrap interval, for all questions and, where they say, by hops. Under
    torchrun each rank answers its share of the questions, and every rank gets all the rollouts. All of a
    rank's questions run as one set of rollouts: cfg.forward_budget bounds each turn's batches (generate_turn)."""
    mine = ranks.shard(questions)
    with ranks.whole_weights(dp), precision(cfg, model):  # FSDP: generation runs on the whole weights
        rollouts = grpo.generate_rollouts(model, tok, mine, list(range(len(mine))), retriever,
                                          **rollout_kwargs(cfg, 0.0, None))
    rollouts = ranks.gather(rollouts)
    summary = summarize(rollouts)
    em, f1 = score_outcome(rollouts)  # per question, by id: runs on the same questions compare pairwise (views)
    summary["each"] = {"id": [r.question.get("id") for r in rollouts], "em": em, "f1": f1,
                       "answered": [float(r.answer is not None) for r in rollouts],
                       "searches": [len(r.searches) for r in rollouts], "answer": [r.answer for r in rollouts],
                       "hops": [r.question.get("hops") for r in rollouts],
                       "type": [r.question.get("type") for r in rollouts]}
    for key in ("hops", "type"):  # the tiny set's 1- and 2-hop questions, HotpotQA's bridge and comparison
        kinds = sorted({r.question[key] for r in rollouts if r.question.get(key) is not None})
        if len(kinds) > 1:
            summary["by_" + key] = {k: summarize([r for r in rollouts if r.question.get(key) == k]) for k in kinds}
    return summary, rollouts


def summarize(rollouts):
    """Per-question EM, F1, answered (an <answer> in format) and searches: their means and 95% intervals."""
    em, f1 = score_outcome(rollouts)
    values = {"em": em, "f1": f1, "answered": [float(r.answer is not None) for r in rollouts],
              "searches": [float(len(r.searches)) for r in rollouts]}
    out = {"n": len(rollouts)}
    for k in views.EVAL_METRICS:
        out[k] = float(np.mean(values[k])) if rollouts else float("nan")
        out[k + "_ci"] = views.bootstrap_ci(values[k])
    return out


# ----------------------------------------------------------------------------------------------------
# Training

def setup(cfg):
    """The seeded process, the device, the retriever over the corpus, the QA splits and the evaluation questions (--eval-split)."""
    runs.seed_everything(cfg.seed)
    device = ranks.local_device(runs.pick_device(cfg.device))  # under torchrun: this rank's GPU
    docs = retrieve.load_corpus(cfg.corpus)
    retriever = retrieve.Retriever(docs, stopwords=cfg.stopwords)
    splits = retrieve.load_data(cfg.data, cfg.split)
    if not splits.get("train"):
        raise DataError(f"--data {cfg.data}: the train split is empty")
    print(f"data {cfg.data}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " questions; "
          f"evaluated on {min(cfg.eval_questions, len(splits.get(cfg.eval_split, [])))} of {cfg.eval_split}")
    return device, retriever, splits, splits.get(cfg.eval_split, [])[: cfg.eval_questions]


def run_path(cfg):
    return Path(cfg.out or f"runs/{cfg.reward}-s{cfg.seed}")


def train(cfg, resume=False, before=None, overwrite=False):
    """GRPO for cfg.steps steps, after the format warm-up when cfg.warmup_steps > 0; with resume=True, continue
    the run in cfg.out from its last checkpoint (from step 0 if it was cut before its first one). `before`: the
    evaluation of the starting model when the caller has it already (compare starts every run from one
    warm-up). A fresh run refuses a directory that holds a run unless overwrite=True, and a directory that
    is not a run and not empty always (runs.claim_run_dir). Under torchrun rank 0 alone claims, locks and
    writes the run directory (ranks.on_main); the others wait for it, then read the checkpoint."""
    out = run_path(cfg)
    ranks.init(cfg.device, cfg.pg_timeout)       # under torchrun: join the other ranks (ranks.py)
    ranks.on_main(runs.claim_run_dir, out, resume, overwrite)  # refused before anything is read or written
    device, retriever, splits, dev = setup(cfg)  # data errors come before any model is loaded
    with ranks.main_holds(runs.locked(out)):     # one process writes a run directory
        ckpt = ranks.on_main(runs.open_run, cfg, out, resume, overwrite,
                             then=lambda: runs.last_checkpoint(out) if resume else None)
        return _train(cfg, out, ckpt, resume, before, device, retriever, splits, dev)


def _train(cfg, out, ckpt, resume, before, device, retriever, splits, dev):
    from tqdm import tqdm
    start, evals = cfg.model, {}
    if cfg.warmup_steps > 0:  # METHOD §6: RL starts from the warmed-up model, and so does the reference
        start, evals = warmup.warm_start(cfg, out, retriever, splits, dev, device, evaluate)
        runs.release_memory()  # the warm-up's model and optimizer state are freed: hand their pages back first
    model, tok, smoke = runs.load_model(start, device, cfg.seed)
    lora.adapt_run(model, cfg, device)
    smoke = smoke or evals.get("smoke", False)
    ref_model = None
    if cfg.beta_kl > 0 or cfg.reward == "inforeasoner":  # the initial policy, frozen (with adapters: for free)
        ref_model = lora.Reference(model) if cfg.lora_rank else engine.frozen_copy(model, cfg.precision)
    dp = ranks.data_parallel(model, cfg.parallel)  # under torchrun: DDP or FSDP (before the optimizer); else None
    opt = engine.adamw(model.parameters(), cfg.lr)
    if ckpt is not None:  # before anything is evaluated or written: a checkpoint that does not fit is refused
        lora.check_checkpoint(ckpt[0], model, ckpt[1])  # adapters of another base or rank: refused in one line
        runs.check_training_state(ckpt[0], model, opt, ckpt[1], ckpt[2])
    print(runs.terminal_safe(f"run {out}  model {start}  reward {cfg.reward}  corpus {len(retriever.docs)} docs  "
                             f"train {len(splits['train'])} questions  device {device}{ranks.describe(cfg.parallel)}"))

    before_path = out / "eval_before.json"
    before = before if before is not None else evals.get("before")
    if before is None and resume and before_path.exists():
        before = runs.read_summary(before_path)
    if before is None:
        before = evaluate(model, tok, retriever, dev, cfg, dp)[0] if dev else {}
    ranks.on_main(runs.write_json, before_path, before)

    generator = torch.Generator().manual_seed(ranks.rank_seed(cfg.seed))  # CPU sampling; rank r: seed + r
    rng = random.Random(cfg.seed)  # the shared stream (questions, IG draws): the same on every rank
    first = runs.restore(ckpt, model, opt, dp, generator, rng, cfg.seed) if ckpt is not None else 0
    if ckpt is None and resume:
        print(runs.terminal_safe(f"{out} has no checkpoint yet: starting it from step 0" +
                                 (" (its warm-up is kept)" if cfg.warmup_steps > 0 else "")))
    if resume:
        ranks.on_main(runs.keep_metrics, out / "metrics.jsonl", first)
    train_q = splits["train"]
    with open(out / "metrics.jsonl" if ranks.is_main() else os.devnull, "a") as log:  # rank 0 writes the run
        for step in tqdm(range(first, cfg.steps), desc=f"GRPO {cfg.reward}", disable=ranks.tqdm_disable(),
                         initial=first, total=cfg.steps):
            questions = rng.sample(train_q, min(cfg.questions_per_step, len(train_q)))
            metrics, rollouts, A = train_step(model, ref_model, opt, tok, retriever, questions, cfg, generator, rng,
                                              dp=dp)
            metrics["step"] = step
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if cfg.show_every and step % cfg.show_every == 0:
                ranks.on_main(views.save_view, out, step, rollouts, A, tok)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:  # FSDP: gathered from the shards
                ranks.on_main(runs.save_checkpoint, out, step + 1, model, tok, opt, generator, rng,
                              **ranks.checkpoint_state(model, opt, dp, generator))

    if cfg.steps > first:
        ranks.on_main(lambda: print(views.flat_groups_line(runs.read_metrics(out), cfg, out)))
    del opt, ref_model  # AdamW's moments and the reference (1.3 GB for SmolLM2) are not needed by the evaluation
    runs.release_memory()
    after = evaluate(model, tok, retriever, dev, cfg, dp)[0] if dev else {}
    ranks.on_main(runs.write_json, out / "eval_after.json", after)
    if dev:
        print(f"\nGreedy evaluation on {len(dev)} {cfg.eval_split} questions, 95% bootstrap intervals"
              + (" (smoke run: random weights)" if smoke else ""))
        rows = [("before", before)] + ([("after warm-up", evals["warm-up"])] if "warm-up" in evals else [])
        views.print_evals(rows + [("after GRPO" if "warm-up" in evals else "after", after)])
    return {"before": before, "after": after, "out": str(out), **({"warm-up": evals["warm-up"]} if evals else {})}


COMMANDS = {"show": views.show_command, "plot": views.plot_command, "merge": runs.merge_command}


def main(argv=None):
    """The command line: train (or --demo), or show / plot a run. Errors end in one line (runs.cli)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    seen = {}

    def command():
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv and argv[0] in ("eval", "compare"):
            raise DataError(f"{argv[0]} is a command of experiments.py: python experiments.py {' '.join(argv)}")
        seen["cfg"], args = parse_args(argv)
        if args.demo:
            return demo.demo()
        train(seen["cfg"], resume=bool(args.resume), overwrite=args.overwrite)

    out = lambda: run_path(seen["cfg"]) if "cfg" in seen and "--demo" not in argv else None
    return runs.cli(ranks.guarded(command), lambda: runs.interrupted(out()))


if __name__ == "__main__":
    sys.exit(ranks.finish(main()))
