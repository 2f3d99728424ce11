"""The per-token advantage view: HTML and terminal renderings of A [B, T] over a group's tokens."""
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import grpo
import igsearch
import retrieve
import views
from conftest import require_tool

DOCS = [{"id": "d0", "title": "Marie Curie", "text": "Marie Curie discovered polonium."},
        {"id": "d1", "title": "Isaac Newton", "text": "Newton wrote the Principia & <Opticks>."}]
QUESTION = {"id": "q", "question": "Who discovered polonium?", "golden_answers": ["Marie Curie"]}
SCRIPTS = [["<search> who discovered polonium </search>", "<answer> Marie Curie </answer>"],
           ["<think>no idea</think> <answer> a < b & c </answer>"]]


@pytest.fixture
def group(tok, tmp_path):
    retriever = retrieve.Retriever(DOCS, cache_dir=tmp_path)
    rollouts = grpo.generate_rollouts(None, tok, [QUESTION] * 2, [0, 0], retriever, max_turns=1,
                                      turn_fn=grpo.scripted_turns(tok, SCRIPTS))
    rollouts[0].reward, rollouts[1].reward = 1.0, 0.0
    rollouts[0].searches[0]["ig"] = 0.42
    batch = grpo.collate(rollouts, tok.pad_token_id)
    A = grpo.token_advantages(torch.tensor([1.0, -0.5]), batch.roles)
    A = grpo.add_query_bonus(A, rollouts, [[0.42], []], alpha=0.5)  # query tokens: 1 + 0.21
    return rollouts, A


TOKEN = re.compile(r'<span class="t( grey)?"(?: style="background:rgb\((\d+), (\d+), (\d+)\)" title="A=([-+.\d]+)")?>'
                   r"(.*?)</span>", re.S)


def rows_of(page):
    """Per rollout: [(text, grey, rgb, A)] parsed back from the page."""
    out = []
    for block in page.split("<div class='roll'>")[1:]:
        out.append([(html.unescape(m[5]), bool(m[0]), tuple(map(int, m[1:4])) if m[1] else None,
                     float(m[4]) if m[4] else None) for m in TOKEN.findall(block)])
    return out


def test_html_has_every_token_in_order_with_its_colour(group, tok):
    rollouts, A = group
    page = views.render_html(rollouts, A, tok, "a scripted group")
    assert "<script" not in page and "http" not in page.lower()
    rows = rows_of(page)
    assert len(rows) == 2
    scale = float(A.abs().max())
    assert scale == pytest.approx(1.21)
    for b, (r, row) in enumerate(zip(rollouts, rows)):
        assert [t for t, *_ in row] == [tok.decode([i]) for i in r.ids]  # every token, in order
        for k, (text, grey, rgb, a) in enumerate(row):
            role = r.roles[k]
            assert grey == (role != grpo.POLICY)
            if role == grpo.POLICY:
                assert a == pytest.approx(float(A[b, k]), abs=1e-3)
                assert rgb == views.adv_rgb(float(A[b, k]), scale)
    qs, qe = rollouts[0].searches[0]["query_span"]
    assert rows[0][qs][2] == (255, 0, 0)                  # the query: A = 1.21 = full red
    assert rows[0][qe][2] is None                         # the information block after it: grey
    answer_tok = rollouts[0].roles.index(grpo.POLICY, rollouts[0].searches[0]["info_span"][1])
    assert rows[0][answer_tok][2] == (255, 44, 44)        # A = 1: 1/1.21 of the way to red
    assert all(rgb == (150, 150, 255) for _, grey, rgb, _ in rows[1] if not grey)   # A = -0.5: 0.41 of the way to blue
    assert "IG +0.420" in page and page.count("class='query'") == 1
    assert "reward 1.000" in page and "answer &#x27;Marie Curie&#x27;" in page
    assert "<Opticks>" not in page and " < b" not in page and "&amp;" in page     # escaped, never raw


def test_colour_scale():
    assert views.adv_rgb(0.0, 1.0) == (255, 255, 255)
    assert views.adv_rgb(2.0, 1.0) == (255, 0, 0)
    assert views.adv_rgb(-1.0, 1.0) == (0, 0, 255)
    assert views.adv_rgb(0.5, 1.0) == (255, 128, 128)


def test_ansi_view(group, tok):
    rollouts, A = group
    text = views.render_ansi(rollouts, A, tok, "t")
    assert "\x1b[48;2;255;0;0m" in text and "\x1b[48;2;150;150;255m" in text and "[IG +0.420]" in text
    plain = lambda s: re.sub(r"\x1b\[[\d;]*m", "", s)
    assert "Answer the question" not in plain(text)      # the prompt only on request
    assert "Answer the question" in plain(views.render_ansi(rollouts, A, tok, "t", prompt=True))


