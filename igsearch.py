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
import math
import os
import random
import re
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
    clip_ratio_c: float = 0.0         # verl's dual clip: the loss of a token with A < 0 is capped at -A * c (> 1; 0 = off)
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
    p = runs.ArgParser(prog="igsearch.py", description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    for f in dataclasses.fields(Config):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        if kind is bool:  # a switch: absent leaves the preset's value, present turns it on
            p.add_argument(flag, action="store_true", default=None, help=f"(default {f.default!r})")
        else:
            p.add_argument(flag, type=kind, default=None, help=f"(default {f.default!r})")
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
    check_config(cfg, source, explicit)
    return cfg, args


CHOICES = {"reward": ("outcome", "igsearch", "inforeasoner"), "loss_agg": ("token-mean", "seq-mean-token-mean"),
           "ig_baseline": ("batch", "corpus"), "ir_estimator": ("prob", "log", "entropy"),
           "precision": ("auto", "bf16", "fp32")}
# the smallest value of each integer setting
MIN_INT = {"steps": 0, "questions_per_step": 1, "group_size": 2, "max_turns": 1, "topk": 1, "max_turn_tokens": 1,
           "max_response_tokens": 1, "warmup_steps": 0, "warmup_batch": 1, "ppo_epochs": 1, "micro_batch": 1,
           "eval_questions": 0, "eval_batch": 1, "save_every": 1, "show_every": 0, "ig_samples": 1,
           "ig_head_tokens": 0, "ig_max_context": 1, "ir_samples": 1, "ir_max_tokens": 1, "seed": 0}
# each float setting: (lowest value, whether the lowest value itself is allowed); all must be finite
MIN_FLOAT = {"temperature": (0, False), "ir_temperature": (0, True), "warmup_lr": (0, True), "lr": (0, True),
             "beta_kl": (0, True), "clip_eps": (0, False), "clip_ratio_c": (0, True), "grad_clip": (0, False),
             "ig_alpha": (0, True), "ig_delta": (0, True), "ig_rho": (0, True), "ig_clip": (0, False),
             "ig_head_weight": (0, False), "ir_lambda": (0, True)}
WHY = {"group_size": "GRPO compares rollouts within a group",
       "temperature": "0 samples greedily, so every rollout of a group is the same and GRPO learns nothing",
       "seed": "numpy takes seeds from 0 to 2**32 - 1"}


def setting_error(name, value, what):
    """A DataError about one setting, naming its flag; `.field` tells check_config's caller which one."""
    e = DataError(f"--{name.replace('_', '-')} {value!r}: {what}")
    e.field, e.what = name, what
    return e


def check_config(cfg, source=None, explicit=(), model=True):
    """Refuse settings that cannot work, in one line each: a value of the wrong type (a hand-edited
    config.json), out of range or not finite, a device this machine does not have, a --model path that is
    not there (model=False skips that: eval of a run loads the run's checkpoint). A value that came from
    `source` (a run's config.json; not among the `explicit` flags) is reported as that file's."""
    try:
        _check_config(cfg, model)
    except DataError as e:
        name = getattr(e, "field", None)
        if source is None or name is None or name in explicit:
            raise
        raise DataError(f"{source}: {name} = {getattr(cfg, name)!r} cannot be used ({e.what}); "
                        f"fix the file or override it with --{name.replace('_', '-')}") from None


TYPES = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}


