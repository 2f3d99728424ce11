"""Faults and hostile run files: a crafted optimizer state or weights, absurd settings in a
config.json, bad evaluation summaries, escape sequences and lone surrogates in files, a full disk, a kill while
--overwrite clears, a frozen or dead rank, and never deleting what the program did not write.

As in tests/test_bad_input.py, each case asserts the exact outcome: the exit code, one line on stderr, no
traceback, and the files that must stay as they were.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import experiments
import igsearch
import runs
import views
from conftest import ROOT
from retrieve import DataError
from test_bad_input import (DOCS, QA, cli, copy_run, files, hand_run, no_model,  # noqa: F401
                            one_line_error, train_argv, tree, untouched)
from test_runs import fake_compare_dir

ESC = "\x1b]0;pwned\x07\x1b[2J"  # sets the terminal's title, then clears the screen


def rewrite(ck, name, write):
    """Replace a checkpoint file (write(path)) and its manifest entry to match, as someone making one would."""
    write(ck / name)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"][name] = (ck / name).stat().st_size
    (ck / "manifest.json").write_text(json.dumps(manifest))


def kept_files(run):
    """tree(run) without what any --resume writes before it reads on (the lock, config.json with its settings)."""
    return {k: v for k, v in tree(run).items() if k.name not in (".lock", "config.json")}


def model_opt():
    """The model and optimizer that --resume builds, with AdamW's moments of every parameter."""
    model, _ = runs.tiny_random_model()
    import engine
    return model, engine.adamw(model.parameters(), 1e-3)


# ----------------------------------------------------------------------------------------------------
# 1. Everything loaded is checked before use

def test_a_misshaped_optimizer_state_is_refused_before_adamw_reads_it(tmp_path, hand_run):
    # fused AdamW reads the moments at the parameter's size: this file crashed --resume with SIGSEGV
    run = copy_run(hand_run, tmp_path)
    model, opt = model_opt()
    state = opt.state_dict()
    state["state"][0] = {**state["state"][0], "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    for ck in runs.checkpoints(run):
        rewrite(ck, "optimizer.pt", lambda p: torch.save(state, p))
    kept = kept_files(run)
    proc = subprocess.run([sys.executable, str(ROOT / "igsearch.py"), "--resume", str(run)], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "IGSEARCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {run}/ckpt/step_000002/optimizer.pt: parameter 0's exp_avg is torch.float32 [3], not "
        f"torch.float32 {list(next(model.parameters()).shape)} like its parameter; it does not fit this model's "
        "optimizer (--overwrite starts the run again)"]
    assert kept_files(run) == kept


def _state(mutate):
    model, opt = model_opt()
    state = opt.state_dict()
    mutate(state)
    return model, opt, state


OPT_STATES = [
    ("no-moments", lambda s: s["state"][1].pop("exp_avg_sq"), "the state of parameter 1 holds ['exp_avg', 'step']"),
    ("step-string", lambda s: s["state"][2].update(step="1"), "parameter 2's step is a string, not a number ≥ 0"),
    ("step-vector", lambda s: s["state"][2].update(step=torch.zeros(4)), "parameter 2's step is torch.float32 [4]"),
    ("moment-dtype", lambda s: s["state"][0].update(exp_avg=s["state"][0]["exp_avg"].double()),
     "parameter 0's exp_avg is torch.float64"),
    ("stranger", lambda s: s["state"].update({10 ** 6: {}}), "'state' has an entry 1000000 for no parameter"),
    ("fewer-params", lambda s: s["param_groups"][0]["params"].pop(), "parameter group 0 does not list"),
    ("twice", lambda s: s["param_groups"][0]["params"].__setitem__(1, 0), "do not number each parameter once"),
    ("lr-string", lambda s: s["param_groups"][0].update(lr="fast"), "parameter group 0 has lr = 'fast'"),
    ("betas-short", lambda s: s["param_groups"][0].update(betas=(0.9,)), "parameter group 0 has betas = (0.9,)"),
    ("groups", lambda s: s["param_groups"].append(dict(s["param_groups"][0])), "it has 2 parameter groups"),
    ("not-dicts", lambda s: s.update(state=[]), "it needs a dict 'state' and a list 'param_groups'"),
]


@pytest.mark.parametrize("name, mutate, words", OPT_STATES, ids=[c[0] for c in OPT_STATES])
def test_optimizer_states_that_do_not_fit_are_named(name, mutate, words):
    model, opt, state = _state(mutate)
    with pytest.raises(DataError) as e:
        runs.check_training_state("CK", model, opt, {}, state)
    assert str(e.value).startswith("CK/optimizer.pt: ") and words in str(e.value), str(e.value)


def test_a_fitting_optimizer_state_passes_and_loads():
    # the control: a real state passes, loads, and takes a step
    model, opt, state = _state(lambda s: None)
    runs.check_training_state("CK", model, opt, dict(model.state_dict()), state)
    runs.load_training_state("CK", model, opt, dict(model.state_dict()), state)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()


def test_a_misshaped_weight_is_refused_in_one_line(tmp_path, hand_run, capsys, untouched):
    run = copy_run(hand_run, tmp_path)
    ck = run / "ckpt" / "step_000002"
    weights = load_file(ck / "model" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name] = torch.zeros(3, 5)
    rewrite(ck, "model/model.safetensors", lambda p: save_file(weights, p))
    untouched()
    one_line_error(capsys, ["--resume", str(run)],
                   f"{ck}/model: tensor {name} is torch.float32 [3, 5], the model's is torch.float32 [128, 64]; "
                   "not a checkpoint of this model")
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


SIZES = [("max_turn_tokens", 10 ** 9, "131,072"), ("steps", 10 ** 12, "1,000,000"), ("group_size", 10 ** 9, "1,024"),
         ("questions_per_step", 10 ** 7, "10,000"), ("pg_timeout", 1e12, "604,800")]


@pytest.mark.parametrize("name, value, most", SIZES, ids=[c[0] for c in SIZES])
def test_absurd_sizes_are_refused_from_a_file_as_from_a_flag(tmp_path, hand_run, capsys, untouched, no_model,
                                                             name, value, most):
    run = copy_run(hand_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, name: value}))
    untouched(run)
    flag = "--" + name.replace("_", "-")
    one_line_error(capsys, ["--resume", str(run)], f"config.json: {name} = {value!r} cannot be used (must be at "
                   f"most {most}); fix the file or override it with {flag}")
    one_line_error(capsys, ["--model", "tiny-random", flag, str(value), "--out", str(tmp_path / "new")],
                   f"{flag} {value!r}: must be at most {most}")


