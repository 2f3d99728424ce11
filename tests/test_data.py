"""Tests of data/prepare.py: the generated tiny QA set, its statistics and the HotpotQA command."""
import hashlib
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

import igsearch
import retrieve
from data import prepare
from data.prepare import build_tiny_qa, leaks, load_tiny_qa, main, qa_stats
from retrieve import DataError
from rewards import normalize_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def docs():
    return retrieve.load_vital_articles()


@pytest.fixture(scope="module")
def qa(docs):
    return build_tiny_qa(docs, seed=0)


@pytest.fixture(scope="module")
def by_title(docs):
    return {d["title"]: d for d in docs}


def gives_away(title, question):
    """The strict test, independent of prepare.leaks: the normalized title (or its base without a
    '(disambiguation)') is a substring of the normalized question, with or without spaces."""
    q = normalize_answer(question)
    for name in {normalize_answer(title), normalize_answer(prepare.base_title(title))}:
        if name in q or name.replace(" ", "") in q.replace(" ", ""):
            return True
    return False


# ----------------------------------------------------------------------------------------------------
# The generated set

def test_sizes_and_record_layout(qa):
    assert sum(q["hops"] == 1 for q in qa) == 2000
    assert sum(q["hops"] == 2 for q in qa) == 1000
    assert len({q["id"] for q in qa}) == len(qa)
    for q in qa:
        assert set(q) == {"id", "question", "golden_answers", "dataset", "supporting_titles", "hops", "split"}
        assert q["dataset"] == "tiny" and q["split"] in ("train", "dev", "test")
        assert q["hops"] in (1, 2) and len(q["supporting_titles"]) == q["hops"]
        assert q["supporting_titles"][-1] == q["golden_answers"][0]  # the answer article comes last
        assert len(set(q["supporting_titles"])) == q["hops"]


def test_both_kinds_run_through_every_split(qa):
    # evaluation reads a split's first N questions (--eval-questions): they must not all be of one kind
    for split in ("train", "dev", "test"):
        hops = [q["hops"] for q in qa if q["split"] == split]
        for first in (hops[:50], hops[:200]):
            share = first.count(2) / len(first)
            assert 0.15 < share < 0.55, (split, len(first), share)  # a third of the set is 2-hop


def test_answer_and_bridge_title_never_in_question(qa):
    for q in qa:
        for title in q["supporting_titles"]:  # the answer, and for a bridge question also B
            assert not gives_away(title, q["question"]), (title, q["question"])


def test_splits_are_disjoint_by_answer(qa):
    split_of = {}
    for q in qa:
        assert split_of.setdefault(q["golden_answers"][0], q["split"]) == q["split"], q["golden_answers"]
    n = {s: sum(q["split"] == s for q in qa) for s in ("train", "dev", "test")}
    assert 0.75 < n["train"] / len(qa) < 0.85 and n["dev"] > 0.05 * len(qa) and n["test"] > 0.05 * len(qa)


def test_bridge_chain_is_real(qa, by_title):
    bridges = [q for q in qa if q["hops"] == 2]
    for q in bridges:
        b, a = q["supporting_titles"]
        assert b in by_title and a in by_title
        # the answer article's own text names B: B's title words occur as a run of words of A's lead
        words, text = retrieve.tokenize(prepare.base_title(b)), retrieve.tokenize(by_title[a]["text"])
        assert any(text[i:i + len(words)] == words for i in range(len(text))), (a, b)
        # and the question names B by its description instead
        assert by_title[b]["description"].lower() in q["question"].lower()


def test_single_hop_questions_quote_their_answers_lead(qa, by_title):
    # the clue comes from the answer's own article: most of its words are words of that lead
    for q in qa[:200]:
        if q["hops"] == 1:
            lead = set(retrieve.tokenize(by_title[q["golden_answers"][0]]["text"]))
            words = [w for w in retrieve.tokenize(q["question"].split(" in: ", 1)[-1]) if w != "x"]
            assert sum(w in lead for w in words) >= 0.9 * len(words), q["question"]


def test_same_seed_same_set_other_seed_other_set(docs):
    few = docs[:2500]  # the full corpus takes seconds a build; the code path is the same
    a, b, c = (build_tiny_qa(few, seed=s, n_single=300, n_bridge=100) for s in (0, 0, 1))
    assert a == b
    assert a != c
    assert {q["question"] for q in a} != {q["question"] for q in c}