def _check_config(cfg, model):
    for f in dataclasses.fields(Config):
        v, kind = getattr(cfg, f.name), type(f.default)
        if not (type(v) is kind or (kind is float and type(v) is int)):  # True is an int to Python: not here
            raise setting_error(f.name, v, f"must be {TYPES[kind]}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise setting_error(name, getattr(cfg, name), f"is not one of {', '.join(allowed)}")
    for name, lowest in MIN_INT.items():
        if getattr(cfg, name) < lowest:
            raise setting_error(name, getattr(cfg, name), f"must be at least {lowest}" +
                                (f" ({WHY[name]})" if name in WHY else ""))
    for name, (lowest, inclusive) in MIN_FLOAT.items():
        v = getattr(cfg, name)
        if not math.isfinite(v) or v < lowest or (v == lowest and not inclusive):
            raise setting_error(name, v, f"must be a finite number {'≥' if inclusive else '>'} {lowest}" +
                                (f" ({WHY[name]})" if name in WHY else ""))
    if cfg.seed >= 2 ** 32:
        raise setting_error("seed", cfg.seed, f"must be below 2**32 ({WHY['seed']})")
    if cfg.clip_eps >= 1:
        raise setting_error("clip_eps", cfg.clip_eps, "must be below 1 (the ratio is clipped to [1 - eps, 1 + eps])")
    if 0 < cfg.clip_ratio_c <= 1:
        raise setting_error("clip_ratio_c", cfg.clip_ratio_c, "must be 0 (off) or above 1 (verl's dual clip: "
                            "the loss of a token with A < 0 is capped at -A * c)")
    for name in ("data", "corpus"):
        if not getattr(cfg, name).strip():
            raise setting_error(name, getattr(cfg, name), "is empty")
    checks = {"device": runs.pick_device, **({"model": runs.check_model_name} if model else {})}
    for name, check in checks.items():
        try:
            check(getattr(cfg, name))
        except DataError as e:
            e.field, e.what = name, str(e).split(": ", 1)[-1]
            raise


def run_config(run_dir):
    """The Config saved in RUN/config.json (keys this version does not know are ignored: a run of another
    version still loads; check_config then checks the values)."""
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
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "dual_clip_frac": 0.0, "grad_norm": 0.0}
    for _ in range(cfg.ppo_epochs):
        opt.zero_grad(set_to_none=True)
        for s in range(0, ids.shape[0], mb):
            sl = slice(s, s + mb)
            with fast():
                logp = grpo.token_logprobs(model, ids[sl], attn[sl], mask[sl], mb)
            logp_old = old[sl] if old is not None else logp.detach()
            loss, st = grpo.grpo_loss(logp, logp_old, ref[sl], A[sl], mask[sl], cfg.clip_eps, cfg.beta_kl,
                                      cfg.loss_agg, norm, cfg.clip_ratio_c)
            loss.backward()
            w = st["n_tokens"] / float(mask.sum().clamp(min=1))  # token-weighted mean of the micro-batch stats
            totals["loss"] += loss.item() / cfg.ppo_epochs
            for k in ("kl", "clip_frac", "dual_clip_frac"):
                totals[k] += st[k] * w / cfg.ppo_epochs
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


def run_path(cfg):
    return Path(cfg.out or f"runs/{cfg.reward}-s{cfg.seed}")


def train(cfg, resume=False, before=None, overwrite=False):
    """GRPO for cfg.steps steps, after the format warm-up when cfg.warmup_steps > 0; with resume=True, continue
    the run in cfg.out from its last checkpoint (from step 0 if it was cut before its first one). `before`: the
    evaluation of the starting model when the caller has it already (compare starts every run from one
    warm-up). A fresh run refuses a directory that holds a run unless overwrite=True, and a directory that
    is not a run and not empty always (runs.claim_run_dir)."""
    out = run_path(cfg)
    runs.claim_run_dir(out, resume, overwrite)   # refused before anything is read or written
    device, retriever, splits, dev = setup(cfg)  # data errors come before any model is loaded
    with runs.locked(out):                        # one process writes a run directory
        runs.claim_run_dir(out, resume, overwrite)  # again, under the lock
        ckpt = runs.last_checkpoint(out) if resume else None  # read before any model: a bad run fails fast
        if resume and (out / "metrics.jsonl").exists():
            runs.read_metrics(out)
        if not resume:
            runs.clear_run(out)  # an old run's files (with --overwrite): never mixed with this run's
        runs.write_json(out / "config.json", dataclasses.asdict(cfg), indent=2)
        return _train(cfg, out, ckpt, resume, before, device, retriever, splits, dev)