def test_a_bad_eval_before_is_refused_before_training(tmp_path, hand_run, capsys, untouched):
    run = copy_run(hand_run, tmp_path)
    (run / "eval_before.json").write_text(json.dumps({"n": 2, "em": "x", "em_ci": [0, 1]}))
    kept = tree(run / "ckpt")
    untouched()
    rc, out, err = cli(capsys, ["--resume", str(run), "--steps", "3"])
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {run}/eval_before.json: 'em' is 'x', not a number; not an evaluation summary this program wrote"]
    assert tree(run / "ckpt") == kept and len((run / "metrics.jsonl").read_text().splitlines()) == 2  # nothing trained
    (run / "eval_before.json").write_text(json.dumps({"n": ESC, "em": 0.5}))
    line = one_line_error(capsys, ["--resume", str(run), "--steps", "3"], "eval_before.json: 'n' is ", "not a count")
    assert "\x1b" not in line and "\\x1b]0;pwned\\x07" in line


SUMMARIES = [({"em": 0.5, "em_ci": "wide"}, "'em_ci' is 'wide', not an interval [low, high] of 'em'"),
             ({"em_ci": [0, 1]}, "'em_ci' is [0, 1], not an interval [low, high] of 'em'"),
             ({"em": True}, "'em' is True, not a number"),
             ({"each": {"id": ["q1"], "em": [1.0]}}, "'each' needs a list 'answered' of numbers, one per id"),
             ({"each": {"id": ["q1"], "em": ["1"], "answered": [1.0]}}, "'each' needs a list 'em' of numbers, one per id"),
             ({"by_hops": {"2": {"n": -1}}}, "'by_hops' 2: 'n' is -1, not a count"),
             ([], "the summary is a list, not an object")]


@pytest.mark.parametrize("summary, words", SUMMARIES, ids=[w for _, w in SUMMARIES])
def test_summary_problems_are_named(summary, words):
    assert runs.summary_problem(summary) == words


