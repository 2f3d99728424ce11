"""InfoReasoner's semantic information gain (METHOD §5): weights, classes, beliefs, the three estimators,
the NLI path, what the reward does to GRPO, and end-to-end calls on the tiny random Qwen3: a sample's weight
from the mean (not the sum) of its token log-probs, K samples per prompt, C_t = the documents of searches
1..t, a step's metrics, each against a plain forward pass or a sum written out here."""
import copy
import doctest
import math
import random

import pytest
import torch

import engine
import grpo
import igsearch
import rewards
import retrieve
from conftest import LYON, NICE, PARIS, Q, enc, make_rollout
from retrieve import DataError, format_docs
from rewards import (Belief, belief, default_equivalent, entailment_index, inforeasoner_information_gain,
                     information_gain, load_nli, nli_equivalent, semantic_classes, smoothed_p_gold, weigh_samples)

EPS = rewards.IR_EPS


def test_docstring_examples():
    # the worked examples in the InfoReasoner docstrings are part of the documentation: keep them true
    names = ["brief_answer_text", "weigh_samples", "default_equivalent", "semantic_classes", "belief",
             "smoothed_p_gold", "information_gain", "nli_equivalent", "entailment_index"]
    for name in names:
        finder = doctest.DocTestFinder(recurse=False)
        for test in finder.find(getattr(rewards, name), name, globs=vars(rewards).copy()):
            assert test.examples, name
            result = doctest.DocTestRunner().run(test)
            assert result.failed == 0, name


# ----------------------------------------------------------------------------------------------------
# METHOD §5.1: sample weights

def test_weights_are_softmax_of_mean_logprobs():
    answers, w = weigh_samples(["x", "y", "z"], [-1.0, -2.0, -3.0])
    # e^-1 / (e^-1 + e^-2 + e^-3) = 1 / (1 + e^-1 + e^-2) = 0.665241, then 0.244728, 0.090031
    assert answers == ["x", "y", "z"]
    assert w == pytest.approx([0.665241, 0.244728, 0.090031], abs=1e-6)
    assert weigh_samples(["x", "y"], [-7.0, -7.0])[1] == pytest.approx([0.5, 0.5])
    assert weigh_samples(["x", "y"], [-1000.0, -1001.0])[1] == pytest.approx([0.731059, 0.268941], abs=1e-6)


def test_empty_samples_are_dropped():
    # "" and "The" (empty once normalized) carry no weight; the rest share all of it: softmax(0, log 3)
    answers, w = weigh_samples(["", "Paris", "The", " ", "Lyon"], [5.0, 0.0, 5.0, 5.0, math.log(3)])
    assert answers == ["Paris", "Lyon"]
    assert w == pytest.approx([0.25, 0.75])
    assert weigh_samples(["", "the"], [0.0, 0.0]) == ([], [])
    assert belief([], [], ["Paris"]) == Belief(p_gold=0.0, entropy=0.0, n_classes=1)


def test_weights_and_beliefs_of_far_apart_logprobs():
    # mean log-probs 800 apart: e^800 overflows a float, so the softmax must subtract the largest; the second
    # sample's weight underflows to exactly 0, and a class of zero mass adds nothing to H_sem (0 log 0 = 0)
    answers, w = rewards.weigh_samples(["Paris", "Lyon"], [0.0, -800.0])
    assert w == [1.0, 0.0]
    b = rewards.belief(answers, w, ["Paris"])
    assert (b.p_gold, b.entropy, b.n_classes) == (1.0, 0.0, 2)


def test_brief_answer_prompt(tiny):
    _, tok = tiny
    with_ctx = tok.decode(rewards.brief_answer_prompt(tok, "Capital of France?", "Doc 1(Title: Paris) Paris."))
    without = tok.decode(rewards.brief_answer_prompt(tok, "Capital of France?", ""))
    assert "Context: Doc 1(Title: Paris) Paris.\n\nQuestion: Capital of France?\nAnswer:" in with_ctx
    assert "Context:" not in without and without.count("Question: Capital of France?\nAnswer:") == 1
    assert with_ctx.startswith("<|im_start|>user\n")                       # the chat template
    assert with_ctx.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3: no thinking


# ----------------------------------------------------------------------------------------------------
# METHOD §5.2: semantic classes (default equivalence)

