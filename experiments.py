"""Experiments around the training script: evaluate a model or a run, and compare the three rewards.

    python experiments.py eval --model runs/outcome-s0 --data tiny        # greedy EM/F1, searches, predictions
    python experiments.py eval --model Qwen/Qwen2.5-0.5B-Instruct --data hotpotqa:dev.json --limit 200
    python experiments.py compare --tiny                                  # outcome, igsearch, inforeasoner
    python experiments.py compare --preset cpu --seeds 0,1 --out runs/cmp # the README's learning experiment
    python experiments.py report runs/cmp-s0 runs/cmp-s1 --out docs/cmp   # one table from several compares
    python experiments.py beliefs --model runs/cmp/warmup/model           # InfoReasoner's belief, asked both ways
    torchrun --nproc_per_node 2 experiments.py compare --tiny             # every run data-parallel (ranks.py)

Both take igsearch.py's settings and use its evaluate and train; nothing here is part of the method.
"""
import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checks
import engine
import grpo
import igsearch
import lora
import ranks
import retrieve
import rewards
import runs
import views
import warmup
from retrieve import DataError


# ----------------------------------------------------------------------------------------------------
# python experiments.py eval --model PATH_OR_RUN --data FILE[,FILE...]

def eval_command(argv):
    p = runs.ArgParser(prog="experiments.py eval", description="Greedy evaluation of a model or a run's "
                       "last checkpoint: EM, F1, searches, answer retrieved; predictions as JSONL")
    p.add_argument("--model", required=True, help="hub id, model directory, .gguf, tiny-random, or a run directory")
    p.add_argument("--data", default=None, help="comma-separated: tiny | hotpotqa:PATH | FlashRAG JSONL "
                   "(default: the run's --data, else tiny)")
    p.add_argument("--corpus", default=None, help="vital | hotpotqa:PATH | jsonl:PATH (default: the run's, else vital)")
    p.add_argument("--out", default=None, help="predictions JSONL (default RUN/eval.jsonl for a run, else eval.jsonl)")
    p.add_argument("--limit", type=int, default=0, help="at most this many questions per dataset (0 = all)")
    for name in ("max_turns", "topk", "max_turn_tokens", "max_response_tokens", "forward_budget", "seed"):
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
    cfg = igsearch.run_config(model_path) if is_run else igsearch.Config()
    explicit = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(igsearch.Config)} and v is not None}
    cfg = dataclasses.replace(cfg, **explicit)
    if not is_run:
        cfg = dataclasses.replace(cfg, model=args.model)
    checks.check_config(cfg, model_path / "config.json" if is_run else None, explicit, model=not is_run)
    data = args.data or (cfg.data if is_run else "tiny")
    out = runs.output_file(args.out or (model_path / "eval.jsonl" if is_run else "eval.jsonl"), "--out", "predictions")
    inputs = [part.split(":", 1)[-1] for part in (*data.split(","), cfg.corpus)]
    if any(Path(i.strip()).resolve() == out.resolve() for i in inputs if i.strip()):
        raise DataError(f"--out {out}: that is an input file of this evaluation; choose another --out")
    sets = eval_sets(data)                      # data errors come before any model is loaded
    docs = retrieve.load_corpus(cfg.corpus)
    retriever = retrieve.Retriever(docs, stopwords=cfg.stopwords)
    runs.seed_everything(cfg.seed)
    device = runs.pick_device(cfg.device)
    if is_run:  # the newest checkpoint that loads; a damaged one is reported and the previous one used
        model, tok, smoke, name = load_run_model(model_path, device, cfg.seed)
    else:
        (model, tok, smoke), name = runs.load_model(cfg.model, device, cfg.seed), cfg.model
    rows = []
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # renamed at the end: an interrupted eval leaves no half file
    try:
        with open(tmp, "w") as f:
            for set_name, questions in sets:
                questions = questions[: args.limit] if args.limit > 0 else questions
                summary, rollouts = igsearch.evaluate(model, tok, retriever, questions, cfg)
                records = [prediction_record(set_name, r) for r in rollouts]
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
                rows.append({"dataset": set_name, "n": len(records), "em": summary["em"], "f1": summary["f1"],
                             "searches": summary["searches"],
                             "answer_retrieved": float(np.mean([rec["answer_retrieved"] for rec in records]))})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(runs.terminal_safe(f"Greedy evaluation of {name}" + (" (smoke run: random weights)" if smoke else "")))
    views.print_table(rows, ["dataset", "n", "em", "f1", "searches", "answer_retrieved"])
    print(runs.terminal_safe(f"predictions: {out}"))
    return rows