def test_what_evaluate_writes_is_a_summary():
    # the control: a summary as igsearch.evaluate writes it, and the empty one (no dev questions)
    s = {"n": 2, "em": 0.5, "em_ci": [0.0, 1.0], "f1": float("nan"), "f1_ci": [float("nan")] * 2,
         "each": {"id": ["q1", None], "em": [1.0, 0.0], "answered": [1.0, 1.0]},
         "by_hops": {"1": {"n": 1, "em": 1.0, "em_ci": [1.0, 1.0]}}}
    assert runs.summary_problem(s) is None and runs.summary_problem({}) is None


def test_a_bad_warmup_summary_is_refused(tmp_path, hand_run, capsys, untouched, no_model):
    run = copy_run(hand_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "warmup_steps": 1}))
    (run / "warmup").mkdir()
    (run / "warmup" / "done.json").write_text(json.dumps({"before": {"em": "x"}, "warm-up": {}, "smoke": True,
                                                          "from": "tiny-random", "losses": []}))
    untouched(run / "warmup")
    one_line_error(capsys, ["--resume", str(run)], f"{run}/warmup/done.json: 'before': 'em' is 'x', not a number, "
                   f"not the summary this program writes; delete {run}/warmup to warm up again")


def test_a_model_directory_without_its_tokenizer_is_refused(tmp_path, files, capsys, untouched, tiny):
    data, corpus = files
    tiny[0].save_pretrained(tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bar
    untouched()
    one_line_error(capsys, train_argv(data, corpus, tmp_path / "run", "--model", str(tmp_path / "model")),
                   f"{tmp_path / 'model'}: the model directory holds no tokenizer (tokenizer.json")


def test_resume_that_would_train_nothing_is_refused(tmp_path, hand_run, capsys, untouched, no_model):
    run = copy_run(hand_run, tmp_path)
    kept = tree(run)
    untouched()
    one_line_error(capsys, ["--resume", str(run), "--steps", "1"], f"{run}: the run has done 2 steps and --steps 1 "
                   "would train none (and shorten its record); give --steps above 2 to go on")
    assert {k: v for k, v in tree(run).items() if k.name != ".lock"} == kept  # config.json keeps "steps": 2
    runs.write_json(run / "eval_after.json", {})
    kept = tree(run)
    one_line_error(capsys, ["--resume", str(run)], f"{run}: the run is finished (2 of 2 steps, evaluated); give "
                   "--steps above 2 to go on")
    assert {k: v for k, v in tree(run).items() if k.name != ".lock"} == {k: v for k, v in kept.items()
                                                                          if k.name != ".lock"}


# ----------------------------------------------------------------------------------------------------
# 2. One printer for text from files: no control character reaches the terminal, a table or a page

def test_escape_sequences_in_a_config_never_reach_the_terminal(tmp_path, hand_run, capsys, untouched, no_model):
    run = copy_run(hand_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "data": "q" + ESC, "corpus": "jsonl:c" + ESC}))
    untouched(run)
    for argv in (["--resume", str(run)], ["eval", "--model", str(run), "--out", str(run / "p.jsonl")]):
        line = one_line_error(capsys, argv, "\\x1b]0;pwned\\x07\\x1b[2J")
        assert "\x1b" not in line and "\x07" not in line


def test_tables_and_pages_show_control_characters_as_text(capsys):
    views.print_evals([("before" + ESC, {"n": 2, "em": 0.5, "em_ci": [0.0, 1.0]})])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "before\\x1b]0;pwned\\x07\\x1b[2J" in out
    table = views.markdown_table([{"model": "m" + ESC + "|x", "n": 2}])
    assert "\x1b" not in table and "| m\\x1b]0;pwned\\x07\\x1b[2J\\|x | 2 |" in table
    rec = {"question": "q", "golds": ["g" + ESC], "group": 0, "tokens": ["a" + ESC], "roles": [2], "answer": ESC,
           "reward": 0.0, "searches": []}
    page = views.html_from_records([rec], [[0.0]], "t" + ESC)
    assert "\x1b" not in page and "\x07" not in page and "\\x1b[2J" in page


