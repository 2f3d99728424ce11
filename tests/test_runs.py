"""Run directories: checkpoints every step, --resume, a killed run, damaged checkpoints."""
import ctypes
import dataclasses
import importlib.util
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine
import experiments
import igsearch
import retrieve
import runs
import views
import warmup
from conftest import ROOT, require_tool


def write_fixtures(tmp_path):
    docs = [{"title": f"Person {i}", "text": f"Person {i} was born in City{i} and worked as a "
             f"{['baker', 'painter', 'pilot'][i % 3]}."} for i in range(12)]
    qs = [{"id": str(i), "question": f"Where was Person {i} born?", "golden_answers": [f"City{i}"]} for i in range(12)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    return tmp_path / "qa.jsonl", tmp_path / "corpus.jsonl"


def train_argv(tmp_path, out, steps, show=0):
    data, corpus = write_fixtures(tmp_path)
    return ["--model", "tiny-random", "--data", str(data), "--corpus", f"jsonl:{corpus}", "--steps", str(steps),
            "--questions-per-step", "1", "--group-size", "2", "--max-turns", "1", "--max-turn-tokens", "8",
            "--max-response-tokens", "64", "--eval-questions", "0", "--show-every", str(show), "--out", str(out)]


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
    assert igsearch.main(train_argv(tmp_path, straight, 3, show=2)) == 0
    assert sorted(p.name for p in (straight / "views").iterdir()) == ["step_0.html", "step_0.json",
                                                                       "step_2.html", "step_2.json"]
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
    state = torch.load(split / "ckpt" / "step_000003" / "state.pt", weights_only=True)
    assert state["step"] == 3 and set(state["rng"]) >= {"python", "numpy", "torch", "generator", "rng"}


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path, capsys):
    # a run of 2 steps, written by hand (no training: only the choice of checkpoint is under test)
    trained = tmp_path / "trained"
    trained.mkdir()
    data, corpus = write_fixtures(tmp_path)
    cfg = igsearch.Config(model="tiny-random", data=str(data), corpus=f"jsonl:{corpus}", eval_questions=0, steps=2)
    (trained / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (trained / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    model, tok = runs.tiny_random_model()
    opt, gen, rng = torch.optim.AdamW(model.parameters()), torch.Generator(), random.Random(0)
    runs.save_checkpoint(trained, 1, model, tok, opt, gen, rng)
    runs.save_checkpoint(trained, 2, model, tok, opt, gen, rng)
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
    assert err.startswith("error:") and "not the config.json of an igsearch run" in err and "\n" not in err
    # a run whose checkpoints are all unreadable (a run with none resumes from step 0: tests/test_bad_input.py)
    data, corpus = write_fixtures(tmp_path)
    cfg = igsearch.Config(model="tiny-random", data=str(data), corpus=f"jsonl:{corpus}", eval_questions=0)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (run / "ckpt" / "step_000001").mkdir(parents=True)
    assert igsearch.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no checkpoint can be resumed from" in err and "\n" not in err


def test_keep_metrics_drops_later_and_half_written_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"st')
    runs.keep_metrics(path, 2)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_a_killed_run_resumes(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "igsearch.py"), *train_argv(tmp_path, run, 10 ** 6)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait on the files, not the clock: the metrics line of step 1 is written after checkpoint 1 and before
        # checkpoint 2, so the kill lands in the middle of the run however busy the machine is
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, "training never finished its second step"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = int(max(p.name for p in (run / "ckpt").glob("step_*")).split("_")[1])
    assert 1 <= done < 10 ** 6
    assert igsearch.main(["--resume", str(run), "--steps", str(done + 1)]) == 0
    assert [m["step"] for m in metrics(run)] == list(range(done + 1))


# ----------------------------------------------------------------------------------------------------
# python experiments.py eval

@pytest.fixture
def scripted_agent(monkeypatch):
    """Every rollout searches its own question, then answers "City0": right for question 0 only, and the
    retrieved documents hold every question's answer."""
    import grpo
    real = grpo.generate_rollouts

    def fake(model, tok, questions, groups, retriever, **kw):
        scripts = [[f"<search> {q['question']} </search>", "<answer> City0 </answer>"] for q in questions]
        return real(None, tok, questions, groups, retriever, max_turns=kw["max_turns"], topk=kw["topk"],
                    turn_fn=grpo.scripted_turns(tok, scripts))
    monkeypatch.setattr(grpo, "generate_rollouts", fake)


def test_eval_reports_em_searches_and_answer_retrieved(tmp_path, capsys, scripted_agent):
    data, corpus = write_fixtures(tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "question": "Where was Person 0 born?", "golden_answers": ["Mars"]}) + "\n")
    preds = tmp_path / "preds.jsonl"
    rc = experiments.main(["eval", "--model", "tiny-random", "--data", f"{data},{other}", "--corpus", f"jsonl:{corpus}",
                        "--limit", "4", "--out", str(preds)])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("qa ", "other "))}
    assert rows["qa"][1:] == ["4", "0.250", "0.250", "1.000", "1.000"]       # n em f1 searches answer_retrieved
    assert rows["other"][1:] == ["1", "0.000", "0.000", "1.000", "0.000"]
    recs = [json.loads(ln) for ln in preds.read_text().splitlines()]
    assert len(recs) == 5
    assert recs[0] == {"dataset": "qa", "id": "0", "question": "Where was Person 0 born?", "golds": ["City0"],
                       "prediction": "City0", "em": 1.0, "f1": 1.0, "searches": 1,
                       "queries": ["Where was Person 0 born?"], "answer_retrieved": True}
    assert recs[1]["em"] == 0.0 and recs[1]["prediction"] == "City0" and recs[1]["answer_retrieved"]


