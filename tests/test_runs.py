"""Run directories: checkpoints every step, --resume, a killed run, damaged checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import igsearch
from conftest import ROOT


def write_fixtures(tmp_path):
    docs = [{"title": f"Person {i}", "text": f"Person {i} was born in City{i} and worked as a "
             f"{['baker', 'painter', 'pilot'][i % 3]}."} for i in range(12)]
    qs = [{"id": str(i), "question": f"Where was Person {i} born?", "golden_answers": [f"City{i}"]} for i in range(12)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    return tmp_path / "qa.jsonl", tmp_path / "corpus.jsonl"


def train_argv(tmp_path, out, steps):
    data, corpus = write_fixtures(tmp_path)
    return ["--model", "tiny-random", "--data", str(data), "--corpus", f"jsonl:{corpus}", "--steps", str(steps),
            "--questions-per-step", "2", "--group-size", "2", "--max-turns", "1", "--max-turn-tokens", "8",
            "--max-response-tokens", "64", "--eval-questions", "2", "--show-every", "0", "--out", str(out)]


@pytest.fixture
def varied_reward(monkeypatch):
    """A random model never answers right, so EM = 0, Â = 0 and the weights would never move; a reward
    that depends on the sampled tokens makes every step change the weights (and so the next samples)."""
    def score(rollouts):
        em = [float(sum(r.ids) % 3 == 0) for r in rollouts]
        return em, em
    monkeypatch.setattr(igsearch, "score_outcome", score)


def metrics(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if not k.startswith("time_")} for ln in lines]


def weights(run, step):
    return load_file(run / "ckpt" / f"step_{step:06d}" / "model" / "model.safetensors")


def test_resume_gives_the_uninterrupted_run(tmp_path, varied_reward):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert igsearch.main(train_argv(tmp_path, straight, 3)) == 0
    assert igsearch.main(train_argv(tmp_path, split, 2)) == 0
    assert igsearch.main(["--resume", str(split), "--steps", "3"]) == 0

    assert [m["step"] for m in metrics(split)] == [0, 1, 2]
    assert metrics(split) == metrics(straight)
    a, b = weights(straight, 3), weights(split, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    w2 = weights(straight, 2)
    assert not all(torch.equal(a[k], w2[k]) for k in a), "the weights must move, or the test proves nothing"
    # the two newest checkpoints are kept, each complete
    assert sorted(p.name for p in (split / "ckpt").iterdir()) == ["step_000002", "step_000003"]
    state = torch.load(split / "ckpt" / "step_000003" / "state.pt", weights_only=False)
    assert state["step"] == 3 and set(state["rng"]) >= {"python", "numpy", "torch", "generator", "rng"}


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path, capsys):
    trained = tmp_path / "trained"
    assert igsearch.main(train_argv(tmp_path, trained, 2)) == 0
    for damage, message in [("truncate", "model/model.safetensors has"), ("delete", "is missing optimizer.pt"),
                            ("manifest", "no manifest.json")]:
        run = tmp_path / damage
        shutil.copytree(trained, run)
        newest = run / "ckpt" / "step_000002"
        if damage == "truncate":
            f = newest / "model" / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif damage == "delete":
            (newest / "optimizer.pt").unlink()
        else:
            (newest / "manifest.json").unlink()
        capsys.readouterr()
        # --steps 1: nothing left to train, so only the checkpoint choice is exercised (fast)
        assert igsearch.main(["--resume", str(run), "--steps", "1"]) == 0
        out = capsys.readouterr()
        warnings = [ln for ln in out.err.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1 and message in warnings[0] and "step_000002" in warnings[0], (damage, out.err)
        assert "resuming from" in out.out and "step_000001 (1 steps done)" in out.out
        assert [m["step"] for m in metrics(run)] == [0]  # the line of step 1 (not in a usable checkpoint) is dropped


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert igsearch.main(["--resume", str(run)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps({"model": "tiny-random"}))
    assert igsearch.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no complete checkpoint" in err and "\n" not in err


def test_keep_metrics_drops_later_and_half_written_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"st')
    igsearch.keep_metrics(path, 2)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_a_killed_run_resumes(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "igsearch.py"), *train_argv(tmp_path, run, 50)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "ckpt" / "step_000001").is_dir():
            assert proc.poll() is None and time.time() < deadline, "training never wrote a checkpoint"
            time.sleep(0.05)
        time.sleep(0.3)  # into the next step
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = int(max(p.name for p in (run / "ckpt").glob("step_*")).split("_")[1])
    assert done < 50
    assert igsearch.main(["--resume", str(run), "--steps", str(done + 1)]) == 0
    assert [m["step"] for m in metrics(run)] == list(range(done + 1))
