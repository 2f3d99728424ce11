"""Bad input and faults against the command line and the files it reads.

Each case asserts the exact outcome: the exit code, one line on stderr (`error: ...` naming the flag, file or
line), no traceback, and no file outside the run directory touched (the `untouched` fixture). Everything
runs on the tiny random model with a 12-document corpus; data errors must come before any model is loaded
(the `no_model` fixture makes loading one fail the test).
"""
import dataclasses
import gzip
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import experiments
import igsearch
import retrieve
import runs
from conftest import ROOT


# ----------------------------------------------------------------------------------------------------
# Fixtures: tiny data files, a run made by hand, the guards

DOCS = [{"id": f"d{i}", "title": f"Person {i}", "text": f"Person {i} was born in City{i} and worked as a "
         f"{['baker', 'painter', 'pilot'][i % 3]}."} for i in range(12)]
QA = [{"id": f"q{i}", "question": f"Where was Person {i} born?", "golden_answers": [f"City{i}"]} for i in range(12)]


def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    return jsonl(tmp_path / "qa.jsonl", QA), jsonl(tmp_path / "corpus.jsonl", DOCS)


def train_argv(data, corpus, out, *more):
    return ["--model", "tiny-random", "--data", str(data), "--corpus", f"jsonl:{corpus}", "--steps", "1",
            "--questions-per-step", "1", "--group-size", "2", "--max-turns", "1", "--max-turn-tokens", "4",
            "--max-response-tokens", "32", "--eval-questions", "0", "--show-every", "0", "--out", str(out), *more]


def snapshot(root, skip):
    """{file: (size, mtime)} under root, leaving out the paths in `skip` (the run directory, the cache)."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not any(p == s or s in p.parents for s in skip)}


@pytest.fixture
def untouched(tmp_path, monkeypatch):
    """Run from an empty working directory; after the test, every file under tmp_path outside the paths
    the test allowed (`allow`, the run directory) is as it was, and the working directory is still empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    allow = [tmp_path / "cache", tmp_path / "run"]
    before = {}

    def start(*extra):
        allow.extend(extra)
        before.update(snapshot(tmp_path, allow))
    yield start
    assert snapshot(tmp_path, allow) == before, "a file outside the run directory was touched"
    assert not any(cwd.iterdir()), f"written into the working directory: {list(cwd.iterdir())}"


@pytest.fixture
def no_model(monkeypatch):
    def fail(*a, **kw):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(runs, "load_model", fail)
    monkeypatch.setattr(runs, "tiny_random_model", fail)


def cli(capsys, argv):
    """igsearch.main (experiments.main for its commands) in-process -> (exit code, stdout, stderr); a
    traceback would fail the test."""
    rc = (experiments.main if argv and argv[0] in experiments.COMMANDS else igsearch.main)(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def one_line_error(capsys, argv, *words, rc=2):
    code, out, err = cli(capsys, argv)
    lines = err.strip().splitlines()
    assert code == rc, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def make_run(path, data, corpus, steps=2, **cfg):
    """A run directory written by hand (no training): config.json, metrics.jsonl, a checkpoint per step."""
    path.mkdir(parents=True)
    c = igsearch.Config(model="tiny-random", data=str(data), corpus=f"jsonl:{corpus}", eval_questions=0,
                        steps=steps, questions_per_step=1, group_size=2, max_turns=1, max_turn_tokens=4,
                        max_response_tokens=32, show_every=0, out=str(path), **cfg)
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.5, "em": 0.0}) + "\n"
                                                for s in range(steps)))
    model, tok = runs.tiny_random_model()
    opt = torch.optim.AdamW(model.parameters())
    for s in range(1, steps + 1):
        runs.save_checkpoint(path, s, model, tok, opt, torch.Generator().manual_seed(0), random.Random(0))
    return path


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
    """A two-checkpoint run made once; tests copy it (copy_run) before they change it."""
    root = tmp_path_factory.mktemp("hand")
    data, corpus = jsonl(root / "qa.jsonl", QA), jsonl(root / "corpus.jsonl", DOCS)
    return make_run(root / "run", data, corpus)


def copy_run(hand_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hand_run, run)
    return run


def view_json(**change):
    """A saved step as views/step_N.json holds it (one rollout, three tokens)."""
    rec = {"question": "Where?", "golds": ["City0"], "group": 0, "tokens": ["<think>", " Paris", "</answer>"],
           "roles": [1, 2, 2], "answer": "Paris", "reward": 1.0,
           "searches": [{"query": "q", "query_span": [1, 2], "ig": 0.25}]}
    rec.update(change)
    return {"step": 0, "rollouts": [rec], "A": [[0.0, 0.5, -0.5]]}


