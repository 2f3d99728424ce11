"""Peak memory of each phase of a run, each in a process of its own: what a machine needs to hold `--tiny`.

    python bench/bench_memory.py --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf
    python bench/bench_memory.py --model WARMED_UP_DIR --cases outcome,igsearch-forced --preset cpu
    python bench/bench_memory.py --model PATH.gguf --token-budget 1024 --forward-budget 8192
    python bench/bench_memory.py --model PATH.gguf --cases warmup,outcome-scripted --lora-rank 0,16   # side by side
    python bench/bench_memory.py --model PATH.gguf --cases run-outcome,run-igsearch,run-inforeasoner  # whole runs

A case runs in a fresh child process, which loads the model, the corpus and the questions as igsearch.py does,
builds what that phase holds (the frozen reference, AdamW), then resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and runs the phase: two warm-up steps, a GRPO step of a reward after one unmeasured step
(its rollouts sampled, searching in every turn: `-forced`, or bench_step's scripted texts, two searches each:
`-scripted`), or the greedy evaluation; so AdamW holds its moments, as in every step of a run but the first. A
`run-` case is a whole `igsearch.py --tiny` run of that reward instead (warm-up, steps, checkpoints, evaluations),
whose peak includes what the phases leave behind for the next ones. A case reports the RSS before the phase, the
phase's peak, and the peak of loading (a .gguf is de-quantized in memory; 0 for a whole run, whose peak holds it).
On a GPU it reports peak CUDA memory as well. The run's peak is the largest of them all. Each child fixes glibc's mmap
threshold as a run does (runs.steady_heap); --heap default leaves glibc's own. --lora-rank 0,16 runs every case
once per rank (0 = full fine-tuning; with adapters the reference is the policy itself, lora.py) and prints them
side by side, each with the phase's wall time."""
import argparse
import dataclasses
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import grpo  # noqa: E402
import igsearch  # noqa: E402
import lora  # noqa: E402
import retrieve  # noqa: E402
import runs  # noqa: E402
import warmup  # noqa: E402
from bench_step import forced_search_turns, scripted_rollouts  # noqa: E402

CASES = ("warmup", "outcome", "igsearch", "inforeasoner", "outcome-forced", "igsearch-forced",
         "inforeasoner-forced", "outcome-scripted", "igsearch-scripted", "inforeasoner-scripted", "eval",
         "run-outcome", "run-igsearch", "run-inforeasoner")