@pytest.mark.parametrize("answers, expected", [
    (["Paris", "paris", "PARIS!"], [0, 0, 0]),
    (["the Beatles", "Beatles", "The Rolling Stones"], [0, 0, 1]),   # articles
    (["Paris", "Paris France", "Paris, France"], [0, 0, 0]),        # whole-word containment
    (["Par", "Paris"], [0, 1]),                                      # a word prefix is not a word
    (["Paris", "Paris France", "France"], [0, 0, 1]),               # greedy: compared with the first member
    (["Zürich", "ZÜRICH", "zurich"], [0, 0, 1]),                    # accents kept, as EM keeps them (§2)
    (["London", "Paris", "London, England", "paris"], [0, 1, 0, 1]),
    (["1984", "1984 novel", "198"], [0, 0, 1]),
    ([], []),
])
def test_semantic_classes(answers, expected):
    assert semantic_classes(answers) == expected


def test_gold_class_uses_every_alias():
    b = belief(["NYC", "New York City", "Boston", "the big apple"], [0.4, 0.1, 0.3, 0.2],
               ["New York City", "NYC", "Big Apple"])
    assert b.p_gold == pytest.approx(0.7)        # 0.4 + 0.1 + 0.2: all three aliases
    assert b.n_classes == 4                      # NYC and New York City differ without NLI


# ----------------------------------------------------------------------------------------------------
# METHOD §5.2: p(c*) and H_sem by hand

def test_p_gold_and_entropy_by_hand():
    b = belief(["Paris", "Lyon", "the paris"], [0.5, 0.2, 0.3], ["Paris"])
    assert b.p_gold == pytest.approx(0.8)
    assert b.entropy == pytest.approx(0.500402, abs=1e-6)   # -(0.8 log 0.8 + 0.2 log 0.2)
    assert b.n_classes == 2


def test_gold_absent_from_every_sample():
    b = belief(["Lyon", "Nice"], [0.6, 0.4], ["Paris"])
    assert b.p_gold == 0.0
    assert b.n_classes == 3                      # Lyon, Nice, and the empty gold class
    assert smoothed_p_gold(b) == pytest.approx(0.001 / 1.003)          # (0 + ε) / (1 + 3ε)
    assert math.log(smoothed_p_gold(b)) == pytest.approx(-6.910751, abs=1e-6)
    present = belief(["Paris", "Nice"], [0.6, 0.4], ["Paris"])
    assert smoothed_p_gold(present) == pytest.approx(0.601 / 1.002)    # (0.6 + ε) / (1 + 2ε)


def test_one_class_has_zero_entropy():
    b = belief(["Paris", "paris", "The Paris", "Paris France"], [0.1, 0.2, 0.3, 0.4], ["Lyon"])
    assert b.entropy == pytest.approx(0.0, abs=1e-12)
    assert b.p_gold == 0.0 and b.n_classes == 2


@pytest.mark.parametrize("n", [2, 3, 5])
def test_uniform_over_n_classes_has_entropy_log_n(n):
    answers = ["Paris", "Lyon", "Nice", "Lille", "Brest"][:n]
    b = belief(answers, [1 / n] * n, ["Lyon"])
    assert b.entropy == pytest.approx(math.log(n))
    assert b.p_gold == pytest.approx(1 / n)


# ----------------------------------------------------------------------------------------------------
# METHOD §5.3: the estimators on a toy 2-step trajectory

def toy_trajectory():
    q = [0.25] * 4
    B = belief(["Lyon", "Nice", "Paris", "Lyon"], q, ["Paris"])     # p = 0.25, classes .5/.25/.25
    C1 = belief(["Paris", "Lyon", "Paris", "Paris"], q, ["Paris"])  # p = 0.75, classes .75/.25
    C2 = belief(["Paris", "paris", "Paris France", "Paris"], q, ["Paris"])  # p = 1, one class
    return B, C1, C2


def test_toy_beliefs():
    B, C1, C2 = toy_trajectory()
    assert (B.p_gold, B.n_classes, C1.p_gold, C1.n_classes, C2.p_gold, C2.n_classes) == (0.25, 3, 0.75, 2, 1.0, 1)
    assert B.entropy == pytest.approx(1.5 * math.log(2))   # -(.5 log .5 + 2 · .25 log .25)
    assert C1.entropy == pytest.approx(0.562335, abs=1e-6)
    assert C2.entropy == pytest.approx(0.0, abs=1e-12)


def test_prob_estimator():
    B, C1, C2 = toy_trajectory()
    assert information_gain(B, [C1, C2], "prob") == pytest.approx(0.75)    # p(c*|C_2) - p(c*|B) = 1 - .25
    assert information_gain(B, [C2], "prob") == pytest.approx(0.75)        # only all the evidence counts
    assert information_gain(C2, [B], "prob") == pytest.approx(-0.75)       # evidence that misleads