def write_view(run, view, step=0):
    (run / "views").mkdir(parents=True, exist_ok=True)
    path = run / "views" / f"step_{step}.json"
    path.write_text(view if isinstance(view, str) else json.dumps(view))
    return path


# ----------------------------------------------------------------------------------------------------
# 1. Settings: type, range, finite; refused before anything is read

SETTINGS = [
    (["--token-budget", "0"], "--token-budget 0: must be at least 1"),
    (["--forward-budget", "0"], "--forward-budget 0: must be at least 1"),
    (["--seed", "-1"], "--seed -1: must be at least 0"),
    (["--seed", str(2 ** 32)], "must be below 2**32"),
    (["--device", "gpu0"], "--device 'gpu0': use auto, cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr=-1e-6"], "--lr -1e-06"),
    (["--temperature", "-1"], "--temperature -1.0: must be a finite number > 0"),
    (["--temperature", "0"], "every rollout of a group is the same"),
    (["--max-response-tokens", "-5"], "--max-response-tokens -5: must be at least 1"),
    (["--max-turns", "-1"], "--max-turns -1: must be at least 1"),
    (["--eval-questions", "-1"], "--eval-questions -1: must be at least 0"),
    (["--ig-alpha", "nan"], "--ig-alpha nan"),
    (["--ir-samples", "0"], "--ir-samples 0: must be at least 1"),
    (["--clip-eps", "1.5"], "--clip-eps 1.5: must be below 1"),
    (["--clip-ratio-c", "0.5"], "--clip-ratio-c 0.5: must be 0 (off) or above 1"),
    (["--beta-kl", "-0.1"], "--beta-kl -0.1"),
    (["--grad-clip", "0"], "--grad-clip 0.0: must be a finite number > 0"),
    (["--micro-batch", "2"], "unrecognized arguments: --micro-batch 2"),   # retired: --token-budget
    (["--group-size", "1"], "GRPO compares rollouts within a group"),
    (["--reward", "bogus"], "--reward 'bogus': is not one of outcome, igsearch, inforeasoner"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--seed", "1e3"], "argument --seed: invalid int value"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--data", " "], "--data ' ': is empty"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such file or directory"),
    (["--model", "/nowhere/model.gguf"], "no such file or directory"),
    (["--model", ""], "--model is empty"),
    (["--resume", "x", "--overwrite"], "give one of them"),
]


