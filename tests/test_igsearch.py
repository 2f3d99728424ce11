"""IG-Search (METHOD §4): gold-answer scores, counterfactual baselines, information gain, the gate g() and
the query-span bonus on the per-token advantages A [B, T], and the "gradient when every rollout fails" property.

Every expectation is worked by hand: a fake language model whose next-token log-probs are a fixed table
(§4.1), a fake scorer whose value is a rule on the decoded context (§4.2), and scripted trajectories run
through the real rollout bookkeeping (grpo.scripted_turns)."""
import copy
import dataclasses
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import grpo
import igsearch
import rewards
import views
from conftest import LYON, NICE, PARIS, Q, enc, loss_and_grads, make_rollout
from retrieve import Retriever


# ----------------------------------------------------------------------------------------------------
# Shared set-up: the real Qwen tokenizer with a tiny random Qwen3, and a hand-made corpus

def D(title, text):
    return {"id": title.lower(), "title": title, "text": text}


DOCS = [
    D("Quendia", "Quendia is a country whose capital is Zorvath."),      # holds Q1's answer
    D("Mirelle", "The Mirelle flows through Ostrand."),                  # holds Q2's answer
    D("Bakery", "A bakery sells bread."),
    D("Harbor", "A harbor shelters ships."),
] + [D(f"Filler{i}", f"Filler{i} holds note number {i}.") for i in range(10)]
BY_TITLE = {d["title"]: d for d in DOCS}

Q1 = {"id": "q1", "question": "What is the capital of Quendia?", "golden_answers": ["Zorvath"]}
Q2 = {"id": "q2", "question": "Through which country does the Mirelle flow?",
      "golden_answers": ["Ostrand Republic", "Ostrand"]}
Q3 = {"id": "q3", "question": "What does a harbor shelter?", "golden_answers": ["ships"]}


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return Retriever(DOCS, cache_dir=tmp_path_factory.mktemp("bm25"))


def scripted(tok, retriever, spec, topk=1, max_turns=2):
    """Rollouts from (question, group, [turn texts]) through the real agent loop, with scripted turns."""
    return grpo.generate_rollouts(None, tok, [q for q, _, _ in spec], [g for _, g, _ in spec], retriever,
                                  max_turns=max_turns, topk=topk,
                                  turn_fn=grpo.scripted_turns(tok, [s for _, _, s in spec]))


def cue(tok):
    return tok.encode("<answer>", add_special_tokens=False)


def gold_ids(tok, alias):
    return tok.encode(" " + alias, add_special_tokens=False)


def block_ids(tok, docs):
    return tok.encode(grpo.information_block(docs), add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------
# 1. gold_scorer: s(a* | C) under a model whose log-probs are a table (METHOD §4.1)

class _FirstTokens:
    """The fake's KV cache: all a table model needs of the past is each row's first token."""

    def __init__(self, first):
        self.first = first  # [B, 1]

    def batch_repeat_interleave(self, n):
        self.first = self.first.repeat_interleave(n, 0)


class _Hidden(nn.Module):
    """Hidden state = [one-hot of the token, one-hot of the row's first token]; with a cache, the first token
    is the cached prefix's."""

    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        first = past_key_values.first if past_key_values is not None else input_ids[:, :1]
        h = torch.cat([nn.functional.one_hot(input_ids, self.V),
                       nn.functional.one_hot(first.expand_as(input_ids), self.V)], -1)
        return SimpleNamespace(last_hidden_state=h.float(), past_key_values=_FirstTokens(first) if use_cache else None)


class TableLM(nn.Module):
    """What grpo.token_logprobs uses of a causal LM, with logits(next | prev, first) = logP[prev] + F[first].
    With F = 0 and rows of P summing to 1, log π(next | prev) = log P[prev, next] exactly."""

    def __init__(self, P, F=None):
        super().__init__()
        V = P.shape[0]
        F = torch.zeros(V, V) if F is None else F
        self.hidden = _Hidden(V)
        self.head = nn.Linear(2 * V, V, bias=False)
        with torch.no_grad():  # Linear: logits = h @ W.T, so W[:, prev] is the row of logits after prev
            self.head.weight.copy_(torch.cat([P.log().T, F.T], dim=1))

    @property
    def base_model(self):
        return self.hidden

    def get_output_embeddings(self):
        return self.head


V = 6
# the transition probabilities the hand computations use; the rest of each row is spread evenly
PICKED = {(2, 3): 0.5, (3, 4): 0.25, (4, 5): 0.125, (5, 3): 0.1, (3, 3): 0.2}


def table():
    P = torch.zeros(V, V, dtype=torch.float64)
    for prev in range(V):
        row = {n: p for (a, n), p in PICKED.items() if a == prev}
        rest = (1 - sum(row.values())) / (V - len(row))
        for n in range(V):
            P[prev, n] = row.get(n, rest)
    return P.float()


def reference_score(P, F, ctx, gold, head_tokens=3, head_weight=3.0):
    """s(a* | C) written out: w-weighted mean of log_softmax(log P[prev] + F[first])[next]."""
    seq = list(ctx) + list(gold)
    total = wsum = 0.0
    for k in range(len(gold)):
        pos = len(ctx) + k
        logits = P[seq[pos - 1]].double().log() + F[seq[0]].double()
        w = head_weight if k < head_tokens else 1.0
        total += w * float(logits.log_softmax(-1)[seq[pos]])
        wsum += w
    return total / wsum


def test_head_weights():
    assert rewards.head_weights(5).tolist() == [3, 3, 3, 1, 1]
    assert rewards.head_weights(2).tolist() == [3, 3]
    assert rewards.head_weights(4, head_tokens=1, head_weight=5.0).tolist() == [5, 1, 1, 1]
    assert rewards.head_weights(3, head_tokens=0).tolist() == [1, 1, 1]


def score_whole(model, contexts, golds, **kw):
    """s(a* | C) of whole contexts: no shared prefix."""
    return rewards.gold_scorer(model, [], **kw)(contexts, golds)


def test_gold_score_by_hand():
    model = TableLM(table())
    ctx, gold = [0, 1, 2], [3, 4, 5, 3, 3]
    # log π of the gold tokens: P[2,3], P[3,4], P[4,5], P[5,3], P[3,3]
    logs = [math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.1), math.log(0.2)]
    default = (3 * (logs[0] + logs[1] + logs[2]) + logs[3] + logs[4]) / 11
    assert default == pytest.approx(-1.4898790, abs=1e-6)
    got = score_whole(model, [ctx], [gold])
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(default, abs=1e-5)
    # non-default head: w = 5, 1, 1, 1, 1
    custom = (5 * logs[0] + sum(logs[1:])) / 9
    assert float(score_whole(model, [ctx], [gold], head_tokens=1, head_weight=5.0)[0]) == \
        pytest.approx(custom, abs=1e-5)
    # no head: the plain mean; a gold shorter than the head: also the plain mean
    assert float(score_whole(model, [ctx], [gold], head_tokens=0)[0]) == pytest.approx(sum(logs) / 5, abs=1e-5)
    assert float(score_whole(model, [ctx], [[3, 4]])[0]) == pytest.approx((logs[0] + logs[1]) / 2, abs=1e-5)
    # a one-token gold: the log-prob of that token after the context's last token
    assert float(score_whole(model, [[4, 2]], [[3]])[0]) == pytest.approx(math.log(0.5), abs=1e-5)
    with pytest.raises(ValueError, match="empty context"):
        score_whole(model, [[]], [[3]])