def test_show_renders_a_saved_step(group, tok, tmp_path, capsys):
    rollouts, A = group
    run = tmp_path / "run"
    views.save_view(run, 3, rollouts, A, tok)
    saved = json.loads((run / "views" / "step_3.json").read_text())
    assert saved["A"][0] == A[0, :len(rollouts[0].ids)].tolist()
    assert igsearch.main(["show", "--run", str(run), "--step", "3", "--html", str(tmp_path / "v.html")]) == 0
    page = (tmp_path / "v.html").read_text()
    assert rows_of(page) == rows_of((run / "views" / "step_3.html").read_text().replace(f"{run} step 3", "x"))
    assert [t for t, *_ in rows_of(page)[0]] == [tok.decode([i]) for i in rollouts[0].ids]
    assert igsearch.main(["show", "--run", str(run)]) == 0                 # the last saved step, in the terminal
    assert "[IG +0.420]" in capsys.readouterr().out
    assert igsearch.main(["show", "--run", str(run), "--step", "7"]) == 2
    assert "step 7 was not saved (saved steps: 3)" in capsys.readouterr().err


CHROMIUM = Path("/usr/bin/chromium")


def test_html_screenshot(group, tok, tmp_path):
    require_tool(CHROMIUM.exists(), str(CHROMIUM), "apt-get install chromium")
    rollouts, A = group
    page = tmp_path / "view.html"
    page.write_text(views.render_html(rollouts, A, tok, "screenshot"))
    png = tmp_path / "view.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,900", page.as_uri()], check=True, timeout=60, capture_output=True)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    shutil.copy(png, tmp_path / "kept.png")


def test_seed_rows_average_each_question_over_the_seeds_and_pair_with_outcome_of_the_same_seed(tmp_path):
    def summary(ids, em, f1):
        return {"each": {"id": ids, "em": em, "answered": [1.0] * len(em)}, "f1": f1, "searches": 1.0}

    def run(name, rewards, ig=None):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward": r, **({"ig_mean": ig} if ig else {})})
                                                 + "\n" for i, r in enumerate(rewards)))
        return d

    q = ["q1", "q2"]
    res = {run("outcome-s0", [0.0, 1.0]): {"after": summary(q, [0.0, 1.0], 0.4)},
           run("outcome-s1", [0.5]): {"after": summary(q[::-1], [0.0, 0.0], 0.2)},          # q2, q1: order is by id
           run("igsearch-s0", [1.0], ig=2.0): {"after": summary(q, [1.0, 1.0], 0.9)},
           run("igsearch-s1", [0.0], ig=4.0): {"after": summary(q + ["q3"], [0.0, 1.0, 1.0], 0.7)}}  # q3: one seed only
    rows = views.seed_rows(list(res), res, {"warm-up": summary(q, [0.0, 0.0], 0.0)})
    out, ig = rows
    assert (out["model"], out["seeds"], out["n"], ig["model"], ig["n"]) == ("outcome", "0,1", 2, "igsearch", 2)
    # outcome per question over the seeds: q1 (0 + 0) / 2 = 0, q2 (1 + 0) / 2 = 0.5; igsearch 0.5 and 1
    assert out["em"] == pytest.approx(0.25) and ig["em"] == pytest.approx(0.75)
    assert ig["em_gain"] == pytest.approx(0.75) and out["em_gain"] == pytest.approx(0.25)   # the start is all 0
    # igsearch − outcome, same seed, same question: q1 (1 − 0 + 0 − 0) / 2 = 0.5, q2 (1 − 1 + 1 − 0) / 2 = 0.5
    assert ig["em_vs_outcome"] == pytest.approx(0.5) and ig["em_vs_outcome_ci"] == [0.5, 0.5]
    assert out["em_vs_outcome"] is None and ig["answered_vs_outcome"] == 0.0
    assert ig["f1"] == pytest.approx(0.8) and out["train_reward"] == pytest.approx(0.5)   # (0.5 + 0.5) / 2
    assert ig["mean_ig"] == pytest.approx(3.0) and out["mean_ig"] is None
    table = views.seed_table(rows)
    assert "| igsearch | 0,1 | 2 | 0.750 [0.50, 1.00] | 1.000 [1.00, 1.00] | +0.750 [+0.50, +1.00] | +0.500 [+0.50, +0.50] |" in table
    # one seed: each reward's own values, and its paired change from outcome of that seed
    one = {r: v for r, v in res.items() if r.name.endswith("-s0")}
    rows = views.seed_rows(list(one), one, {"warm-up": summary(q, [0.0, 0.0], 0.0)})
    assert [(r["seeds"], r["em"], r["em_vs_outcome"]) for r in rows] == [("0", 0.5, None), ("0", 1.0, 0.5)]
    assert views.seed_rows([], {}, {}) == []


