"""The token budgets (engine.token_chunks): every batched forward of a step holds at most --token-budget tokens
where a backward follows (the update, the warm-up) and --forward-budget where none does (generation, reference
log-probs, IG scoring, belief sampling), rows × the tokens each row attends to, or a single row where one row
alone exceeds it; and cutting a batch by them changes no number beyond the order of float sums.

A pre-hook on the decoder records every forward: its rows and the positions each row attends to (the KV cache
it continues plus its new tokens). The phases run on the tiny random Qwen3 with scripted or sampled rollouts:
the update (policy, reference and old log-probs), IG scoring, rollout generation, evaluation, InfoReasoner's
belief sampling and the format warm-up."""
import copy
import dataclasses
import random

import pytest
import torch

import engine
import grpo
import igsearch
import ranks
import retrieve
import rewards
import warmup

DOCS = [{"id": "d0", "title": "Paris", "text": "Paris is the capital and largest city of France."},
        {"id": "d1", "title": "Seine", "text": "The Seine is the river that flows through Paris and Rouen."},
        {"id": "d2", "title": "Berlin", "text": "Berlin is the capital of Germany."},
        {"id": "d3", "title": "Danube", "text": "The Danube flows through Vienna and Budapest."}]
FRANCE = {"id": "q0", "question": "What is the capital of France?", "golden_answers": ["Paris"]}
RIVER = {"id": "q1", "question": "Which river flows through Vienna?", "golden_answers": ["Danube", "the Danube"]}
SEARCH = "<think>I need to search.</think>\n<search> {} </search>"


@pytest.fixture
def retriever(tmp_path):
    return retrieve.Retriever(DOCS, cache_dir=tmp_path)


class Forwards:
    """Every forward of the decoders of `models`, as (rows, positions attended): the positions of the KV cache
    it continues plus its own new tokens, so that rows × positions is what the forward holds."""

    def __init__(self, *models):
        self.seen = []
        self.hooks = [m.base_model.register_forward_pre_hook(self.record, with_kwargs=True) for m in models]

    def record(self, module, args, kwargs):
        ids, past = kwargs["input_ids"], kwargs.get("past_key_values")
        self.seen.append((ids.shape[0], (past.get_seq_length() if past is not None else 0) + ids.shape[1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def within(self, budget):
        """Every forward within the budget, or one row alone; returns the largest number of rows seen."""
        assert self.seen
        for rows, positions in self.seen:
            assert rows * positions <= budget or rows == 1, (rows, positions, budget)
        return max(rows for rows, _ in self.seen)


def scripted_rollouts(tok, retriever):
    """Four rollouts of unequal lengths through the real agent loop: two answer at once, two search first."""
    scripts = [["<answer> Paris </answer>"], ["<answer> Lyon </answer>"],
               [SEARCH.format("capital of France"), "<answer> Paris </answer>"],
               [SEARCH.format("river Vienna"), SEARCH.format("Danube river"), "<answer> Danube </answer>"]]
    return grpo.generate_rollouts(None, tok, [FRANCE, FRANCE, RIVER, RIVER], [0, 0, 1, 1], retriever, max_turns=2,
                                  topk=2, turn_fn=grpo.scripted_turns(tok, scripts))


# ----------------------------------------------------------------------------------------------------
# The helper

def test_token_chunks_by_hand():
    # budget 12: 3, 4, 4 (3 rows × 4 = 12); 2, 2 (a third row of 6 would make 3 × 6 = 18); 6
    assert engine.token_chunks([3, 4, 4, 2, 2, 6], 12) == [slice(0, 3), slice(3, 5), slice(5, 6)]
    # the chunk's longest row counts, not its sum: 2 rows of 6 fill 12 although they hold 7 tokens
    assert engine.token_chunks([6, 1, 1], 12) == [slice(0, 2), slice(2, 3)]
    # a row longer than the budget goes alone, and the rows after it start a new chunk
    assert engine.token_chunks([5, 30, 5, 5], 12) == [slice(0, 1), slice(1, 2), slice(2, 4)]
    assert engine.token_chunks([30], 12) == [slice(0, 1)]
    # no budget: one chunk; no rows: no chunk
    assert engine.token_chunks([5, 30, 5], None) == [slice(0, 3)]
    assert engine.token_chunks([], 12) == []


def test_token_chunks_keep_order_fit_the_budget_and_are_greedy():
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 12))]
        budget = rng.randint(1, 100)
        chunks = engine.token_chunks(lengths, budget)
        assert [i for sl in chunks for i in range(sl.start, sl.stop)] == list(range(len(lengths)))  # order kept
        for k, sl in enumerate(chunks):
            rows = lengths[sl]
            assert rows and (len(rows) * max(rows) <= budget or len(rows) == 1), (lengths, budget, sl)
            if k + 1 < len(chunks):  # greedy: the next row would not have fitted
                more = lengths[sl.start:sl.stop + 1]
                assert len(more) * max(more) > budget, (lengths, budget, sl)