@pytest.mark.parametrize("argv, words", SETTINGS, ids=[" ".join(a) for a, _ in SETTINGS])
def test_bad_setting(capsys, untouched, no_model, argv, words):
    untouched()
    one_line_error(capsys, argv, words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_cpu_only_machine(capsys, untouched, no_model):
    untouched()
    one_line_error(capsys, ["--device", "cuda"], "no CUDA GPU is visible", "--device cpu")


def test_eval_settings(capsys, untouched, no_model, files):
    data, corpus = files
    untouched()
    one_line_error(capsys, ["eval", "--model", "tiny-random", "--limit", "-97"], "--limit -97")
    one_line_error(capsys, ["eval", "--model", "tiny-random", "--forward-budget", "0"], "--forward-budget 0")
    one_line_error(capsys, ["eval", "--model", "tiny-random", "--seed", "-1"], "--seed -1")
    one_line_error(capsys, ["eval", "--model", "tiny-random", "--device", "gpu0"], "--device 'gpu0'")
    one_line_error(capsys, ["eval"], "the following arguments are required: --model")


# ----------------------------------------------------------------------------------------------------
# 2. Data rows: schema checked by the loaders, before any model is loaded

def qa_line(**change):
    return {"id": "x", "question": "Where was Person 1 born?", "golden_answers": ["City1"], **change}


BAD_QA = [
    ("not-utf8", "Where".encode("latin-1") + b" \xe9t\xe9?", "qa.jsonl:2: not UTF-8 text"),
    ("list", [1, 2], "qa.jsonl:2: expected a JSON object {...}, found a list"),
    ("string", "a question", "found a string"),
    ("number-question", qa_line(question=7), "qa.jsonl:2: 'question' is an integer (7)"),
    ("empty-question", qa_line(question="  "), "'question' is empty"),
    ("null-question", qa_line(question=None), "'question' is null"),
    ("no-question", {"id": "x", "golden_answers": ["a"]}, "needs 'question' and 'golden_answers'"),
    ("dict-answers", qa_line(golden_answers={"value": "City1"}), "'golden_answers' is an object"),
    ("null-answer", qa_line(golden_answers=[None]), "a gold answer is null"),
    ("empty-answer", qa_line(golden_answers=["City1", ""]), "a gold answer is empty"),
    ("no-answers", qa_line(golden_answers=[]), "'golden_answers' is an empty list"),
    ("bool-answer", qa_line(golden_answers=[True]), "a gold answer is true/false"),
    ("list-id", qa_line(id=[1]), "'id' is a list"),
    ("duplicate-id", qa_line(id="q0"), "qa.jsonl:2: id 'q0' is already used at"),
    ("huge-question", qa_line(question="why " * 2000), "the question is 8,000 characters long"),
    ("bad-json", '{"id": "x", "question": ', "qa.jsonl:2: not valid JSON"),
]


@pytest.mark.parametrize("name, line, words", BAD_QA, ids=[c[0] for c in BAD_QA])
def test_bad_question_file(tmp_path, capsys, untouched, no_model, files, name, line, words):
    data, corpus = files
    raw = line if isinstance(line, bytes) else (line if isinstance(line, str) and name == "bad-json"
                                                else json.dumps(line)).encode()
    data.write_bytes(json.dumps(QA[0]).encode() + b"\n" + raw + b"\n" + json.dumps(QA[1]).encode() + b"\n")
    untouched()
    one_line_error(capsys, train_argv(data, corpus, tmp_path / "run"), words)
    assert not (tmp_path / "run").exists()      # nothing written for a run that could not start


def test_gzipped_and_directory_and_empty_question_files(tmp_path, capsys, untouched, no_model, files):
    data, corpus = files
    gz = tmp_path / "qa.jsonl.gz"
    gz.write_bytes(gzip.compress(data.read_bytes()))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    untouched()
    one_line_error(capsys, train_argv(gz, corpus, tmp_path / "run"), "a compressed file; decompress it first")
    one_line_error(capsys, train_argv(tmp_path, corpus, tmp_path / "run"), "a directory; give the path of a JSONL")
    one_line_error(capsys, train_argv(empty, corpus, tmp_path / "run"), "no questions found")
    one_line_error(capsys, train_argv(tmp_path / "nope.jsonl", corpus, tmp_path / "run"), "file not found")


BAD_CORPUS = [
    ("null-text", {"id": "x", "title": "T", "text": None}, "corpus.jsonl:2: 'text' is null, not a string"),
    ("number-text", {"id": "x", "title": "T", "text": 42}, "'text' is an integer (42), not a string"),
    ("number-title", {"id": "x", "title": 3, "text": "t"}, "'title' is an integer (3), not a string"),
    ("list-contents", {"id": "x", "contents": ["T", "t"]}, "'contents' is a list"),
    ("no-text", {"id": "x", "body": "t"}, "neither 'contents' nor 'text'"),
    ("duplicate-id", {"id": "d0", "title": "T", "text": "t"}, "corpus.jsonl:2: id 'd0' is already used at"),
    ("not-object", None, "corpus.jsonl:2: expected a JSON object {...}, found null"),
]


@pytest.mark.parametrize("name, line, words", BAD_CORPUS, ids=[c[0] for c in BAD_CORPUS])
def test_bad_corpus_file(tmp_path, capsys, untouched, no_model, files, name, line, words):
    data, corpus = files
    jsonl(corpus, [DOCS[0], line, *DOCS[1:]])
    untouched()
    one_line_error(capsys, train_argv(data, corpus, tmp_path / "run"), words)


def test_duplicate_ids_no_longer_empty_the_random_document_pool(tmp_path):
    # before: every document with id "1" -> IG's random documents (exclude by id) silently found none
    p = jsonl(tmp_path / "c.jsonl", [{"id": 1, "title": f"T{i}", "text": "words"} for i in range(4)])
    with pytest.raises(retrieve.DataError, match="id '1' is already used"):
        retrieve.load_jsonl_corpus(p)


HOTPOT = {"_id": "h1", "question": "Which river?", "answer": "Rhine", "supporting_facts": [["Rhine", 0]],
          "context": [["Rhine", ["The Rhine is a river."]], ["Elbe", ["The Elbe is a river."]]]}
BAD_HOTPOT = [
    ("context-string", {"context": [["Rhine", "The Rhine is a river."]]}, "a 'context' entry is"),
    ("context-triple", {"context": [["Rhine", ["s"], 3]]}, "each must be [title, [sentence, ...]]"),
    ("context-number", {"context": 5}, "'context' is an integer (5)"),
    ("hf-lengths", {"context": {"title": ["A", "B"], "sentences": [["s"]]}}, "lists 'title' and 'sentences' of one length"),
    ("answer-null", {"answer": None}, "'answer' is null"),
    ("facts-number", {"supporting_facts": 3}, "'supporting_facts' is an integer (3)"),
]


@pytest.mark.parametrize("name, change, words", BAD_HOTPOT, ids=[c[0] for c in BAD_HOTPOT])
def test_bad_hotpotqa_file(tmp_path, capsys, untouched, no_model, name, change, words):
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps([HOTPOT, {**HOTPOT, "_id": "h2", **change}]))
    untouched()
    one_line_error(capsys, ["--model", "tiny-random", "--data", f"hotpotqa:{path}", "--corpus", f"hotpotqa:{path}",
                            "--out", str(tmp_path / "run")], "hotpot.json, record 2: ", words)


