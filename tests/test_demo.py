"""The credit-assignment demo of IG-Search (METHOD §4.3): every rollout fails, yet IG-Search learns which
query finds the answer, while outcome-only GRPO does not move at all."""
import math

import pytest
import torch

import demo
import igsearch


def test_igsearch_moves_toward_the_good_query_and_outcome_does_not(tok, tmp_path):
    ig = demo.credit_assignment_demo("igsearch", steps=30, tok=tok, cache_dir=tmp_path)
    out = demo.credit_assignment_demo("outcome", steps=30, tok=tok, cache_dir=tmp_path)
    assert len(ig) == len(out) == 30
    # outcome-only: Â = 0 for every rollout, so A = 0 everywhere and θ never changes: exactly 0.5
    assert all(p == 0.5 for p in out)
    # IG-Search: the good query's span carries +α·g(IG) and the bad one's a negative term, at every step
    assert ig == pytest.approx(demo_by_hand(tok, 30), abs=1e-4)
    assert ig[0] > 0.5 and ig[-1] > 0.9
    assert all(b >= a - 1e-6 for a, b in zip(ig, ig[1:]))   # every step moves toward the good query


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


def demo_by_hand(tok, steps, group_size=8, lr=10.0, seed=0):
    """The demo's θ written out. Each step draws G queries from softmax(θ) with the demo's generator (nothing
    else draws from it). The good query retrieves the answer's document alone, so its baselines are other
    documents: IG = 0 - (-3) = 3, clipped to c = 2, A = α · 2 = 1 on its span. The bad query retrieves the three
    other documents, so its baseline can only be the answer's: IG = -3 - 0, clipped to -2, A = α · ρ · (-2) = -0.5.
    log π(query) sits on the span's first token and the loss is the token mean over the n policy tokens of the
    batch at ratio 1, so θ <- θ + (lr / n) Σ_b A_b (e_{a_b} - softmax(θ))."""
    enc = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    queries = ["who discovered polonium", "famous scientists"]             # good, bad
    n_policy = [enc(f"<search> {q} </search>") + enc("<answer> Pierre Curie </answer>") for q in queries]
    A = [1.0, -0.5]
    theta, gen, curve = [0.0, 0.0], torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        probs = torch.softmax(torch.tensor(theta, dtype=torch.float32), -1)
        actions = torch.multinomial(probs, group_size, replacement=True, generator=gen).tolist()
        e = [math.exp(t - max(theta)) for t in theta]
        p = [x / sum(e) for x in e]
        n = sum(n_policy[a] for a in actions)
        for j in range(2):
            theta[j] += lr / n * sum(A[a] * ((a == j) - p[j]) for a in actions)
        e = [math.exp(t - max(theta)) for t in theta]
        curve.append(e[0] / sum(e))
    return curve