def test_same_count_halves_the_widest_micro_batch_until_the_ranks_agree(monkeypatch):
    # one process: the micro-batches as they are
    chunks = [slice(0, 4), slice(4, 5), slice(5, 7)]
    assert ranks.same_count(chunks) == chunks
    # another rank has 5 micro-batches: halve the widest (2:8 -> 2:5, 5:8), then the first of the widest (2:5)
    monkeypatch.setattr(ranks, "reduce_values", lambda values, op="sum": {k: 5 for k in values})
    chunks = [slice(0, 2), slice(2, 8), slice(8, 9)]
    assert ranks.same_count(chunks) == [slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 8), slice(8, 9)]


# ----------------------------------------------------------------------------------------------------
# The update: policy forward and backward, reference and old log-probs (METHOD §3.3)

@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_update_micro_batches_fit_the_budget_and_give_the_same_gradients(tiny, retriever, agg):
    model, tok = tiny
    rollouts = scripted_rollouts(tok, retriever)
    batch = grpo.collate(rollouts, tok.pad_token_id)
    lengths = batch.attention_mask.sum(-1).tolist()
    small = 2 * max(lengths[:2])  # the two short rows together, each searching row alone
    assert engine.token_chunks(lengths, small) == [slice(0, 2), slice(2, 3), slice(3, 4)]
    A = grpo.token_advantages(torch.tensor([1.0, -1.0, 0.5, -0.5]), batch.roles)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.norm.weight.mul_(1.5)  # a reference that differs: the KL term has a gradient too
    results = {}
    for budget in (small, 10 ** 9):
        # the two budgets swapped: the policy's forwards (with a backward) follow --token-budget, the
        # reference's (no gradient) --forward-budget
        other = 10 ** 9 if budget == small else small
        policy = copy.deepcopy(model)
        cfg = igsearch.Config(token_budget=budget, forward_budget=other, beta_kl=0.1, ppo_epochs=2, grad_clip=1e9,
                              loss_agg=agg)
        opt, grads = torch.optim.SGD(policy.parameters(), lr=0.1), {}
        # the last epoch's gradients, read before its step (update_policy drops them after it)
        opt.register_step_pre_hook(lambda *a: grads.update({n: p.grad.clone() for n, p in policy.named_parameters()}))
        with Forwards(policy) as fw, Forwards(ref) as fw_ref:  # ppo_epochs 2: the old log-probs are a pass too
            stats = igsearch.update_policy(policy, ref, opt, batch, A, cfg)
        assert all(p.grad is None for p in policy.parameters())
        results[budget] = stats, grads
        assert fw.within(budget) == (2 if budget == small else 4)
        assert fw_ref.within(other) == (2 if other == small else 4)
        # the old log-probs' pass, then per epoch the policy's micro-batches; the reference's pass
        assert len(fw.seen) == (3 + 2 * 3 if budget == small else 1 + 2 * 1)
        assert len(fw_ref.seen) == (3 if other == small else 1)
    (s_small, g_small), (s_big, g_big) = results[small], results[10 ** 9]
    assert s_big["kl"] > 0 and s_big["grad_norm"] > 0
    for k in ("loss", "kl", "clip_frac", "grad_norm"):
        assert s_small[k] == pytest.approx(s_big[k], rel=1e-5, abs=1e-7), k
    assert g_big.keys() == g_small.keys() and len(g_big) > 10
    for n in g_big:
        torch.testing.assert_close(g_small[n], g_big[n], rtol=1e-5, atol=1e-7, msg=n)


@torch.no_grad()
def test_token_logprobs_do_not_depend_on_the_budget(tiny, retriever):
    model, tok = tiny
    batch = grpo.collate(scripted_rollouts(tok, retriever), tok.pad_token_id)
    ids, attn, mask = batch.ids, batch.attention_mask, batch.policy_mask
    whole = grpo.token_logprobs(model, ids, attn, mask)
    for budget in (1, 2 * int(attn.sum(-1).max())):
        with Forwards(model) as fw:
            got = grpo.token_logprobs(model, ids, attn, mask, budget)
        fw.within(budget)
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)
    assert (whole[mask] < 0).all() and (whole[~mask] == 0).all()


