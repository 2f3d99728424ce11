"""Do two trees train the same? Seeded runs of each write metrics.jsonl and evaluations; a change that should not
change behaviour (a refactor) must leave them identical, the time_* metrics aside. Not a pytest file: it reads run
directories made beforehand, e.g. for each of OLD and NEW (two worktrees of the repository):

    c="--tiny --model tiny-random --warmup-steps 2 --steps 2 --eval-questions 4 --max-response-tokens 256 --show-every 0"
    for r in outcome igsearch inforeasoner; do (cd OLD && python igsearch.py $c --reward $r --out RUNS_OLD/$r); done
    (cd OLD && python igsearch.py $c --beta-kl 0.01 --ppo-epochs 2 --out RUNS_OLD/kl)
    (cd OLD && python igsearch.py $c --reward igsearch --lora-rank 4 --out RUNS_OLD/lora)
    ... the same in NEW with RUNS_NEW, then
    python tests/same_runs.py RUNS_OLD RUNS_NEW
"""
import json
import sys
from pathlib import Path


def steps(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main(a, b):
    same = True
    for name in sorted(p.name for p in a.iterdir() if p.is_dir()):
        ma, mb = steps(a / name), steps(b / name)
        untimed = lambda ms: [{k: v for k, v in m.items() if not k.startswith("time_")} for m in ms]
        metrics = untimed(ma) == untimed(mb) and [list(m) for m in ma] == [list(m) for m in mb]
        evals = all((a / name / f).read_bytes() == (b / name / f).read_bytes()
                    for f in ("eval_before.json", "eval_after.json"))
        print(f"{name}: {len(ma)} steps; metrics.jsonl the same (time_* aside, keys in order): {metrics}; "
              f"evaluations byte-identical: {evals}")
        same &= metrics and evals
    print("the same" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