def test_paired_gain_matches_questions_by_id_and_its_interval_holds_the_pairs():
    ids = [f"q{i}" for i in range(40)]
    start = {"each": {"id": ids, "em": [float(i % 2) for i in range(40)]}}
    # the same questions in reverse order; 10 of the 20 misses become hits, nothing is lost
    after = {"each": {"id": ids[::-1], "em": [1.0 if (i % 2 or i < 20) else 0.0 for i in range(40)][::-1]}}
    g = views.paired_gain(after, start)
    assert g["n"] == 40 and g["gain"] == pytest.approx(10 / 40)
    lo, hi = g["gain_ci"]
    assert 0 < lo < 0.25 < hi < 0.5   # every paired difference is 0 or +1: the interval stays above 0
    # unpaired, the two means' intervals (0.5 vs 0.75 over 40 questions) would overlap
    assert views.bootstrap_ci(start["each"]["em"])[1] > views.bootstrap_ci(after["each"]["em"])[0]
    assert views.paired_gain({"em": 0.5}, start) is None     # a summary without per-question values
    assert views.paired_gain(after, {"each": {"id": ["other"], "em": [1.0]}}) is None  # no question in common


def test_pairwise_rows_by_hand_with_the_sign_test(tmp_path):
    # 2 seeds, 4 questions (b1, b2 bridge; c1, c2 comparison). Per question, the mean over the seeds of
    # igsearch − outcome (same seed): b1 (1−0 + 1−0)/2 = 1, b2 (0−0 + 1−0)/2 = 0.5, c1 (0−1 + 0−1)/2 = −1, c2 0
    def summary(em):
        return {"each": {"id": ["b1", "b2", "c1", "c2"], "em": em,
                         "type": ["bridge", "bridge", "comparison", "comparison"]}}
    res = {tmp_path / "outcome-s0": {"after": summary([0.0, 0.0, 1.0, 1.0])},
           tmp_path / "outcome-s1": {"after": summary([0.0, 0.0, 1.0, 0.0])},
           tmp_path / "igsearch-s0": {"after": summary([1.0, 0.0, 0.0, 1.0])},
           tmp_path / "igsearch-s1": {"after": summary([1.0, 1.0, 0.0, 0.0])},
           tmp_path / "control-s0": {"after": summary([0.0, 0.0, 0.0, 0.0])}}
    rows = views.pairwise_rows(list(res), res, {"warm-up": summary([0.0, 0.0, 0.0, 0.0])})
    got = {(r["arm"], r["vs"], r["kind"]): r for r in rows}
    r = got["igsearch", "outcome", "all"]
    assert (r["n"], r["seeds"], r["diff"], r["better"], r["worse"]) == (4, "0,1", 0.125, 2, 1)
    assert r["p"] == 1.0                                   # 2 better, 1 worse: P(X <= 1 | 3, 1/2) · 2 = 1
    b = got["igsearch", "outcome", "bridge"]
    assert (b["n"], b["diff"], b["better"], b["worse"], b["p"]) == (2, 0.75, 2, 0, 0.5)   # 2 · (1/2)^2
    c = got["igsearch", "outcome", "comparison"]
    assert (c["n"], c["diff"], c["better"], c["worse"]) == (2, -0.5, 0, 1)
    # against the start (one model for both seeds): igsearch's per-question mean EM 1, 0.5, 0, 0.5
    s = got["igsearch", "start", "all"]
    assert (s["diff"], s["better"], s["worse"]) == (0.5, 3, 0)
    # the control has seed 0 only: igsearch − control over seed 0 alone; the control is compared with the start only
    assert got["igsearch", "control", "all"]["seeds"] == "0" and got["igsearch", "control", "all"]["diff"] == 0.5
    assert {k[1] for k in got if k[0] == "control"} == {"start"} and {k[1] for k in got if k[0] == "outcome"} == \
        {"start", "control"}
    assert "| igsearch (bridge) | outcome | 2 | 0,1 | +0.750 [+0.500, +1.000] | 2 / 0 | 0.5 |" in views.pairwise_table(rows)