def test_log_estimator():
    B, C1, C2 = toy_trajectory()
    # p̃(B) = .251/1.003, p̃(C1) = .751/1.002, p̃(C2) = 1.001/1.001 = 1
    # IG = ½[log(.751/1.002) + log 1] - log(.251/1.003) = ½(-0.288348) + 1.385298
    assert information_gain(B, [C1, C2], "log") == pytest.approx(1.241124, abs=1e-6)


def test_entropy_estimator():
    B, C1, C2 = toy_trajectory()
    # H(B) - ½[H(C1) + H(C2)] = 1.039721 - ½ · 0.562335
    assert information_gain(B, [C1, C2], "entropy") == pytest.approx(0.758553, abs=1e-6)


def test_log_form_identities():
    B, C1, C2 = toy_trajectory()
    C3 = belief(["Lyon", "Paris"], [0.9, 0.1], ["Paris"])
    lp = lambda b: math.log(smoothed_p_gold(b))  # noqa: E731
    steps = [C1, C2, C3]
    # the per-step terms share the same B, so the mean of differences = mean of log p̃(C_t) minus log p̃(B)
    assert information_gain(B, steps, "log") == pytest.approx(sum(lp(c) for c in steps) / 3 - lp(B))
    assert information_gain(B, steps, "log") == pytest.approx(sum(lp(c) - lp(B) for c in steps) / 3)
    assert information_gain(B, [C1], "log") == pytest.approx(lp(C1) - lp(B))    # T = 1
    # with the same belief before and after, every estimator is 0
    for est in ("prob", "log", "entropy"):
        assert information_gain(C1, [C1, C1], est) == pytest.approx(0.0, abs=1e-12)


def test_no_search_gives_zero_and_bad_estimator_is_refused():
    B, C1, _ = toy_trajectory()
    for est in ("prob", "log", "entropy"):
        assert information_gain(B, [], est) == 0.0
    with pytest.raises(ValueError, match="prob, log or entropy"):
        information_gain(B, [C1], "kl")


# ----------------------------------------------------------------------------------------------------
# METHOD §5.2 with --nli-model: bidirectional entailment (a fake entailment function, no download)

# premise entails hypothesis when it holds all the hypothesis's words, or when the pair is declared synonymous
SYNONYMS = {("nyc", "new york city"), ("new york city", "nyc")}


def fake_entail(calls):
    def entail(premise, hypothesis):
        calls.append((premise, hypothesis))
        p, h = premise.lower().split("? ")[1], hypothesis.lower().split("? ")[1]
        return 0.9 if set(h.split()) <= set(p.split()) or (p, h) in SYNONYMS else 0.1
    return entail


def test_nli_equivalence_is_bidirectional():
    calls = []
    eq = nli_equivalent(fake_entail(calls), "Which city?")
    assert eq("NYC", "New York City")                        # both ways: merged (the default cannot)
    assert not default_equivalent("NYC", "New York City")
    assert not eq("Paris France", "Paris")                   # one way only: not merged
    assert not eq("Paris", "Paris France")
    assert ("Which city? NYC", "Which city? New York City") in calls   # texts prefixed by the question
    assert semantic_classes(["NYC", "Paris France", "New York City", "Paris"], eq) == [0, 1, 0, 2]
    b = belief(["NYC", "Paris France", "New York City", "Paris"], [0.1, 0.2, 0.3, 0.4], ["New York City"], eq)
    assert b.p_gold == pytest.approx(0.4) and b.n_classes == 3


def test_nli_equivalence_needs_more_than_one_half_both_ways():
    eq = rewards.nli_equivalent(lambda p, h: 0.5, "Q?")
    assert not eq("Paris", "Paris")                                   # p > 0.5, strictly
    eq = rewards.nli_equivalent(lambda p, h: 0.51, "Q?")
    assert eq("Paris", "Paris")
    # each direction on its own: 0.5 one way and 0.9 the other is not equivalent, in either order
    one_half_from_a = lambda p, h: 0.5 if p.endswith("a") else 0.9  # noqa: E731
    assert not rewards.nli_equivalent(one_half_from_a, "Q?")("a", "b")
    assert not rewards.nli_equivalent(one_half_from_a, "Q?")("b", "a")