def test_build_does_not_depend_on_hash_order():
    # set and dict-of-str iteration order changes with PYTHONHASHSEED; the set must not
    code = ("import hashlib, json, retrieve; from data.prepare import build_tiny_qa; "
            "qa = build_tiny_qa(retrieve.load_vital_articles()[:1500], seed=3, n_single=200, n_bridge=50); "
            "print(hashlib.sha256(json.dumps(qa).encode()).hexdigest())")
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_bare_question_recall(qa, docs, tmp_path_factory):
    retriever = retrieve.Retriever(docs, cache_dir=tmp_path_factory.mktemp("bm25"))
    stats = qa_stats(qa, retriever, k=3)
    single, bridge = stats["recall"][1], stats["recall"][2]
    assert single["n"] == 2000 and bridge["n"] == 1000
    assert single["any"] == single["all"] > 0.9  # answerable by search
    assert bridge["any"] > 0.9  # one supporting article is found by the bare question...
    assert bridge["all"] < 0.5 < single["all"]  # ...but rarely both: the second needs another search


def test_bad_input_raises_data_error():
    with pytest.raises(retrieve.DataError, match="load_vital_articles"):
        build_tiny_qa([])
    with pytest.raises(retrieve.DataError):
        build_tiny_qa([{"title": "Paris"}])


# ----------------------------------------------------------------------------------------------------
# Masks and leaks

def test_normalize_is_rewards_normalize_answer():
    for s in ["The  Eiffel-Tower!", "A Tale of Two Cities", "Protein (nutrient)", "an 'X' in the anthem", "Rock 'n' roll"]:
        assert prepare.normalize(s) == normalize_answer(s)


def test_leaks():
    assert leaks("Protein (nutrient)", "What is a protein?")  # base title, disambiguation dropped
    assert leaks("Serbo-Croatian", "Is it Serbo Croatian?")  # spaces removed: 'serbocroatian'
    assert leaks("The Beatles", "the Beatles' first album")
    assert leaks("Bertolt Brecht", "Brecht wrote it", vocab={"wrote": 1})  # a name alone gives it away
    assert not leaks("Bertolt Brecht", "a German playwright", vocab={"german": 1})
    assert not leaks("New York City", "a city in New Jersey", vocab={"new": 9, "city": 9})


def test_mask_answer():
    assert prepare.mask_answer("Proteins are essential nutrients.", "Protein (nutrient)") == "X are essential nutrients."
    assert prepare.mask_answer("She was a poet.", "Sylvia Plath") == "X was a poet."
    assert prepare.mask_answer("The city is large.", "Paris") is None  # does not refer to the answer
    assert prepare.mask_answer("Malcolm X was a minister.", "Malcolm X") is None  # X already taken


def test_replace_bridge_skips_parts_of_longer_names():
    b = {"title": "Donatello", "description": "Italian Renaissance sculptor"}
    vocab = {"italian": 0}
    assert prepare.replace_bridge("X was inspired by Donatello and others.", b, vocab) == \
        "X was inspired by the Italian Renaissance sculptor and others."
    assert prepare.replace_bridge("X won a David di Donatello Award.", b, vocab) is None
    assert prepare.replace_bridge("X visited Donatello Street.", b, vocab) is None
    assert prepare.replace_bridge("X admired donatello.", b, vocab) is None  # not written as a name


# ----------------------------------------------------------------------------------------------------
# Files and statistics

def test_tiny_qa_path_honours_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IGSEARCH_DATA_DIR", str(tmp_path))
    assert prepare.tiny_qa_path(5).parent == tmp_path and "seed5" in prepare.tiny_qa_path(5).name
    monkeypatch.delenv("IGSEARCH_DATA_DIR")
    assert prepare.tiny_qa_path(0).parent == ROOT / "data" / "generated"


def test_load_tiny_qa_builds_once_then_reads(monkeypatch, tmp_path, docs):
    monkeypatch.setenv("IGSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(prepare.retrieve, "load_vital_articles", lambda: docs[:2000])
    first = load_tiny_qa(seed=0)
    path = prepare.tiny_qa_path(0)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert set(first) == {"train", "dev", "test"} and all(first.values())
    assert all(q["split"] == s for s, qs in first.items() for q in qs)

    def no_build(*args, **kwargs):
        raise AssertionError("the second call must read the file, not build the set again")
    monkeypatch.setattr(prepare, "build_tiny_qa", no_build)
    assert load_tiny_qa(seed=0) == first
    assert sum(len(qs) for qs in first.values()) == len(path.read_text(encoding="utf-8").splitlines())


def test_load_tiny_qa_rejects_record_without_split(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"id": "1", "question": "q?", "golden_answers": ["a"]}) + "\n")
    with pytest.raises(retrieve.DataError, match="delete the file"):
        load_tiny_qa(path=path)


