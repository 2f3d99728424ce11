"""igsearch: GRPO for search-augmented QA with step-level information-gain rewards.

    python igsearch.py --tiny                          # train the small preset (outcome reward)
    python igsearch.py --tiny --reward igsearch        # IG-Search: information gain on query tokens
    python igsearch.py --tiny --reward inforeasoner    # InfoReasoner: semantic information gain
    python igsearch.py --resume runs/outcome-s0 [--steps N]          # continue from the last checkpoint
    python igsearch.py eval --model runs/outcome-s0 --data tiny      # greedy EM/F1, searches, answer retrieved
    python igsearch.py show --run runs/igsearch-s0 --step 0          # tokens coloured by their advantage A[i, k]
    python igsearch.py plot --run runs/outcome-s0 runs/igsearch-s0   # training curves, overlaid
    python igsearch.py compare --tiny                                # the three rewards, same seed and data

One training step (train_step below) is the whole method: sample G rollouts per question with search,
score them, build the per-token advantage tensor A [B, T], take a PPO-clip step. METHOD.md has the math.
This file is the training script; its plumbing lives beside it: runs.py (model loading, checkpoints, the
metrics files), views.py (show, plot, tables) and demo.py (--demo).
"""
import argparse
import copy
import dataclasses
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import demo
import grpo
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
    reward: str = "outcome"           # outcome | igsearch | inforeasoner
    out: str = ""                     # run directory (default runs/<reward>-s<seed>)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"           # auto | bf16 | fp32: the forward matmuls (weights, optimizer, loss stay fp32)
    # rollouts (METHOD §1)
    steps: int = 200
    questions_per_step: int = 8
    group_size: int = 5               # G
    temperature: float = 1.0
    max_turns: int = 4
    topk: int = 3
    max_turn_tokens: int = 256
    max_response_tokens: int = 1536   # all tokens after the prompt, observations included
    # format warm-up (METHOD §6, our addition): supervised steps on oracle trajectories before GRPO
    warmup_steps: int = 0             # 0 = off
    warmup_batch: int = 8             # oracle trajectories per step (train questions only)
    warmup_lr: float = 1e-4
    # GRPO (METHOD §3)
    lr: float = 1e-6
    beta_kl: float = 0.001
    clip_eps: float = 0.2
    ppo_epochs: int = 1               # μ
    loss_agg: str = "token-mean"      # token-mean | seq-mean-token-mean
    grad_clip: float = 1.0
    micro_batch: int = 4              # sequences per forward/backward (gradient accumulation)
    # evaluation
    eval_questions: int = 64
    eval_batch: int = 16
    # runs: checkpoints and views
    save_every: int = 1               # write a checkpoint after every N steps (and after the last one)
    show_every: int = 10              # save the step's rollouts + A and views/step_N.html every N steps (0 = never)
    # IG-Search (METHOD §4)
    ig_alpha: float = 0.5
    ig_delta: float = 0.05
    ig_rho: float = 0.5
    ig_clip: float = 2.0
    ig_samples: int = 3               # N counterfactual blocks per step
    ig_baseline: str = "batch"        # batch | corpus
    ig_head_tokens: int = 3
    ig_head_weight: float = 3.0
    ig_max_context: int = 2048
    # InfoReasoner (METHOD §5)
    ir_samples: int = 10              # K
    ir_temperature: float = 1.0
    ir_max_tokens: int = 32
    ir_estimator: str = "prob"        # prob | log | entropy
    ir_lambda: float = 0.6
    nli_model: str = ""