def check_run_typo(path):
    """eval --model runs/outcme-s0: a path beside other runs that is not there is a typo, never a hub id."""
    parent = path.parent
    if path.exists() or parent == Path(".") or not parent.is_dir():
        return
    siblings = sorted(p.name for p in parent.iterdir() if runs.is_run_dir(p))
    if siblings:
        raise DataError(f"--model {path}: no such run; {parent}/ holds the runs {', '.join(siblings[:5])}")


def load_run_model(run_dir, device, seed=0):
    """(model, tokenizer, smoke, model directory) of the run's newest checkpoint that loads; a damaged one
    is reported in one line and the previous one used, as on resume."""
    errors = []
    for path in runs.checkpoints(run_dir):
        try:
            runs.check_manifest(path)
            if lora.read_config(path / "adapters") is not None:  # the run's base, the adapters merged in
                model, tok, smoke = runs.load_merged(run_dir, path, device, seed)
            else:
                model, tok, smoke = runs.load_model(str(path / "model"), device, seed)
        except DataError as e:
            errors.append(str(e))
            continue
        for e in errors:
            print(runs.terminal_safe(f"warning: {e}; using the previous checkpoint"), file=sys.stderr)
        return model, tok, smoke, path / "model"
    if errors:
        raise DataError(f"{run_dir}: no checkpoint loads ({len(errors)} damaged; newest: {errors[0]})")
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


# ----------------------------------------------------------------------------------------------------
# python experiments.py compare --tiny: the three rewards from the same seed and data, one table

REWARDS = ("outcome", "igsearch", "inforeasoner")
CONTROL = "control"     # the supervised warm-up continued on as many oracle trajectories as a GRPO arm samples
ARMS = REWARDS + (CONTROL,)
CLIP_ARM = re.compile(r"igsearch-c(\d+)")  # the ablation of IG-Search's clip c (METHOD §4.3): --ig-clip N
LORA_ARM = re.compile(r"(outcome|igsearch|inforeasoner)-lora(\d+)")  # a reward with adapters (METHOD §3.5)


def arm_settings(arm):
    """(reward, settings of its own) of an arm of compare: a reward, the control, igsearch-cN (IG-Search with
    --ig-clip N, for where the clip binds on most searches), or REWARD-loraR (that reward with adapters of rank R
    on the shared warm-up; compare gives it --lora-lr); None for any other name.

    >>> arm_settings("igsearch-c8"), arm_settings("control"), arm_settings("igsearch-c")
    (('igsearch', {'ig_clip': 8.0}), ('control', {}), None)
    >>> arm_settings("outcome-lora16"), arm_settings("control-lora16")
    (('outcome', {'lora_rank': 16}), None)
    """
    if arm in ARMS:
        return arm, {}
    if m := CLIP_ARM.fullmatch(arm):
        return "igsearch", {"ig_clip": float(m[1])}
    if (m := LORA_ARM.fullmatch(arm)) and int(m[2]) > 0:
        return m[1], {"lora_rank": int(m[2])}
    return None


def arm_rank(run):
    """compare's order of runs: each seed's arms in turn, an ablation after its reward."""
    arm, _, seed = run.name.rpartition("-s")
    reward, extra = arm_settings(arm)
    return int(seed), ARMS.index(reward), sorted(extra.items())


COMPARE_FILES = ("compare.json", "compare.md", "seeds.json", "pairwise.json", "curves.png", "warmup", runs.LOCK)
RECORD_FILES = ("config.json", "metrics.jsonl", "eval_before.json", "eval_after.json")  # what report reads of a run