def rss_mb(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: VmHWM := VmRSS


def whole_run(case, cfg):
    """A whole `igsearch.py --tiny --reward R` run (warm-up, GRPO steps, checkpoints, evaluations) in this
    process, in a temporary run directory: the peak a user meets, where the phases are each measured apart."""
    before, t = rss_mb("VmRSS"), time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        code = igsearch.main(["--tiny", "--reward", case.removeprefix("run-"), "--out", f"{d}/run",
                              "--model", cfg.model, "--device", cfg.device, "--seed", str(cfg.seed),
                              "--lora-rank", str(cfg.lora_rank), "--precision", cfg.precision,
                              "--token-budget", str(cfg.token_budget), "--forward-budget", str(cfg.forward_budget)])
    if code:
        raise SystemExit(f"the run failed (exit code {code})")
    return {"case": case, "load_peak": 0.0, "before": before, "peak": rss_mb("VmHWM"),
            "seconds": time.perf_counter() - t}


def one_case(case, cfg, heap="steady"):
    """Run one phase in this process; returns its memory figures (MiB)."""
    if case.startswith("run-"):
        return whole_run(case, cfg)
    if heap == "steady":  # as every command line does (runs.cli)
        runs.steady_heap()
        runs.bounded_kernel_cache()
    device = runs.pick_device(cfg.device)
    runs.seed_everything(cfg.seed)
    retriever = retrieve.Retriever(retrieve.load_vital_articles())
    from data.prepare import load_tiny_qa
    qa = load_tiny_qa()
    model, tok, _ = runs.load_model(cfg.model, device, cfg.seed)
    lora.adapt_run(model, cfg, device)  # --lora-rank 0: nothing
    load_peak = rss_mb("VmHWM")
    rng, generator = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    ref = opt = None
    if case not in ("warmup", "eval"):
        ref = lora.Reference(model) if cfg.lora_rank else engine.frozen_copy(model, cfg.precision)
        opt = engine.adamw(model.parameters(), cfg.lr)
    def grpo_step():
        reward, _, regime = case.partition("-")
        c = dataclasses.replace(cfg, reward=reward)
        questions = rng.sample(qa["train"], c.questions_per_step)
        batch_q = [q for q in questions for _ in range(c.group_size)]
        groups = [i for i in range(len(questions)) for _ in range(c.group_size)]
        rollouts = None
        if regime == "scripted":
            rollouts = scripted_rollouts(tok, batch_q, groups, retriever, c, 2)
        elif regime == "forced":
            with engine.autocast(c.precision, device):
                rollouts = grpo.generate_rollouts(model, tok, batch_q, groups, retriever,
                                                  **igsearch.rollout_kwargs(c, c.temperature, generator),
                                                  turn_fn=forced_search_turns(model, tok, c, generator))
        igsearch.train_step(model, ref, opt, tok, retriever, questions, c, generator, rng, rollouts=rollouts)

    if case not in ("warmup", "eval"):
        grpo_step()  # unmeasured: from the first step on AdamW holds its two moments, as in every later step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak()
    before, t = rss_mb("VmRSS"), time.perf_counter()
    if case == "warmup":  # two steps: the second holds AdamW's moments
        warmup.warmup(model, tok, retriever, qa["train"], dataclasses.replace(cfg, warmup_steps=2), rng,
                      log=lambda *a: None)
    elif case == "eval":
        igsearch.evaluate(model, tok, retriever, qa["dev"][:cfg.eval_questions], cfg)
    else:
        grpo_step()
    out = {"case": case, "load_peak": load_peak, "before": before, "peak": rss_mb("VmHWM"),
           "seconds": time.perf_counter() - t}
    if device.type == "cuda":
        out["cuda_peak"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--preset", default="tiny", choices=sorted(igsearch.PRESETS))
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    p.add_argument("--token-budget", type=int, default=None)
    p.add_argument("--forward-budget", type=int, default=None)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--precision", default=None, choices=("auto", "bf16", "fp32"))
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", default="0", help="comma-separated adapter ranks, each case run once per rank "
                   "(0 = full fine-tuning)")
    p.add_argument("--heap", default="steady", choices=("steady", "default"),
                   help="steady: glibc's mmap threshold fixed at 4 MiB and oneDNN's kernel cache bounded, as a run "
                        "sets them (runs.steady_heap, runs.bounded_kernel_cache; ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 "
                        "in the environment restores oneDNN's own cache); default: glibc's and oneDNN's own")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run this one case here
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    lora_ranks = [int(r) for r in args.lora_rank.split(",") if r.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        p.error(f"--cases {','.join(bad)}: unknown; choose from {', '.join(CASES)}")
    explicit = {k: v for k, v in dict(token_budget=args.token_budget, forward_budget=args.forward_budget,
                                      grad_checkpointing=args.grad_checkpointing, precision=args.precision).items()
                if v is not None}
    cfg = dataclasses.replace(igsearch.Config(), **{**igsearch.PRESETS[args.preset], **explicit},
                              model=args.model, device=args.device, seed=args.seed, lora_rank=lora_ranks[0])
    if args.child:
        print(json.dumps(one_case(args.child, cfg, args.heap)))
        return

    print(f"model {args.model}, preset {args.preset}: token budget {cfg.token_budget}, forward budget "
          f"{cfg.forward_budget}, gradient checkpointing {cfg.grad_checkpointing}, precision {cfg.precision}, "
          f"heap {args.heap}; "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':<22}{'lora rank':>10}{'load peak MiB':>14}{'before MiB':>12}{'peak MiB':>10}{'peak - before':>15}"
          f"{'phase s':>9}")
    worst = {r: 0.0 for r in lora_ranks}
    for case in cases:
        for r in lora_ranks:  # side by side: each case once per rank
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", case,
                   "--lora-rank", str(r)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{case:<22}{r:>10} failed: "
                      f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
                continue
            m = json.loads(res.stdout.strip().splitlines()[-1])
            worst[r] = max(worst[r], m["load_peak"], m["peak"])
            cuda = f"   CUDA peak {m['cuda_peak']:.0f} MiB" if "cuda_peak" in m else ""
            print(f"{case:<22}{r:>10}{m['load_peak']:>14.0f}{m['before']:>12.0f}{m['peak']:>10.0f}"
                  f"{m['peak'] - m['before']:>15.0f}{m['seconds']:>9.1f}{cuda}", flush=True)
    for r, w in worst.items():
        print(f"peak RSS of the run, lora rank {r}: {w:.0f} MiB ({w / 1024:.2f} GiB); the issue's goal for --tiny: 4 GiB")


if __name__ == "__main__":
    main()