# ----------------------------------------------------------------------------------------------------
# IG-Search scoring (METHOD §4.1, §4.2): the rows continue the prefix's cache, so the prefix counts in a row

@torch.no_grad()
def test_gold_scores_fit_the_budget_and_do_not_depend_on_it(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 5000, (30,), generator=g).tolist()
    sufs = [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (12, 40, 3, 25, 8)]
    golds = [torch.randint(0, 5000, (m,), generator=g).tolist() for m in (2, 5, 1, 3, 4)]
    whole = rewards.gold_scorer(model, prefix)(sufs, golds)
    budget = 180  # rows of 30 + 14, 45 | 4, 28, 12 tokens: 2 × 75 = 150, a third would make 225; 3 × 58 = 174
    with Forwards(model) as fw:
        got = rewards.gold_scorer(model, prefix, token_budget=budget)(sufs, golds)
    assert fw.seen == [(1, 30), (2, 75), (3, 58)]  # the prefix once, then two batches of rows × (30 + T)
    assert fw.within(budget) == 3
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)


def test_ig_of_a_step_fits_the_budget_and_does_not_depend_on_it(tiny, retriever):
    model, tok = tiny
    rollouts = scripted_rollouts(tok, retriever)
    out = {}
    for budget in (400, None):  # rows of 167 to 239 positions: 2 aliases or 2 of the 3 blocks a batch, or 1
        with Forwards(model) as fw:
            out[budget], _ = rewards.igsearch_information_gain(
                lambda prefix: rewards.gold_scorer(model, prefix, token_budget=budget), tok, rollouts, retriever,
                n_samples=3, rng=random.Random(0))
        seen = fw.seen
        if budget:
            assert fw.within(budget) == 2
    assert max(rows for rows, _ in seen) == 3  # without a budget the 3 blocks of a step run together
    assert [len(x) for x in out[None]] == [0, 0, 1, 2]
    # each IG is a difference of log-probs of several nats, summed in another order when batched otherwise: fp32
    # rounding of a few 1e-6 (1.9e-6 seen on one CPU), far below a real change of budget-dependent scoring
    torch.testing.assert_close(torch.tensor(sum(out[400], [])), torch.tensor(sum(out[None], [])),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Generation: rollouts and evaluation (METHOD §1); the KV cache of a turn grows to the row plus max_new

def small_config(budget, **kw):
    """Generation within --forward-budget `budget`; --token-budget (the update's) out of the way."""
    return igsearch.Config(model="tiny-random", max_turns=2, topk=1, max_turn_tokens=12, max_response_tokens=200,
                           forward_budget=budget, token_budget=10 ** 9, **kw)


def two_first_turns(tok):
    """A budget that holds two first turns (prompt + 12 new tokens) but not three of either question, nor
    three prompts alone with the tokens they generate: a cut that forgot max_new would batch three."""
    n = [len(grpo.prompt_ids(tok, q["question"])) + 12 for q in (FRANCE, RIVER)]
    assert 2 * max(n) < 3 * min(n)
    return 3 * min(n) - 1


def test_rollout_generation_fits_the_budget(tiny, retriever):
    model, tok = tiny
    budget = two_first_turns(tok)
    with Forwards(model) as fw:
        rollouts = grpo.generate_rollouts(model, tok, [FRANCE, RIVER] * 3, [0, 1] * 3, retriever,
                                          **igsearch.rollout_kwargs(small_config(budget), 1.0,
                                                                    torch.Generator().manual_seed(0)))
    assert fw.within(budget) == 2
    assert all(r.n_policy > 0 for r in rollouts)


def test_generate_turn_counts_every_row_at_the_turns_longest_max_new(tiny):
    # rows of 5 tokens with max_new 12, 12, 2: two rows still run at 5 + 11 positions (2 × 16 = 32 > 30), so a
    # budget of 30 runs them one by one (a cut at the shortest max_new, 3 × 7 = 21, would batch all three)
    model, _ = tiny
    with Forwards(model) as fw:
        gens, why = engine.generate_turn(model, tiny[1], [[11, 12, 13, 14, 15]] * 3, [12, 12, 2], [], set(), 0.0,
                                       None, 30)
    assert fw.within(30) == 1
    assert [len(g) for g in gens] == [12, 12, 2] and why == ["length"] * 3


def test_rows_that_need_several_batches_are_cut_shortest_first(tiny):
    # lengths 5, 20, 5, 20 with 2 new tokens and a budget of 2 × 22: in the given order the batches would be
    # (5, 20) and (5, 20), each padded to 20; shortest first they are (5, 5) and (20, 20), and half the
    # prefill's padding is gone. Greedy, the answers are those of one batch, each in its own row.
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, 5000, (n,), generator=g).tolist() for n in (5, 20, 5, 20)]
    with Forwards(model) as fw:
        gens, why = engine.generate_turn(model, tok, seqs, [2] * 4, [], set(), 0.0, None, 44)
    assert [s for s in fw.seen if s[1] in (5, 20)] == [(2, 5), (2, 20)]  # the two prefills
    assert (gens, why) == engine.generate_turn(model, tok, seqs, [2] * 4, [], set(), 0.0, None)


