"""Learning per CPU-hour, before and after: one `--tiny` GRPO step and one warm-up step, timed in the code of an
older commit and in this checkout, side by side in one run, on the same inputs.

    python bench/bench_versions.py --step-model WARMED_UP_DIR          # the GRPO step from a model that searches
    python bench/bench_versions.py --before 82b6ed2^ --warmup-before 82b6ed2 --warmup-precision fp32
    python bench/bench_versions.py --step-model WARMED_UP_DIR --after-flags=--no-grad-checkpointing

"Before" is the code before the efficiency work. Its GRPO step is the parent of 82b6ed2, the commit that added bf16
autocast: it ran every forward in fp32, with no gradient checkpointing and no token budgets. The warm-up did not
exist there. It came in 82b6ed2 itself, so the warm-up's "before" is that commit with its forwards forced to fp32
(--warmup-precision). "After" is this checkout with its defaults. Each older commit is unpacked with
`git archive` into a temporary directory. --after-flags adds igsearch.py flags to the "after" side only, to
see what a setting buys: gradient checkpointing, for one, trades update time for the 4 GB `--tiny` holds.

Every phase runs in a fresh child process in the tree it measures. The child imports that tree's own modules
and applies this checkout's --tiny settings, as far as the old Config has the same fields. The settings it had
to leave out are printed. The inputs are the same on both sides:
- step, scripted: the GRPO step (rewards, advantages, the PPO-clip update) on fixed rollouts, the same tokens on
  both sides. Each rollout searches for its question; half of each group then answers with the gold answer, half
  with a wrong one. Its loss and gradient norm are compared.
- step, sampled: a full step whose rollouts the model samples (seeded). Precision changes the samples, so this
  row compares times only.
- warm-up: one warm-up step on oracle trajectories of the same questions with the same seed. A tree builds them
  with its own warmup.py, so the "inputs" columns say whether they are the same (policy tokens, trajectories).

Where a row's inputs are the same, its numbers agree when the loss is within 0.05 (nats a token, bf16 forwards
against fp32; tests/test_precision.py bounds each log-prob the same way) and the gradient norm within 5%. The
machine should be otherwise idle: the times are wall clock.

A second table bounds what is possible (bench/roofline.py): each side's work, counted from the positions its
forwards compute (2·P each, 6·P where a backward follows, and the same for the head's V·H parameters at the states
it projects), at this machine's plain matmul rate in that side's precision, measured after the phases. Its least
time, over the 'after' side's, is the most the 'before' side could be sped up without doing less work (measured
tables, with their machines: docs/PERFORMANCE.md)."""
import argparse
import dataclasses
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import roofline  # bench/ (this script's folder): the same counts in every tree

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("step-scripted", "step-sampled", "warmup")
LOSS_TOL, GRAD_TOL = 0.05, 0.05


# ----------------------------------------------------------------------------------------------------
# The child: one phase, in the tree it measures (its modules only)