# METHOD §4.1: without a shared prefix, an empty context leaves the first gold token unpredicted
def test_gold_scorer_refuses_an_empty_context_in_any_row(tiny):
    model, _ = tiny
    score = rewards.gold_scorer(model, [], token_budget=4)
    for suffixes in ([[5, 6], []], [[], [5, 6]], [[5], [6], [7], []]):
        with pytest.raises(ValueError, match="empty context"):
            score(suffixes, [[3]] * len(suffixes))


def test_gold_score_with_a_shared_prefix_by_hand():
    """The prefix's cache must carry what the suffixes depend on: here, the row's first token (F != 0)."""
    F = torch.tensor([[0.3 * f * n for n in range(V)] for f in range(V)])
    model, P = TableLM(table(), F), table()
    prefix = [5, 1]
    suffixes, golds = [[0, 2], [4], [], [3, 3, 3, 2]], [[3, 4, 5], [5, 3], [0, 3], [3]]
    got = rewards.gold_scorer(model, prefix, token_budget=21)(suffixes, golds)  # rows of 2 + 5, 3, 2 | 5
    for b, (s, g) in enumerate(zip(suffixes, golds)):
        # an empty suffix: the gold's first token is predicted by the prefix's last token
        assert float(got[b]) == pytest.approx(reference_score(P, F, prefix + s, g), abs=1e-5)
        assert float(got[b]) == pytest.approx(float(score_whole(model, [prefix + s], [g])[0]), abs=1e-6)
    # the first token does change the score: a prefix of another first token gives other numbers
    other = rewards.gold_scorer(model, [2, 1])([[0, 2]], [golds[0]])
    assert abs(float(other[0]) - float(got[0])) > 0.05


def test_gold_score_batched_equals_one_by_one_table():
    F = torch.tensor([[0.1 * (f + 1) * (n - 2) for n in range(V)] for f in range(V)])
    model = TableLM(table(), F)
    P = table()
    ctxs = [[0, 1, 2], [4], [5, 3, 3, 1, 0, 2, 4], [2, 2]]
    golds = [[3, 4, 5, 3, 3], [5], [3, 4], [3, 3, 3, 3]]
    batched = score_whole(model, ctxs, golds, token_budget=27)  # rows of 8, 2, 9 | 6
    assert batched.shape == (4,)
    for b, (c, g) in enumerate(zip(ctxs, golds)):
        assert float(batched[b]) == pytest.approx(reference_score(P, F, c, g), abs=1e-5)
        assert float(batched[b]) == pytest.approx(float(score_whole(model, [c], [g])[0]), abs=1e-6)