def test_one_batch_samples_as_the_engine_did_before_the_budget(tiny):
    # a budget that holds every row is one batch, which draws from the generator exactly as the one batch of
    # before: seeded runs whose rows fit the budget sample what they sampled before
    model, tok = tiny
    seqs = [tok.encode(t, add_special_tokens=False) for t in ("The capital of France is", "Rivers", "A b c d e")]
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    before = engine._generate_batch(model, tok, seqs, [6, 6, 6], [], set(), 1.0, gen())
    assert engine.generate_turn(model, tok, seqs, [6, 6, 6], [], set(), 1.0, gen(), 10 ** 6) == before
    assert engine.generate_turn(model, tok, seqs, [6, 6, 6], [], set(), 1.0, gen()) == before


def test_evaluation_fits_the_budget_and_answers_as_with_one_batch(tiny, retriever):
    model, tok = tiny
    questions = [FRANCE, RIVER, {**FRANCE, "id": "q2"}, {**RIVER, "id": "q3"}]
    out, small = {}, two_first_turns(tok)
    for budget in (small, 10 ** 6):
        with Forwards(model) as fw:
            out[budget] = igsearch.evaluate(model, tok, retriever, questions, small_config(budget))
        assert fw.within(budget) == (2 if budget == small else 4)
    # greedy: the budget cuts the batches, not the answers
    assert [r.ids for r in out[small][1]] == [r.ids for r in out[10 ** 6][1]]
    assert out[small][0]["em"] == out[10 ** 6][0]["em"]


# ----------------------------------------------------------------------------------------------------
# InfoReasoner's belief sampling (METHOD §5.1) and the format warm-up (METHOD §6)

def test_belief_sampling_fits_the_budget_and_its_logprobs_do_not_depend_on_it(tiny):
    model, tok = tiny
    prompts = [rewards.brief_answer_prompt(tok, FRANCE["question"]),
               rewards.brief_answer_prompt(tok, FRANCE["question"], retrieve.format_docs(DOCS[:2]))]
    budget = 2 * (len(prompts[1]) + 6)  # two rows with the evidence, or three without, a batch
    cfg = igsearch.Config(reward="inforeasoner", ir_samples=3, ir_max_tokens=6, forward_budget=budget,
                          token_budget=1)  # the update's budget is not the sampling's
    with Forwards(model) as fw:
        texts, lps, n = rewards.sample_answers(model, tok, prompts, cfg, torch.Generator().manual_seed(0))
    assert fw.within(budget) == 3 and n > 0
    assert [len(t) for t in texts] == [3, 3]
    # the samples' log-probs are those of one batch
    seqs = [p for p in prompts for _ in range(3)]
    gens, _ = engine.generate_turn(model, tok, seqs, [6] * 6, ["\n"], engine.stop_ids(tok, model), 1.0,
                                 torch.Generator().manual_seed(0), budget)
    whole = rewards.sample_logprobs(model, seqs, gens)
    assert [x for row in lps for x in row] == pytest.approx(whole, rel=1e-5, abs=1e-6)


def test_warmup_micro_batches_fit_the_budget(tiny, retriever):
    model, tok = tiny
    model = copy.deepcopy(model)
    cfg = dataclasses.replace(small_config(10 ** 9), warmup_steps=1, warmup_batch=3, max_turn_tokens=64,
                              max_response_tokens=400, token_budget=500)  # the warm-up trains: --token-budget
    with Forwards(model) as fw:
        losses = warmup.warmup(model, tok, retriever, [FRANCE, RIVER, {**FRANCE, "id": "q2"}], cfg,
                               random.Random(0), log=lambda *a: None)
    assert len(losses) == 1 and losses[0] > 0
    assert fw.within(500) == 2  # trajectories of ~200 tokens: two a micro-batch