def test_unicode_bom_and_crlf_data_train(tmp_path, capsys, untouched):
    # what is not an error: a byte-order mark, CRLF line ends, questions in any script, an emoji in the path
    data = tmp_path / "qa.jsonl"
    qs = [{"id": f"u{i}", "question": f"¿Dónde nació Persona {i}? 人 \u202e ok 🙂", "golden_answers": [f"City{i}"]}
          for i in range(12)]
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(q, ensure_ascii=False) + "\r\n" for q in qs).encode())
    corpus = jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = tmp_path / "run" / "ünïcödé 🙂"
    untouched()
    rc, stdout, err = cli(capsys, train_argv(data, corpus, out))
    assert rc == 0, err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert retrieve.load_questions(data)[0]["question"].startswith("¿Dónde")


# ----------------------------------------------------------------------------------------------------
# 3. Models given as input

def test_empty_model_directory(tmp_path, capsys, untouched, files):
    data, corpus = files
    (tmp_path / "model").mkdir()
    untouched()
    one_line_error(capsys, train_argv(data, corpus, tmp_path / "run", "--model", str(tmp_path / "model")),
                   "not a loadable model directory")


def test_corrupt_gguf(tmp_path, capsys, untouched, files):
    data, corpus = files
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    untouched()
    msg = one_line_error(capsys, train_argv(data, corpus, tmp_path / "run", "--model", str(bad)), "model.gguf")
    assert "not a readable GGUF model" in msg or "pip install gguf" in msg


def test_mistyped_run_directory_for_eval(tmp_path, hand_run, capsys, untouched, no_model):
    copy_run(hand_run, tmp_path)
    untouched()
    one_line_error(capsys, ["eval", "--model", str(tmp_path / "rnu")], "no such run", "holds the runs run")


# ----------------------------------------------------------------------------------------------------
# 4. Run files: config.json, metrics.jsonl, checkpoints, views

BAD_CONFIG = [
    ("wrong-type", lambda c: {**c, "steps": "ten"}, "config.json: steps = 'ten' cannot be used (must be an integer)"),
    ("bool-for-int", lambda c: {**c, "topk": True}, "topk = True cannot be used"),
    ("nan", lambda c: {**c, "lr": float("nan")}, "lr = nan cannot be used"),
    ("negative", lambda c: {**c, "max_turns": -1}, "max_turns = -1 cannot be used (must be at least 1)"),
    ("list", lambda c: [c], "config.json: expected an object of settings, found a list"),
    ("not-ours", lambda c: {"theme": "dark"}, "not the config.json of an igsearch run"),
    ("truncated", lambda c: json.dumps(c)[:40], "config.json:1: not valid JSON"),
    ("empty", lambda c: "", "not valid JSON"),
]


@pytest.mark.parametrize("name, change, words", BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_json(tmp_path, hand_run, capsys, untouched, no_model, name, change, words):
    run = copy_run(hand_run, tmp_path)
    new = change(json.loads((run / "config.json").read_text()))
    (run / "config.json").write_text(new if isinstance(new, str) else json.dumps(new))
    untouched(run)  # nothing in it may change either
    one_line_error(capsys, ["--resume", str(run)], words)
    one_line_error(capsys, ["eval", "--model", str(run)], words if name != "truncated" else "not valid JSON")


def test_a_flag_overrides_a_bad_saved_value(tmp_path, hand_run, capsys, untouched):
    run = copy_run(hand_run, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "token_budget": 0, "from_a_newer_version": 1}))
    untouched()
    rc, out, err = cli(capsys, ["--resume", str(run), "--token-budget", "4096"])
    assert rc == 0 and "resuming from" in out and "step_000002 (2 steps done)" in out, err


@pytest.mark.parametrize("line, words", [("[1, 2]", "metrics.jsonl:2: not a metrics record"),
                                         ('{"step": "one"}', "metrics.jsonl:2: not a metrics record"),
                                         ("{oops", "metrics.jsonl:2: not valid JSON")])
def test_bad_metrics_line(tmp_path, hand_run, capsys, untouched, no_model, line, words):
    run = copy_run(hand_run, tmp_path)
    (run / "metrics.jsonl").write_text('{"step": 0, "reward": 0.1}\n' + line + '\n{"step": 1, "reward": 0.2}\n')
    untouched(run)
    one_line_error(capsys, ["--resume", str(run)], words, "fix or delete that line")
    one_line_error(capsys, ["plot", "--run", str(run), "--out", str(tmp_path / "run" / "c.png")], words)