def claim_compare_root(root):
    """compare writes only into a new or empty directory, or one that it wrote (its files and runs)."""
    if root.exists() and not root.is_dir():
        raise DataError(f"--out {root}: is a file, not a directory; choose another --out")
    if not root.is_dir():
        return
    own = lambda name: (m := re.fullmatch(r"(.+)-s\d+", name)) and arm_settings(m[1])  # noqa: E731
    foreign = [p.name for p in root.iterdir() if p.name not in COMPARE_FILES and not own(p.name)]
    if foreign:
        raise DataError(f"--out {root}: the directory holds files compare did not write ({', '.join(sorted(foreign)[:3])}); "
                        "choose a new or empty directory")


def compare_command(argv):
    """Train outcome, igsearch and inforeasoner with the same flags (parse_args's; --out is the parent
    directory), the same data and steps, for each of --seeds, all from one starting model: with
    --warmup-steps, one format warm-up (ROOT/warmup) that every run starts from. Each run is evaluated greedily
    on the same dev questions. Prints and writes (ROOT/compare.json, ROOT/compare.md) EM, F1, answered and
    searches with 95% intervals, by hops, and the mean information gain; plots ROOT/curves.png.
    Resumable: a finished run is read back, a cut one resumes from its checkpoint. Under torchrun every run
    is data-parallel, and rank 0 alone holds ROOT's lock and reports."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--seeds", default=None, help="comma-separated seeds (default: --seed)")
    pre.add_argument("--arms", default=",".join(REWARDS),
                     help=f"comma-separated, in run order, from {', '.join(ARMS)} and igsearch-cN (control: the "
                          "warm-up continued on as many oracle trajectories as a GRPO arm samples, needs "
                          "--warmup-steps; igsearch-cN: IG-Search with --ig-clip N; REWARD-loraR, e.g. "
                          "outcome-lora16: that reward with adapters of rank R, at --lora-lr)")
    pre.add_argument("--lora-lr", type=float, default=None,
                     help="learning rate of the REWARD-loraR arms (default: 10 x --lr, the ratio of LoRA's best "
                          "learning rate to full fine-tuning's reported by Schulman et al. 2025, docs/LORA.md)")
    extra, argv = pre.parse_known_args(argv)
    cfg, args = igsearch.parse_args(argv)
    if args.resume or args.demo or args.overwrite:
        raise DataError("compare takes training flags only (no --resume, --demo, --overwrite): run it again to "
                        "continue it")
    try:
        seeds = [int(s) for s in extra.seeds.split(",")] if extra.seeds else [cfg.seed]
    except ValueError:
        raise DataError(f"--seeds {extra.seeds!r}: give comma-separated integers, e.g. --seeds 0,1") from None
    if len(set(seeds)) != len(seeds):
        raise DataError(f"--seeds {extra.seeds}: a seed is repeated")
    arms = [a.strip() for a in extra.arms.split(",") if a.strip()]
    if not arms or any(arm_settings(a) is None for a in arms) or len(set(arms)) != len(arms):
        raise DataError(f"--arms {extra.arms!r}: give distinct arms from {', '.join(ARMS)}, igsearch-cN or "
                        "REWARD-loraR, e.g. --arms outcome,control")
    if cfg.lora_rank and any("lora_rank" in arm_settings(a)[1] for a in arms):
        raise DataError("--lora-rank puts adapters on every arm and its warm-up; a REWARD-loraR arm adds them to "
                        "one arm only: give one or the other")
    if CONTROL in arms and cfg.warmup_steps == 0:
        raise DataError("--arms control continues the warm-up: give --warmup-steps N (or a preset that has one)")
    if CONTROL in arms and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DataError("--arms control runs in one process: leave it out under torchrun, or run without torchrun")
    for seed in seeds:
        checks.check_config(dataclasses.replace(cfg, seed=seed))
    root = Path(cfg.out or f"runs/compare-{args.preset or ('tiny' if args.tiny else 's' + str(cfg.seed))}")
    ranks.init(cfg.device, cfg.pg_timeout)  # under torchrun: join the other ranks
    ranks.on_main(claim_compare_root, root)
    with ranks.main_holds(runs.locked(root)):
        return _compare(cfg, args, seeds, root, arms, extra.lora_lr)


def _compare(cfg, args, seeds, root, arms=REWARDS, lora_lr=None):
    start, evals = cfg.model, {}
    if cfg.warmup_steps > 0:  # one warm-up, shared: every run starts from the same weights
        device, retriever, splits, dev = igsearch.setup(cfg)
        start, evals = warmup.warm_start(cfg, root, retriever, splits, dev, device, igsearch.evaluate,
                                            eval_before=False)
    run_dirs, results = [], {}
    for seed in seeds:
        for reward in arms:
            run = root / f"{reward}-s{seed}"
            run_dirs.append(run)
            if reward == CONTROL:
                results[run] = ranks.on_main(control_run, dataclasses.replace(cfg, seed=seed), start, run,
                                             evals["warm-up"])
                continue
            arm, own = arm_settings(reward)
            if "lora_rank" in own:
                own["lr"] = lora_lr or 10 * cfg.lr  # --lora-lr
            rcfg = dataclasses.replace(cfg, reward=arm, seed=seed, model=start, warmup_steps=0, out=str(run), **own)
            if ranks.from_main(finished, run, rcfg):  # every rank takes rank 0's view of the run
                print(f"\n=== {run.name}: done, read back ===")
                results[run] = {"before": runs.read_summary(run / "eval_before.json"),
                                "after": runs.read_summary(run / "eval_after.json")}
                continue
            print(f"\n=== {run.name} ===")
            # compare owns its runs: one cut before its first checkpoint starts again (overwrite)
            resume = ranks.from_main(lambda: bool(runs.checkpoints(run)))
            results[run] = igsearch.train(rcfg, resume=resume, before=evals.get("warm-up"), overwrite=True)
    return ranks.on_main(report, cfg, seeds, root, run_dirs, results, evals)  # rank 0 prints and writes


def control_run(cfg, start, run, warm):
    """The control arm: does supervision alone, given the same trajectories, do what GRPO does? From the shared
    warm-up, cfg.steps more supervised steps (METHOD §6's loss, at warmup_lr) of questions_per_step × group_size
    oracle trajectories each, as many as a GRPO arm samples, then the same greedy evaluation. Its config.json
    is the warm-up's recipe with those counts; a run cut before its evaluation is written starts again."""
    ccfg = dataclasses.replace(cfg, model=start, out=str(run), warmup_steps=cfg.steps,
                               warmup_batch=cfg.questions_per_step * cfg.group_size)
    after_path = run / "eval_after.json"
    if after_path.is_file() and runs.saved_config(run) == dataclasses.asdict(ccfg):
        print(f"\n=== {run.name}: done, read back ===")
        return {"before": warm, "after": runs.read_summary(after_path)}
    print(f"\n=== {run.name} ===")
    run.mkdir(parents=True, exist_ok=True)
    for name in ("eval_after.json", "metrics.jsonl"):
        (run / name).unlink(missing_ok=True)
    runs.write_json(run / "config.json", dataclasses.asdict(ccfg), indent=2)
    device, retriever, splits, dev = igsearch.setup(ccfg)
    model, tok, _ = runs.load_model(start, device, cfg.seed)
    t = time.perf_counter()
    losses = warmup.warmup(model, tok, retriever, splits["train"], ccfg, random.Random(cfg.seed))
    seconds = (time.perf_counter() - t) / max(len(losses), 1)
    with open(run / "metrics.jsonl", "w") as f:  # one line a supervised step, in the shape of a GRPO run's
        for step, loss in enumerate(losses):
            f.write(json.dumps({"step": step, "loss": loss, "time_update": seconds}) + "\n")
    runs.release_memory()
    after = igsearch.evaluate(model, tok, retriever, dev, ccfg)[0] if dev else {}
    runs.write_json(run / "eval_before.json", warm)
    runs.write_json(after_path, after)
    return {"before": warm, "after": after}


def finished(run, rcfg):
    """Has this run of the comparison, with these settings, ended (evaluated after training)?"""
    return bool((run / "eval_after.json").is_file() and runs.read_metrics(run) and
                igsearch.run_config(run) == rcfg)  # settings added since read as their defaults


def report(cfg, seeds, root, run_dirs, results, evals):
    """compare's table, printed and written (ROOT/compare.json, ROOT/compare.md), and its curves."""
    rows = views.compare_rows(run_dirs, results, evals)
    title = runs.terminal_safe(f"Same data ({cfg.data}), {cfg.steps} GRPO steps of {cfg.questions_per_step} "
                               f"questions x G = {cfg.group_size}, seeds {seeds}; greedy evaluation on "
                               f"{cfg.eval_questions} {cfg.eval_split} questions at most, mean [95% bootstrap interval]")
    print("\n" + title)
    table = views.markdown_table(rows)
    print(table)
    runs.write_json(root / "compare.json", rows, indent=1)
    text = f"{title}\n\n{table}\n"
    pooled = views.seed_rows(run_dirs, results, evals)
    if pooled:  # each reward over its seeds, and paired with outcome of the same seed
        note = ("Each reward over its seeds: a question's value is its mean over the seeds, the interval is "
                "bootstrapped over questions; the changes are paired question by question (with outcome of "
                "the same seed)")
        print(f"\n{note}\n{views.seed_table(pooled)}")
        text += f"\n{note}\n\n{views.seed_table(pooled)}\n"
        runs.write_json(root / "seeds.json", pooled, indent=1)
    pairs = views.pairwise_rows(run_dirs, results, evals)
    if pairs:
        note = ("Paired by question: each arm against the start, outcome and the control, over all questions and by "
                "kind; a question's difference is its mean over the seeds (the baseline of the same seed). Every "
                f"interval is a 95% percentile bootstrap of {views.N_BOOT} resamples of the questions; the sign test "
                "counts the questions where the arm did better or worse and gives the exact two-sided p")
        print(f"\n{note}\n{views.pairwise_table(pairs)}")
        text += f"\n{note}\n\n{views.pairwise_table(pairs)}\n"
        runs.write_json(root / "pairwise.json", pairs, indent=1)
    (root / "compare.md").write_text(text)
    try:
        print(f"curves: {views.plot_runs(run_dirs, root / 'curves.png')}")
    except DataError as e:  # matplotlib is optional; the table stands on its own
        print(f"no curves: {e}")
    return rows


# ----------------------------------------------------------------------------------------------------
# python experiments.py report DIR [DIR ...] --out OUT: one table from the finished runs of several compares

def report_command(argv):
    """The table and curves of compare, written to --out, from the finished runs of one or more compare
    directories that started from the same warm-up: e.g. seed 0 and seed 1 run apart (each resumable on its
    own, or each from its own commit) and reported together. Trains nothing, loads no model."""
    p = runs.ArgParser(prog="experiments.py report", description=report_command.__doc__.split(":")[0])
    p.add_argument("dirs", nargs="+", help="compare directories (their --out)")
    p.add_argument("--out", required=True, help="the directory for compare.md, compare.json, seeds.json, curves.png")
    p.add_argument("--overwrite", action="store_true", help="replace tables in --out that report did not write")
    args = p.parse_args(argv)
    claim_report_out(Path(args.out), args.overwrite)
    run_dirs, results, evals, seeds, first = [], {}, None, set(), None
    out_dir = Path(args.out)
    for d in map(Path, args.dirs):
        done = d / "warmup" / "done.json"
        if not done.is_file():
            raise DataError(f"{d}: no warmup/done.json; give directories written by `experiments.py compare "
                            "--warmup-steps N` (a --preset cpu or --tiny compare)")
        info = runs.read_json(done, "the warm-up's summary")
        wrong = runs.warmup_problem(info)
        if wrong:
            raise DataError(f"{done}: {wrong}, not the summary this program writes")
        if evals is None:
            evals, first = {"before": info.get("before") or {}, "warm-up": info.get("warm-up") or {}}, d
        elif info.get("warm-up") != evals["warm-up"]:
            raise DataError(f"{d}: its warm-up is not the one of {first} (other evaluation); report compares "
                            "runs that started from one model")
        named = sorted(p for p in d.iterdir() if p.is_dir() and arm_settings(p.name.rpartition("-s")[0]))
        for other in [r for r in named if not re.fullmatch(r".+-s\d+", r.name)]:
            print(runs.terminal_safe(f"{other}: not a run of compare (named {other.name.rpartition('-s')[0]}-sN), "
                                     "left out"))
        for run in sorted((r for r in named if re.fullmatch(r".+-s\d+", r.name)), key=arm_rank):
            if not (run / "eval_after.json").is_file():
                print(runs.terminal_safe(f"{run}: not finished (no eval_after.json), left out"))
                continue
            seed = run.name.rpartition("-s")[2]
            if any(r.name == run.name for r in run_dirs):
                raise DataError(f"{run}: {run.name} is in two of the directories; give each seed once")
            run_dirs.append(run)
            seeds.add(int(seed))
            results[out_dir / run.name] = {"before": runs.read_summary(run / "eval_before.json"),
                                       "after": runs.read_summary(run / "eval_after.json")}
    if not run_dirs:
        raise DataError(f"{', '.join(args.dirs)}: no finished run (reward-sN with eval_after.json)")
    run_dirs.sort(key=arm_rank)
    cfg = igsearch.run_config(run_dirs[0])
    keys = ("data", "steps", "questions_per_step", "group_size", "lr", "eval_questions")
    for run in run_dirs[1:]:
        other = igsearch.run_config(run)
        same = [k for k in keys if k != "lr" or other.lora_rank == cfg.lora_rank]  # adapters: --lora-lr
        if any(getattr(other, k) != getattr(cfg, k) for k in same):
            raise DataError(f"{run}: trained with other settings than {run_dirs[0]} (" + ", ".join(
                f"{k} {getattr(other, k)} vs {getattr(cfg, k)}" for k in same if getattr(other, k) != getattr(cfg, k))
                + "); report compares runs of one experiment")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = keep_records(out, run_dirs, first)
    return report(cfg, sorted(seeds), out, run_dirs, results, evals)


def keep_records(out, run_dirs, warm_dir):
    """Copy into OUT what report reads (each run's settings, metrics and per-question evaluations, and the
    warm-up's summary), and nothing else (no checkpoint): OUT is then a directory that report rebuilds every
    table from, small enough to commit. Returns the runs' directories in OUT (results are keyed by name)."""
    kept = []
    for run in run_dirs:
        dest = out / run.name
        if dest.resolve() != run.resolve():
            dest.mkdir(exist_ok=True)
            for name in RECORD_FILES:
                if (run / name).is_file():
                    shutil.copyfile(run / name, dest / name)
        kept.append(dest)
    if (out / "warmup").resolve() != (warm_dir / "warmup").resolve():
        (out / "warmup").mkdir(exist_ok=True)
        shutil.copyfile(warm_dir / "warmup" / "done.json", out / "warmup" / "done.json")
    return kept


# ----------------------------------------------------------------------------------------------------
# python experiments.py beliefs --model DIR: can the model state a belief? (InfoReasoner, METHOD §5.1)

def beliefs_command(argv):
    """InfoReasoner's belief asked both ways (--ir-belief agent and plain) of a model: for each question the
    question is the query, its top-k documents the evidence, and K answers are sampled without and with them
    through rewards.inforeasoner_beliefs, the reward's own code. Prints the mean p(gold) and semantic entropy of
    each; a belief the model can state moves p(gold) up with the evidence."""
    p = runs.ArgParser(prog="experiments.py beliefs", description=beliefs_command.__doc__.split(":")[0])
    p.add_argument("--model", required=True, help="hub id, model directory, .gguf or tiny-random")
    p.add_argument("--data", default="tiny", help="tiny | hotpotqa:PATH | FlashRAG JSONL")
    p.add_argument("--corpus", default="vital", help="vital | hotpotqa:PATH | jsonl:PATH")
    p.add_argument("--split", default="dev", choices=("train", "dev", "test"), help="questions from this split")
    p.add_argument("--cut", default="80/10/10", help="train/dev/test percents of a file without splits "
                   "(igsearch.py --split; the hotpot preset's is 55/10/35)")
    p.add_argument("--limit", type=int, default=12, help="the first N questions of the split")
    p.add_argument("--ir-samples", type=int, default=10, help="K answers per belief")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = dataclasses.replace(igsearch.Config(), model=args.model, data=args.data, corpus=args.corpus,
                              ir_samples=args.ir_samples, seed=args.seed, reward="inforeasoner", split=args.cut)
    checks.check_config(cfg)
    if args.limit < 1:
        raise DataError(f"--limit {args.limit}: must be at least 1")
    docs = retrieve.load_corpus(cfg.corpus)
    questions = retrieve.load_data(cfg.data, cfg.split)[args.split][: args.limit]
    retriever = retrieve.Retriever(docs, stopwords=cfg.stopwords)
    runs.seed_everything(cfg.seed)
    model, tok, _ = runs.load_model(cfg.model, runs.pick_device(cfg.device), cfg.seed)
    found = retriever.search([q["question"] for q in questions], cfg.topk)
    rollouts = [grpo.Rollout(question=q, group=i, ids=[], roles=[], searches=[{"query": q["question"], "docs": d}])
                for i, (q, d) in enumerate(zip(questions, found))]
    rows = []
    for kind in ("agent", "plain"):
        generator = torch.Generator().manual_seed(cfg.seed)
        with engine.autocast(cfg.precision, next(model.parameters()).device):
            _, beliefs, _ = rewards.inforeasoner_beliefs(model, tok, rollouts, dataclasses.replace(cfg, ir_belief=kind),
                                                         generator)
        for when, j in (("without evidence", 0), ("with evidence", 1)):
            rows.append({"belief": kind, "when": when, "n": len(beliefs),
                         "p_gold": float(np.mean([b[j].p_gold for b in beliefs])),
                         "p_gold_ci": views.bootstrap_ci([b[j].p_gold for b in beliefs]),
                         "entropy": float(np.mean([b[j].entropy for b in beliefs])),
                         "classes": float(np.mean([b[j].n_classes for b in beliefs]))})
    print(f"Beliefs of {cfg.model}: {len(questions)} {args.split} questions of {cfg.data}, the question as the query, "
          f"top {cfg.topk} documents as the evidence, K = {cfg.ir_samples}, mean [95% bootstrap interval]")
    views.print_table([{**r, "p_gold": f"{r['p_gold']:.3f} [{r['p_gold_ci'][0]:.2f}, {r['p_gold_ci'][1]:.2f}]",
                        "entropy": f"{r['entropy']:.3f}", "classes": f"{r['classes']:.2f}"} for r in rows],
                      ["belief", "when", "p_gold", "entropy", "classes", "n"])
    return rows




REPORT_FILES = {"compare.md": "table", "compare.json": "rows", "seeds.json": "rows", "pairwise.json": "pairs",
                "curves.png": "figure"}


def claim_report_out(out, overwrite):
    """report --out writes its files there: refused in one line where one of them is there and was not
    written by compare or report (runs.OUTPUT_MARKS), unless --overwrite; never a file, never anything else."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a directory; choose another --out")
    for name, kind in REPORT_FILES.items():
        if not overwrite and (out / name).is_file():
            try:
                runs.output_file(out / name, "--out", kind)
            except DataError:
                raise DataError(f"--out {out}: {name} is there and was not written by igsearch; --overwrite "
                                "replaces it, or choose another --out") from None


COMMANDS = {"eval": eval_command, "compare": compare_command, "report": report_command, "beliefs": beliefs_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python experiments.py {{{','.join(COMMANDS)}}} ... (--help after a command for its flags)",
              file=sys.stderr)
        return 2
    line = "interrupted: run the same compare command again to go on (finished runs are read back)" \
        if argv[0] == "compare" else "interrupted"
    return runs.cli(ranks.guarded(lambda: COMMANDS[argv[0]](argv[1:])), lambda: line)


if __name__ == "__main__":
    sys.exit(ranks.finish(main()))