# --tiny: the real offline model (SmolLM2-135M where the default is not cached), a short format warm-up, then a
# few GRPO steps, evaluated before and after on 50 dev questions: minutes on a laptop GPU, about 15 on a 2-core
# CPU. --preset cpu: the learning experiment of `compare --preset cpu` (README, "Learning"), hours there.
PRESETS = {
    "tiny": dict(steps=4, questions_per_step=2, group_size=4, max_turns=2, topk=3, max_turn_tokens=64,
                 max_response_tokens=1024, lr=1e-5, eval_questions=50, eval_batch=25, micro_batch=2, show_every=1,
                 warmup_steps=8, warmup_batch=4),
    "cpu": dict(steps=10, questions_per_step=4, group_size=4, max_turns=2, topk=3, max_turn_tokens=64,
                max_response_tokens=1024, lr=1e-5, eval_questions=200, eval_batch=25, micro_batch=2, show_every=4,
                warmup_steps=12, warmup_batch=8),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the small preset (--preset tiny): " + json.dumps(PRESETS["tiny"]))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of settings (flags given beside it override them): "
                        + "; ".join(f"{k}: {json.dumps(v)}" for k, v in PRESETS.items()))
    p.add_argument("--demo", action="store_true", help="the IG-Search credit-assignment demo (CPU, seconds)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the run in DIR from its last complete checkpoint (its config.json, "
                        "overridden by any flags given here, e.g. --steps)")
    for f in dataclasses.fields(Config):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        if kind is bool:  # a switch: absent leaves the preset's value, present turns it on
            p.add_argument(flag, action="store_true", default=None, help=f"(default {f.default!r})")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"(default {f.default!r})")
    args = p.parse_args(argv)
    cfg = Config()
    if args.resume:
        cfg = run_config(args.resume)
        cfg = dataclasses.replace(cfg, out=args.resume)
    elif args.tiny or args.preset:
        cfg = dataclasses.replace(cfg, **PRESETS[args.preset or "tiny"])
    explicit = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(cfg, **explicit)
    check_config(cfg)
    return cfg, args