def test_plot_refusals(tmp_path, hand_run, capsys, untouched):
    run = copy_run(hand_run, tmp_path)
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n my holiday picture")
    untouched()
    one_line_error(capsys, ["plot", "--run", str(run), "--out", str(tmp_path / "no" / "c.png")],
                   "the directory", "does not exist")
    one_line_error(capsys, ["plot", "--run", str(run), "--out", str(foreign)], "not written by igsearch")
    one_line_error(capsys, ["plot", "--run", str(run), "--out", str(run / "c.txt")], "a figure is written as .png")
    one_line_error(capsys, ["plot", "--run", str(run), "--out", str(tmp_path)], "is a directory")
    (run / "metrics.jsonl").write_text("")
    one_line_error(capsys, ["plot", "--run", str(run), "--out", str(run / "c.png")], "no completed step yet")
    (run / "metrics.jsonl").write_text('{"step": 0, "reward": "high"}\n')
    one_line_error(capsys, ["plot", "--run", str(run), "--out", str(run / "c.png")], "reward = 'high', not a number")


BAD_VIEWS = [
    ("truncated", json.dumps(view_json())[:50], "step_0.json:1: not valid JSON"),
    ("list", "[]", "expected a saved step, found a list"),
    ("html-group", view_json(group="<script>alert(1)</script>"), "rollout 0 lacks a field or has one of the wrong type"),
    ("string-reward", view_json(reward="1.0"), "rollout 0 lacks a field"),
    ("nan-reward", view_json(reward=float("nan")), "rollout 0 lacks a field"),
    ("bad-role", view_json(roles=[1, 2, 9]), "rollout 0 lacks a field"),
    ("short-roles", view_json(roles=[1, 2]), "rollout 0 lacks a field"),
    ("bad-span", view_json(searches=[{"query": "q", "query_span": [2, 99], "ig": 0.1}]), "has a search that is not"),
    ("string-ig", view_json(searches=[{"query": "q", "query_span": [1, 2], "ig": "<b>"}]), "has a search that is not"),
    ("a-rows", {**view_json(), "A": []}, "one row of 'A' per rollout"),
]


@pytest.mark.parametrize("name, view, words", BAD_VIEWS, ids=[c[0] for c in BAD_VIEWS])
def test_bad_view(tmp_path, capsys, untouched, name, view, words):
    run = tmp_path / "run"
    write_view(run, view)
    untouched()
    one_line_error(capsys, ["show", "--run", str(run)], words)
    one_line_error(capsys, ["show", "--run", str(run), "--html", str(run / "v.html")], words)
    assert not (run / "v.html").exists()


def test_received_view_cannot_inject_html_or_terminal_escapes(tmp_path, capsys, untouched):
    run = tmp_path / "run"
    evil = "\x1b[2J\x1b]0;pwned\x07<script>alert(1)</script>\u202e"
    write_view(run, view_json(tokens=["<think>", evil, "</answer>"], answer=evil, golds=[evil], question=evil))
    (run / "views" / "step_x.json").write_text("stray file: ignored")
    untouched()
    rc, out, err = cli(capsys, ["show", "--run", str(run)])
    assert rc == 0 and "\x1b[2J" not in out and "\x1b]0" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out
    rc, _, err = cli(capsys, ["show", "--run", str(run), "--html", str(run / "v.html")])
    page = (run / "v.html").read_text()
    assert rc == 0 and "<script>" not in page and "&lt;script&gt;" in page


def test_show_refusals(tmp_path, capsys, untouched):
    run = tmp_path / "run"
    write_view(run, view_json())
    mine = tmp_path / "notes.html"
    mine.write_text("<p>my notes</p>")
    untouched()
    one_line_error(capsys, ["show", "--run", str(run), "--html", str(tmp_path / "no" / "v.html")], "does not exist")
    one_line_error(capsys, ["show", "--run", str(run), "--html", str(mine)], "not written by igsearch")
    one_line_error(capsys, ["show", "--run", str(run), "--step", "3"], "step 3 was not saved (saved steps: 0)")
    one_line_error(capsys, ["show", "--run", str(tmp_path / "none")], "no saved steps")
    one_line_error(capsys, ["show", "--run", str(run), "--step", "x"], "argument --step: invalid int value")