def test_gold_score_prefix_cache_equals_whole_contexts_real_model(tiny):
    """On a real transformer: continuing from the prefix's KV cache, in micro-batches of suffixes of unequal
    length, gives the scores of the whole contexts run one by one."""
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 5000, (23,), generator=g).tolist()
    lens = [(5, 1), (40, 4), (17, 2), (0, 6), (3, 3)]
    sufs = [torch.randint(0, 5000, (n,), generator=g).tolist() for n, _ in lens]
    golds = [torch.randint(0, 5000, (m,), generator=g).tolist() for _, m in lens]
    score = rewards.gold_scorer(model, prefix, token_budget=134)  # rows of 23 + 6, 44 | 19, 6, 6
    shared = score(sufs, golds)
    again = score(sufs[::-1], golds[::-1])  # the prefix cache is reused, not consumed
    whole = torch.cat([score_whole(model, [prefix + s], [a]) for s, a in zip(sufs, golds)])
    assert torch.isfinite(shared).all()
    assert torch.allclose(shared, whole, atol=1e-5)
    assert torch.allclose(again.flip(0), whole, atol=1e-5)
    # the same through grpo.token_logprobs on the whole sequences (the loss's own log-prob path)
    seq = prefix + sufs[1] + golds[1]
    mask = torch.zeros(1, len(seq), dtype=torch.bool)
    mask[0, -len(golds[1]):] = True
    with torch.no_grad():
        lp = grpo.token_logprobs(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long), mask)[0, -4:]
    w = rewards.head_weights(4)
    assert float(shared[1]) == pytest.approx(float((lp * w).sum() / w.sum()), abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# 2. igsearch_information_gain with a fake scorer (METHOD §4.2)

class FakeScorer:
    """scorer(prefix) -> score(suffixes, golds): s(a* | C) = 0 when the alias text appears in the decoded context
    C = prefix + suffix, -2 otherwise, plus bonus[alias]. Records each step's prefix and every score call as
    (contexts, golds); a step scores its real context first, then its baselines (`passes`)."""

    def __init__(self, tok, bonus=None):
        self.tok, self.bonus, self.prefixes, self.calls = tok, bonus or {}, [], []

    def value(self, ctx, gold):
        alias = self.tok.decode(gold).strip()
        return (0.0 if alias in self.tok.decode(ctx) else -2.0) + self.bonus.get(alias, 0.0)

    def __call__(self, prefix):
        self.prefixes.append(list(prefix))

        def score(suffixes, golds):
            contexts = [list(prefix) + list(s) for s in suffixes]
            self.calls.append((contexts, [list(g) for g in golds]))
            return torch.tensor([self.value(c, g) for c, g in zip(contexts, golds)])
        return score

    def passes(self, k):
        """(contexts, golds) of every step's real (k = 0) or baseline (k = 1) call, in step order."""
        calls = self.calls[k::2]
        return [c for cs, _ in calls for c in cs], [g for _, gs in calls for g in gs]


# group 0: Q1 three times (the answer's document, a useless one, no search); group 1: Q2 twice (the answer's
# document; a useless search, then the answer's document)
MAIN = [
    (Q1, 0, ["<search> Quendia </search>", "<answer> Zorvath </answer>"]),
    (Q1, 0, ["<search> bakery bread </search>", "<answer> Lyon </answer>"]),
    (Q1, 0, ["<answer> Zorvath </answer>"]),
    (Q2, 1, ["<search> Mirelle </search>", "<answer> Ostrand </answer>"]),
    (Q2, 1, ["<search> harbor ships </search>", "<search> Mirelle </search>", "<answer> Ostrand </answer>"]),
]


def split_baseline(tok, r, t, ctx):
    """The block a counterfactual context put in place of step t's block; checks the prefix and the cue."""
    s, _ = r.searches[t]["info_span"]
    c = cue(tok)
    assert ctx[:s] == r.ids[:s]
    assert ctx[-len(c):] == c
    return ctx[s:-len(c)]


def test_main_scenario_retrieval(tok, retriever):
    rs = scripted(tok, retriever, MAIN)
    titles = [[[d["title"] for d in s["docs"]] for s in r.searches] for r in rs]
    assert titles == [[["Quendia"]], [["Bakery"]], [], [["Mirelle"]], [["Harbor"], ["Mirelle"]]]
    for r in rs:
        for s in r.searches:
            assert r.ids[slice(*s["info_span"])] == block_ids(tok, s["docs"])
            assert tok.decode(r.ids[slice(*s["query_span"])]).strip().startswith("<search>")
            assert tok.decode(r.ids[slice(*s["query_span"])]).strip().endswith("</search>")


def test_ig_real_evidence_vs_useless_evidence(tok, retriever):
    rs = scripted(tok, retriever, MAIN)
    scorer = FakeScorer(tok, bonus={"Ostrand Republic": 1.0})
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=3, rng=random.Random(0))
    # r0: real 0 (Zorvath in its block), baseline -2 (other question's blocks) -> 2
    # r1: -2 vs -2 -> 0.   r2: no search.
    # r3: aliases "Ostrand Republic" -2+1 = -1, "Ostrand" 0 -> best "Ostrand"; baseline -2 -> 2
    # r4 step 0 (harbor; step 1's block is not in C_0): best "Ostrand Republic" -1, baseline -1 -> 0
    # r4 step 1: "Ostrand" 0, baseline -2 -> 2
    assert ig == [[2.0], [0.0], [], [2.0], [0.0, 2.0]]
    assert [(d["rollout"], d["step"], d["real"], d["baseline"], d["ig"]) for d in details] == [
        (0, 0, 0.0, -2.0, 2.0), (1, 0, -2.0, -2.0, 0.0), (3, 0, 0.0, -2.0, 2.0),
        (4, 0, -1.0, -1.0, 0.0), (4, 1, 0.0, -2.0, 2.0)]


def test_ig_of_some_rollouts_only_scores_those_with_the_draws_of_the_whole_step(tok, retriever):
    # a rank scores its own rollouts (only=): those get the values of the whole step above, the others None and
    # no details (that their baseline draws are still taken, tests/test_ranks.py checks against one process)
    rs = scripted(tok, retriever, MAIN)
    scorer = FakeScorer(tok, bonus={"Ostrand Republic": 1.0})
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=3, rng=random.Random(0),
                                                    only={3, 4})
    assert ig == [None, None, None, [2.0], [0.0, 2.0]]
    assert [(d["rollout"], d["step"], d["real"], d["baseline"]) for d in details] == [
        (3, 0, 0.0, -2.0), (4, 0, -1.0, -1.0), (4, 1, 0.0, -2.0)]


def test_ig_contexts_and_golds(tok, retriever):
    rs = scripted(tok, retriever, MAIN)
    scorer = FakeScorer(tok, bonus={"Ostrand Republic": 1.0})
    N = 4
    rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=N, rng=random.Random(3))
    steps = [(0, 0), (1, 0), (3, 0), (4, 0), (4, 1)]
    # one prefix per step, run once and shared by its real and baseline calls: the ids before step t's block
    assert scorer.prefixes == [rs[i].ids[:rs[i].searches[t]["info_span"][0]] for i, t in steps]
    assert len(scorer.calls) == 2 * len(steps)
    # pass 1: every step with every alias; C_t^real = ids up to the end of step t's block, then "<answer>"
    ctx1, gold1 = scorer.passes(0)
    exp_ctx, exp_gold = [], []
    for i, t in steps:
        end = rs[i].searches[t]["info_span"][1]
        for a in rs[i].question["golden_answers"]:
            exp_ctx.append(rs[i].ids[:end] + cue(tok))
            exp_gold.append(gold_ids(tok, a))
    assert ctx1 == exp_ctx and gold1 == exp_gold
    assert rs[4].searches[0]["info_span"][1] <= rs[4].searches[1]["query_span"][0]  # C_0 of r4 stops before step 1
    # pass 2: N per step, scored with the alias that had the best real score
    ctx2, gold2 = scorer.passes(1)
    best = ["Zorvath", "Zorvath", "Ostrand", "Ostrand Republic", "Ostrand"]
    assert gold2 == [gold_ids(tok, a) for a in best for _ in range(N)]
    assert len(ctx2) == len(steps) * N
    # C_t^rand: the same prefix, exactly step t's block replaced, by a block of the other question
    blocks = lambda idx: [rs[i].ids[slice(*s["info_span"])] for i in idx for s in rs[i].searches]
    other = {0: blocks([3, 4]), 1: blocks([0, 1])}  # group -> the blocks of the other question
    for k, (i, t) in enumerate(steps):
        for j in range(N):
            blk = split_baseline(tok, rs[i], t, ctx2[k * N + j])
            assert blk in other[rs[i].group]