def check_config(cfg):
    """Refuse settings that cannot work, in one line each."""
    choices = {"reward": ("outcome", "igsearch", "inforeasoner"), "loss_agg": ("token-mean", "seq-mean-token-mean"),
               "ig_baseline": ("batch", "corpus"), "ir_estimator": ("prob", "log", "entropy"),
               "precision": ("auto", "bf16", "fp32")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise DataError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if cfg.group_size < 2:
        raise DataError("--group-size must be at least 2: GRPO compares rollouts within a group")
    for name in ("steps", "questions_per_step", "micro_batch", "topk", "max_turn_tokens", "ppo_epochs", "save_every",
                 "show_every", "ig_samples", "ig_max_context", "warmup_steps", "warmup_batch"):
        if getattr(cfg, name) < (0 if name in ("steps", "show_every", "warmup_steps") else 1):
            raise DataError(f"--{name.replace('_', '-')} must be positive")


def run_config(run_dir):
    """The Config saved in RUN/config.json (keys this version does not know are ignored)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in runs.saved_config(run_dir).items() if k in known})


# ----------------------------------------------------------------------------------------------------
# Data

def load_corpus(spec):
    if spec == "vital":
        return retrieve.load_vital_articles()
    kind, _, path = spec.partition(":")
    if kind == "hotpotqa" and path:
        return retrieve.load_hotpotqa(path)[0]
    if kind == "jsonl" and path:
        return retrieve.load_jsonl_corpus(path)
    raise DataError(f"--corpus {spec!r}: use vital, hotpotqa:PATH or jsonl:PATH")


def load_data(spec, docs, seed):
    """Questions as {split: [question, ...]}; a file without splits is cut 80/10/10 by a seeded shuffle."""
    if spec == "tiny":
        from data.prepare import load_tiny_qa
        return load_tiny_qa(seed=0)  # the question set is fixed; the run's seed only drives sampling
    kind, _, path = spec.partition(":")
    questions = retrieve.load_hotpotqa(path)[1] if kind == "hotpotqa" and path else retrieve.load_questions(spec)
    if not questions:
        raise DataError(f"--data {spec}: no questions found")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    n = len(order)
    cut = {"train": order[: int(0.8 * n)], "dev": order[int(0.8 * n): int(0.9 * n)], "test": order[int(0.9 * n):]}
    return {s: [questions[i] for i in ix] for s, ix in cut.items()}


# ----------------------------------------------------------------------------------------------------
# Rewards of a batch of rollouts

def score_outcome(rollouts):
    """METHOD §2: EM and F1 of each rollout's answer (a truncated rollout has no answer)."""
    em = [rewards.exact_match(r.answer, r.question["golden_answers"]) for r in rollouts]
    f1 = [rewards.f1_score(r.answer, r.question["golden_answers"]) for r in rollouts]
    return em, f1


def rollout_kwargs(cfg, temperature, generator):
    return dict(max_turns=cfg.max_turns, topk=cfg.topk, max_turn_tokens=cfg.max_turn_tokens,
                max_response_tokens=cfg.max_response_tokens, temperature=temperature, generator=generator)


# ----------------------------------------------------------------------------------------------------
# One training step

def train_step(model, ref_model, opt, tok, retriever, questions, cfg, generator, rng, rollouts=None):
    """Rollouts -> rewards -> per-token advantages A [B, T] -> PPO-clip update. Returns (metrics, rollouts, A).
    `rollouts` skips sampling and learns from those (the step benchmark gives every variant the same ones)."""
    times = {"retrieval": 0.0, "rollout": 0.0}
    fast = lambda: grpo.autocast(cfg.precision, next(model.parameters()).device)  # bf16 forwards where native
    if rollouts is None:
        G = cfg.group_size
        batch_q = [q for q in questions for _ in range(G)]
        groups = [i for i in range(len(questions)) for _ in range(G)]  # a group = one question of this batch
        t = time.perf_counter()
        retriever.seconds = 0.0
        with fast():
            rollouts = grpo.generate_rollouts(model, tok, batch_q, groups, retriever,
                                              **rollout_kwargs(cfg, cfg.temperature, generator))
        times["retrieval"] = retriever.seconds
        times["rollout"] = time.perf_counter() - t - times["retrieval"]
    groups = [r.group for r in rollouts]

    t = time.perf_counter()
    em, f1 = score_outcome(rollouts)
    R, extra = list(em), {}
    if cfg.reward == "igsearch":
        scorer = lambda prefix: rewards.gold_scorer(model, prefix, cfg.ig_head_tokens, cfg.ig_head_weight,
                                                    cfg.micro_batch)
        with fast():
            ig, details = rewards.igsearch_information_gain(scorer, tok, rollouts, retriever, cfg.ig_samples,
                                                            cfg.ig_baseline, rng, cfg.ig_max_context)
        extra = ig_metrics(details)
        for r, gains in zip(rollouts, ig):  # kept on the rollout for the per-token view
            for s, g in zip(r.searches, gains):
                s["ig"] = float(g)
    elif cfg.reward == "inforeasoner":
        ir_model = ref_model if ref_model is not None else model
        with fast():
            ig, extra = rewards.inforeasoner_information_gain(ir_model, tok, rollouts, cfg, generator)
        R = [e + cfg.ir_lambda * g for e, g in zip(em, ig)]  # METHOD §5.4
    for r, x in zip(rollouts, R):
        r.reward = x
    times["scoring"] = time.perf_counter() - t

    t = time.perf_counter()
    adv = grpo.group_advantages(R, groups)                                     # [B]      METHOD §3.1
    batch = grpo.collate(rollouts, tok.pad_token_id)
    A = grpo.token_advantages(adv, batch.roles)                                # [B, T]   METHOD §3.2
    if cfg.reward == "igsearch":
        A = grpo.add_query_bonus(A, rollouts, ig, cfg.ig_alpha, cfg.ig_delta, cfg.ig_rho, cfg.ig_clip)  # §4.3
    stats = update_policy(model, ref_model, opt, batch, A, cfg)
    times["update"] = time.perf_counter() - t

    n_resp = [len(r.ids) - r.roles.count(grpo.PROMPT) for r in rollouts]
    metrics = {
        "reward": float(np.mean(R)), "em": float(np.mean(em)), "f1": float(np.mean(f1)),
        "searches": float(np.mean([len(r.searches) for r in rollouts])),
        "response_len": float(np.mean(n_resp)), "policy_tokens": float(np.mean([r.n_policy for r in rollouts])),
        "answered": float(np.mean([r.answer is not None for r in rollouts])),
        "truncated": float(np.mean([r.truncated for r in rollouts])),
        "zero_adv_groups": int(sum(bool(torch.all(adv[torch.tensor(groups) == g] == 0)) for g in set(groups))),
        **stats, **extra, **{f"time_{k}": round(v, 3) for k, v in times.items()},
    }
    return metrics, rollouts, A


def ig_metrics(details):
    """IG-Search's step statistics for the JSONL line (zeros when no rollout searched)."""
    if not details:
        return {"ig_mean": 0.0, "ig_std": 0.0, "ig_min": 0.0, "ig_max": 0.0, "ig_frac_positive": 0.0,
                "ig_real": 0.0, "ig_baseline": 0.0, "ig_steps": 0}
    ig = np.array([d["ig"] for d in details])
    return {"ig_mean": float(ig.mean()), "ig_std": float(ig.std()), "ig_min": float(ig.min()),
            "ig_max": float(ig.max()), "ig_frac_positive": float((ig > 0).mean()),
            "ig_real": float(np.mean([d["real"] for d in details])),
            "ig_baseline": float(np.mean([d["baseline"] for d in details])), "ig_steps": len(details)}


def update_policy(model, ref_model, opt, batch, A, cfg):
    """μ epochs of PPO-clip over the batch, each one optimizer step accumulated over micro-batches."""
    device = next(model.parameters()).device
    ids, attn, mask, A = batch.ids.to(device), batch.attention_mask.to(device), batch.policy_mask.to(device), A.to(device)
    mb = cfg.micro_batch
    fast = lambda: grpo.autocast(cfg.precision, device)  # bf16 forwards; log-softmax, loss and weights fp32
    with torch.no_grad(), fast():
        ref = (grpo.token_logprobs(ref_model, ids, attn, mask, mb) if cfg.beta_kl > 0 else torch.zeros_like(A))
        # with one epoch the sampling policy is the current one, so old = current (detached, below)
        old = grpo.token_logprobs(model, ids, attn, mask, mb) if cfg.ppo_epochs > 1 else None
    norm = mask.sum().clamp(min=1) if cfg.loss_agg == "token-mean" else ids.shape[0]
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.ppo_epochs):
        opt.zero_grad(set_to_none=True)
        for s in range(0, ids.shape[0], mb):
            sl = slice(s, s + mb)
            with fast():
                logp = grpo.token_logprobs(model, ids[sl], attn[sl], mask[sl], mb)
            logp_old = old[sl] if old is not None else logp.detach()
            loss, st = grpo.grpo_loss(logp, logp_old, ref[sl], A[sl], mask[sl], cfg.clip_eps, cfg.beta_kl,
                                      cfg.loss_agg, norm)
            loss.backward()
            w = st["n_tokens"] / float(mask.sum().clamp(min=1))  # token-weighted mean of the micro-batch stats
            totals["loss"] += loss.item() / cfg.ppo_epochs
            totals["kl"] += st["kl"] * w / cfg.ppo_epochs
            totals["clip_frac"] += st["clip_frac"] * w / cfg.ppo_epochs
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        totals["grad_norm"] += float(gn) / cfg.ppo_epochs
        opt.step()
    return totals