def test_eval_of_a_run_loads_its_last_intact_checkpoint(tmp_path, capsys, scripted_agent):
    data, corpus = write_fixtures(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    cfg = igsearch.Config(model="tiny-random", data=str(data), corpus=f"jsonl:{corpus}", max_turns=1)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    model, tok = runs.tiny_random_model()
    opt = torch.optim.AdamW(model.parameters())
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    runs.save_checkpoint(run, 1, model, tok, opt, gen, rng)
    runs.save_checkpoint(run, 2, model, tok, opt, gen, rng)
    (run / "ckpt" / "step_000002" / "optimizer.pt").write_bytes(b"")
    assert experiments.main(["eval", "--model", str(run), "--limit", "2"]) == 0
    out, err = capsys.readouterr()
    assert "step_000001" in out.splitlines()[-4] and "is missing" not in err and "step_000002" in err
    assert len((run / "eval.jsonl").read_text().splitlines()) == 2   # the run's data and corpus are used


def test_eval_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert experiments.main(["eval", "--model", "tiny-random", "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data") and "\n" not in err


# ----------------------------------------------------------------------------------------------------
# python igsearch.py plot

def fake_run(path, ig_key):
    path.mkdir()
    lines = [{"step": s, "reward": 0.1 * s, "em": 0.1 * s, "kl": 0.01 * s, "response_len": 50 + s,
              "searches": 1.0, **({ig_key: 0.2 * s} if ig_key else {})} for s in range(4)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 4, "rew')
    return path


def test_curves_read_ig_or_inforeasoner_ig(tmp_path):
    ig = views.curves(fake_run(tmp_path / "ig", "ig_mean"))
    ir = views.curves(fake_run(tmp_path / "ir", "ir_ig_mean"))
    out = views.curves(fake_run(tmp_path / "out", None))
    assert ig["information gain"] == ([0, 1, 2, 3], [0.0, 0.2, 0.4, pytest.approx(0.6)])
    assert ir["information gain"][1][1] == 0.2
    assert "information gain" not in out and out["EM"][0] == [0, 1, 2, 3]   # the half-written line is skipped
    assert set(ig) == {t for t, _ in views.CURVES}


def test_plot_writes_a_png_or_says_matplotlib_is_missing(tmp_path, capsys, monkeypatch):
    runs = [str(fake_run(tmp_path / "a", "ig_mean")), str(fake_run(tmp_path / "b", None))]
    png = tmp_path / "c.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert igsearch.main(["plot", "--run", *runs, "--out", str(png)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: plot needs matplotlib, which is not installed: pip install matplotlib"
        require_tool(False, "matplotlib", "pip install matplotlib")   # the plot itself did not run
    assert igsearch.main(["plot", "--run", *runs, "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1500, 800)      # the 15 x 8 inch figure at 100 dpi
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert igsearch.main(["plot", "--run", *runs, "--out", str(png)]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_plot_of_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert igsearch.main(["plot", "--run", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# python experiments.py compare

def _summary(em):
    return {"n": 4, "em": em, "em_ci": [em / 2, em], "f1": em, "f1_ci": [0.0, 1.0], "answered": 1.0,
            "answered_ci": [1.0, 1.0], "searches": 1.5, "searches_ci": [1.0, 2.0],
            "by_hops": {"1": {"n": 2, "em": em, "em_ci": [0.0, 1.0], "f1": em, "f1_ci": [0.0, 1.0]}}}


def test_compare_starts_every_run_from_one_warmup_and_resumes(tmp_path, capsys, monkeypatch):
    seen, warmed = [], []

    def fake_warm_start(cfg, out, *a, **kw):
        warmed.append(out)
        return "WARM-DIR", {"before": _summary(0.0), "warm-up": _summary(0.25), "smoke": False}

    def fake_train(cfg, resume=False, before=None, overwrite=False):  # the real train() is covered above
        assert overwrite  # compare owns its runs: a run cut before its first checkpoint starts again
        seen.append((cfg, resume, before))
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        ig = {"igsearch": "ig_mean", "inforeasoner": "ir_ig_mean"}.get(cfg.reward)
        (out / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": s, "reward": 0.5, "em": 0.0, "kl": 0.0, "response_len": 9, "searches": 1.0,
             "time_rollout": 1.0, "time_update": 0.5, **({ig: 0.1 * (s + 1)} if ig else {})}) + "\n" for s in range(2)))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (out / "eval_before.json").write_text(json.dumps(before))
        (out / "eval_after.json").write_text(json.dumps(_summary(0.5)))
        return {"before": before, "after": _summary(0.5), "out": str(out)}

    monkeypatch.setattr(warmup, "warm_start", fake_warm_start)
    monkeypatch.setattr(igsearch, "train", fake_train)
    argv = ["compare", "--tiny", "--seeds", "3,4", "--out", str(tmp_path / "cmp")]
    assert experiments.main(argv) == 0
    assert warmed == [tmp_path / "cmp"]                       # one warm-up for all six runs
    assert [(c.reward, c.seed) for c, _, _ in seen] == [(r, s) for s in (3, 4) for r in experiments.REWARDS]
    assert all(c.model == "WARM-DIR" and c.warmup_steps == 0 and not resume and before == _summary(0.25)
               for c, resume, before in seen)
    assert {c.steps for c, _, _ in seen} == {igsearch.PRESETS["tiny"]["steps"]}
    assert [c.out for c, _, _ in seen] == [str(tmp_path / "cmp" / f"{r}-s{s}") for s in (3, 4) for r in experiments.REWARDS]
    out = capsys.readouterr().out
    assert "| warm-up (start of every run) | 4 | 0.250 [0.12, 0.25] |" in out
    assert "| igsearch-s3 | 4 | 0.500 [0.25, 0.50] |" in out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["model"] for r in rows][:2] == ["before warm-up", "warm-up (start of every run)"] and len(rows) == 8
    ig = {r["model"]: r["mean_ig"] for r in rows[2:]}
    assert ig["outcome-s3"] is None and ig["igsearch-s3"] == pytest.approx(0.15) and ig["inforeasoner-s4"] == pytest.approx(0.15)
    assert all(r["train_reward"] == 0.5 and r["s_per_step"] == 1.5 for r in rows[2:])
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.count("\n| ") == 9 + 4   # header + 8 rows; then one row per reward over the seeds, and its header
    assert "\n| igsearch | 3,4 | 0 | – |" in md   # these summaries hold no per-question values to pool
    pooled = json.loads((tmp_path / "cmp" / "seeds.json").read_text())
    assert [(r["model"], r["seeds"], r["mean_ig"]) for r in pooled] == [
        ("outcome", "3,4", None), ("igsearch", "3,4", pytest.approx(0.15)), ("inforeasoner", "3,4", pytest.approx(0.15))]
    # run again: every run is finished, so nothing is trained twice
    seen.clear()
    assert experiments.main(argv) == 0 and seen == []
    # a run cut off (no eval_after.json) is resumed from its checkpoint when it has one
    (tmp_path / "cmp" / "igsearch-s4" / "eval_after.json").unlink()
    (tmp_path / "cmp" / "igsearch-s4" / "ckpt" / "step_000001").mkdir(parents=True)
    assert experiments.main(argv) == 0
    assert [(c.reward, c.seed, resume) for c, resume, _ in seen] == [("igsearch", 4, True)]


def test_control_arm_continues_the_warmup_on_as_many_trajectories_as_a_grpo_arm(tmp_path, capsys, monkeypatch):
    # --arms control: from the shared warm-up, steps supervised steps of questions_per_step × G oracle
    # trajectories (the count a GRPO arm samples), at the warm-up's lr, then the same evaluation; read back after
    warm = tmp_path / "cmp" / "warmup" / "model"
    monkeypatch.setattr(warmup, "warm_start", lambda cfg, out, *a, **kw: (
        str(warm), {"before": {}, "warm-up": _summary(0.25), "smoke": False}))
    loaded, supervised = [], []
    monkeypatch.setattr(runs, "load_model", lambda name, device, seed=0: loaded.append(name) or ("M", "T", False))

    def fake_warmup(model, tok, retriever, questions, cfg, rng, log=print):
        supervised.append((model, cfg.warmup_steps, cfg.warmup_batch, cfg.warmup_lr, len(questions)))
        return [2.0, 1.5, 1.0]
    monkeypatch.setattr(warmup, "warmup", fake_warmup)
    monkeypatch.setattr(igsearch, "evaluate", lambda model, tok, retriever, qs, cfg, dp=None: (_summary(0.75), []))
    argv = ["compare", "--tiny", "--arms", "control", "--steps", "3", "--questions-per-step", "2", "--group-size", "5",
            "--warmup-lr", "0.0002", "--out", str(tmp_path / "cmp")]
    assert experiments.main(argv) == 0
    assert loaded == [str(warm)] and supervised == [("M", 3, 10, 0.0002, len(retrieve.load_data("tiny")["train"]))]
    run = tmp_path / "cmp" / "control-s0"
    assert [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [2.0, 1.5, 1.0]
    saved = json.loads((run / "config.json").read_text())
    assert (saved["warmup_steps"], saved["warmup_batch"], saved["model"]) == (3, 10, str(warm))
    assert json.loads((run / "eval_after.json").read_text())["em"] == 0.75
    assert "| control-s0 | 4 | 0.750 [0.38, 0.75] |" in capsys.readouterr().out
    supervised.clear()
    assert experiments.main(argv) == 0 and supervised == []               # finished: read back, not trained again
    # the control needs a warm-up to continue
    assert experiments.main(argv + ["--warmup-steps", "0"]) == 2
    assert "--arms control continues the warm-up" in capsys.readouterr().err


def fake_compare_training(monkeypatch):
    """compare's warm-up and training replaced by fakes that write a finished run's files. Returns the lists of
    the configs they are given: (warm-ups, runs)."""
    warmed, trained = [], []

    def fake_train(cfg, resume=False, before=None, overwrite=False):
        trained.append(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward": 0.5, "ig_mean": 3.0}) + "\n")
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        for name in ("eval_before.json", "eval_after.json"):
            runs.write_json(out / name, _summary(0.5))
        return {"before": _summary(0.25), "after": _summary(0.5), "out": str(out)}
    def fake_warm_start(cfg, out, *a, **kw):
        warmed.append(cfg)
        info = {"before": {}, "warm-up": _summary(0.25), "smoke": False}
        (out / "warmup").mkdir(parents=True)
        runs.write_json(out / "warmup" / "done.json", {**info, "losses": [], "from": cfg.model})
        return "WARM", info
    monkeypatch.setattr(warmup, "warm_start", fake_warm_start)
    monkeypatch.setattr(igsearch, "train", fake_train)
    return warmed, trained


def test_clip_ablation_arm_is_igsearch_with_its_own_clip(tmp_path, monkeypatch, capsys):
    _, trained = fake_compare_training(monkeypatch)
    argv = ["compare", "--tiny", "--arms", "igsearch,igsearch-c8", "--out", str(tmp_path / "cmp")]
    assert experiments.main(argv) == 0
    seen = [(Path(c.out).name, c.reward, c.ig_clip) for c in trained]
    assert seen == [("igsearch-s0", "igsearch", 2.0), ("igsearch-c8-s0", "igsearch", 8.0)]
    assert "| igsearch-c8-s0 | 4 |" in capsys.readouterr().out
    # report reads it back as its own arm, after igsearch
    assert experiments.main(["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "rep")]) == 0
    assert [r["model"] for r in json.loads((tmp_path / "rep" / "seeds.json").read_text())] == ["igsearch", "igsearch-c8"]
    assert experiments.main(["compare", "--tiny", "--arms", "igsearch-cx", "--out", str(tmp_path / "x")]) == 2
    assert "--arms 'igsearch-cx': give distinct arms" in capsys.readouterr().err


def test_lora_arm_is_its_reward_with_adapters_at_the_lora_lr_on_the_full_warm_up(tmp_path, monkeypatch, capsys):
    warmed, trained = fake_compare_training(monkeypatch)
    seen = lambda: [(Path(c.out).name, c.reward, c.lora_rank, c.lr, c.model) for c in trained]  # noqa: E731
    argv = ["compare", "--tiny", "--arms", "outcome,outcome-lora16", "--out", str(tmp_path / "cmp")]
    assert experiments.main(argv) == 0
    # one warm-up, with full fine-tuning; the adapters' arm at 10 x --lr (1e-5 in --tiny), from that warm-up
    assert [c.lora_rank for c in warmed] == [0]
    assert seen() == [("outcome-s0", "outcome", 0, 1e-5, "WARM"), ("outcome-lora16-s0", "outcome", 16, 1e-4, "WARM")]
    assert "| outcome-lora16-s0 | 4 |" in capsys.readouterr().out
    assert experiments.main(["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "rep")]) == 0
    assert [r["model"] for r in json.loads((tmp_path / "rep" / "seeds.json").read_text())] == ["outcome", "outcome-lora16"]
    trained.clear()
    assert experiments.main(["compare", "--tiny", "--arms", "igsearch-lora8", "--lora-lr", "3e-4",
                             "--out", str(tmp_path / "b")]) == 0
    assert seen() == [("igsearch-lora8-s0", "igsearch", 8, 3e-4, "WARM")]
    # adapters on every arm and on one arm at once: refused in one line; rank 0 is no adapter arm
    assert experiments.main(argv[:-1] + [str(tmp_path / "c"), "--lora-rank", "4"]) == 2
    assert "give one or the other" in capsys.readouterr().err
    assert experiments.main(["compare", "--tiny", "--arms", "outcome-lora0", "--out", str(tmp_path / "d")]) == 2
    assert "--arms 'outcome-lora0': give distinct arms" in capsys.readouterr().err


def fake_compare_dir(root, seed, em_of, warm_em=(0.0, 0.0), steps=2, finished=True):
    """A compare directory written by hand: warmup/done.json and one run per reward, with per-question EM over
    the questions q1, q2 (em_of[reward])."""
    def summary(em):
        return {"n": 2, "em": sum(em) / 2, "em_ci": [0.0, 1.0], "f1": sum(em) / 2, "answered": 1.0,
                "each": {"id": ["q1", "q2"], "em": list(em), "answered": [1.0, 1.0]}}
    (root / "warmup").mkdir(parents=True)
    runs.write_json(root / "warmup" / "done.json", {"before": {}, "warm-up": summary(warm_em), "smoke": False,
                                                    "losses": [], "from": "m"})
    for reward in experiments.REWARDS:
        run = root / f"{reward}-s{seed}"
        run.mkdir()
        cfg = igsearch.Config(reward=reward, seed=seed, steps=steps, out=str(run))
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward": 0.5, "time_update": 1.0}) + "\n")
        runs.write_json(run / "eval_before.json", summary(warm_em))
        if finished:
            runs.write_json(run / "eval_after.json", summary(em_of[reward]))


def test_report_pools_the_seeds_of_several_compare_directories(tmp_path, capsys):
    fake_compare_dir(tmp_path / "a", 0, {"outcome": (0, 1), "igsearch": (1, 1), "inforeasoner": (0, 0)})
    fake_compare_dir(tmp_path / "b", 1, {"outcome": (0, 0), "igsearch": (0, 1), "inforeasoner": (1, 0)})
    out = tmp_path / "docs"
    assert experiments.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in rows] == ["warm-up (start of every run)", "outcome-s0", "igsearch-s0",
                                          "inforeasoner-s0", "outcome-s1", "igsearch-s1", "inforeasoner-s1"]
    pooled = {r["model"]: r for r in json.loads((out / "seeds.json").read_text())}
    # per question over the seeds: outcome q1 0, q2 0.5; igsearch 0.5, 1; inforeasoner 0.5, 0
    assert [pooled[r]["em"] for r in experiments.REWARDS] == [0.25, 0.75, 0.25]
    assert pooled["igsearch"]["em_vs_outcome"] == 0.5 and pooled["inforeasoner"]["em_vs_outcome"] == 0.0
    assert "seeds [0, 1]" in (out / "compare.md").read_text() and "| igsearch | 0,1 | 2 |" in capsys.readouterr().out
    # OUT keeps what the tables are made of, and only that: report on OUT alone writes the same tables
    assert sorted(p.name for p in (out / "igsearch-s1").iterdir()) == sorted(experiments.RECORD_FILES)
    assert [p.name for p in (out / "warmup").iterdir()] == ["done.json"]
    again = tmp_path / "again"
    assert experiments.main(["report", str(out), "--out", str(again)]) == 0
    for name in ("compare.md", "seeds.json", "pairwise.json"):
        assert (again / name).read_text() == (out / name).read_text(), name
    pairs = {(r["arm"], r["vs"]): r for r in json.loads((out / "pairwise.json").read_text())}
    assert (pairs["igsearch", "outcome"]["diff"], pairs["igsearch", "outcome"]["better"]) == (0.5, 2)
    assert "2000 resamples" in (out / "compare.md").read_text()
    capsys.readouterr()
    # a cut run is left out, and said so
    fake_compare_dir(tmp_path / "c", 2, {}, finished=False)
    experiments.main(["report", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(out)])
    assert "inforeasoner-s2: not finished (no eval_after.json), left out" in capsys.readouterr().out
    assert [r["seeds"] for r in json.loads((out / "seeds.json").read_text())] == ["0", "0", "0"]


def rebuilt_by_report(name, tmp_path):
    """docs/NAME, after checking that report rebuilds each of its tables, byte for byte, from its records alone."""
    docs = ROOT / "docs" / name
    assert experiments.main(["report", str(docs), "--out", str(tmp_path / "again")]) == 0
    for table in ("compare.md", "compare.json", "seeds.json", "pairwise.json"):
        assert (tmp_path / "again" / table).read_text() == (docs / table).read_text(), table
    return docs


def test_the_committed_hotpot_tables_are_what_report_rebuilds_from_the_committed_records(tmp_path, capsys):
    # docs/hotpot-cpu keeps each arm's records; every table there must follow from them alone, so an edited
    # record or a table written by hand shows up here
    docs = rebuilt_by_report("hotpot-cpu", tmp_path)
    pooled = {r["model"]: r for r in json.loads((docs / "seeds.json").read_text())}
    assert [pooled[r]["seeds"] for r in experiments.REWARDS] == ["0,1"] * 3
    assert "| control | 0,1 | 300 |" in capsys.readouterr().out


def test_the_committed_tiny_test_split_tables_are_what_report_rebuilds_from_the_committed_records(tmp_path):
    # docs/cpu-test: the cpu preset evaluated on the tiny set's test split, full fine-tuning beside adapters
    docs = rebuilt_by_report("cpu-test", tmp_path)
    rows = {r["model"]: r for r in json.loads((docs / "compare.json").read_text())}
    assert {"outcome-s0", "outcome-lora16-s0"} <= rows.keys()
    assert runs.saved_config(docs / "outcome-s0")["eval_split"] == "test"
    assert runs.saved_config(docs / "outcome-lora16-s0")["lora_rank"] == 16


def test_compare_on_the_tiny_preset_really_trains_all_three(tmp_path, capsys, monkeypatch):
    # the real warm-up and train() for each reward: the --tiny preset (Vital Articles, generated QA set), cut short
    monkeypatch.setenv("IGSEARCH_DATA_DIR", str(tmp_path / "data"))
    argv = ["compare", "--tiny", "--model", "tiny-random", "--steps", "1", "--eval-questions", "2",
            "--max-turn-tokens", "6", "--max-response-tokens", "24", "--ir-samples", "2", "--ir-max-tokens", "3",
            "--warmup-steps", "1", "--warmup-batch", "2", "--out", str(tmp_path / "cmp")]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "cmp" / "warmup" / "model" / "config.json").is_file()
    for reward in experiments.REWARDS:
        run = tmp_path / "cmp" / f"{reward}-s0"
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["step"] == 0
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["reward"] == reward and cfg["model"] == str(tmp_path / "cmp" / "warmup" / "model")
        assert f"| {reward}-s0 | 2 |" in out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert all(r["em"] == 0.0 for r in rows)  # random weights: no answer is right
    # each run is paired with the warm-up on the same 2 questions: 0 - 0, question by question
    assert [(r["em_gain"], r["em_gain_ci"]) for r in rows[-3:]] == [(0.0, [0.0, 0.0])] * 3


def test_a_save_clears_what_a_killed_save_left(tmp_path):
    model, tok = runs.tiny_random_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stale = tmp_path / "ckpt" / ".tmp-step_000001-99999"     # a save killed half-way, by another process
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"half")
    assert runs.checkpoints(tmp_path) == []                # never taken for a checkpoint
    final = runs.save_checkpoint(tmp_path, 1, model, tok, opt, torch.Generator(), __import__("random").Random(0))
    assert not stale.exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000001"] and final.name == "step_000001"
    path, weights, _, state = runs.last_checkpoint(tmp_path)
    assert path == final and state["step"] == 1
    assert torch.equal(weights["model.embed_tokens.weight"], model.model.embed_tokens.weight)


STEADY_HEAP_CHILD = """
import ctypes, sys, torch
import runs
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "steady":
    assert runs.steady_heap()
big = torch.empty(4 << 20); del big  # 16 MiB freed: glibc's own threshold rises to 16 MiB
mapped = libc.mallinfo2().hblkhd
x = torch.empty(2 << 20)  # 8 MiB
print((libc.mallinfo2().hblkhd - mapped) / 2**20)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2) to read the heap")
def test_steady_heap_maps_a_big_tensor_after_a_bigger_one_was_freed():
    # glibc's default: once a 16 MiB block is freed, an 8 MiB tensor comes from the heap (0 MiB newly mapped);
    # with steady_heap's fixed 4 MiB threshold it gets a mapping of its own (8 MiB and a page header)
    def mapped_mib(mode):
        out = subprocess.run([sys.executable, "-c", STEADY_HEAP_CHILD, mode], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
        return float(out)

    assert mapped_mib("default") == 0
    assert 8 <= mapped_mib("steady") < 8.1


KERNEL_CACHE_CHILD = """
import os, torch
import runs
runs.steady_heap()
print(runs.bounded_kernel_cache(8))
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
lin = torch.nn.Linear(576, 1536)
start = rss_mb()
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    for rows in range(1, 801):  # 800 input shapes, as 800 sequence lengths would give
        lin(torch.ones(rows, 576))
runs.release_memory()
print(rss_mb() - start)
"""


def test_bounded_kernel_cache_sets_onednns_capacity_unless_the_user_did(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert runs.bounded_kernel_cache() == "64" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    assert runs.bounded_kernel_cache() == "512" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # set but empty: oneDNN's own default otherwise
    assert runs.bounded_kernel_cache() == "64"


@pytest.mark.skipif(not engine.bf16_native(torch.device("cpu")), reason="oneDNN runs bf16 matmuls natively only "
                    "on CPUs with AVX-512 BF16 or AMX; this one has neither")
def test_a_bounded_kernel_cache_holds_less_after_many_bf16_shapes():
    # oneDNN keeps a kernel with scratch about the weight's size (576 x 1536 bf16: 1.7 MiB) for each input
    # shape: with its own capacity of 1,024 the 800 shapes' kernels all stay (hundreds of MiB); bounded to 8,
    # the evicted ones' memory goes back with the heap
    def growth(capacity):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if capacity:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
        out = subprocess.run([sys.executable, "-c", KERNEL_CACHE_CHILD], capture_output=True, text=True, cwd=ROOT,
                             env=env, check=True).stdout.split()
        return out[0], float(out[1])

    (own, grown_own), (bounded, grown_bounded) = growth(1024), growth(None)
    assert own == "1024" and bounded == "8"
    assert grown_own > 400 and grown_bounded < grown_own / 2, (grown_own, grown_bounded)


RELEASE_CHILD = """
import os, torch
import runs
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
runs.release_memory()
start = rss_mb()
xs, keep = [], []
for _ in range(5000):
    xs.append(torch.ones(20000))
    keep.append(torch.ones(16))
grown = rss_mb() - start
del xs
held = rss_mb()
runs.release_memory()
assert sum(float(k.sum()) for k in keep) == 5000 * 16
print(grown, held - rss_mb())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc (Linux)")
def test_release_memory_hands_freed_heap_back():
    # 5,000 tensors of 80 KB go on glibc's heap (below its mmap threshold), each followed by a small one that is
    # kept: the freed 80 KB blocks are holes between blocks in use, which glibc cannot give back from the heap's
    # top, so the resident size stays where it was until the trim. (One small tensor kept after all of them was
    # not enough: it may land in an older free chunk, and then freeing the 5,000 shrank the heap at once.)
    # A fresh process: how much a trim gives back depends on the heap's history (in-process, after the other
    # tests of this file, most of it can stay held).
    out = subprocess.run([sys.executable, "-c", RELEASE_CHILD], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    grown, released = map(float, out.split())
    assert grown > 300 and released > 300
