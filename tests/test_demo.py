"""The credit-assignment demo of IG-Search (METHOD §4.3): every rollout fails, yet IG-Search learns which
query finds the answer, while outcome-only GRPO does not move at all."""
import pytest

import demo
import igsearch
import runs


@pytest.fixture(scope="module")
def tok():
    return runs.qwen_tokenizer()


def test_igsearch_moves_toward_the_good_query_and_outcome_does_not(tok, tmp_path):
    ig = demo.credit_assignment_demo("igsearch", steps=30, tok=tok, cache_dir=tmp_path)
    out = demo.credit_assignment_demo("outcome", steps=30, tok=tok, cache_dir=tmp_path)
    assert len(ig) == len(out) == 30
    # outcome-only: Â = 0 for every rollout, so A = 0 everywhere and θ never changes: exactly 0.5
    assert all(p == 0.5 for p in out)
    # IG-Search: the good query's span carries +α·g(IG) and the bad one's a non-positive term
    assert ig[0] > 0.5
    assert ig[-1] > 0.9
    assert sum(b >= a - 1e-6 for a, b in zip(ig, ig[1:])) >= 25  # mostly monotone


def test_demo_is_reproducible(tok, tmp_path):
    a = demo.credit_assignment_demo("igsearch", steps=5, tok=tok, cache_dir=tmp_path)
    b = demo.credit_assignment_demo("igsearch", steps=5, tok=tok, cache_dir=tmp_path)
    c = demo.credit_assignment_demo("igsearch", steps=5, tok=tok, cache_dir=tmp_path, seed=1)
    assert a == b
    assert a != c


def test_demo_cli_prints_both_curves_and_saves_the_first_group(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert igsearch.main(["--demo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["step", "igsearch", "outcome"]
    rows = [line.split() for line in lines[2:32]]
    assert [int(r[0]) for r in rows] == list(range(1, 31))
    assert float(rows[-1][1]) > 0.9 and float(rows[-1][2]) == 0.5
    page = (tmp_path / "runs" / "demo" / "views" / "step_0.html").read_text()
    assert page.count("<div class='roll'>") == 8 and "IG +3.000" in page  # the good query's gain, clipped to c=2 later