# ----------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, tok, retriever, questions, cfg):
    """Greedy rollouts -> (summary, rollouts). The summary holds EM, F1, answered-in-format and searches per
    question, each with a 95% bootstrap interval, for all questions and, where they say, by hops."""
    from tqdm import tqdm
    rollouts = []
    for s in tqdm(range(0, len(questions), cfg.eval_batch), desc=f"eval {len(questions)} questions", disable=None,
                  leave=False):
        qs = questions[s:s + cfg.eval_batch]
        with grpo.autocast(cfg.precision, next(model.parameters()).device):
            rollouts += grpo.generate_rollouts(model, tok, qs, list(range(len(qs))), retriever,
                                               **rollout_kwargs(cfg, 0.0, None))
    summary = summarize(rollouts)
    hops = sorted({r.question["hops"] for r in rollouts if "hops" in r.question})
    if len(hops) > 1:
        summary["by_hops"] = {h: summarize([r for r in rollouts if r.question.get("hops") == h]) for h in hops}
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

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg):
    """The seeded process, the device, the retriever over the corpus, the QA splits and the dev questions."""
    seed_everything(cfg.seed)
    device = runs.pick_device(cfg.device)
    docs = load_corpus(cfg.corpus)
    retriever = retrieve.Retriever(docs, stopwords=cfg.stopwords)
    splits = load_data(cfg.data, docs, cfg.seed)
    if not splits.get("train"):
        raise DataError(f"--data {cfg.data}: the train split is empty")
    return device, retriever, splits, splits.get("dev", [])[: cfg.eval_questions]