def _train(cfg, out, ckpt, resume, before, device, retriever, splits, dev):
    from tqdm import tqdm
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
        before = runs.read_json(before_path, "an evaluation summary")
    if before is None:
        before = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
    runs.write_json(before_path, before)

    generator = torch.Generator().manual_seed(cfg.seed)  # sampling runs on CPU tensors: same seed, same tokens
    rng = random.Random(cfg.seed)
    first = 0
    if ckpt is not None:
        path, weights, opt_state, state = ckpt
        runs.load_weights(model, weights)
        try:
            opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}/optimizer.pt does not fit this model's optimizer ({e}); --overwrite starts "
                            "the run again") from None
        runs.set_rng_states(state["rng"], generator, rng)
        first = state["step"]
        print(f"resuming from {path} ({first} steps done)")
    elif resume:
        print(f"{out} has no checkpoint yet: starting it from step 0" +
              (" (its warm-up is kept)" if cfg.warmup_steps > 0 else ""))
    if resume:
        runs.keep_metrics(out / "metrics.jsonl", first)
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
    runs.write_json(out / "eval_after.json", after)
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
        runs.write_json(done, {"before": before, "warm-up": after, "losses": losses, "smoke": smoke, "from": cfg.model})
    info = runs.read_json(done, "the warm-up's summary")
    if not (isinstance(info.get("before"), dict) and isinstance(info.get("warm-up"), dict)
            and isinstance(info.get("smoke"), bool)):
        raise DataError(f"{done}: not the summary this program writes; delete {wdir} to warm up again")
    if info.get("from") != cfg.model:  # a warm-up of another model must not start this run
        raise DataError(f"{done}: that warm-up started from {info.get('from')!r}, not from --model {cfg.model}; "
                        f"use another --out, or delete {wdir} to warm up again")
    return str(wdir / "model"), {k: info[k] for k in ("before", "warm-up", "smoke")}


# ----------------------------------------------------------------------------------------------------
# python igsearch.py eval --model PATH_OR_RUN --data FILE[,FILE...]

def eval_command(argv):
    p = runs.ArgParser(prog="igsearch.py eval", description="Greedy evaluation of a model or a run's "
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
    if args.limit < 0:
        raise DataError(f"--limit {args.limit}: must be 0 (every question) or more")

    model_path = Path(args.model)
    is_run = (model_path / "ckpt").is_dir() or ((model_path / "config.json").is_file() and
                                                 (model_path / "metrics.jsonl").exists())
    if not is_run:
        check_run_typo(model_path)
    cfg = run_config(model_path) if is_run else Config()
    explicit = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(Config)} and v is not None}
    cfg = dataclasses.replace(cfg, **explicit)
    if not is_run:
        cfg = dataclasses.replace(cfg, model=args.model)
    check_config(cfg, model_path / "config.json" if is_run else None, explicit, model=not is_run)
    data = args.data or (cfg.data if is_run else "tiny")
    out = runs.output_file(args.out or (model_path / "eval.jsonl" if is_run else "eval.jsonl"), "--out", "predictions")
    inputs = [part.split(":", 1)[-1] for part in (*data.split(","), cfg.corpus)]
    if any(Path(i.strip()).resolve() == out.resolve() for i in inputs if i.strip()):
        raise DataError(f"--out {out}: that is an input file of this evaluation; choose another --out")
    sets = runs.eval_sets(data)                      # data errors come before any model is loaded
    docs = load_corpus(cfg.corpus)
    retriever = retrieve.Retriever(docs, stopwords=cfg.stopwords)
    seed_everything(cfg.seed)
    device = runs.pick_device(cfg.device)
    if is_run:  # the newest checkpoint that loads; a damaged one is reported and the previous one used
        model, tok, smoke, name = runs.load_run_model(model_path, device, cfg.seed)
    else:
        (model, tok, smoke), name = runs.load_model(cfg.model, device, cfg.seed), cfg.model
    rows = []
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # renamed at the end: an interrupted eval leaves no half file
    try:
        with open(tmp, "w") as f:
            for set_name, questions in sets:
                questions = questions[: args.limit] if args.limit > 0 else questions
                summary, rollouts = evaluate(model, tok, retriever, questions, cfg)
                records = [runs.prediction_record(set_name, r) for r in rollouts]
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
                rows.append({"dataset": set_name, "n": len(records), "em": summary["em"], "f1": summary["f1"],
                             "searches": summary["searches"],
                             "answer_retrieved": float(np.mean([rec["answer_retrieved"] for rec in records]))})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"Greedy evaluation of {name}" + (" (smoke run: random weights)" if smoke else ""))
    views.print_table(rows, ["dataset", "n", "em", "f1", "searches", "answer_retrieved"])
    print(f"predictions: {out}")
    return rows


def check_run_typo(path):
    """eval --model runs/outcme-s0: a path beside other runs that is not there is a typo, never a hub id."""
    parent = path.parent
    if path.exists() or parent == Path(".") or not parent.is_dir():
        return
    siblings = sorted(p.name for p in parent.iterdir() if runs.is_run_dir(p))
    if siblings:
        raise DataError(f"--model {path}: no such run; {parent}/ holds the runs {', '.join(siblings[:5])}")


# ----------------------------------------------------------------------------------------------------
# python igsearch.py compare --tiny: the three rewards from the same seed and data, one table