def scripted_rollouts(grpo, tok, retriever, questions, cfg):
    """One group of cfg.group_size per question: search the question, then answer; even rollouts answer with
    the gold answer and odd ones with "unknown", so that every group has a reward spread (non-zero advantages)."""
    G = cfg.group_size
    batch_q = [q for q in questions for _ in range(G)]
    scripts = [[f"<search> {q['question']} </search>",
                f"<answer> {q['golden_answers'][0] if i % 2 == 0 else 'unknown'} </answer>"]
               for q in questions for i in range(G)]
    return grpo.generate_rollouts(None, tok, batch_q, [i // G for i in range(len(batch_q))], retriever,
                                  max_turns=cfg.max_turns, topk=cfg.topk, max_turn_tokens=cfg.max_turn_tokens,
                                  max_response_tokens=cfg.max_response_tokens,
                                  turn_fn=grpo.scripted_turns(tok, scripts))


def run_phase(spec):
    """Load the model and the corpus the way this tree does, then time one phase; returns its figures."""
    import copy
    import torch
    import grpo
    import igsearch
    import retrieve
    runs = __import__("runs") if (Path.cwd() / "runs.py").exists() else igsearch  # runs.py came later
    engine = __import__("engine") if (Path.cwd() / "engine.py").exists() else grpo  # and engine.py after it
    cfg, _ = igsearch.parse_args(["--tiny"])
    have = {f.name for f in dataclasses.fields(cfg)}
    settings = {k: v for k, v in spec["settings"].items() if k in have}
    cfg = dataclasses.replace(cfg, **settings, seed=spec["seed"])
    (getattr(runs, "seed_everything", None) or igsearch.seed_everything)(cfg.seed)  # older trees: in igsearch.py
    device = runs.pick_device(spec["device"])
    load_corpus = getattr(retrieve, "load_corpus", None) or igsearch.load_corpus  # older trees: in igsearch.py
    retriever = retrieve.Retriever(load_corpus(cfg.corpus), stopwords=cfg.stopwords)
    model, tok, _ = runs.load_model(spec["model"], device, cfg.seed)
    rng, generator = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    out = {"left_out": sorted(set(spec["settings"]) - have), "precision": getattr(cfg, "precision", "fp32")}
    bf16 = hasattr(engine, "bf16_forwards") and engine.bf16_forwards(cfg.precision, device)  # older trees: fp32
    out.update(P=roofline.body_params(model), mlp=roofline.mlp_sizes(model), bf16=bool(bf16))
    counted = [roofline.Positions(model)]  # the work the phase needs (roofline.py), for its time at the matmul rate
    if spec["phase"] == "warmup":
        import warmup
        cfg = dataclasses.replace(cfg, warmup_steps=1)
        t = time.perf_counter()
        said = []  # its one log line names the step's policy tokens and trajectories: the inputs, compared
        losses = warmup.warmup(model, tok, retriever, spec["questions"], cfg, rng, log=said.append)
        out.update(seconds=time.perf_counter() - t, loss=losses[0] if losses else None,
                   tokens=said[0].split(" over ")[-1].split(",")[0].replace(" trajectories", "") if said else None)
    else:
        ref = None
        if cfg.beta_kl > 0 or cfg.reward == "inforeasoner":  # as igsearch.py builds it, in either tree
            ref = (engine.frozen_copy(model, cfg.precision) if hasattr(engine, "frozen_copy")
                   else copy.deepcopy(model).eval().requires_grad_(False))
            counted.append(roofline.Positions(ref))
        opt = (engine.adamw(model.parameters(), cfg.lr) if hasattr(engine, "adamw")  # as the tree builds it
               else torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0))
        qs = spec["questions"][: cfg.questions_per_step]
        rollouts = scripted_rollouts(grpo, tok, retriever, qs, cfg) if spec["phase"] == "step-scripted" else None
        t = time.perf_counter()
        metrics, rollouts, _ = igsearch.train_step(model, ref, opt, tok, retriever, qs, cfg, generator, rng,
                                                   rollouts=rollouts)
        out.update(seconds=time.perf_counter() - t, loss=metrics.get("loss"), grad_norm=metrics.get("grad_norm"),
                   reward=metrics.get("reward"), tokens=f"{sum(len(r.ids) for r in rollouts)} tokens",
                   times={k[5:]: v for k, v in metrics.items() if k.startswith("time_")})
    out["flops"] = sum(c.flops(out["P"]) for c in counted)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


def child_main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    os.chdir(spec["tree"])
    sys.path.insert(0, spec["tree"])
    print("RESULT " + json.dumps(run_phase(spec)), flush=True)


# ----------------------------------------------------------------------------------------------------
# The parent: unpack the older trees, run every phase in each, print the table