def test_report_strips_escape_sequences_from_the_runs_it_reads(tmp_path, capsys):
    fake_compare_dir(tmp_path / "a", 0, {r: (0, 1) for r in experiments.REWARDS})
    for reward in experiments.REWARDS:
        path = tmp_path / "a" / f"{reward}-s0" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "data": "tiny" + ESC}))
    assert experiments.main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 0
    out, md = capsys.readouterr().out, (tmp_path / "out" / "compare.md").read_text()
    for text in (out, md):
        assert "\x1b" not in text and "Same data (tiny\\x1b]0;pwned\\x07\\x1b[2J)" in text


SURROGATES = [("question", lambda: {**QA[0], "question": "Where\ud800?"}, "qa"),
              ("gold", lambda: {**QA[0], "golden_answers": ["City\udfff"]}, "qa"),
              ("title", lambda: {**DOCS[0], "title": "Person \ud800"}, "corpus")]


@pytest.mark.parametrize("field, record, which", SURROGATES, ids=[c[0] for c in SURROGATES])
def test_a_lone_surrogate_in_a_data_row_is_refused_with_its_line(tmp_path, files, capsys, untouched, no_model,
                                                                 field, record, which):
    data, corpus = files
    path = data if which == "qa" else corpus
    rows = QA if which == "qa" else DOCS
    # ensure_ascii writes the surrogate as the escape \ud800, the only way a UTF-8 file can hold one
    path.write_text("".join(json.dumps(r) + "\n" for r in [rows[1], record(), *rows[2:]]))
    untouched()
    one_line_error(capsys, train_argv(data, corpus, tmp_path / "run"), f"{path}:2: holds '\\u", "half of a UTF-16 "
                   "surrogate pair")
    assert not (tmp_path / "run").exists()


def test_a_surrogate_pair_is_a_character(tmp_path):
    # the control: an emoji escaped as a pair (\ud83d\ude00) is one character, and loads
    import retrieve
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({**QA[0], "question": "Where 😀?"}) + "\n")
    assert "\\ud83d\\ude00" in path.read_text() and retrieve.load_questions(path)[0]["question"] == "Where 😀?"


# ----------------------------------------------------------------------------------------------------
# 3. Faults: a full disk, a kill while --overwrite clears, a frozen or dead rank