REWARDS = ("outcome", "igsearch", "inforeasoner")
COMPARE_FILES = ("compare.json", "compare.md", "curves.png", "warmup", runs.LOCK)


def claim_compare_root(root):
    """compare writes only into a new or empty directory, or one that it wrote (its files and runs)."""
    if root.exists() and not root.is_dir():
        raise DataError(f"--out {root}: is a file, not a directory; choose another --out")
    if not root.is_dir():
        return
    own = re.compile(rf"({'|'.join(REWARDS)})-s\d+")
    foreign = [p.name for p in root.iterdir() if p.name not in COMPARE_FILES and not own.fullmatch(p.name)]
    if foreign:
        raise DataError(f"--out {root}: the directory holds files compare did not write ({', '.join(sorted(foreign)[:3])}); "
                        "choose a new or empty directory")


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
    if args.resume or args.demo or args.overwrite:
        raise DataError("compare takes training flags only (no --resume, --demo, --overwrite): run it again to "
                        "continue it")
    try:
        seeds = [int(s) for s in extra.seeds.split(",")] if extra.seeds else [cfg.seed]
    except ValueError:
        raise DataError(f"--seeds {extra.seeds!r}: give comma-separated integers, e.g. --seeds 0,1") from None
    if len(set(seeds)) != len(seeds):
        raise DataError(f"--seeds {extra.seeds}: a seed is repeated")
    for seed in seeds:
        check_config(dataclasses.replace(cfg, seed=seed))
    root = Path(cfg.out or f"runs/compare-{args.preset or ('tiny' if args.tiny else 's' + str(cfg.seed))}")
    claim_compare_root(root)
    with runs.locked(root):
        return _compare(cfg, args, seeds, root)


def _compare(cfg, args, seeds, root):
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
                    runs.read_json(run / "config.json") == dataclasses.asdict(rcfg):
                print(f"\n=== {run.name}: done, read back ===")
                results[run] = {"before": runs.read_json(run / "eval_before.json"),
                                "after": runs.read_json(run / "eval_after.json")}
                continue
            print(f"\n=== {run.name} ===")
            # compare owns its runs: one cut before its first checkpoint starts again (overwrite)
            results[run] = train(rcfg, resume=bool(runs.checkpoints(run)), before=evals.get("warm-up"), overwrite=True)
    rows = views.compare_rows(run_dirs, results, evals)
    title = (f"Same data ({cfg.data}), {cfg.steps} GRPO steps of {cfg.questions_per_step} questions x G = "
             f"{cfg.group_size}, seeds {seeds}; greedy evaluation on {cfg.eval_questions} dev questions at most, "
             "mean [95% bootstrap interval]")
    print("\n" + title)
    table = views.markdown_table(rows)
    print(table)
    runs.write_json(root / "compare.json", rows, indent=1)
    (root / "compare.md").write_text(f"{title}\n\n{table}\n")
    try:
        print(f"curves: {views.plot_runs(run_dirs, root / 'curves.png')}")
    except DataError as e:  # matplotlib is optional; the table stands on its own
        print(f"no curves: {e}")
    return rows


COMMANDS = {"eval": eval_command, "show": views.show_command, "plot": views.plot_command, "compare": compare_command}


def main(argv=None):
    """The command line. Every failure the user can fix ends in one line on stderr: `error: ...` and exit
    code 2 (bad input, settings or files; a file system error; out of memory); Ctrl-C ends in one line and
    exit code 130, and a training run stays resumable."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = None
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
            return 0
        cfg, args = parse_args(argv)
        if args.demo:
            demo.demo()
        else:
            train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk that is full, a directory that cannot be written, ...
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print("error: out of memory; lower --micro-batch, --eval-batch or --max-response-tokens", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted(argv, cfg), file=sys.stderr)
        return 130
    return 0


def interrupted(argv, cfg):
    """The one line printed on Ctrl-C: what was kept, and how to go on."""
    if argv and argv[0] == "compare":
        return "interrupted: run the same compare command again to go on (finished runs are read back)"
    if cfg is None or "--demo" in argv:
        return "interrupted"
    out = run_path(cfg)
    if not (out / "config.json").is_file():
        return "interrupted before the run started"
    done = runs.checkpoints(out)
    return (f"interrupted: {out} keeps {done[0].name if done else 'no checkpoint yet'}; "
            f"python igsearch.py --resume {out} goes on")


if __name__ == "__main__":
    sys.exit(main())