def unpack(rev, into):
    """The tree of commit `rev` of this repository, written to the directory `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"bench_versions: git archive {rev} failed: {archive.stderr.decode().strip()} "
                 "(give a commit of this repository, e.g. --before 82b6ed2^)")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def run_child(spec, workdir):
    path = Path(workdir) / f"spec-{spec['label']}-{spec['phase']}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(path)],
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(lines[-1][len("RESULT "):])


def agree(a, b):
    """'yes'/'no' for the numbers of one row (None when there is nothing to compare)."""
    checks = []
    if a.get("loss") is not None and b.get("loss") is not None:
        checks.append(abs(a["loss"] - b["loss"]) <= LOSS_TOL)
    if a.get("grad_norm") and b.get("grad_norm"):
        checks.append(abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_TOL * abs(a["grad_norm"]))
    return None if not checks else ("yes" if all(checks) else "no")


def fmt(x, spec=".3f"):
    return "—" if x is None else format(x, spec)


def table(rows):
    head = ("phase", "before s", "after s", "speed-up", "before inputs", "after inputs", "before loss", "after loss",
            "before grad norm", "after grad norm", "agree", "before GB", "after GB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase, a, b in rows:
        if "error" in a or "error" in b:
            lines.append(f"| {phase} | {a.get('error', '')} | {b.get('error', '')} |" + " |" * (len(head) - 3))
            continue
        lines.append("| " + " | ".join([
            phase, fmt(a["seconds"], ".1f"), fmt(b["seconds"], ".1f"), f"{a['seconds'] / b['seconds']:.2f}×",
            str(a.get("tokens")), str(b.get("tokens")), fmt(a.get("loss"), ".4f"), fmt(b.get("loss"), ".4f"), fmt(a.get("grad_norm")), fmt(b.get("grad_norm")),
            (agree(a, b) if a.get("tokens") == b.get("tokens") and phase != "step-sampled" else None) or "—",
            fmt(a["peak_rss_gb"], ".2f"), fmt(b["peak_rss_gb"], ".2f")]) + " |")
    return "\n".join(lines)


def bound_table(rows, rate):
    """Each side's counted work (roofline.py) at the plain matmul rate of its precision: the least time the
    phase could take here, the fraction of that rate it reached, and so the most any change that keeps the
    work could speed the 'before' side up (its time over the 'after' side's least time)."""
    head = ("phase", "side", "precision", "GFLOP counted", "s at the matmul rate", "achieved", "speed-up ceiling")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase, a, b in rows:
        if "error" in a or "error" in b or "flops" not in a:
            continue
        least = {side: x["flops"] / rate[x["bf16"]] for side, x in (("before", a), ("after", b))}
        for side, x in (("before", a), ("after", b)):
            lines.append("| " + " | ".join([
                phase, side, "bf16" if x["bf16"] else "fp32", f"{x['flops'] / 1e9:,.0f}", f"{least[side]:.1f}",
                f"{least[side] / x['seconds']:.0%}",
                f"{a['seconds'] / least['after']:.2f}×" if side == "after" else "—"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", default="82b6ed2^", help="the commit whose GRPO step is 'before'")
    p.add_argument("--warmup-before", default="82b6ed2", help="the commit whose warm-up step is 'before'")
    p.add_argument("--warmup-precision", default="fp32", help="the 'before' warm-up's --precision")
    p.add_argument("--model", default=None, help="the model the warm-up starts from (default: SmolLM2's GGUF)")
    p.add_argument("--step-model", default=None, help="the model the GRPO step starts from (default: --model)")
    p.add_argument("--reward", default="outcome", choices=("outcome", "igsearch", "inforeasoner"))
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated, of: " + ", ".join(PHASES))
    p.add_argument("--after-flags", default="", help="igsearch.py flags for the 'after' side beside --tiny, "
                   "given with '=' as they start with a dash: --after-flags=--no-grad-checkpointing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one phase here
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child)
    phases = [x for x in args.phases.split(",") if x]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        sys.exit(f"bench_versions: unknown phase {', '.join(unknown)}; choose from {', '.join(PHASES)}")

    sys.path.insert(0, str(ROOT))
    import igsearch
    import runs
    from data.prepare import load_tiny_qa
    model = args.model or str(runs.smollm2_gguf())
    step_model = args.step_model or model
    cfg, _ = igsearch.parse_args(["--tiny", "--reward", args.reward, "--seed", str(args.seed)])
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("model", "out", "device", "seed", "precision", "token_budget", "forward_budget")}
    after_cfg, _ = igsearch.parse_args(["--tiny", "--reward", args.reward, "--seed", str(args.seed),
                                        *shlex.split(args.after_flags)])
    after_settings = {k: v for k, v in dataclasses.asdict(after_cfg).items()
                      if k not in ("model", "out", "device", "seed")}
    train = load_tiny_qa()["train"]
    questions = random.Random(args.seed).sample(train, max(cfg.questions_per_step, cfg.warmup_batch))

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_versions-") as tmp:
        trees = {}
        for rev in dict.fromkeys([args.before, args.warmup_before]):
            tree = Path(tmp) / f"tree{len(trees)}"
            tree.mkdir()
            trees[rev] = str(unpack(rev, tree))
        print(f"before: step at {args.before}, warm-up at {args.warmup_before} (precision "
              f"{args.warmup_precision}); after: {ROOT}; {args.reward} reward; step model {step_model}; "
              f"warm-up model {model}", flush=True)
        tiny = dataclasses.asdict(cfg)
        changed = {k: v for k, v in after_settings.items() if tiny.get(k) != v}
        if changed:
            print(f"after: --tiny with {', '.join(f'{k} {v}' for k, v in changed.items())} ({args.after_flags})")
        for phase in phases:
            warm = phase == "warmup"
            base = dict(phase=phase, seed=args.seed, device=args.device, questions=questions,
                        model=model if warm else step_model, settings=settings)
            before = dict(base, label="before", tree=trees[args.warmup_before if warm else args.before],
                          settings=dict(settings, **({"precision": args.warmup_precision} if warm else {})))
            after = dict(base, label="after", tree=str(ROOT), settings=after_settings)
            a, b = run_child(before, tmp), run_child(after, tmp)
            if a.get("left_out"):
                print(f"{phase}: settings the 'before' tree has no field for: {', '.join(a['left_out'])}")
            print(f"{phase}: before {json.dumps(a)}\n{phase}: after  {json.dumps(b)}", flush=True)
            rows.append((phase, a, b))
    print()
    print(table(rows))
    sized = [x for _, a, b in rows for x in (a, b) if "mlp" in x]
    if sized:  # the machine's matmul rate at the model's MLP size, idle, after the phases
        import torch
        rate = {bf16: roofline.matmul_rate(*sized[0]["mlp"], torch.bfloat16 if bf16 else torch.float32, args.device)
                for bf16 in (False, True)}
        H, inter = sized[0]["mlp"]
        print(f"\nroofline: torch.mm [2048 x {H}] @ [{H} x {inter}] runs at {rate[True] / 1e9:.1f} GFLOP/s in bf16 "
              f"and {rate[False] / 1e9:.1f} in fp32 here; P = {sized[0]['P'] / 1e6:.1f}M matmul parameters")
        print(bound_table(rows, rate))


if __name__ == "__main__":
    main()
