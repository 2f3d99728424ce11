"""Guards for the formulas of METHOD §3–§5 that the other test files leave open, each against a value worked
out by hand or by an independent computation (a plain forward pass of the model, a written-out sum), never
by calling the function under test a second time. tests/mutate.py checks that a one-line bug in any formula
line makes some test fail.

    §5.1  a sample's weight: the mean (not the sum) of its token log-probs, the stop token included
    §5.1  sample_answers: K rows per prompt, ir_temperature and ir_max_tokens reach the engine
    §5.3  C_t = the documents of searches 1..t (not of step t alone, nor of all steps)
    §4.2  N = 3 counterfactual blocks from the batch by default
    the defaults of Config, the --tiny preset and the formula functions, against METHOD"""
import inspect
import math
import random

import pytest
import torch

import engine
import grpo
import igsearch
import rewards
from conftest import enc, make_rollout
from retrieve import Retriever, format_docs

PARIS = {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."}
LYON = {"id": "lyon", "title": "Lyon", "text": "Lyon is a city in France."}
NICE = {"id": "nice", "title": "Nice", "text": "Nice lies on the Riviera."}
Q = {"question": "What is the capital of France?", "golden_answers": ["Paris"]}


def mean_logprob_by_hand(model, prompt, sample):
    """(1/n) Σ_k log π(sample_k | prompt, sample_<k) from one plain forward pass of the whole model, unpadded."""
    ids = torch.tensor([list(prompt) + list(sample)])
    with torch.no_grad():
        lsm = model(input_ids=ids).logits[0].float().log_softmax(-1)      # [n, V]
    P = len(prompt)
    return sum(float(lsm[P + k - 1, sample[k]]) for k in range(len(sample))) / len(sample)


def script_engine(monkeypatch, tok, answer_of, record=None):
    """The engine's batches (engine._generate_batch, under generate_turn's token budget) replaced by fixed
    samples: answer_of(prompt text, row index within its batch) -> ids."""
    def fake(model, tok_, seqs, max_new, stop_strings, eos_ids, temperature, generator):
        if record is not None:
            record.append({"model": model, "rows": len(seqs), "max_new": list(max_new), "stops": stop_strings,
                           "eos": set(eos_ids), "temperature": temperature, "seqs": [list(s) for s in seqs]})
        gens = [list(answer_of(tok.decode(s), j)) for j, s in enumerate(seqs)]
        return gens, ["\n"] * len(seqs)
    monkeypatch.setattr(engine, "_generate_batch", fake)


def ir_config(**kw):
    return igsearch.Config(**{**dict(reward="inforeasoner", ir_samples=2, ir_max_tokens=8, beta_kl=0.0, ir_belief="plain"),
                              **kw})


# ----------------------------------------------------------------------------------------------------
# METHOD §5.1: log-probs of the samples, by a plain forward pass

def test_sample_logprobs_is_the_mean_over_the_samples_tokens(tiny):
    model, tok = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 5000, (n,), generator=g).tolist() for n in (7, 3, 12, 5)]
    samples = [torch.randint(0, 5000, (m,), generator=g).tolist() for m in (1, 6, 3, 9)]
    got = rewards.sample_logprobs(model, prompts, samples, token_budget=30)  # rows 8, 9 | 15, 14
    expected = [mean_logprob_by_hand(model, p, s) for p, s in zip(prompts, samples)]
    assert got == pytest.approx(expected, abs=1e-5)
    # the mean, not the sum: a 6-token sample's sum is ~6 times its mean (-12 per token on a random model)
    assert got[1] > -13 and got[3] > -13