def test_batch_baseline_never_draws_the_same_question(tok, retriever):
    spec = [
        (Q1, 0, ["<search> Quendia </search>", "<answer> Zorvath </answer>"]),
        (Q1, 0, ["<search> bakery </search>", "<answer> x </answer>"]),
        (Q2, 1, ["<search> Mirelle </search>", "<answer> Ostrand </answer>"]),
        (Q1, 2, ["<search> Filler3 </search>", "<answer> x </answer>"]),   # Q1 again, in another group
        (Q3, 3, ["<search> harbor </search>", "<answer> ships </answer>"]),
    ]
    rs = scripted(tok, retriever, spec)
    blocks = {i: rs[i].ids[slice(*rs[i].searches[0]["info_span"])] for i in range(5)}
    scorer = FakeScorer(tok)
    N = 20
    rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=N, rng=random.Random(0))
    ctx2, _ = scorer.passes(1)
    drawn = {i: [split_baseline(tok, rs[i], 0, ctx2[i * N + j]) for j in range(N)] for i in range(5)}
    allowed = {0: [blocks[2], blocks[4]], 1: [blocks[2], blocks[4]], 2: [blocks[0], blocks[1], blocks[3], blocks[4]],
               3: [blocks[2], blocks[4]], 4: [blocks[0], blocks[1], blocks[2], blocks[3]]}
    for i in range(5):
        assert all(b in allowed[i] for b in drawn[i]), i
        assert len({tuple(b) for b in drawn[i]}) > 1  # drawn from the whole pool, not one fixed block


def test_empty_pool_falls_back_to_corpus_documents(tok, retriever):
    # one question only: the batch holds no other question's block -> k random corpus documents
    spec = [(Q1, 0, ["<search> Quendia bread </search>", "<answer> Zorvath </answer>"]),
            (Q1, 0, ["<search> Quendia bread </search>", "<answer> Zorvath </answer>"]),
            (Q1, 1, ["<answer> Zorvath </answer>"])]  # the same question in another group is not "other"
    rs = scripted(tok, retriever, spec, topk=2)
    real_titles = {d["title"] for d in rs[0].searches[0]["docs"]}
    assert real_titles == {"Quendia", "Bakery"}
    scorer = FakeScorer(tok)
    N = 5
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=N, rng=random.Random(0))
    # the real block holds Zorvath (0); the random documents never include the real ones, so never the
    # Quendia article (-2): IG = 2 for both steps
    assert ig == [[2.0], [2.0], []]
    ctx2, _ = scorer.passes(1)
    assert len(ctx2) == 2 * N
    seen = set()
    for k in range(2 * N):
        blk = split_baseline(tok, rs[k // N], 0, ctx2[k])
        titles = re.findall(r"Doc \d+\(Title: (.*?)\)", tok.decode(blk))
        assert len(titles) == 2 and len(set(titles)) == 2          # k = the real step's document count
        assert not set(titles) & real_titles                       # never the real step's documents
        assert blk == block_ids(tok, [BY_TITLE[t] for t in titles])  # formatted exactly like a real block
        seen.add(tuple(titles))
    assert len(seen) > 1


def test_corpus_baseline_when_asked_even_with_a_pool(tok, retriever):
    rs = scripted(tok, retriever, MAIN)
    pool = [r.ids[slice(*s["info_span"])] for r in rs for s in r.searches]
    scorer = FakeScorer(tok)
    N = 6
    rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=N, baseline="corpus",
                                      rng=random.Random(0))
    ctx2, _ = scorer.passes(1)
    steps = [(0, 0), (1, 0), (3, 0), (4, 0), (4, 1)]
    not_pool = 0
    for k, (i, t) in enumerate(steps):
        real = {d["title"] for d in rs[i].searches[t]["docs"]}
        for j in range(N):
            blk = split_baseline(tok, rs[i], t, ctx2[k * N + j])
            titles = re.findall(r"Doc \d+\(Title: (.*?)\)", tok.decode(blk))
            assert len(titles) == 1 and not set(titles) & real
            assert blk == block_ids(tok, [BY_TITLE[x] for x in titles])
            not_pool += blk not in pool
    assert not_pool > 0  # random corpus documents, not the batch's blocks


def test_empty_information_block(tok, retriever):
    spec = [(Q1, 0, ["<search> xyzzy plugh </search>", "<answer> x </answer>"]),
            (Q2, 1, ["<search> Mirelle </search>", "<answer> Ostrand </answer>"])]
    rs = scripted(tok, retriever, spec)
    s = rs[0].searches[0]
    assert s["docs"] == [] and s["query"] == "xyzzy plugh"
    assert rs[0].ids[slice(*s["info_span"])] == block_ids(tok, []) == \
        tok.encode("\n\n<information></information>\n\n", add_special_tokens=False)
    # batch baseline: Q1's empty block replaced by Q2's Mirelle block; Zorvath in neither -> -2 - (-2) = 0
    scorer = FakeScorer(tok)
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=2, rng=random.Random(0))
    assert ig == [[0.0], [2.0]]
    ctx1, _ = scorer.passes(0)
    assert ctx1[0] == rs[0].ids[:s["info_span"][1]] + cue(tok)
    ctx2, _ = scorer.passes(1)
    mirelle = rs[1].ids[slice(*rs[1].searches[0]["info_span"])]
    assert [split_baseline(tok, rs[0], 0, c) for c in ctx2[:2]] == [mirelle, mirelle]
    # corpus baseline: an empty real block still gets one random document (k = max(0, 1))
    scorer = FakeScorer(tok)
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs[:1], retriever, n_samples=3,
                                                    baseline="corpus", rng=random.Random(0))
    ctx2, _ = scorer.passes(1)
    vals = []
    for c in ctx2:
        blk = split_baseline(tok, rs[0], 0, c)
        titles = re.findall(r"Doc \d+\(Title: (.*?)\)", tok.decode(blk))
        assert len(titles) == 1 and blk == block_ids(tok, [BY_TITLE[titles[0]]])
        vals.append(scorer.value(c, gold_ids(tok, "Zorvath")))
    assert details[0]["real"] == -2.0
    assert ig[0][0] == pytest.approx(-2.0 - sum(vals) / 3)


def test_ig_deterministic_for_a_seeded_rng(tok, retriever):
    rs = scripted(tok, retriever, MAIN)
    runs = []
    for seed in (5, 5, 6):
        scorer = FakeScorer(tok)
        ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=4,
                                                        rng=random.Random(seed))
        runs.append((ig, details, scorer.calls))
    assert runs[0] == runs[1]
    assert runs[0][2][1][0] != runs[2][2][1][0]  # another seed draws other blocks (checked for these seeds)