def train(cfg, resume=False, before=None):
    """GRPO for cfg.steps steps, after the format warm-up when cfg.warmup_steps > 0; with resume=True, continue
    the run in cfg.out from its last checkpoint. `before`: the evaluation of the starting model when the caller
    has it already (compare starts every run from one warm-up)."""
    from tqdm import tqdm
    device, retriever, splits, dev = setup(cfg)
    out = Path(cfg.out or f"runs/{cfg.reward}-s{cfg.seed}")
    ckpt = runs.last_checkpoint(out) if resume else None  # read before anything is loaded: a bad run fails fast
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run in an old directory: never mix its files with the old run's
        if (out / "ckpt").exists():
            print(f"replacing the previous run in {out} (--resume {out} continues it; --out DIR keeps both)")
        for f in ("metrics.jsonl", "eval_before.json", "eval_after.json"):
            (out / f).unlink(missing_ok=True)
        for d in ("ckpt", "views", "warmup"):
            shutil.rmtree(out / d, ignore_errors=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    start, evals = cfg.model, {}
    if cfg.warmup_steps > 0:  # METHOD §6: RL starts from the warmed-up model, and so does the reference
        start, evals = warm_start(cfg, out, retriever, splits, dev, device)
    model, tok, smoke = runs.load_model(start, device, cfg.seed)
    smoke = smoke or evals.get("smoke", False)
    ref_model = None
    if cfg.beta_kl > 0 or cfg.reward == "inforeasoner":  # frozen copy of the initial policy
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    print(f"run {out}  model {start}  reward {cfg.reward}  corpus {len(retriever.docs)} docs  "
          f"train {len(splits['train'])} questions  device {device}")

    before_path = out / "eval_before.json"
    before = before if before is not None else evals.get("before")
    if before is None and resume and before_path.exists():
        before = json.loads(before_path.read_text())
    if before is None:
        before = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
    before_path.write_text(json.dumps(before))

    generator = torch.Generator().manual_seed(cfg.seed)  # sampling runs on CPU tensors: same seed, same tokens
    rng = random.Random(cfg.seed)
    first = 0
    if ckpt is not None:
        path, weights, opt_state, state = ckpt
        runs.load_weights(model, weights)
        opt.load_state_dict(opt_state)
        runs.set_rng_states(state["rng"], generator, rng)
        first = state["step"]
        runs.keep_metrics(out / "metrics.jsonl", first)
        print(f"resuming from {path} ({first} steps done)")
    train_q = splits["train"]
    with open(out / "metrics.jsonl", "a") as log:
        for step in tqdm(range(first, cfg.steps), desc=f"GRPO {cfg.reward}", disable=None,
                         initial=first, total=cfg.steps):
            questions = rng.sample(train_q, min(cfg.questions_per_step, len(train_q)))
            metrics, rollouts, A = train_step(model, ref_model, opt, tok, retriever, questions, cfg, generator, rng)
            metrics["step"] = step
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if cfg.show_every and step % cfg.show_every == 0:
                views.save_view(out, step, rollouts, A, tok)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                runs.save_checkpoint(out, step + 1, model, tok, opt, generator, rng)

    after = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
    (out / "eval_after.json").write_text(json.dumps(after))
    if dev:
        print(f"\nGreedy evaluation on {len(dev)} dev questions, 95% bootstrap intervals"
              + (" (smoke run: random weights)" if smoke else ""))
        rows = [("before", before)] + ([("after warm-up", evals["warm-up"])] if "warm-up" in evals else [])
        views.print_evals(rows + [("after GRPO" if "warm-up" in evals else "after", after)])
    return {"before": before, "after": after, "out": str(out), **({"warm-up": evals["warm-up"]} if evals else {})}


def warm_start(cfg, out, retriever, splits, dev, device, eval_before=True):
    """METHOD §6, once per run directory: evaluate the model as loaded ("before"), warm it up for
    cfg.warmup_steps steps on oracle trajectories of the train split (never dev or test), save it with
    save_pretrained to OUT/warmup/model and evaluate it again ("warm-up"). A run that finds OUT/warmup/done.json
    starts from the saved model. eval_before=False skips the first evaluation (compare: a model that does not
    follow the format rambles to every token limit, and the warm-up's own row says where RL starts).
    Returns (the model directory, {"before", "warm-up", "smoke"}); "before" is {} when skipped."""
    wdir = out / "warmup"
    done = wdir / "done.json"
    if not done.is_file():
        model, tok, smoke = runs.load_model(cfg.model, device, cfg.seed)
        before = evaluate(model, tok, retriever, dev, cfg)[0] if dev and eval_before else {}
        print(f"format warm-up: {cfg.warmup_steps} steps of {cfg.warmup_batch} oracle trajectories (METHOD §6)")
        losses = warmup.warmup(model, tok, retriever, splits["train"], cfg, random.Random(cfg.seed))
        runs.save_model(model, tok, wdir / "model")
        after = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
        done.write_text(json.dumps({"before": before, "warm-up": after, "losses": losses, "smoke": smoke,
                                    "from": cfg.model}))
    info = json.loads(done.read_text())
    return str(wdir / "model"), {k: info[k] for k in ("before", "warm-up", "smoke")}


# ----------------------------------------------------------------------------------------------------
# python igsearch.py eval --model PATH_OR_RUN --data FILE[,FILE...]

def eval_command(argv):
    p = argparse.ArgumentParser(prog="igsearch.py eval", description="Greedy evaluation of a model or a run's "
                                "last checkpoint: EM, F1, searches, answer retrieved; predictions as JSONL")
    p.add_argument("--model", required=True, help="hub id, model directory, .gguf, tiny-random, or a run directory")
    p.add_argument("--data", default=None, help="comma-separated: tiny | hotpotqa:PATH | FlashRAG JSONL "
                   "(default: the run's --data, else tiny)")
    p.add_argument("--corpus", default=None, help="vital | hotpotqa:PATH | jsonl:PATH (default: the run's, else vital)")
    p.add_argument("--out", default=None, help="predictions JSONL (default RUN/eval.jsonl for a run, else eval.jsonl)")
    p.add_argument("--limit", type=int, default=0, help="at most this many questions per dataset (0 = all)")
    for name in ("max_turns", "topk", "max_turn_tokens", "max_response_tokens", "eval_batch", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    model_path = Path(args.model)
    is_run = (model_path / "ckpt").is_dir() or ((model_path / "config.json").is_file() and
                                                 (model_path / "metrics.jsonl").exists())
    cfg = run_config(model_path) if is_run else Config()
    explicit = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(Config)} and v is not None}
    cfg = dataclasses.replace(cfg, **explicit)
    if not is_run:
        cfg = dataclasses.replace(cfg, model=args.model)
    data = args.data or (cfg.data if is_run else "tiny")
    sets = runs.eval_sets(data)
    docs = load_corpus(cfg.corpus)
    retriever = retrieve.Retriever(docs, stopwords=cfg.stopwords)
    name = str(runs.latest_model_dir(model_path)) if is_run else cfg.model
    seed_everything(cfg.seed)
    model, tok, smoke = runs.load_model(name, runs.pick_device(cfg.device), cfg.seed)
    out = Path(args.out or (model_path / "eval.jsonl" if is_run else "eval.jsonl"))
    rows = []
    with open(out, "w") as f:
        for set_name, questions in sets:
            questions = questions[: args.limit] if args.limit > 0 else questions
            summary, rollouts = evaluate(model, tok, retriever, questions, cfg)
            records = [runs.prediction_record(set_name, r) for r in rollouts]
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            rows.append({"dataset": set_name, "n": len(records), "em": summary["em"], "f1": summary["f1"],
                         "searches": summary["searches"],
                         "answer_retrieved": float(np.mean([rec["answer_retrieved"] for rec in records]))})
    print(f"Greedy evaluation of {name}" + (" (smoke run: random weights)" if smoke else ""))
    views.print_table(rows, ["dataset", "n", "em", "f1", "searches", "answer_retrieved"])
    print(f"predictions: {out}")
    return rows