def test_sample_answers_by_hand(tiny, monkeypatch):
    model, tok = tiny
    eos = tok.eos_token_id
    samples = [enc(tok, "Paris\n"), enc(tok, " Lyon") + [eos], enc(tok, " The Seine river\n"),   # prompt 0
               enc(tok, "Nice\n"), enc(tok, "\n"), enc(tok, "Brest and more\n")]                # prompt 1
    calls = []
    row = iter(range(6))
    script_engine(monkeypatch, tok, lambda text, j: samples[next(row)], calls)
    cfg = ir_config(ir_samples=3, ir_temperature=0.7, ir_max_tokens=5)
    prompts = [rewards.brief_answer_prompt(tok, "Capital of France?"),
               rewards.brief_answer_prompt(tok, "Capital of France?", format_docs([PARIS]))]
    texts, lps, n = rewards.sample_answers(model, tok, prompts, cfg, torch.Generator().manual_seed(0))
    # one batched call: each prompt K = 3 times, in order; ir_temperature, ir_max_tokens, a newline stops
    assert len(calls) == 1
    c = calls[0]
    assert c["model"] is model and c["seqs"] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert c["temperature"] == 0.7 and c["max_new"] == [5] * 6 and c["stops"] == ["\n"]
    assert c["eos"] == engine.stop_ids(tok, model) and eos in c["eos"]
    # texts cut at the newline and stripped (the EOS token is not text); the empty sample stays empty here
    assert texts == [["Paris", "Lyon", "The Seine river"], ["Nice", "", "Brest and more"]]
    # each mean covers every sampled token, the one that ended the sample (newline or EOS) included
    by_hand = [mean_logprob_by_hand(model, prompts[j // 3], s) for j, s in enumerate(samples)]
    assert [x for row_ in lps for x in row_] == pytest.approx(by_hand, abs=1e-5)
    assert n == sum(len(s) for s in samples)


@pytest.mark.parametrize("rows_per_call, rows", [(2, 2), (0, 1), (100, 6)])
def test_sample_answers_batches_rows_within_the_forward_budget(tiny, monkeypatch, rows_per_call, rows):
    # cfg.forward_budget bounds a sampling batch: rows × (prompt + ir_max_tokens) tokens of KV cache (at least one
    # row); the samples come back in prompt order whatever the cut
    model, tok = tiny
    prompts = [rewards.brief_answer_prompt(tok, q) for q in ("Capital of France?", "Capital of Peru?")]
    assert len(prompts[0]) == len(prompts[1])
    cfg = ir_config(ir_samples=3, forward_budget=rows_per_call * (len(prompts[0]) + 8) + 1)   # ir_max_tokens 8
    calls, row = [], iter(range(6))
    script_engine(monkeypatch, tok, lambda text, j: enc(tok, f"answer {next(row)}\n"), calls)
    texts, _, _ = rewards.sample_answers(model, tok, prompts, cfg, torch.Generator().manual_seed(0))
    assert [c["rows"] for c in calls] == [rows] * (6 // rows)
    assert texts == [["answer 0", "answer 1", "answer 2"], ["answer 3", "answer 4", "answer 5"]]


def test_weights_and_beliefs_of_far_apart_logprobs():
    # mean log-probs 800 apart: e^800 overflows a float, so the softmax must subtract the largest; the second
    # sample's weight underflows to exactly 0, and a class of zero mass adds nothing to H_sem (0 log 0 = 0)
    answers, w = rewards.weigh_samples(["Paris", "Lyon"], [0.0, -800.0])
    assert w == [1.0, 0.0]
    b = rewards.belief(answers, w, ["Paris"])
    assert (b.p_gold, b.entropy, b.n_classes) == (1.0, 0.0, 2)


def test_nli_equivalence_needs_more_than_one_half_both_ways():
    eq = rewards.nli_equivalent(lambda p, h: 0.5, "Q?")
    assert not eq("Paris", "Paris")                                   # p > 0.5, strictly
    eq = rewards.nli_equivalent(lambda p, h: 0.51, "Q?")
    assert eq("Paris", "Paris")
    # each direction on its own: 0.5 one way and 0.9 the other is not equivalent, in either order
    one_half_from_a = lambda p, h: 0.5 if p.endswith("a") else 0.9  # noqa: E731
    assert not rewards.nli_equivalent(one_half_from_a, "Q?")("a", "b")
    assert not rewards.nli_equivalent(one_half_from_a, "Q?")("b", "a")


def test_clip_fraction_counts_ratios_strictly_outside_the_range():
    # METHOD §3.3 (the statistic): |r - 1| > ε; at ratio exactly 1 and ε = 0 no token counts as clipped
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.tensor([[0, 1, 1]])
    _, st = grpo.grpo_loss(logp, logp.clone(), None, torch.ones(1, 3), mask, clip_eps=0.0)
    assert st["clip_frac"] == 0.0 and st["n_tokens"] == 2.0


def test_belief_weights_are_the_softmax_of_mean_logprobs_end_to_end(tiny, monkeypatch):
    # K = 2: without evidence the reference answers "Paris" (1 token + newline) and a long wrong answer; with the
    # evidence, "Paris" twice. prob IG = 1 - ℓ_Paris, ℓ from the *mean* log-probs of a plain forward pass
    model, tok = tiny
    short, long = enc(tok, "Paris\n"), enc(tok, "Lyon, a city in the south of France on the Rhone\n")

    def answer(text, j):
        return short if "Context:" in text or j % 2 == 0 else long
    script_engine(monkeypatch, tok, answer)
    r = make_rollout(tok, Q, 0, [[PARIS]])
    ig, extra = rewards.inforeasoner_information_gain(model, tok, [r], ir_config(), torch.Generator().manual_seed(0))
    prompt = rewards.brief_answer_prompt(tok, Q["question"])
    m_short, m_long = mean_logprob_by_hand(model, prompt, short), mean_logprob_by_hand(model, prompt, long)
    w_short = math.exp(m_short) / (math.exp(m_short) + math.exp(m_long))
    assert extra["ir_p_gold_without"] == pytest.approx(w_short, abs=1e-5)
    assert ig == pytest.approx([1.0 - w_short], abs=1e-5)
    # one rollout: the step's mean is its IG, the spread 0
    assert extra["ir_ig_mean"] == pytest.approx(1.0 - w_short, abs=1e-5)
    assert extra["ir_ig_std"] == 0.0 and extra["ir_frac_positive"] == 1.0
    # the long answer's *sum* is several times its mean: weights from sums would put almost all mass on Paris
    assert 0.05 < w_short < 0.95


# ----------------------------------------------------------------------------------------------------
# METHOD §5.3: C_t is the evidence of searches 1..t

def test_trajectory_evidence_is_searches_one_to_t(tiny):
    _, tok = tiny
    r = make_rollout(tok, Q, 0, [[PARIS], [LYON, NICE], [NICE]])
    by_hand = {1: "Doc 1(Title: Paris) " + PARIS["text"],
               2: f"Doc 1(Title: Paris) {PARIS['text']}\nDoc 2(Title: Lyon) {LYON['text']}\n"
                  f"Doc 3(Title: Nice) {NICE['text']}",
               3: f"Doc 1(Title: Paris) {PARIS['text']}\nDoc 2(Title: Lyon) {LYON['text']}\n"
                  f"Doc 3(Title: Nice) {NICE['text']}\nDoc 4(Title: Nice) {NICE['text']}"}
    for t, text in by_hand.items():
        assert rewards.trajectory_evidence(r, t) == text


@pytest.mark.parametrize("estimator, expected", [
    # B: "London" only (p = 0, 2 classes with the empty gold one): p̃(B) = ε / (1 + 2ε) = 1 / 1002
    # r0 searches [Paris], then [Lyon]: C_1 and C_2 both hold Paris -> p̃ = 1 at both steps
    # r1 searches [Lyon], then [Paris]: C_1 = Lyon only -> p̃ = 1/1002; C_2 holds both -> 1
    ("log", [math.log(1002), 0.5 * math.log(1002)]),
    ("prob", [1.0, 1.0]),                                  # all the evidence: Paris in both
    ("entropy", [0.0, 0.0]),                               # one class throughout
])
def test_beliefs_are_conditioned_on_the_evidence_of_steps_one_to_t(tiny, monkeypatch, estimator, expected):
    model, tok = tiny
    paris, london = enc(tok, "Paris\n"), enc(tok, "London\n")
    script_engine(monkeypatch, tok, lambda text, j: paris if PARIS["text"] in text else london)
    rs = [make_rollout(tok, Q, 0, [[PARIS], [LYON]]), make_rollout(tok, Q, 0, [[LYON], [PARIS]])]
    ig, extra = rewards.inforeasoner_information_gain(model, tok, rs, ir_config(ir_estimator=estimator),
                                                      torch.Generator().manual_seed(0))
    assert ig == pytest.approx(expected, abs=1e-9)
    # the step's p(c*) "with" is read with all the evidence (C_T): Paris for both, whatever the estimator
    assert extra["ir_p_gold_with"] == 1.0 and extra["ir_p_gold_without"] == 0.0


# ----------------------------------------------------------------------------------------------------
# METHOD §5 metrics of a step, by hand

def test_inforeasoner_step_metrics_by_hand(tiny, monkeypatch):
    model, tok = tiny
    paris, london = enc(tok, "Paris\n"), enc(tok, "London\n")
    script_engine(monkeypatch, tok, lambda text, j: paris if PARIS["text"] in text else london)
    rs = [make_rollout(tok, Q, 0, [[PARIS]]), make_rollout(tok, Q, 0, [[LYON]]), make_rollout(tok, Q, 0, []),
          make_rollout(tok, Q, 0, [[NICE], [PARIS]])]
    ig, extra = rewards.inforeasoner_information_gain(model, tok, rs, ir_config(), torch.Generator().manual_seed(0))
    assert ig == [1.0, 0.0, 0.0, 1.0]
    # mean 0.5; population std sqrt(4 · 0.25 / 4) = 0.5; two of four positive
    assert extra["ir_ig_mean"] == 0.5 and extra["ir_ig_std"] == 0.5 and extra["ir_frac_positive"] == 0.5
    # over the 3 searching rollouts: p(c*) with all the evidence 1, 0, 1; without 0, 0, 0
    assert extra["ir_p_gold_with"] == pytest.approx(2 / 3) and extra["ir_p_gold_without"] == 0.0
    assert extra["ir_h_before"] == 0.0 and extra["ir_h_after"] == 0.0
    # K = 2 samples for the bare question and for each of 3 distinct evidence sets ([Paris] twice is one; prob
    # reads only all the evidence, so [Nice] alone is never sampled)
    tokens = 2 * len(london) + 2 * (len(paris) + len(london) + len(paris))
    assert extra["ir_extra_tokens"] == tokens / 4


def test_nli_model_setting_loads_the_classifier(tiny, monkeypatch):
    # --nli-model: classes by the loaded classifier's bidirectional entailment (here one that entails anything)
    model, tok = tiny
    loaded = []
    monkeypatch.setattr(rewards, "load_nli", lambda name, device: loaded.append(name) or (lambda p, h: 0.9))
    script_engine(monkeypatch, tok, lambda text, j: enc(tok, "London\n"))
    r = make_rollout(tok, Q, 0, [[PARIS]])
    _, extra = rewards.inforeasoner_information_gain(model, tok, [r], ir_config(nli_model="some/mnli"),
                                                     torch.Generator().manual_seed(0))
    assert loaded == ["some/mnli"] and extra["ir_p_gold_without"] == 1.0   # "London" ~ "Paris" under this NLI


def test_a_step_where_no_rollout_searched_samples_nothing(tiny, monkeypatch):
    model, tok = tiny
    calls = []
    script_engine(monkeypatch, tok, lambda text, j: enc(tok, "Paris\n"), calls)
    rs = [make_rollout(tok, Q, 0, []), make_rollout(tok, Q, 0, [])]
    ig, extra = rewards.inforeasoner_information_gain(model, tok, rs, ir_config(), torch.Generator().manual_seed(0))
    assert ig == [0.0, 0.0] and calls == []                                  # §5.4: no search, IG = 0, no cost
    assert extra == {"ir_ig_mean": 0.0, "ir_ig_std": 0.0, "ir_frac_positive": 0.0, "ir_extra_tokens": 0.0}


# ----------------------------------------------------------------------------------------------------
# METHOD §4.1: without a shared prefix, an empty context leaves the first gold token unpredicted

def test_gold_scorer_refuses_an_empty_context_in_any_row(tiny):
    model, _ = tiny
    score = rewards.gold_scorer(model, [], token_budget=4)
    for suffixes in ([[5, 6], []], [[], [5, 6]], [[5], [6], [7], []]):
        with pytest.raises(ValueError, match="empty context"):
            score(suffixes, [[3]] * len(suffixes))


# ----------------------------------------------------------------------------------------------------
# METHOD §4.2: the default number and pool of counterfactual blocks

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


# ----------------------------------------------------------------------------------------------------
# Defaults against METHOD

def test_config_defaults_follow_method():
    c = igsearch.Config()
    # §1: k = 3 documents, at most 4 searches; §3: G = 5 at temperature 1.0, ε = 0.2, β_kl = 0.001 (k3),
    # μ = 1, grad clip 1.0, token-mean; §6: lr 1e-6
    assert (c.topk, c.max_turns, c.group_size, c.temperature) == (3, 4, 5, 1.0)
    assert (c.clip_eps, c.beta_kl, c.ppo_epochs, c.grad_clip, c.loss_agg, c.lr) == \
        (0.2, 0.001, 1, 1.0, "token-mean", 1e-6)
    # §4: α = 0.5, δ = 0.05, ρ = 0.5, c = 2, N = 3 from the batch, w = 3 on the first 3 gold tokens
    assert (c.ig_alpha, c.ig_delta, c.ig_rho, c.ig_clip, c.ig_samples, c.ig_baseline) == \
        (0.5, 0.05, 0.5, 2.0, 3, "batch")
    assert (c.ig_head_tokens, c.ig_head_weight) == (3, 3.0)
    # §5: K = 10 at temperature 1.0, at most 32 new tokens, the prob estimator, λ = 0.6, ε = 1e-3, no NLI
    assert (c.ir_samples, c.ir_temperature, c.ir_max_tokens, c.ir_estimator, c.ir_lambda, c.nli_model) == \
        (10, 1.0, 32, "prob", 0.6, "")
    assert rewards.IR_EPS == 1e-3


def test_tiny_preset():
    # §1: max_turns 2 for --tiny; README: 2 questions x G = 4 per step, 4 steps
    cfg, _ = igsearch.parse_args(["--tiny"])
    assert (cfg.max_turns, cfg.questions_per_step, cfg.group_size, cfg.steps, cfg.topk) == (2, 2, 4, 4, 3)
    # everything the preset does not set keeps METHOD's values
    assert (cfg.clip_eps, cfg.beta_kl, cfg.ig_alpha, cfg.ig_samples, cfg.ir_samples, cfg.ir_lambda) == \
        (0.2, 0.001, 0.5, 3, 10, 0.6)
    # a flag still wins over the preset
    assert igsearch.parse_args(["--tiny", "--max-turns", "3"])[0].max_turns == 3


def test_cpu_preset():
    # README, the learning experiment: 10 steps of 4 questions x G = 4, max_turns 2 (§1), top-3 documents
    cfg, _ = igsearch.parse_args(["--preset", "cpu"])
    assert (cfg.max_turns, cfg.questions_per_step, cfg.group_size, cfg.steps, cfg.topk) == (2, 4, 4, 10, 3)
    assert (cfg.clip_eps, cfg.beta_kl, cfg.ig_alpha, cfg.ig_samples, cfg.ir_samples, cfg.ir_lambda) == \
        (0.2, 0.001, 0.5, 3, 10, 0.6)


def defaults(fn, *names):
    """The defaults of the named parameters (a parameter added later does not break the check)."""
    params = inspect.signature(fn).parameters
    return {k: params[k].default for k in names}


def test_formula_function_defaults_follow_method():
    assert defaults(grpo.group_advantages, "eps") == {"eps": 1e-6}                                   # §3.1
    assert defaults(grpo.grpo_loss, "clip_eps", "beta_kl", "agg") == {"clip_eps": 0.2, "beta_kl": 0.0,
                                                                       "agg": "token-mean"}        # §3.3
    assert defaults(grpo.ig_gate, "delta", "rho", "clip") == {"delta": 0.05, "rho": 0.5, "clip": 2.0}  # §4.3
    assert defaults(grpo.add_query_bonus, "alpha", "delta", "rho", "clip") == \
        {"alpha": 0.5, "delta": 0.05, "rho": 0.5, "clip": 2.0}
    assert defaults(rewards.head_weights, "head_tokens", "head_weight") == {"head_tokens": 3, "head_weight": 3.0}
    assert defaults(rewards.gold_scorer, "head_tokens", "head_weight") == \
        {"head_tokens": 3, "head_weight": 3.0}                                                       # §4.1
    assert defaults(rewards.igsearch_information_gain, "n_samples", "baseline", "max_context") == \
        {"n_samples": 3, "baseline": "batch", "max_context": 2048}                                   # §4.2
    assert defaults(rewards.information_gain, "estimator", "eps") == {"estimator": "prob", "eps": 1e-3}  # §5.3
    assert defaults(rewards.smoothed_p_gold, "eps") == {"eps": 1e-3}