def test_eval_output_refusals(tmp_path, files, capsys, untouched, no_model):
    data, corpus = files
    mine = tmp_path / "cwd" / "eval.jsonl"
    untouched()
    base = ["eval", "--model", "tiny-random", "--data", str(data), "--corpus", f"jsonl:{corpus}"]
    one_line_error(capsys, base + ["--out", str(tmp_path / "no" / "p.jsonl")], "--out", "does not exist")
    one_line_error(capsys, base + ["--out", str(data)], "not written by igsearch")
    jsonl(tmp_path / "run.jsonl", [{"prediction": "old"}])  # one of ours, from an earlier eval
    one_line_error(capsys, base + ["--out", str(tmp_path / "run.jsonl"), "--data", str(tmp_path / "run.jsonl")],
                   "that is an input file of this evaluation")
    (tmp_path / "run.jsonl").unlink()
    mine.write_text("my own notes\n")  # the default --out, eval.jsonl in the working directory, is not ours
    try:
        one_line_error(capsys, base, "eval.jsonl: the file exists and was not written by igsearch")
        assert mine.read_text() == "my own notes\n"
    finally:
        mine.unlink()


def test_eval_falls_back_from_damaged_newest_weights(tmp_path, hand_run, files, capsys, untouched):
    data, corpus = files
    run = copy_run(hand_run, tmp_path)
    weights = run / "ckpt" / "step_000002" / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:16] = b"\xff" * 8  # the JSON header is damaged; the size is kept, so the manifest passes
    weights.write_bytes(bytes(raw))
    untouched()
    rc, out, err = cli(capsys, ["eval", "--model", str(run), "--limit", "1", "--out", str(run / "p.jsonl")])
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "step_000002" in warnings[0] and "using the previous checkpoint" in warnings[0]
    assert "step_000001" in out
    # and resume, which read the same checkpoint, agrees
    rc, out, err = cli(capsys, ["--resume", str(run)])
    assert rc == 0 and "step_000001 (1 steps done)" in out


def test_eval_when_every_checkpoint_is_damaged(tmp_path, hand_run, capsys, untouched, files):
    run = copy_run(hand_run, tmp_path)
    for ck in runs.checkpoints(run):
        (ck / "model" / "config.json").write_text("{broken")
    untouched(run)
    one_line_error(capsys, ["eval", "--model", str(run), "--out", str(run / "p.jsonl")], "no checkpoint loads")


def test_truncated_run_directories(tmp_path, hand_run, capsys, untouched):
    run = copy_run(hand_run, tmp_path)
    shutil.rmtree(run / "ckpt" / "step_000002" / "model")
    (run / "ckpt" / "step_000001" / "manifest.json").unlink()
    untouched(run)
    one_line_error(capsys, ["--resume", str(run)], "no checkpoint can be resumed from (2 unreadable",
                   "--overwrite starts the run again")
    (run / "config.json").unlink()
    one_line_error(capsys, ["--resume", str(run)], "not a run directory (no config.json)")


def test_a_run_cut_before_its_first_checkpoint_resumes_from_step_0(tmp_path, hand_run, capsys, untouched):
    run = copy_run(hand_run, tmp_path)
    shutil.rmtree(run / "ckpt")
    untouched()
    rc, out, err = cli(capsys, ["--resume", str(run), "--steps", "1"])
    assert rc == 0 and "has no checkpoint yet: starting it from step 0" in out, err
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [0]


def test_a_checkpoint_of_an_older_version_is_refused_unread(tmp_path, hand_run, capsys, untouched):
    # the state.pt of earlier versions pickled numpy arrays: weights_only=True refuses them, in one line
    run = copy_run(hand_run, tmp_path)
    import numpy as np
    for ck in runs.checkpoints(run):
        torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, ck / "state.pt")
        manifest = json.loads((ck / "manifest.json").read_text())
        manifest["files"]["state.pt"] = (ck / "state.pt").stat().st_size
        (ck / "manifest.json").write_text(json.dumps(manifest))
    untouched(run)
    one_line_error(capsys, ["--resume", str(run)], "state.pt holds objects other than tensors and plain data",
                   "older igsearch")


def test_a_checkpoint_whose_rank_generators_are_not_generator_states_is_refused(tmp_path, hand_run, capsys,
                                                                                untouched):
    # state.pt's "generators" (every rank's sampling generator, ranks.py) are checked before a rank takes one
    run = copy_run(hand_run, tmp_path)
    for ck in runs.checkpoints(run):
        state = torch.load(ck / "state.pt", weights_only=True)
        torch.save({**state, "generators": [torch.zeros(3, dtype=torch.uint8)]}, ck / "state.pt")
        manifest = json.loads((ck / "manifest.json").read_text())
        manifest["files"]["state.pt"] = (ck / "state.pt").stat().st_size
        (ck / "manifest.json").write_text(json.dumps(manifest))
    untouched(run)
    one_line_error(capsys, ["--resume", str(run)], "no checkpoint can be resumed from",
                   "state.pt does not hold what igsearch writes")