def test_no_search_anywhere(tok, retriever):
    rs = scripted(tok, retriever, [(Q1, 0, ["<answer> a </answer>"]), (Q2, 1, ["<answer> b </answer>"])])
    scorer = FakeScorer(tok)
    assert rewards.igsearch_information_gain(scorer, tok, rs, retriever, rng=random.Random(0)) == ([[], []], [])
    assert scorer.prefixes == [] and scorer.calls == []  # no forward pass at all


# Hand-built rollouts (conftest.make_rollout) and a scorer that records its calls: the defaults of §4.2 (N = 3
# blocks from the batch, the seed-0 rng), plain-text ids, and the cut of a step's contexts

def test_igsearch_defaults_draw_three_blocks_of_other_questions(tiny):
    _, tok = tiny
    q2 = {"question": "Where is Nice?", "golden_answers": ["Riviera"]}
    rs = [make_rollout(tok, Q, 0, [[PARIS]]), make_rollout(tok, q2, 1, [[NICE]])]
    calls = []

    def scorer(prefix):
        def score(suffixes, golds):
            calls.append([list(prefix) + list(s) for s in suffixes])
            return torch.zeros(len(suffixes))
        return score
    rewards.igsearch_information_gain(scorer, tok, rs, retriever=None)
    # per step: the real context with each alias (one here), then N = 3 baselines; each baseline block is the
    # other question's block (the batch pool), never a random corpus document (retriever=None would fail)
    assert [len(c) for c in calls] == [1, 3, 1, 3]
    for i, other in ((0, 1), (1, 0)):
        s, e = rs[i].searches[0]["info_span"]
        block = rs[other].ids[slice(*rs[other].searches[0]["info_span"])]
        for ctx in calls[2 * i + 1]:
            assert ctx[:s] == rs[i].ids[:s] and ctx[s:s + len(block)] == block


def recording_scorer(calls):
    def scorer(prefix):
        def score(suffixes, golds):
            calls.append(([list(prefix) + list(s) for s in suffixes], [list(g) for g in golds]))
            return torch.zeros(len(suffixes))
        return score
    return scorer


def test_igsearch_default_rng_is_seed_zero(tiny):
    _, tok = tiny
    qs = [{"question": f"Where is {d['title']}?", "golden_answers": [d["title"]]} for d in (PARIS, LYON, NICE)]
    rs = [make_rollout(tok, q, i, [[d]]) for i, (q, d) in enumerate(zip(qs, (PARIS, LYON, NICE)))]
    runs = []
    for rng in (None, random.Random(0), random.Random(1)):
        calls = []
        rewards.igsearch_information_gain(recording_scorer(calls), tok, rs, None, n_samples=6, rng=rng)
        runs.append(calls)
    assert runs[0] == runs[1] and runs[1] != runs[2]


BOS = 151644  # <|im_start|>: never in a block or an answer