@pytest.fixture
def small_disk(tmp_path):
    """mount(bytes) -> a directory on a tmpfs of its own of that size (grow(path, bytes) resizes it), unmounted
    at teardown; the test is skipped, with the reason, where this process may not mount one."""
    mounted = []

    def mount(size):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: the disk-full tests mount a small tmpfs")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): the disk-full "
                        "tests need root with CAP_SYS_ADMIN")
        mounted.append(path)
        return path

    def grow(path, size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

    mount.grow = grow
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    """The bytes of one checkpoint of the tiny model, file by file, as the save writes them in order."""
    root = tmp_path_factory.mktemp("sizes")
    model, opt = model_opt()
    _, tok = runs.tiny_random_model()
    ck = runs.save_checkpoint(root, 1, model, tok, opt, torch.Generator(), random.Random(0))
    files = {str(p.relative_to(ck)): p.stat().st_size for p in ck.rglob("*") if p.is_file()}
    shutil.rmtree(root)
    return files, model, opt, tok


@pytest.mark.parametrize("where", ["weights", "tokenizer", "optimizer"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_nothing(small_disk, sizes, where):
    # each library fails in its own way (SafetensorError, tokenizers' Exception, torch.save's RuntimeError)
    files, model, opt, tok = sizes
    weights = files["model/model.safetensors"]
    tokenizer = sum(n for f, n in files.items() if f.startswith("model/") and "safetensors" not in f)
    room = {"weights": weights // 2, "tokenizer": weights + tokenizer // 2,
            "optimizer": weights + tokenizer + files["optimizer.pt"] // 2}[where]
    disk = small_disk(room)
    with pytest.raises(DataError) as e:
        runs.save_checkpoint(disk, 1, model, tok, opt, torch.Generator(), random.Random(0))
    assert str(e.value) == (f"{disk}/ckpt: no space left on device while writing checkpoint step_000001; its "
                            "partial files are removed and what was written before is kept: free some space, then "
                            "--resume goes on")
    assert list((disk / "ckpt").iterdir()) == []  # no .tmp-*: the space is free again


def test_a_run_on_a_full_disk_ends_in_one_line_and_resumes_once_space_is_freed(tmp_path, files, capsys, small_disk,
                                                                               sizes):
    data, corpus = files
    one = sum(sizes[0].values())
    disk = small_disk(one * 3 // 2)  # room for the first checkpoint, not the second
    run = disk / "run"
    rc, out, err = cli(capsys, train_argv(data, corpus, run, "--steps", "2"))
    assert rc == 2 and err.strip().splitlines() == [
        f"error: {run}/ckpt: no space left on device while writing checkpoint step_000002; its partial files are "
        "removed and what was written before is kept: free some space, then --resume goes on"]
    assert [p.name for p in (run / "ckpt").iterdir()] == ["step_000001"]
    assert runs.read_checkpoint(run / "ckpt" / "step_000001")[2]["step"] == 1  # the last complete one loads
    small_disk.grow(disk, one * 3)
    rc, out, err = cli(capsys, ["--resume", str(run)])
    assert rc == 0 and "resuming from" in out and "step_000001 (1 steps done)" in out, err
    assert [p.name for p in runs.checkpoints(run)] == ["step_000002", "step_000001"]
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_resume_clears_what_a_cut_save_left(tmp_path, hand_run, capsys, untouched):
    # a save cut by a kill (or by a full disk, before its partial files could be removed) holds its space until
    # the run goes on: --resume frees it first, even when it then trains no step and writes no checkpoint
    run = copy_run(hand_run, tmp_path)
    left = run / "ckpt" / f".tmp-step_000003-{os.getpid() + 1}"
    shutil.copytree(run / "ckpt" / "step_000002", left)
    (run / "warmup" / f".tmp-model-{os.getpid() + 1}").mkdir(parents=True)
    untouched()
    rc, out, err = cli(capsys, ["--resume", str(run)])  # 2 of 2 steps done, not yet evaluated: it evaluates
    assert rc == 0, err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_000001", "step_000002"]
    assert not (run / "warmup").exists() or not any((run / "warmup").iterdir())


def test_a_kill_while_overwrite_clears_leaves_a_run_that_overwrite_takes(tmp_path, hand_run, files, capsys):
    # the kill is simulated at each deletion in turn: whenever it lands, the directory is still a run (its
    # config.json is the last thing replaced), so --overwrite and --resume take it, never "not an igsearch run"
    data, corpus = files
    real_unlink, real_rmtree = runs.Path.unlink, runs.shutil.rmtree
    k = 0
    while True:
        run = tmp_path / f"run{k}"
        shutil.copytree(hand_run, run)
        (run / "notes.txt").write_text("mine")
        (run / "eval_before.json").write_text("{}")
        calls = [0]

        def counting(real):
            def kill(*a, **kw):
                calls[0] += 1
                if calls[0] > k:
                    raise KeyboardInterrupt
                return real(*a, **kw)
            return kill
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runs.Path, "unlink", counting(real_unlink))
            mp.setattr(runs.shutil, "rmtree", counting(real_rmtree))
            try:
                runs.clear_run(run)
                finished = True
            except KeyboardInterrupt:
                finished = False
        assert runs.is_run_dir(run) and (run / "notes.txt").read_text() == "mine"
        runs.claim_run_dir(run, overwrite=True)
        if finished:
            break
        k += 1
    assert k >= 3, "the clearing must have been cut at several points"
    rc, out, err = cli(capsys, train_argv(data, corpus, run, "--overwrite"))
    assert rc == 0, err
    assert (run / "notes.txt").read_text() == "mine" and [p.name for p in runs.checkpoints(run)] == ["step_000001"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available in this torch build")
@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"], ids=["frozen", "dead"])
def test_a_frozen_or_dead_rank_ends_the_run_in_bounded_time(tmp_path, files, how):
    # 2 gloo ranks, started as torchrun starts them (its own output would mix theirs): once the first checkpoint
    # is written, rank 1 is frozen (kill -STOP) or killed; rank 0 ends within --pg-timeout, in one line
    data, corpus = files
    run, timeout = tmp_path / "run", 5
    argv = train_argv(data, corpus, run, "--device", "cpu", "--pg-timeout", str(timeout), "--questions-per-step", "2")
    argv[argv.index("--steps") + 1] = "1000"
    port, procs = free_port(), []
    for r in (0, 1):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "IGSEARCH_CACHE": str(tmp_path / "cache")}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "igsearch.py"), *argv], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 600
        while not (run / "ckpt" / "step_000001").is_dir():
            assert all(p.poll() is None for p in procs) and time.time() < deadline, procs[0].stderr.read()[-3000:] \
                if procs[0].poll() is not None else "no checkpoint written"
            time.sleep(0.1)
        os.kill(procs[1].pid, getattr(signal, how))
        start = time.time()
        out, err = procs[0].communicate(timeout=timeout + 120)
        took = time.time() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: rank 0 of 2: another rank ended or did not answer within --pg-timeout {timeout} s (RuntimeError); "
        "the run's last checkpoint is kept: --resume goes on")
    assert took < timeout + 60, took
    assert f"2 ranks (ddp), a rank silent for {timeout} s ends the run" in out
    done = runs.last_checkpoint(run)[3]["step"]  # the run stays resumable, in one process
    assert igsearch.main(["--resume", str(run), "--steps", str(done + 1)]) == 0
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == list(range(done + 1))


# ----------------------------------------------------------------------------------------------------
# 4. Never delete or overwrite what the program did not write

def test_rotation_and_overwrite_delete_only_our_own_checkpoints(tmp_path, hand_run, files, capsys, untouched):
    data, corpus = files
    run = copy_run(hand_run, tmp_path)
    (run / "ckpt" / "step_000002.bak").mkdir()
    (run / "ckpt" / "step_000002.bak" / "NOTE.txt").write_text("the good one")
    (run / "ckpt" / "step_000000").mkdir()  # a name like ours, without our manifest
    (run / "ckpt" / "step_000000" / "NOTE.txt").write_text("mine too")
    untouched()
    rc, out, err = cli(capsys, ["--resume", str(run), "--steps", "4"])
    assert rc == 0, err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_000000", "step_000002.bak", "step_000003",
                                                                 "step_000004"]
    rc, out, err = cli(capsys, train_argv(data, corpus, run, "--overwrite"))
    assert rc == 0, err
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_000000", "step_000001", "step_000002.bak"]
    assert (run / "ckpt" / "step_000002.bak" / "NOTE.txt").read_text() == "the good one"
    assert (run / "ckpt" / "step_000000" / "NOTE.txt").read_text() == "mine too"