def test_qa_stats_hand_computed(tmp_path):
    docs = [{"id": str(i), "title": t, "text": x} for i, (t, x) in enumerate([
        ("Paris", "Paris is the capital of France."),
        ("France", "France is a country in Europe."),
        ("Berlin", "Berlin is the capital of Germany."),
        ("Germany", "Germany is a country in Europe."),
        ("Tokyo", "Tokyo is the capital of Japan."),
    ])]
    retriever = retrieve.Retriever(docs, cache_dir=tmp_path)
    questions = [
        {"question": "capital of Japan", "supporting_titles": ["Tokyo"], "hops": 1, "split": "train"},  # hit
        {"question": "country in Europe", "supporting_titles": ["Tokyo"], "hops": 1, "split": "train"},  # miss
        {"question": "Germany", "supporting_titles": ["Berlin", "Germany"], "hops": 2, "split": "dev"},  # both
        {"question": "Tokyo", "supporting_titles": ["Paris", "Tokyo"], "hops": 2, "split": "test"},  # one: only Tokyo shares a word
        {"question": "Rome", "supporting_titles": ["Paris", "France"], "hops": 2, "split": "test"},  # none
        {"question": "no titles", "hops": 1, "split": "train"},  # counted, not in the recall
    ]
    stats = qa_stats(questions, retriever, k=2)
    assert stats["counts"] == {"train": {1: 3}, "dev": {2: 1}, "test": {2: 2}}
    assert stats["recall"][1] == {"n": 2, "any": 0.5, "all": 0.5}
    assert stats["recall"][2] == {"n": 3, "any": pytest.approx(2 / 3), "all": pytest.approx(1 / 3)}
    table = prepare.format_stats(stats)
    assert "| train | 3 | 0 | 3 |" in table and "| total | 3 | 3 | 6 |" in table
    assert "| 2 | 3 | 0.667 | 0.333 |" in table


def test_tiny_command_prints_statistics(monkeypatch, tmp_path, capsys, docs):
    monkeypatch.setenv("IGSEARCH_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(prepare.retrieve, "load_vital_articles", lambda: docs[:1500])
    assert main(["tiny", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "seed 2" in out and "| split | hops=1 | hops=2 | total |" in out and "recall@3 all" in out
    assert prepare.tiny_qa_path(2).is_file()


def test_hotpotqa_command_offline(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    out = tmp_path / "hotpot.json"
    assert main(["hotpotqa", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].startswith("could not download") and "hotpot_dev_distractor_v1.json" in lines[0]
    assert f"hotpotqa:{out}" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_hotpotqa_command_saves_the_file(monkeypatch, tmp_path, capsys):
    record = {"_id": "q1", "question": "Who?", "answer": "Ann", "type": "bridge",
              "supporting_facts": [["A", 0], ["B", 0]], "context": [["A", ["Ann is A."]], ["B", ["B is b."]]]}
    payload = json.dumps([record]).encode()

    class Response:
        def __init__(self):
            self.chunks = [payload[:10], payload[10:], b""]

        def read(self, n):
            return self.chunks.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(prepare.urllib.request, "urlopen", lambda url, timeout: Response())
    out = tmp_path / "sub" / "hotpot.json"
    assert main(["hotpotqa", "--out", str(out)]) == 0
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert "saved 1 HotpotQA dev questions" in capsys.readouterr().out


def test_a_file_is_cut_by_split_percents_the_same_for_every_seed():
    # --split 55/10/35 of HotpotQA's 886: 487 train, 88 dev, 311 test; disjoint, all of the file, and a fixed
    # shuffle, so that seed 1 of an experiment never trains on seed 0's test questions
    from conftest import shared_file
    spec = f"hotpotqa:{shared_file('hotpotqa_dev_distractor_886.jsonl')}"
    splits = retrieve.load_data(spec, "55/10/35")
    assert {k: len(v) for k, v in splits.items()} == {"train": 487, "dev": 88, "test": 311}
    ids = {k: {q["id"] for q in v} for k, v in splits.items()}
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
    assert len(ids["train"] | ids["dev"] | ids["test"]) == 886
    again = retrieve.load_data(spec, "55/10/35")
    assert [q["id"] for q in again["test"]] == [q["id"] for q in splits["test"]]
    default = retrieve.load_data(spec)
    assert {k: len(v) for k, v in default.items()} == {"train": 708, "dev": 89, "test": 89}


@pytest.mark.parametrize("flag, message", [
    ("50/10", "--split '50/10': give train/dev/test percents, e.g. 80/10/10"),
    ("50/10/10", "--split '50/10/10': the percents must add up to 100, with train above 0"),
    ("0/50/50", "--split '0/50/50': the percents must add up to 100, with train above 0"),
    ("a/b/c", "--split 'a/b/c': give train/dev/test percents, e.g. 80/10/10")])
def test_bad_split_is_refused_in_one_line(flag, message):
    with pytest.raises(DataError) as e:
        igsearch.parse_args(["--split", flag])
    assert str(e.value) == message