# ----------------------------------------------------------------------------------------------------
# 5. No code execution from received files

class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def plant(ck, name, marker):
    """Replace a checkpoint file with a malicious pickle, and its manifest entry to match (as an attacker would)."""
    torch.save({"step": 1, "rng": {}, "x": Payload(marker)}, ck / name)
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"][name] = (ck / name).stat().st_size
    (ck / "manifest.json").write_text(json.dumps(manifest))


def test_the_payload_works_when_unpickled(tmp_path):
    # the control: an unsafe load really runs the command, so the tests below prove something
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("name", ["state.pt", "optimizer.pt"])
def test_malicious_checkpoint_runs_nothing(tmp_path, hand_run, capsys, untouched, name):
    run = copy_run(hand_run, tmp_path)
    marker = tmp_path / "ran"
    plant(run / "ckpt" / "step_000002", name, marker)
    untouched(run)
    rc, out, err = cli(capsys, ["--resume", str(run), "--steps", "1"])  # the newest is refused, the previous used
    assert rc == 0 and not marker.exists()
    assert "holds objects other than tensors and plain data" in err and "step_000001 (1 steps done)" in out
    plant(run / "ckpt" / "step_000001", name, marker)
    one_line_error(capsys, ["--resume", str(run)], "no checkpoint can be resumed from")
    assert not marker.exists()