def test_report_refuses_tables_it_did_not_write(tmp_path, capsys, untouched):
    fake_compare_dir(tmp_path / "a", 0, {r: (0, 1) for r in experiments.REWARDS})
    out = tmp_path / "out"
    out.mkdir()
    untouched(out)
    for name in ("compare.md", "compare.json"):
        (out / name).write_text("my own notes\n")
        one_line_error(capsys, ["report", str(tmp_path / "a"), "--out", str(out)], f"--out {out}: {name} is there "
                       "and was not written by igsearch; --overwrite replaces it, or choose another --out")
        assert (out / name).read_text() == "my own notes\n"
        (out / name).unlink()
    assert experiments.main(["report", str(tmp_path / "a"), "--out", str(out)]) == 0
    assert experiments.main(["report", str(tmp_path / "a"), "--out", str(out)]) == 0  # its own tables: replaced
    (out / "compare.md").write_text("my own notes\n")
    assert experiments.main(["report", str(tmp_path / "a"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "compare.md").read_text().startswith("Same data (")


def test_report_leaves_out_what_is_not_a_run_and_refuses_bad_summaries(tmp_path, capsys, untouched):
    fake_compare_dir(tmp_path / "a", 0, {r: (0, 1) for r in experiments.REWARDS})
    (tmp_path / "a" / "outcome-sX").mkdir()
    assert experiments.main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 0
    assert f"{tmp_path / 'a' / 'outcome-sX'}: not a run of compare (named outcome-sN), left out" in capsys.readouterr().out
    after = tmp_path / "a" / "igsearch-s0" / "eval_after.json"
    after.write_text(json.dumps({**json.loads(after.read_text()), "em_ci": "[0, 1]"}))
    untouched()
    one_line_error(capsys, ["report", str(tmp_path / "a"), "--out", str(tmp_path / "out")],
                   f"{after}: 'em_ci' is '[0, 1]', not an interval [low, high] of 'em'")