def test_entailment_label():
    assert entailment_index({"0": "entailment", "1": "neutral", "2": "contradiction"}) == 0
    with pytest.raises(DataError, match="entailment"):
        entailment_index({0: "LABEL_0", 1: "LABEL_1"})


def test_nli_model_that_cannot_load(tmp_path):
    with pytest.raises(DataError, match="--nli-model .*leave --nli-model empty"):
        load_nli(str(tmp_path))                              # an empty directory: no config.json


def test_nli_model_loads_from_a_local_directory(tmp_path, tiny):
    # a random 1-layer BERT classifier with MNLI labels, saved locally: the real loading path, offline
    from transformers import BertConfig, BertForSequenceClassification
    _, tok = tiny
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
                        label2id={"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2}, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    entail = load_nli(str(tmp_path))
    p = entail("Q? Paris", "Q? Paris France")
    # by hand: the softmax of the classifier's logits on the pair, at the ENTAILMENT label (index 2)
    nli = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        probs = nli(**tok("Q? Paris", "Q? Paris France", return_tensors="pt")).logits[0].softmax(-1)
    assert min(abs(float(probs[2] - probs[i])) for i in (0, 1)) > 1e-4   # another label would give another p
    assert p == pytest.approx(float(probs[2]), abs=1e-6)
    assert entail("Q? Paris", "Q? Paris France") == p        # memoized, same value
    assert load_nli(str(tmp_path)) is entail                  # loaded once


# ----------------------------------------------------------------------------------------------------
# METHOD §5.4 and §3: the reward, and the gradient it gives a group where every answer is wrong

# make_rollout (tests/conftest.py): a hand-built trajectory, here from the question's text and its golds

DOCS = [{"title": "Paris", "text": "Paris is the capital and largest city of France."},
        {"title": "Lyon", "text": "Lyon is a city in France."}]


def test_all_wrong_group_learns_from_ig(tiny, monkeypatch):
    # METHOD §5.4 through the real step: every answer is wrong (EM = 0), but the evidence of two rollouts moved
    # the reference's belief onto the gold answer: R = 0.6 · IG = [.6, 0, .6, 0], so Â != 0 and the weights move
    model, tok = tiny
    q = "What is the capital of France?"
    def fake_turn(model_, tok_, seqs, *args):  # the reference answers Paris when its context holds the Paris article
        return [tok.encode("Paris\n" if "Paris is the capital" in tok.decode(s) else "London\n",
                           add_special_tokens=False) for s in seqs], ["\n"] * len(seqs)
    monkeypatch.setattr(engine, "generate_turn", fake_turn)

    def step(searches):
        policy = copy.deepcopy(model)
        rollouts = [make_rollout(tok, q, 0, s) for s in searches]
        cfg = ir_config(ir_lambda=0.6, lr=1e-3)
        opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
        _, out, A = igsearch.train_step(policy, None, opt, tok, None, None, cfg, torch.Generator().manual_seed(0),
                                        random.Random(0), rollouts=rollouts)
        moved = any(not torch.equal(p, p0) for p, p0 in zip(policy.parameters(), model.parameters()))
        return out, A, moved

    out, A, moved = step([[DOCS], [DOCS[1:]], [DOCS], []])
    assert [rewards.exact_match(r.answer, r.question["golden_answers"]) for r in out] == [0.0] * 4
    assert [r.reward for r in out] == pytest.approx([0.6, 0.0, 0.6, 0.0])
    # Â by hand: mean 0.3, unbiased std sqrt(4 · 0.09 / 3) = sqrt(0.12)
    a = 0.3 / (math.sqrt(0.12) + 1e-6)
    for b, sign in enumerate([1, -1, 1, -1]):
        policy = torch.tensor(out[b].roles) == grpo.POLICY
        assert torch.allclose(A[b, :len(policy)][policy], torch.full((int(policy.sum()),), sign * a), atol=1e-5)
    assert moved
    # the same evidence for all: the same IG, all-equal rewards, Â = 0, no update (§3.4)
    out, A, moved = step([[DOCS]] * 4)
    assert [r.reward for r in out] == pytest.approx([0.6] * 4)
    assert torch.count_nonzero(A) == 0 and not moved


# ----------------------------------------------------------------------------------------------------
# End to end on the tiny random Qwen3

def ir_config(**kw):
    return igsearch.Config(**{"reward": "inforeasoner", "ir_samples": 3, "ir_max_tokens": 4, "beta_kl": 0.0,
                              "ir_belief": "plain", **kw})


def toy_rollouts(tok):
    """q1 searched once, q1 searched twice, q1 never searched, q2 searched once."""
    q1, q2 = "What is the capital of France?", "Which city is Lyon?"
    return [make_rollout(tok, q1, 0, [DOCS]), make_rollout(tok, q1, 0, [DOCS, DOCS[1:]]),
            make_rollout(tok, q1, 0, []), make_rollout(tok, q2, 1, [DOCS[1:]], golds=("Lyon",))]


def spy_generate(monkeypatch, tok, script=None):
    """Record every batch of the engine (engine._generate_batch: rows, rows with a Context line, tokens made);
    `script(has_context)` replaces what the model samples with fixed text."""
    calls, real = [], engine._generate_batch

    def spy(model, tok_, seqs, max_new, stop_strings, eos_ids, temperature, generator):
        ctx = ["Context:" in tok.decode(s) for s in seqs]
        if script is None:
            gens, why = real(model, tok_, seqs, max_new, stop_strings, eos_ids, temperature, generator)
        else:
            gens = [tok.encode(script(c), add_special_tokens=False) for c in ctx]
            why = ["\n"] * len(seqs)
        assert stop_strings == ["\n"] and max_new == [4] * len(seqs)
        calls.append({"rows": len(seqs), "context": sum(ctx), "tokens": sum(len(g) for g in gens),
                      "prompts": len(set(map(tuple, seqs)))})
        return gens, why

    monkeypatch.setattr(engine, "_generate_batch", spy)
    return calls


# distinct evidence prompts: prob, one per searching rollout (all its docs: 3); log (as entropy), one per step
# (1 + 2 + 1) less one: step 1 of the 2-search rollout has the same question and docs as the 1-search one
@pytest.mark.parametrize("estimator, evidence_prompts", [("prob", 3), ("log", 3)])
def test_end_to_end_tiny_model(tiny, monkeypatch, estimator, evidence_prompts):
    model, tok = tiny
    rollouts, cfg = toy_rollouts(tok), ir_config(ir_estimator=estimator)
    calls = spy_generate(monkeypatch, tok)
    ig, extra = inforeasoner_information_gain(model, tok, rollouts, cfg, torch.Generator().manual_seed(0))
    assert len(ig) == 4 and all(math.isfinite(x) for x in ig)
    assert ig[2] == 0.0                                                  # never searched
    # phase 1: no evidence, once per distinct question (q1's rollouts share it); phase 2: with evidence
    assert [(c["rows"], c["context"], c["prompts"]) for c in calls] == [
        (2 * 3, 0, 2), (evidence_prompts * 3, evidence_prompts * 3, evidence_prompts)]
    assert set(extra) == {"ir_ig_mean", "ir_ig_std", "ir_frac_positive", "ir_extra_tokens", "ir_p_gold_with",
                          "ir_p_gold_without", "ir_h_before", "ir_h_after"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in extra.values())
    assert extra["ir_extra_tokens"] == sum(c["tokens"] for c in calls) / 4
    if estimator == "prob":  # one repeat is enough (CPU time)
        again = inforeasoner_information_gain(model, tok, rollouts, cfg, torch.Generator().manual_seed(0))
        assert again == (ig, extra)                                      # same seed, same numbers


def test_end_to_end_scripted_answers(tiny, monkeypatch):
    # the model (weights from its real log-probs) answers "London" without evidence and "Paris" with it
    model, tok = tiny
    rollouts = toy_rollouts(tok)
    spy_generate(monkeypatch, tok, script=lambda has_context: "Paris\n" if has_context else "London\n")
    gen = torch.Generator().manual_seed(0)
    ig, extra = inforeasoner_information_gain(model, tok, rollouts, ir_config(ir_estimator="prob"), gen)
    assert ig == [1.0, 1.0, 0.0, 0.0]           # q2's gold is "Lyon": Paris is wrong with or without evidence
    assert extra["ir_p_gold_with"] == pytest.approx(2 / 3) and extra["ir_p_gold_without"] == 0.0
    assert extra["ir_frac_positive"] == 0.5 and extra["ir_h_before"] == 0.0 and extra["ir_h_after"] == 0.0
    assert extra["ir_ig_mean"] == 0.5 and extra["ir_ig_std"] == 0.5   # [1, 1, 0, 0]: mean .5, deviations ±.5
    ig, _ = inforeasoner_information_gain(model, tok, rollouts, ir_config(ir_estimator="log"), gen)
    # q1: p̃(C_t) = 1 for every step, p̃(B) = ε / (1 + 2ε) (London + the empty gold class): IG = log 1002
    assert ig[:3] == pytest.approx([math.log(1002), math.log(1002), 0.0])
    assert ig[3] == pytest.approx(0.0)          # q2: both ε/(1+2ε)
    ig, _ = inforeasoner_information_gain(model, tok, rollouts, ir_config(ir_estimator="entropy"), gen)
    assert ig == pytest.approx([0.0] * 4, abs=1e-12)   # one class before and after: H_sem = 0 throughout
    # an NLI that never entails: no answer matches the gold, so prob IG is 0 everywhere
    ig, _ = inforeasoner_information_gain(model, tok, rollouts, ir_config(ir_estimator="prob"), gen,
                                          entail=lambda p, h: 0.0)
    assert ig == [0.0, 0.0, 0.0, 0.0]


def test_train_step_combines_em_and_ig(tiny, monkeypatch):
    # METHOD §5.4 inside the real training step: R = EM + λ·IG, a rollout without search gets IG = 0
    model, tok = tiny
    q = "What is the capital of France?"
    rollouts = [make_rollout(tok, q, 0, [DOCS], answer="Paris"), make_rollout(tok, q, 0, [DOCS]),
                make_rollout(tok, q, 0, [], answer="Paris"), make_rollout(tok, q, 0, [])]
    spy_generate(monkeypatch, tok, script=lambda has_context: "Paris\n" if has_context else "London\n")
    cfg = ir_config(ir_lambda=0.6, lr=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    metrics, out, A = igsearch.train_step(model, None, opt, tok, None, None, cfg, torch.Generator().manual_seed(0),
                                          random.Random(0), rollouts=rollouts)
    assert [r.reward for r in out] == pytest.approx([1.6, 0.6, 1.0, 0.0])   # EM + 0.6 · IG, IG = [1, 1, 0, 0]
    assert metrics["ir_ig_mean"] == pytest.approx(0.5)
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------
# METHOD §5.1 and §5.3 by hand on the tiny model: the samples' mean log-probs against a plain forward pass, K
# rows per prompt, C_t = the documents of searches 1..t (not of step t alone, nor of all steps), a step's
# metrics, --nli-model

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


def ir_config_k2(**kw):
    """ir_config with K = 2 samples of at most 8 tokens: the counts below are worked out for these."""
    return ir_config(**{"ir_samples": 2, "ir_max_tokens": 8, **kw})


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
    cfg = ir_config_k2(ir_samples=3, ir_temperature=0.7, ir_max_tokens=5)
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
    cfg = ir_config_k2(ir_samples=3, forward_budget=rows_per_call * (len(prompts[0]) + 8) + 1)   # ir_max_tokens 8
    calls, row = [], iter(range(6))
    script_engine(monkeypatch, tok, lambda text, j: enc(tok, f"answer {next(row)}\n"), calls)
    texts, _, _ = rewards.sample_answers(model, tok, prompts, cfg, torch.Generator().manual_seed(0))
    assert [c["rows"] for c in calls] == [rows] * (6 // rows)
    assert texts == [["answer 0", "answer 1", "answer 2"], ["answer 3", "answer 4", "answer 5"]]


def test_belief_weights_are_the_softmax_of_mean_logprobs_end_to_end(tiny, monkeypatch):
    # K = 2: without evidence the reference answers "Paris" (1 token + newline) and a long wrong answer; with the
    # evidence, "Paris" twice. prob IG = 1 - ℓ_Paris, ℓ from the *mean* log-probs of a plain forward pass
    model, tok = tiny
    short, long = enc(tok, "Paris\n"), enc(tok, "Lyon, a city in the south of France on the Rhone\n")

    def answer(text, j):
        return short if "Context:" in text or j % 2 == 0 else long
    script_engine(monkeypatch, tok, answer)
    r = make_rollout(tok, Q, 0, [[PARIS]])
    ig, extra = rewards.inforeasoner_information_gain(model, tok, [r], ir_config_k2(), torch.Generator().manual_seed(0))
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
    ig, extra = rewards.inforeasoner_information_gain(model, tok, rs, ir_config_k2(ir_estimator=estimator),
                                                      torch.Generator().manual_seed(0))
    assert ig == pytest.approx(expected, abs=1e-9)
    # the step's p(c*) "with" is read with all the evidence (C_T): Paris for both, whatever the estimator
    assert extra["ir_p_gold_with"] == 1.0 and extra["ir_p_gold_without"] == 0.0


def test_inforeasoner_step_metrics_by_hand(tiny, monkeypatch):
    model, tok = tiny
    paris, london = enc(tok, "Paris\n"), enc(tok, "London\n")
    script_engine(monkeypatch, tok, lambda text, j: paris if PARIS["text"] in text else london)
    rs = [make_rollout(tok, Q, 0, [[PARIS]]), make_rollout(tok, Q, 0, [[LYON]]), make_rollout(tok, Q, 0, []),
          make_rollout(tok, Q, 0, [[NICE], [PARIS]])]
    ig, extra = rewards.inforeasoner_information_gain(model, tok, rs, ir_config_k2(), torch.Generator().manual_seed(0))
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
    _, extra = rewards.inforeasoner_information_gain(model, tok, [r], ir_config_k2(nli_model="some/mnli"),
                                                     torch.Generator().manual_seed(0))
    assert loaded == ["some/mnli"] and extra["ir_p_gold_without"] == 1.0   # "London" ~ "Paris" under this NLI


def test_a_step_where_no_rollout_searched_samples_nothing(tiny, monkeypatch):
    model, tok = tiny
    calls = []
    script_engine(monkeypatch, tok, lambda text, j: enc(tok, "Paris\n"), calls)
    rs = [make_rollout(tok, Q, 0, []), make_rollout(tok, Q, 0, [])]
    ig, extra = rewards.inforeasoner_information_gain(model, tok, rs, ir_config_k2(), torch.Generator().manual_seed(0))
    assert ig == [0.0, 0.0] and calls == []                                  # §5.4: no search, IG = 0, no cost
    assert extra == {"ir_ig_mean": 0.0, "ir_ig_std": 0.0, "ir_frac_positive": 0.0, "ir_extra_tokens": 0.0}


# ----------------------------------------------------------------------------------------------------
# METHOD §5.1, --ir-belief agent: the belief asked in the agent's own format

class OneShotRetriever:
    """Returns DOCS for every query: the agent loop's observation, without BM25."""
    def search(self, queries, k):
        return [DOCS[:k] for _ in queries]


def test_agent_belief_prompt_is_the_agent_loop_cut_after_the_answer_tag(tiny):
    # with evidence: exactly the ids the agent loop builds for a rollout whose one search is the question,
    # up to the end of its <information> block, then "<answer>"; without: the agent prompt, then "<answer>"
    _, tok = tiny
    q = {"question": "What is the capital of France?", "golden_answers": ["Paris"]}
    script = grpo.scripted_turns(tok, [[f"<search> {q['question']} </search>", "<answer> Paris </answer>"]])
    r = grpo.generate_rollouts(None, tok, [q], [0], OneShotRetriever(), max_turns=2, topk=2, turn_fn=script)[0]
    evidence = rewards.format_docs(r.searches[0]["docs"])
    cut = r.searches[0]["info_span"][1]
    answer_tag = tok.encode("<answer>", add_special_tokens=False)
    assert rewards.agent_belief_prompt(tok, q["question"], evidence) == r.ids[:cut] + answer_tag
    p = grpo.prompt_ids(tok, q["question"])
    assert rewards.agent_belief_prompt(tok, q["question"]) == p + answer_tag
    assert rewards.agent_belief_prompt(tok, q["question"], "  ") == p + answer_tag   # blank evidence = none
    # token by token: prompt, the search turn, the observation, the opened tag
    pieces = [(p, "prompt"), (tok.encode(f"<search> {q['question']} </search>", add_special_tokens=False), "query"),
              (tok.encode(grpo.information_block(DOCS[:2]), add_special_tokens=False), "obs"), (answer_tag, "tag")]
    assert rewards.agent_belief_prompt(tok, q["question"], evidence) == [t for ids, _ in pieces for t in ids]
    assert tok.decode(rewards.agent_belief_prompt(tok, q["question"], evidence)[len(p):]) == \
        rewards.agent_belief_text(q["question"], evidence)


@pytest.mark.parametrize("belief_kind, stop", [("agent", "</answer>"), ("plain", "\n")])
def test_belief_prompts_and_stops_reach_the_engine(tiny, monkeypatch, belief_kind, stop):
    # one rollout searched DOCS: K = 3 samples without evidence, then 3 with; each prompt is the belief's own
    # (agent or plain), the sample stops at its stop string, and its text is what stands before it
    model, tok = tiny
    r = make_rollout(tok, "What is the capital of France?", 0, [DOCS])
    evidence = rewards.trajectory_evidence(r, 1)
    ask = rewards.agent_belief_prompt if belief_kind == "agent" else rewards.brief_answer_prompt
    expected = {tuple(ask(tok, r.question["question"])): "without", tuple(ask(tok, r.question["question"], evidence)): "with"}
    calls = []

    def fake(model_, tok_, seqs, max_new, stop_strings, eos_ids, temperature, generator):
        calls.append((stop_strings, [expected.get(tuple(s)) for s in seqs]))
        # without evidence: "Lyon" and twice "Paris"; with it: "Paris" three times
        texts = [f" Paris {stop}" if expected.get(tuple(s)) == "with" or j > 0 else f" Lyon {stop}"
                 for j, s in enumerate(seqs)]
        return [tok.encode(t, add_special_tokens=False) for t in texts], [stop] * len(seqs)
    monkeypatch.setattr(engine, "_generate_batch", fake)
    monkeypatch.setattr(rewards, "sample_logprobs", lambda model_, prompts, samples, budget=None: [0.0] * len(prompts))
    ig, extra = inforeasoner_information_gain(model, tok, [r], ir_config(ir_belief=belief_kind),
                                              torch.Generator().manual_seed(0))
    assert calls == [([stop], ["without"] * 3), ([stop], ["with"] * 3)]
    # equal weights (equal mean log-probs): p(Paris) = 2/3 without, 1 with; prob IG = 1/3
    assert extra["ir_p_gold_without"] == pytest.approx(2 / 3) and extra["ir_p_gold_with"] == pytest.approx(1.0)
    assert ig == [pytest.approx(1 / 3)]


def test_agent_belief_samples_end_at_the_answer_tag(tiny, monkeypatch):
    # sample_answers with the agent's stop: a sample's text is what stands before </answer> (a newline inside
    # it is kept); EOS and the token limit end a sample too, and then the whole sample is its text
    model, tok = tiny
    eos = tok.eos_token_id
    samples = [tok.encode(" Paris\nFrance </answer>", add_special_tokens=False),
               tok.encode(" Lyon", add_special_tokens=False) + [eos], tok.encode(" Nice and", add_special_tokens=False)]
    row = iter(range(3))
    monkeypatch.setattr(engine, "_generate_batch", lambda m, t, seqs, *a: ([samples[next(row)] for _ in seqs],
                                                                         ["</answer>", "eos", "length"]))
    prompt = rewards.agent_belief_prompt(tok, "Capital of France?")
    texts, _, n = rewards.sample_answers(model, tok, [prompt], ir_config(ir_samples=3), None, "</answer>")
    assert texts == [["Paris\nFrance", "Lyon", "Nice and"]]
    assert n == sum(map(len, samples))


def test_beliefs_command_asks_both_ways_with_the_questions_top_documents(monkeypatch, capsys):
    # experiments.py beliefs: the reward's own inforeasoner_beliefs, once per --ir-belief, on rollouts whose one
    # search is the question with its top-k documents; the table holds the mean p(gold) of each
    import experiments
    seen = []

    def fake(model, tok, rollouts, cfg, generator, entail=None):
        seen.append((cfg.ir_belief, [(r.searches[0]["query"], [d["title"] for d in r.searches[0]["docs"]])
                                     for r in rollouts]))
        p = {"agent": (0.25, 0.75), "plain": (0.0, 0.5)}[cfg.ir_belief]
        b = [(Belief(p[0], 1.0, 2), Belief(p[1], 0.5, 2)) for _ in rollouts]
        return [0.0] * len(rollouts), b, 0
    monkeypatch.setattr(rewards, "inforeasoner_beliefs", fake)
    rows = experiments.beliefs_command(["--model", "tiny-random", "--limit", "2", "--ir-samples", "2"])
    qs = retrieve.load_data("tiny")["dev"][:2]
    top = [[d["title"] for d in hits] for hits in
           retrieve.Retriever(retrieve.load_corpus("vital")).search([q["question"] for q in qs], 3)]
    assert seen == [(kind, [(q["question"], t) for q, t in zip(qs, top)]) for kind in ("agent", "plain")]
    assert [(r["belief"], r["when"], r["p_gold"]) for r in rows] == [
        ("agent", "without evidence", 0.25), ("agent", "with evidence", 0.75),
        ("plain", "without evidence", 0.0), ("plain", "with evidence", 0.5)]
    assert "agent   with evidence     0.750 [0.75, 0.75]" in capsys.readouterr().out