def test_malicious_bm25_cache_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    r = retrieve.Retriever(DOCS, cache_dir=tmp_path)
    r.cache_path.write_bytes(pickle.dumps(Payload(marker)))
    (r.cache_path.with_suffix(".pkl")).write_bytes(pickle.dumps(Payload(marker)))  # the old cache's name
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        again = retrieve.Retriever(DOCS, cache_dir=tmp_path)
    assert not marker.exists()
    assert again.search(["born in City3"], k=1)[0][0]["id"] == "d3"
    import numpy as np
    np.savez(r.cache_path.with_name("x.npz"), vocab=np.array([Payload(marker)], dtype=object))
    os.replace(r.cache_path.with_name("x.npz"), r.cache_path)  # an .npz holding a pickled object array
    with pytest.warns(UserWarning, match="rebuilding"):
        retrieve.Retriever(DOCS, cache_dir=tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# 6. Lost user data

def tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_fresh_run_into_an_existing_run_is_refused(tmp_path, hand_run, files, capsys, untouched, no_model):
    data, corpus = files
    run = copy_run(hand_run, tmp_path)
    kept = tree(run)
    untouched()
    one_line_error(capsys, train_argv(data, corpus, run), f"{run} holds a run (2 steps logged)",
                   f"--resume {run} continues it, --overwrite replaces it")
    assert tree(run) == kept


def test_overwrite_replaces_only_what_the_run_wrote(tmp_path, hand_run, files, capsys, untouched):
    data, corpus = files
    run = copy_run(hand_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    (run / "views").mkdir()
    (run / "views" / "sketch.svg").write_text("mine too")
    write_view(run, view_json(), step=5)
    untouched()
    rc, out, err = cli(capsys, train_argv(data, corpus, run, "--overwrite"))
    assert rc == 0, err
    assert (run / "notes.txt").read_text() == "mine" and (run / "views" / "sketch.svg").read_text() == "mine too"
    assert not (run / "views" / "step_5.json").exists()
    assert [p.name for p in runs.checkpoints(run)] == ["step_000001"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_directory_that_is_not_a_run_is_refused(tmp_path, files, capsys, untouched, no_model, overwrite):
    data, corpus = files
    mine = tmp_path / "mine"
    (mine / "views").mkdir(parents=True)
    (mine / "views" / "slides.html").write_text("mine")
    (mine / "config.json").write_text('{"theme": "dark"}')
    (tmp_path / "afile").write_text("x")
    untouched()
    one_line_error(capsys, train_argv(data, corpus, mine, *overwrite), "is not an igsearch run",
                   "choose a new or empty directory")
    one_line_error(capsys, train_argv(data, corpus, tmp_path / "afile", *overwrite), "is a file, not a directory")


def test_compare_refusals(tmp_path, capsys, untouched, no_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    untouched()
    base = ["compare", "--model", "tiny-random", "--steps", "1"]
    one_line_error(capsys, base + ["--out", str(mine)], "holds files compare did not write (thesis.tex)")
    one_line_error(capsys, base + ["--out", str(tmp_path / "c"), "--overwrite"], "no --resume, --demo, --overwrite")
    one_line_error(capsys, base + ["--out", str(tmp_path / "c"), "--seeds", "0,0"], "a seed is repeated")
    one_line_error(capsys, base + ["--out", str(tmp_path / "c"), "--seeds", "0,-1"], "--seed -1")
    one_line_error(capsys, base + ["--out", str(tmp_path / "c"), "--seeds", "a"], "comma-separated integers")



def test_report_refusals(tmp_path, capsys, untouched, no_model):
    from test_runs import fake_compare_dir
    em = {r: (0, 1) for r in experiments.REWARDS}
    fake_compare_dir(tmp_path / "a", 0, em)
    fake_compare_dir(tmp_path / "other-warmup", 1, em, warm_em=(1, 1))
    fake_compare_dir(tmp_path / "more-steps", 1, em, steps=5)
    fake_compare_dir(tmp_path / "cut", 1, em, finished=False)
    (tmp_path / "empty").mkdir()
    untouched()
    report = lambda *dirs: ["report", *(str(tmp_path / d) for d in dirs), "--out", str(tmp_path / "run")]
    one_line_error(capsys, report("a", "empty"), "empty: no warmup/done.json")
    one_line_error(capsys, report("a", "other-warmup"), "its warm-up is not the one of")
    one_line_error(capsys, report("a", "more-steps"), "trained with other settings", "steps 5 vs 2")
    one_line_error(capsys, report("a", "a"), "outcome-s0 is in two of the directories")
    one_line_error(capsys, report("cut"), "no finished run")
    one_line_error(capsys, ["report", str(tmp_path / "a")], "--out")


# ----------------------------------------------------------------------------------------------------
# 7. Faults: Ctrl-C, two processes on one run, an unusable cache directory

def test_a_second_process_on_one_run_is_refused(tmp_path, hand_run, files, capsys, untouched, no_model):
    run = copy_run(hand_run, tmp_path)
    kept = tree(run)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                               str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        untouched()
        one_line_error(capsys, ["--resume", str(run)], "another igsearch process is writing this run directory")
    finally:
        holder.kill()
        holder.wait()
    assert {k: v for k, v in tree(run).items() if k.name != ".lock"} == {k: v for k, v in kept.items()}


def test_an_unusable_cache_directory_is_not_fatal(tmp_path, files, capsys, untouched, monkeypatch):
    data, corpus = files
    blocker = tmp_path / "cache"   # allowed to change: it is where the cache would go
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("IGSEARCH_CACHE", str(blocker))
    untouched()
    with pytest.warns(UserWarning, match="could not write the BM25 cache"):
        rc, out, err = cli(capsys, train_argv(data, corpus, tmp_path / "run"))
    assert rc == 0, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a directory whatever its mode")
def test_an_unreadable_cache_directory_is_rebuilt_around(tmp_path):
    cache = tmp_path / "locked"
    retrieve.Retriever(DOCS, cache_dir=cache)
    cache.chmod(0)
    try:
        with pytest.warns(UserWarning):
            r = retrieve.Retriever(DOCS, cache_dir=cache)
    finally:
        cache.chmod(0o755)
    assert r.search(["born in City3"], k=1)[0][0]["id"] == "d3"


def test_ctrl_c_ends_in_one_line_and_the_run_resumes(tmp_path, files):
    data, corpus = files
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = train_argv(data, corpus, run)
    argv[argv.index("--steps") + 1] = "1000000"  # still running at the signal, however slowly this process gets there
    # a shell's background job starts with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # the child gets the default disposition back, as it has when a user runs it in a terminal
    proc = subprocess.Popen([sys.executable, str(ROOT / "igsearch.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 180
        while not (run / "ckpt" / "step_000001").is_dir():
            assert proc.poll() is None and time.time() < deadline, "training never wrote a checkpoint"
            time.sleep(0.05)
        # a second process on the same run is refused while this one writes it
        assert igsearch.main(["--resume", str(run)]) == 2
        time.sleep(0.3)  # into the next step
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: {run} keeps step_") and last.endswith(f"--resume {run} goes on"), err
    done = int(runs.checkpoints(run)[0].name.split("_")[1])
    rc = igsearch.main(["--resume", str(run), "--steps", str(done + 1)])
    assert rc == 0
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == list(range(done + 1))


def test_help_of_every_setting_is_its_config_comment(capsys):
    # the Config dataclass's field comments are the --help text, each with its default
    notes = runs.field_comments(igsearch.Config)
    assert notes["group_size"] == "G" and notes["ir_belief"].startswith("agent | plain")
    assert set(notes) == {f.name for f in dataclasses.fields(igsearch.Config)}      # every setting says what it is
    with pytest.raises(SystemExit):
        igsearch.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())                                # argparse wraps lines
    for name in ("group_size", "ir_belief", "eval_split", "ig_clip"):
        f = next(f for f in dataclasses.fields(igsearch.Config) if f.name == name)
        assert f"--{name.replace('_', '-')} {name.upper()} {notes[name]} (default {f.default!r})" in text