class BosTokenizer:
    """The Qwen tokenizer, but with a BOS id in front when asked for special tokens (as Llama's adds one)."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_special_tokens=True):
        return ([BOS] if add_special_tokens else []) + self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids, **kw):
        return self.tok.decode(ids, **kw)


def test_igsearch_contexts_and_golds_are_plain_text_ids(tiny, tmp_path):
    # "<answer>", the gold alias and a corpus block continue the rollout: no special token in front of any (§4.1)
    _, tok = tiny
    q2 = {"question": "Where is Nice?", "golden_answers": ["Riviera"]}
    rs = [make_rollout(tok, Q, 0, [[PARIS]]), make_rollout(tok, q2, 1, [[NICE]])]
    cue = enc(tok, "<answer>")
    retriever = Retriever([PARIS, LYON, NICE], cache_dir=tmp_path)
    for baseline in ("batch", "corpus"):
        calls = []
        rewards.igsearch_information_gain(recording_scorer(calls), BosTokenizer(tok), rs, retriever,
                                          baseline=baseline)
        for r, (ctxs, golds) in zip([rs[0], rs[0], rs[1], rs[1]], calls):
            s = r.searches[0]["info_span"][0]
            for ctx in ctxs:
                assert ctx[-len(cue):] == cue and BOS not in ctx[s:]
            assert golds == [enc(tok, " " + r.question["golden_answers"][0])] * len(ctxs)


def test_left_truncation_cuts_a_step_at_one_point(tok, retriever):
    """METHOD §4.1: contexts longer than the limit are cut from the left, all contexts of a step at the same
    point (so they still differ only in the evidence): the prefix keeps max_context - longest suffix tokens."""
    rs = scripted(tok, retriever, MAIN)
    c = len(cue(tok))
    i, t = 4, 1                                          # the second step of r4: the longest prefix
    s, e = rs[i].searches[t]["info_span"]
    full = FakeScorer(tok)
    rewards.igsearch_information_gain(full, tok, rs[3:5], retriever, n_samples=3, rng=random.Random(0))
    # r4 step 1: after r3's step and r4's step 0, two aliases (Q2) each in the real pass, N = 3 in the baseline's
    ctx_real, ctx_base = full.passes(0)[0][4], full.passes(1)[0][6:9]
    longest = max(len(x) - s for x in [ctx_real] + ctx_base)       # block + cue
    limit = longest + 7
    cut = FakeScorer(tok)
    rewards.igsearch_information_gain(cut, tok, rs[3:5], retriever, n_samples=3, rng=random.Random(0),
                                      max_context=limit)
    assert cut.prefixes[2] == rs[i].ids[s - 7:s]          # 7 prefix tokens fit beside the longest suffix
    real, base = cut.passes(0)[0][4], cut.passes(1)[0][6:9]
    assert real == ctx_real[s - 7:] and base == [x[s - 7:] for x in ctx_base]
    assert max(len(x) for x in [real] + base) == limit   # the longest context is exactly at the limit
    assert real[-c:] == cue(tok)
    # not cut when everything fits exactly
    fits = FakeScorer(tok)
    rewards.igsearch_information_gain(fits, tok, rs[3:5], retriever, n_samples=3, rng=random.Random(0),
                                      max_context=longest + s)
    assert fits.prefixes[2] == rs[i].ids[:s]
    # a block longer than the limit: no prefix left, and the block itself is cut from the left
    tiny_limit = c + 2
    short = FakeScorer(tok)
    rewards.igsearch_information_gain(short, tok, rs[3:5], retriever, n_samples=3, rng=random.Random(0),
                                      max_context=tiny_limit)
    assert all(p == [] for p in short.prefixes)
    assert short.passes(0)[0][4] == ctx_real[-tiny_limit:]


def test_igsearch_cuts_every_context_of_a_step_to_the_limit(tiny):
    # a limit shorter than the blocks: no prefix at all, and every context, real or counterfactual, is the last
    # `max_context` tokens of its block + "<answer>" (§4.1: cut from the left)
    _, tok = tiny
    q2 = {"question": "Where is Nice?", "golden_answers": ["Riviera"]}
    rs = [make_rollout(tok, Q, 0, [[PARIS]]), make_rollout(tok, q2, 1, [[NICE]])]
    calls = []
    rewards.igsearch_information_gain(recording_scorer(calls), tok, rs, None, max_context=5)
    blocks = [r.ids[slice(*r.searches[0]["info_span"])] + enc(tok, "<answer>") for r in rs]
    assert [ctxs for ctxs, _ in calls] == [[blocks[0][-5:]], [blocks[1][-5:]] * 3,
                                          [blocks[1][-5:]], [blocks[0][-5:]] * 3]


def test_left_truncation_on_the_real_model(tiny, retriever):
    """With a limit, each score is the score of the cut context run whole."""
    model, tok = tiny
    rs = scripted(tok, retriever, MAIN)[3:5]
    rec = FakeScorer(tok)
    rewards.igsearch_information_gain(rec, tok, rs, retriever, n_samples=2, rng=random.Random(0), max_context=60)
    scorer = lambda prefix: rewards.gold_scorer(model, prefix, token_budget=512)
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=2, rng=random.Random(0),
                                                    max_context=60)
    (real_ctx, real_gold), (base_ctx, _) = rec.passes(0), rec.passes(1)
    assert all(len(x) <= 60 for x in real_ctx + base_ctx) and any(len(x) == 60 for x in real_ctx + base_ctx)
    whole_real = score_whole(model, real_ctx, real_gold)
    for j, d in enumerate(details):                       # Q2 has two aliases; the same blocks were drawn
        best = 2 * j + int(whole_real[2 * j:2 * j + 2].argmax())
        assert d["real"] == pytest.approx(float(whole_real[best]), abs=1e-5)
        whole = score_whole(model, base_ctx[2 * j:2 * j + 2], [real_gold[best]] * 2)
        assert d["baseline"] == pytest.approx(float(whole.mean()), abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# 3. The gate g() (METHOD §4.3)

@pytest.mark.parametrize("x, expected", [
    (0.0, 0.0), (0.049, 0.0), (-0.049, 0.0),       # dead zone
    (0.05, 0.05), (-0.05, -0.025),                 # the boundary |x| = δ is kept
    (0.4, 0.4), (-0.4, -0.2),                      # positives as they are, negatives * ρ
    (2.0, 2.0), (3.5, 2.0), (-2.0, -1.0), (-7.0, -1.0),  # clipped to [-c, c] before scaling
])
def test_ig_gate_defaults(x, expected):
    assert grpo.ig_gate(x) == pytest.approx(expected, abs=1e-12)


def test_ig_gate_custom():
    g = lambda x: grpo.ig_gate(x, delta=0.5, rho=0.25, clip=1.0)
    assert [g(x) for x in (0.49, -0.49, 0.5, -0.5, 0.8, -0.8, 1.5, -1.5)] == \
        [0.0, 0.0, 0.5, -0.125, 0.8, -0.2, 1.0, -0.25]
    assert grpo.ig_gate(-0.3, rho=1.0) == -0.3   # symmetric when ρ = 1
    assert grpo.ig_gate(-0.3, rho=0.0) == 0.0    # negatives ignored when ρ = 0
    assert grpo.ig_gate(0.01, delta=0.0) == 0.01  # no dead zone


# ----------------------------------------------------------------------------------------------------
# 4. The per-token advantages A [B, T] with the query bonus (METHOD §3.2, §4.3)

GROUP = [
    (Q1, 0, ["<think>look it up</think><search> Quendia </search>", "<answer> Zorvath </answer>"]),
    (Q1, 0, ["<search> bakery </search>", "<search> harbor </search>", "<answer> ships </answer>"]),
    (Q1, 0, ["<answer> Zorvath </answer>"]),
    (Q1, 0, ["<search> Mirelle </search>", "<answer> Lyon </answer>"]),
]


def test_advantages_with_query_bonus_element_by_element(tok, retriever):
    rs = scripted(tok, retriever, GROUP)
    assert [len(r.searches) for r in rs] == [1, 2, 0, 1]
    R = [rewards.exact_match(r.answer, r.question["golden_answers"]) for r in rs]
    assert R == [1.0, 0.0, 1.0, 0.0]
    adv = grpo.group_advantages(R, [0, 0, 0, 0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # mean 0.5, unbiased std sqrt(1/3)
    assert adv.tolist() == pytest.approx([a, -a, a, -a], abs=1e-6)
    batch = grpo.collate(rs, tok.pad_token_id)
    A0 = grpo.token_advantages(adv, batch.roles)
    ig = [[0.4], [-0.3, 0.02], [], [-5.0]]
    A = grpo.add_query_bonus(A0, rs, ig, alpha=0.5)
    assert torch.equal(A0, grpo.token_advantages(adv, batch.roles))  # not modified in place
    bonus = {(0, 0): 0.5 * 0.4, (1, 0): 0.5 * -0.15, (1, 1): 0.0, (3, 0): 0.5 * -1.0}  # α g(IG), by hand
    B, T = A.shape
    n_query = 0
    for b in range(B):
        span_of = {}
        for t, s in enumerate(rs[b].searches):
            q = rs[b].ids[slice(*s["query_span"])]
            assert tok.decode(q).strip() == f"<search> {s['query']} </search>"  # the span is the query, tags in
            for k in range(*s["query_span"]):
                span_of[k] = t
        for k in range(T):
            role = int(batch.roles[b, k])
            if role != grpo.POLICY:
                expected = 0.0
            elif k in span_of:
                expected = float(adv[b]) + bonus[(b, span_of[k])]
                n_query += 1
            else:
                expected = float(adv[b])
            assert float(A[b, k]) == pytest.approx(expected, abs=1e-6), (b, k, grpo.ROLE_NAMES[role])
    assert n_query > 0
    assert torch.equal(A[2], A0[2])  # the rollout with no search is untouched
    values = A[1][batch.roles[1] == grpo.POLICY].unique()  # r1's step 1 (IG 0.02) is in the dead zone
    assert torch.allclose(values, torch.tensor([float(adv[1]) - 0.075, float(adv[1])]), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 5. The property: a group that all fails still trains its query tokens (METHOD §3.4, §4.3)

def test_all_failed_group_gets_gradient_only_on_query_tokens(tiny, retriever):
    model, tok = tiny
    rs = scripted(tok, retriever, GROUP[:2] + [(Q1, 0, ["<answer> nothing </answer>"])])
    adv = grpo.group_advantages([0.0, 0.0, 0.0], [0, 0, 0])
    assert torch.equal(adv, torch.zeros(3))
    batch = grpo.collate(rs, tok.pad_token_id)
    mask = batch.policy_mask
    A0 = grpo.token_advantages(adv, batch.roles)
    A = grpo.add_query_bonus(A0, rs, [[0.4], [-0.3, 1.0], []], alpha=0.5)
    query = torch.zeros_like(mask)
    for b, r in enumerate(rs):
        for s in r.searches:
            query[b, slice(*s["query_span"])] = True
    assert torch.equal(A != 0, query)

    # d loss / d logp: non-zero exactly on the query spans, and equal to -A / (policy tokens)
    logp = grpo.token_logprobs(model, batch.ids, batch.attention_mask, mask)
    lp = logp.detach().requires_grad_()
    loss, _ = grpo.grpo_loss(lp, lp.detach(), None, A, mask, beta_kl=0.0)
    loss.backward()
    assert torch.equal(lp.grad != 0, query)
    assert torch.allclose(lp.grad, -A * mask / mask.sum(), atol=1e-9)

    # through the model: outcome-only gives exactly no gradient, IG-Search a non-zero one
    loss_out, grads = loss_and_grads(model, batch, A0)
    g_out = list(grads.values())
    assert float(loss_out) == 0.0 and all(torch.count_nonzero(g) == 0 for g in g_out)
    _, grads = loss_and_grads(model, batch, A)
    g_ig = list(grads.values())
    assert sum(float(g.abs().sum()) for g in g_ig) > 0
    model.zero_grad(set_to_none=True)


def test_alpha_zero_is_outcome_only_bit_for_bit(tiny, retriever):
    model, tok = tiny
    rs = scripted(tok, retriever, GROUP)
    R = [1.0, 0.0, 0.0, 0.0]
    adv = grpo.group_advantages(R, [0] * 4)
    batch = grpo.collate(rs, tok.pad_token_id)
    A_out = grpo.token_advantages(adv, batch.roles)
    A_ig = grpo.add_query_bonus(A_out, rs, [[0.4], [-0.3, 1.0], [], [-5.0]], alpha=0.0)
    assert torch.equal(A_ig, A_out)

    l1, g1 = loss_and_grads(model, batch, A_out)
    l2, g2 = loss_and_grads(model, batch, A_ig)
    g1, g2 = list(g1.values()), list(g2.values())
    model.zero_grad(set_to_none=True)
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert sum(float(g.abs().sum()) for g in g1) > 0  # the comparison is between non-trivial gradients


# ----------------------------------------------------------------------------------------------------
# 6. Metrics and the training step

def test_ig_metrics_by_hand():
    details = [{"rollout": 0, "step": 0, "real": 0.0, "baseline": -0.5, "ig": 0.5},
               {"rollout": 1, "step": 0, "real": -1.0, "baseline": -0.75, "ig": -0.25},
               {"rollout": 1, "step": 1, "real": -2.0, "baseline": -2.0, "ig": 0.0},
               {"rollout": 3, "step": 0, "real": 0.5, "baseline": -0.5, "ig": 1.0}]
    m = rewards.ig_metrics(details, clip=0.5)
    # mean 1.25/4; population std: deviations .1875, -.5625, -.3125, .6875 -> variance .921875/4
    # sorted -0.25, 0, 0.5, 1: linear percentiles at positions 0.3, 1.5, 2.7; |IG| >= 0.5 for 0.5 and 1.0
    assert m == pytest.approx({"ig_mean": 0.3125, "ig_std": math.sqrt(0.23046875), "ig_min": -0.25, "ig_max": 1.0,
                               "ig_frac_positive": 0.5, "ig_real": -0.625, "ig_baseline": -0.9375, "ig_steps": 4,
                               "ig_p10": -0.175, "ig_p50": 0.25, "ig_p90": 0.85, "ig_clip_frac": 0.5})
    assert m["ig_steps"] == 4 and isinstance(m["ig_steps"], int)
    assert rewards.ig_metrics(details)["ig_clip_frac"] == 0.0               # the default c = 2: never reached
    assert rewards.ig_metrics(details, clip=1.0)["ig_clip_frac"] == 0.25     # |IG| = c binds
    assert rewards.ig_metrics([]) == {"ig_mean": 0.0, "ig_std": 0.0, "ig_min": 0.0, "ig_max": 0.0,
                                       "ig_frac_positive": 0.0, "ig_real": 0.0, "ig_baseline": 0.0, "ig_steps": 0,
                                       "ig_clip_frac": 0.0}


def small_cfg(**kw):
    base = dict(model="tiny-random", reward="igsearch", group_size=2, questions_per_step=2, max_turns=2, topk=1,
                max_turn_tokens=6, max_response_tokens=64, beta_kl=0.0, lr=1e-5)
    return igsearch.Config(**{**base, **kw})


def test_train_step_igsearch_runs_on_the_random_model(tiny, retriever):
    model, tok = tiny
    model = copy.deepcopy(model)
    cfg = small_cfg()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    metrics, rs, A = igsearch.train_step(model, None, opt, tok, retriever, [Q1, Q2], cfg,
                                         torch.Generator().manual_seed(0), random.Random(0))
    assert len(rs) == 4 and A.shape[0] == 4
    assert sum(len(r.searches) for r in rs) == 0  # random weights never write a search
    assert metrics["ig_steps"] == 0 and metrics["ig_mean"] == 0.0
    assert metrics["all_fail_groups"] == 2 and metrics["zero_adv_groups"] == 2   # no answers: both groups fail
    assert math.isfinite(metrics["loss"])


def test_train_step_igsearch_on_scripted_rollouts(tiny, retriever, monkeypatch):
    """The whole step with real gold scores: A = Â + α g(IG) on the query spans, IG recomputed apart."""
    model, tok = tiny
    model = copy.deepcopy(model)
    before = copy.deepcopy(model)
    scripts = [s for _, _, s in [MAIN[0], MAIN[1], MAIN[3], MAIN[4]]]  # Q1, Q1, Q2, Q2
    original = grpo.generate_rollouts

    def fake_generate(model_, tok_, questions, groups, retriever_, **kw):
        return original(model_, tok_, questions, groups, retriever_, **{**kw, "turn_fn": grpo.scripted_turns(tok_, scripts)})
    monkeypatch.setattr(grpo, "generate_rollouts", fake_generate)
    cfg = small_cfg(ig_samples=2, max_turn_tokens=32, max_response_tokens=256, ig_delta=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    metrics, rs, A = igsearch.train_step(model, None, opt, tok, retriever, [Q1, Q2], cfg,
                                         torch.Generator().manual_seed(0), random.Random(11))
    assert [len(r.searches) for r in rs] == [1, 1, 1, 2]
    assert metrics["ig_steps"] == 5

    scorer = lambda prefix: rewards.gold_scorer(before, prefix, cfg.ig_head_tokens, cfg.ig_head_weight,
                                                cfg.token_budget)
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, cfg.ig_samples, cfg.ig_baseline,
                                                    random.Random(11), cfg.ig_max_context)
    assert metrics["ig_mean"] == pytest.approx(sum(d["ig"] for d in details) / 5, abs=1e-6)
    R = [rewards.exact_match(r.answer, r.question["golden_answers"]) for r in rs]
    assert R == [1.0, 0.0, 1.0, 1.0]
    assert metrics["all_fail_groups"] == 0 and metrics["zero_adv_groups"] == 1   # group 1: both succeed
    # group 1 has Â = 0: its non-zero advantages are the query bonus, on its 1 + 2 query spans
    spans = sum(e - s for r in rs[2:] for s, e in (q["query_span"] for q in r.searches))
    assert metrics["flat_group_credit_tokens"] == int((A[2:] != 0).sum()) == spans
    # A by hand: group 0 (R = 1, 0): mean 0.5, unbiased std sqrt(0.5); group 1 (1, 1): all equal, Â = 0.
    # On a query span add α g(IG) = 0.5 · IG clipped to [-2, 2], times ρ = 0.5 when negative (δ = 0 here)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    adv = [a, -a, 0.0, 0.0]
    bonus = lambda x: 0.5 * max(-2.0, min(2.0, x)) * (1.0 if x > 0 else 0.5)  # noqa: E731
    n_bonus = 0
    for b, r in enumerate(rs):
        span = {k: bonus(ig[b][t]) for t, s in enumerate(r.searches) for k in range(*s["query_span"])}
        for k in range(A.shape[1]):
            policy = k < len(r.roles) and r.roles[k] == grpo.POLICY
            expected = adv[b] + span.get(k, 0.0) if policy else 0.0
            assert float(A[b, k]) == pytest.approx(expected, abs=1e-6), (b, k)
        n_bonus += sum(v != 0 for v in span.values())
    assert n_bonus > 0  # some step got past the dead zone


def test_information_gain_with_gold_scorer_on_the_tiny_model(tiny, retriever):
    model, tok = tiny
    rs = scripted(tok, retriever, MAIN)
    scorer = lambda prefix: rewards.gold_scorer(model, prefix, token_budget=1024)
    ig, details = rewards.igsearch_information_gain(scorer, tok, rs, retriever, n_samples=2, rng=random.Random(0))
    assert [len(x) for x in ig] == [1, 1, 0, 1, 2]
    assert len(details) == 5
    rec = FakeScorer(tok)  # the same seed draws the same blocks: their contexts, 2 per step in step order
    rewards.igsearch_information_gain(rec, tok, rs, retriever, n_samples=2, rng=random.Random(0))
    base_ctx, _ = rec.passes(1)
    for j, d in enumerate(details):
        assert all(math.isfinite(d[k]) for k in ("real", "baseline", "ig"))
        assert d["real"] < 0 and d["baseline"] < 0          # mean log-probs
        assert ig[d["rollout"]][d["step"]] == d["ig"]
        # each score alone on its whole context: the best alias's real score, the mean of its N baselines
        r = rs[d["rollout"]]
        ctx = r.ids[:r.searches[d["step"]]["info_span"][1]] + cue(tok)
        alone = {a: float(score_whole(model, [ctx], [gold_ids(tok, a)])[0]) for a in r.question["golden_answers"]}
        best = max(alone, key=alone.get)
        base = score_whole(model, base_ctx[2 * j:2 * j + 2], [gold_ids(tok, best)] * 2)
        base = (float(base[0]) + float(base[1])) / 2
        assert d["real"] == pytest.approx(alone[best], abs=1e-5)
        assert d["baseline"] == pytest.approx(base, abs=1e-5)
        assert d["ig"] == pytest.approx(alone[best] - base, abs=1e-5)


def test_closing_line_counts_the_groups_without_spread_and_igsearch_credit():
    steps = [{"step": 0, "zero_adv_groups": 2, "all_fail_groups": 1, "flat_group_credit_tokens": 0},
             {"step": 1, "zero_adv_groups": 1, "all_fail_groups": 1, "flat_group_credit_tokens": 14},
             {"step": 2, "zero_adv_groups": 2, "all_fail_groups": 2, "flat_group_credit_tokens": 9}]
    cfg = small_cfg(questions_per_step=2, show_every=2)
    assert views.flat_groups_line(steps, cfg, "runs/x") == (
        "groups without reward spread: 5 of 6 (4 where every rollout failed); 2 of 3 steps had no spread in any "
        "group; IG-Search gave 23 query tokens in those groups an advantage "
        "(see them: python igsearch.py show --run runs/x --step 2)")
    outcome = dataclasses.replace(cfg, reward="outcome")
    assert views.flat_groups_line(steps, outcome, "runs/x").endswith(
        "2 of 3 steps had no spread in any group (no gradient there; --reward igsearch credits their queries)")