# ----------------------------------------------------------------------------------------------------
# python igsearch.py compare --tiny: the three rewards from the same seed and data, one table

REWARDS = ("outcome", "igsearch", "inforeasoner")


def compare_command(argv):
    """Train outcome, igsearch and inforeasoner with the same flags (parse_args's; --out is the parent
    directory), the same data and steps, for each of --seeds, all from one starting model: with
    --warmup-steps, one format warm-up (ROOT/warmup) that every run starts from. Each run is evaluated greedily
    on the same dev questions. Prints and writes (ROOT/compare.json, ROOT/compare.md) EM, F1, answered and
    searches with 95% intervals, by hops, and the mean information gain; plots ROOT/curves.png.
    Resumable: a finished run is read back, a cut one resumes from its checkpoint."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    extra, argv = pre.parse_known_args(argv)
    cfg, args = parse_args(argv)
    if args.resume or args.demo:
        raise DataError("compare takes training flags only (no --resume, --demo)")
    try:
        seeds = [int(s) for s in extra.seeds.split(",")] if extra.seeds else [cfg.seed]
    except ValueError:
        raise DataError(f"--seeds {extra.seeds!r}: give comma-separated integers, e.g. --seeds 0,1") from None
    root = Path(cfg.out or f"runs/compare-{args.preset or ('tiny' if args.tiny else 's' + str(cfg.seed))}")
    root.mkdir(parents=True, exist_ok=True)
    start, evals = cfg.model, {}
    if cfg.warmup_steps > 0:  # one warm-up, shared: every run starts from the same weights
        device, retriever, splits, dev = setup(cfg)
        start, evals = warm_start(cfg, root, retriever, splits, dev, device, eval_before=False)
    run_dirs, results = [], {}
    for seed in seeds:
        for reward in REWARDS:
            run = root / f"{reward}-s{seed}"
            rcfg = dataclasses.replace(cfg, reward=reward, seed=seed, model=start, warmup_steps=0, out=str(run))
            run_dirs.append(run)
            if (run / "eval_after.json").is_file() and runs.read_metrics(run) and \
                    json.loads((run / "config.json").read_text()) == dataclasses.asdict(rcfg):
                print(f"\n=== {run.name}: done, read back ===")
                results[run] = {"before": json.loads((run / "eval_before.json").read_text()),
                                "after": json.loads((run / "eval_after.json").read_text())}
                continue
            print(f"\n=== {run.name} ===")
            results[run] = train(rcfg, resume=bool(runs.checkpoints(run)), before=evals.get("warm-up"))
    rows = views.compare_rows(run_dirs, results, evals)
    title = (f"Same data ({cfg.data}), {cfg.steps} GRPO steps of {cfg.questions_per_step} questions x G = "
             f"{cfg.group_size}, seeds {seeds}; greedy evaluation on {cfg.eval_questions} dev questions at most, "
             "mean [95% bootstrap interval]")
    print("\n" + title)
    table = views.markdown_table(rows)
    print(table)
    (root / "compare.json").write_text(json.dumps(rows, indent=1))
    (root / "compare.md").write_text(f"{title}\n\n{table}\n")
    try:
        print(f"curves: {views.plot_runs(run_dirs, root / 'curves.png')}")
    except DataError as e:  # matplotlib is optional; the table stands on its own
        print(f"no curves: {e}")
    return rows


COMMANDS = {"eval": eval_command, "show": views.show_command, "plot": views.plot_command, "compare": compare_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
            return 0
        cfg, args = parse_args(argv)
        if args.demo:
            demo.demo()
        else:
            train(cfg, resume=bool(args.resume))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
