"""Rewards: the outcome reward (EM/F1) and the two step-level information-gain rewards.

    exact_match("the Paris!", ["Paris"])                          -> 1.0
    f1_score("Paris France", ["Paris"])                           -> 0.667

Section numbers refer to METHOD.md (the math this project implements).
"""
import copy
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import engine  # token budgets, head log-probs, the generation engine
import grpo  # rollouts, spans and log-probs
from retrieve import DataError, format_docs


# ----------------------------------------------------------------------------------------------------
# Outcome reward (METHOD §2)

def normalize_answer(s):
    """SQuAD normalization: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction, golds):
    """1.0 when the normalized prediction equals any normalized gold alias; no answer (None) scores 0."""
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(prediction, golds):
    """Token-level SQuAD F1, the best over gold aliases; no answer (None) scores 0."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        gold = normalize_answer(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not pred and not gold:  # both empty after normalization (e.g. "The" vs "a"): equal
            best = max(best, 1.0)
    return best


# ----------------------------------------------------------------------------------------------------
# IG-Search: step-level information gain of the retrieved documents (METHOD §4)

def head_weights(n, head_tokens=3, head_weight=3.0):
    """METHOD §4.1: w_k = head_weight for the first head_tokens gold tokens, 1 after.

    >>> head_weights(5)
    tensor([3., 3., 3., 1., 1.])
    """
    w = torch.ones(n)
    w[:head_tokens] = head_weight
    return w


@torch.no_grad()
def gold_scorer(model, prefix, head_tokens=3, head_weight=3.0, token_budget=None):
    """METHOD §4.1: s(a* | C) = Σ_k w_k log π(a*_k | C, a*_<k) / Σ_k w_k, teacher-forced, no grad.

    The 1 + N contexts of a search step differ only from the information block on, so the shared prefix runs
    once and every context continues from its KV cache (METHOD §4.4: the cost is the suffixes, not 1 + N whole
    trajectories). Returns score(suffixes, golds) -> tensor [M] of s(golds[j] | prefix + suffixes[j]), the
    suffixes batched in chunks of at most token_budget tokens, a row's being the prefix it attends to plus its
    suffix and gold (None: one batch). An empty prefix scores whole contexts. For a step whose block starts
    at position s of the rollout's ids:

        score = gold_scorer(model, ids[:s])                         # once per step: ids up to its block
        score([real_block + cue, rand_block + cue], [gold, gold])   # a tensor of 2 scores, e.g. [-1.2, -3.4]
    """
    device = next(model.parameters()).device
    body, head = model.base_model, model.get_output_embeddings()
    P = len(prefix)
    cache = last = None
    if P:
        out = body(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
        cache, last = out.past_key_values, out.last_hidden_state[:, -1:]  # [1, 1, H] predicts a suffix's first token

    @torch.no_grad()  # called after gold_scorer has returned, so outside its no_grad
    def score(suffixes, golds):
        if not P and not all(suffixes):
            raise ValueError("gold_scorer: an empty context leaves the first gold token unpredicted")
        rows, scores = [list(x) + list(g) for x, g in zip(suffixes, golds)], []
        for sl in engine.token_chunks([P + len(r) for r in rows], token_budget):  # a row attends to P + its tokens
            B, T = len(rows[sl]), max(len(r) for r in rows[sl])
            ids = torch.zeros((B, T), dtype=torch.long)  # padded on the right, where a causal model never looks
            target = torch.zeros((B, T), dtype=torch.bool)
            for b, (r, g) in enumerate(zip(rows[sl], golds[sl])):
                ids[b, :len(r)] = torch.tensor(r)
                target[b, len(r) - len(g):len(r)] = True
            ids, target = ids.to(device), target.to(device)
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)  # the forward appends to the cache it is given
                past.batch_repeat_interleave(B)
            pos = torch.arange(P, P + T, device=device).expand(B, T)
            h = body(input_ids=ids, past_key_values=past, position_ids=pos, use_cache=past is not None).last_hidden_state
            if last is not None:
                h = torch.cat([last.expand(B, 1, -1), h[:, :-1]], 1)   # [B, T, H]: the state that predicts token k
            else:
                h, ids, target = h[:, :-1], ids[:, 1:], target[:, 1:]  # without a prefix, token 0 has no prediction
            lp = engine.head_logprobs(head, h[target], ids[target]).cpu()  # [n]
            k = 0
            for g in golds[sl]:
                w = head_weights(len(g), head_tokens, head_weight)
                scores.append(float((lp[k:k + len(g)] * w).sum() / w.sum()))
                k += len(g)
        return torch.tensor(scores)

    return score


def batch_pool(rollouts, i):
    """METHOD §4.2: the information blocks (token ids) retrieved for the *other questions* of the batch, the
    pool of rollout i's counterfactuals. Under torchrun `rollouts` is the whole step's (gathered from the ranks)."""
    r = rollouts[i]
    return [o.ids[slice(*s["info_span"])] for o in rollouts
            if o.group != r.group and o.question["question"] != r.question["question"] for s in o.searches]


def ig_metrics(details, clip=2.0):
    """IG-Search's step statistics for the JSONL line (zeros when no rollout searched): the distribution of
    IG over the step's searches, and ig_clip_frac, the share of searches whose |IG| reaches the clip c of
    METHOD §4.3 (there every query gets the same bonus, whatever it found).

    >>> m = ig_metrics([{"ig": x, "real": 0.0, "baseline": 0.0} for x in (-3.0, 0.5, 1.0, 2.5)], clip=2.0)
    >>> m["ig_clip_frac"], m["ig_p50"]
    (0.5, 0.75)
    """
    if not details:
        return {"ig_mean": 0.0, "ig_std": 0.0, "ig_min": 0.0, "ig_max": 0.0, "ig_frac_positive": 0.0,
                "ig_real": 0.0, "ig_baseline": 0.0, "ig_steps": 0, "ig_clip_frac": 0.0}
    ig = np.array([d["ig"] for d in details])
    return {"ig_mean": float(ig.mean()), "ig_std": float(ig.std()), "ig_min": float(ig.min()),
            "ig_max": float(ig.max()), "ig_frac_positive": float((ig > 0).mean()),
            "ig_p10": float(np.percentile(ig, 10)), "ig_p50": float(np.percentile(ig, 50)),
            "ig_p90": float(np.percentile(ig, 90)), "ig_clip_frac": float((np.abs(ig) >= clip).mean()),
            "ig_real": float(np.mean([d["real"] for d in details])),
            "ig_baseline": float(np.mean([d["baseline"] for d in details])), "ig_steps": len(details)}


def baseline_blocks(rollouts, i, t, n, rng, retriever, tok, how="batch"):
    """METHOD §4.2: n counterfactual information blocks (token ids) for search step t of rollout i.

    "batch": blocks of batch_pool (drawn with replacement); "corpus", or an empty pool: k random corpus
    documents (k = the real step's document count, at least 1: an empty real block still gets a non-empty
    counterfactual) formatted like a real block."""
    r = rollouts[i]
    if how == "batch":
        pool = batch_pool(rollouts, i)
        if pool:
            return [pool[rng.randrange(len(pool))] for _ in range(n)]
    real = r.searches[t]["docs"]
    exclude = {d["id"] for d in real}
    k = max(len(real), 1)
    return [tok.encode(grpo.information_block(retriever.random_documents(k, rng, exclude)), add_special_tokens=False)
            for _ in range(n)]


def igsearch_information_gain(scorer, tok, rollouts, retriever, n_samples=3, baseline="batch", rng=None,
                              max_context=2048, only=None):
    """METHOD §4.2: IG_{i,t} = s(a* | C_t^real) - (1/N) Σ_j s(a* | C_t^rand,j) for every search step.

    C_t^real = the rollout's ids up to the end of step t's information block, then the cue "<answer>";
    C_t^rand,j = the same with that block's ids replaced by a baseline block. Gold answers are scored as
    " " + alias (the natural tokenization after "<answer>"). With several aliases, the alias with the best
    real score is used for the baseline too. scorer(prefix) -> score(suffixes, golds) -> tensor [M]
    (gold_scorer with the rollout policy; tests pass a fake); the prefix is the rollout before step t's block.
    Contexts longer than max_context are cut from the left (§4.1), at one point for all the contexts of a
    step, so that they still differ only in the evidence. Returns (ig: one list per rollout, per-step details).

    only: the indices of the rollouts to score (under torchrun a rank's own; the rest of the step is other
    ranks'); the others get None, yet their baseline blocks are drawn all the same, so that `rng` takes the
    same draws on every rank as in one process, and each scored rollout gets the blocks one process gives it."""
    rng = rng if rng is not None else random.Random(0)
    cue = tok.encode("<answer>", add_special_tokens=False)
    ig = [[] for _ in rollouts]
    details = []
    for i, r in enumerate(rollouts):
        if only is not None and i not in only:
            ig[i] = None
            for t in range(len(r.searches)):  # the same draws as when scored, nothing scored
                baseline_blocks(rollouts, i, t, n_samples, rng, retriever, tok, baseline)
            continue
        aliases = [tok.encode(" " + a.strip(), add_special_tokens=False) for a in r.question["golden_answers"]]
        for t, step in enumerate(r.searches):
            s, e = step["info_span"]
            real = r.ids[s:e] + cue
            rand = [list(blk) + cue for blk in baseline_blocks(rollouts, i, t, n_samples, rng, retriever, tok, baseline)]
            keep = max(0, max_context - max(len(x) for x in [real] + rand))  # prefix tokens beside the longest
            real, rand = real[-max_context:], [x[-max_context:] for x in rand]  # a block longer than the limit
            score = scorer(r.ids[max(0, s - keep):s])
            real_scores = score([real] * len(aliases), aliases)                  # every alias in the real context
            a = int(real_scores.argmax())
            base = float(score(rand, [aliases[a]] * n_samples).mean())          # the best alias, N blocks
            ig[i].append(float(real_scores[a]) - base)
            details.append({"rollout": i, "step": t, "real": float(real_scores[a]), "baseline": base, "ig": ig[i][-1]})
    return ig, details


# ----------------------------------------------------------------------------------------------------
# InfoReasoner: semantic information gain (METHOD §5)
#
#   belief   K short answers to (question, evidence), asked in the agent's format or a plain prompt
#            (--ir-belief), each weighted by the softmax of its mean token log-prob           §5.1
#   classes  answers of equal meaning grouped; p(c*) = the weight of the answers equal to a gold  §5.2
#   IG       from the belief without evidence (B) and with the evidence of steps 1..t (C_t)    §5.3
#
#   ig, extra = inforeasoner_information_gain(ref_model, tok, rollouts, cfg, generator)
#   R_i = EM_i + λ · ig[i]          (igsearch.train_step)                                     §5.4

IR_INSTRUCTION = ("Answer the question as briefly as possible: give only the answer, in a few words, "
                  "with no explanation.")
IR_EPS = 1e-3       # METHOD §5.3: smoothing of p(c*) for the log estimator [our choice]


def brief_answer_text(question, evidence=""):
    """METHOD §5.1: the plain brief-answer prompt; the Context line is left out when there is no evidence.

    >>> print(brief_answer_text("Capital of France?", "Doc 1(Title: Paris) Paris is the capital."))
    Answer the question as briefly as possible: give only the answer, in a few words, with no explanation.
    <BLANKLINE>
    Context: Doc 1(Title: Paris) Paris is the capital.
    <BLANKLINE>
    Question: Capital of France?
    Answer:
    """
    context = f"Context: {evidence.strip()}\n\n" if evidence.strip() else ""
    return f"{IR_INSTRUCTION}\n\n{context}Question: {question.strip()}\nAnswer:"


def brief_answer_prompt(tok, question, evidence=""):
    """Token ids of the brief-answer prompt, through the chat template when the tokenizer has one.

    Qwen3's template is asked for no thinking block (other templates ignore the flag): the answer must be
    the first line, and a sample that opened with "<think>\\n" would stop at its first newline."""
    text = brief_answer_text(question, evidence)
    if tok.chat_template:
        messages = [{"role": "user", "content": text}]
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False, enable_thinking=False))
    return tok.encode(text, add_special_tokens=True)  # a base model continues "Answer:" directly


def agent_belief_prompt(tok, question, evidence=""):
    """METHOD §5.1, --ir-belief agent: the belief asked in the agent's own format. The agent prompt of §1;
    with evidence, one search turn whose query is the question and one <information> block holding it; then
    an opened <answer> tag that the sample continues (it ends at </answer>).

    The pieces are tokenized apart, as the agent loop builds a rollout: policy turn, observation, policy turn
    (agent_belief_text shows the text)."""
    ids = list(grpo.prompt_ids(tok, question))
    if evidence.strip():
        ids += tok.encode(f"<search> {question.strip()} </search>", add_special_tokens=False)
        ids += tok.encode(grpo.information_text(evidence), add_special_tokens=False)
    return ids + tok.encode("<answer>", add_special_tokens=False)


def agent_belief_text(question, evidence=""):
    """The response part of agent_belief_prompt as text (what follows the agent prompt).

    >>> print(agent_belief_text("Capital of France?", "Doc 1(Title: Paris) Paris is the capital."))
    <search> Capital of France? </search>
    <BLANKLINE>
    <information>Doc 1(Title: Paris) Paris is the capital.</information>
    <BLANKLINE>
    <answer>
    >>> agent_belief_text("Capital of France?")
    '<answer>'
    """
    search = f"<search> {question.strip()} </search>{grpo.information_text(evidence)}" if evidence.strip() else ""
    return f"{search}<answer>"


BELIEF_PROMPTS = {"agent": (agent_belief_prompt, "</answer>"), "plain": (brief_answer_prompt, "\n")}  # prompt, stop


def weigh_samples(texts, mean_logps):
    """METHOD §5.1: ℓ_i = softmax_i(mean token log-prob of r_i), over the non-empty samples only.

    An empty sample (nothing before the newline, or nothing left by normalization, e.g. "The") is dropped
    rather than given a low weight: it names no answer, and as an empty string it would be "contained" in
    every answer (§5.2). When every sample is empty the belief is empty: p(c*) = 0, H_sem = 0.
    >>> answers, weights = weigh_samples(["Paris", "", "Lyon", "the"], [-2.0, -0.1, -2.0 + math.log(3), -0.1])
    >>> answers, [round(w, 6) for w in weights]
    (['Paris', 'Lyon'], [0.25, 0.75])
    """
    kept = [(t, lp) for t, lp in zip(texts, mean_logps) if normalize_answer(t)]
    if not kept:
        return [], []
    top = max(lp for _, lp in kept)  # subtract the max: exp never overflows
    z = [math.exp(lp - top) for _, lp in kept]
    return [t for t, _ in kept], [x / sum(z) for x in z]


def default_equivalent(a, b):
    """METHOD §5.2 [our choice, offline]: the normalized answers are equal, or one is a whole-word span of
    the other. Normalization is EM's (§2): case folds but accents stay, so "Zürich" ~ "ZÜRICH" while
    "Zürich" and "zurich" differ, exactly as EM scores them.

    >>> default_equivalent("The Beatles", "beatles"), default_equivalent("Paris, France", "Paris")
    (True, True)
    >>> default_equivalent("Par", "Paris"), default_equivalent("Zürich", "zurich"), default_equivalent("", "x")
    (False, False, False)
    """
    a, b = normalize_answer(a), normalize_answer(b)
    if not a or not b:
        return False
    return f" {a} " in f" {b} " or f" {b} " in f" {a} "


def semantic_classes(answers, equivalent=default_equivalent):
    """METHOD §5.2: the class id of each answer, greedy in sample order. An answer joins the first class
    whose *first* member it is equivalent to, else it opens a new class (as in the semantic-entropy
    reference code). Not a transitive closure: "Paris" ~ "Paris France" ~ "France" leaves "France" apart.

    >>> semantic_classes(["Paris", "Paris, France", "France", "paris"])
    [0, 0, 1, 0]
    """
    firsts, ids = [], []
    for a in answers:
        c = next((c for c, f in enumerate(firsts) if equivalent(a, f)), None)
        if c is None:
            c = len(firsts)
            firsts.append(a)
        ids.append(c)
    return ids


@dataclass
class Belief:
    """What K weighted samples say for one (question, evidence): the gold class's mass p(c*), the semantic
    entropy H_sem, and the number of classes (the gold class counted even when no sample is in it)."""
    p_gold: float
    entropy: float
    n_classes: int


def belief(answers, weights, golds, equivalent=default_equivalent):
    """METHOD §5.2: p(c*|E) = Σ_{i∈c*} ℓ_i and H_sem(E) = -Σ_c p(c) log p(c), c* = the samples equivalent
    to any gold alias. p(c*) is summed per sample, so it never depends on the greedy clustering.

    >>> b = belief(["Paris", "paris france", "Lyon"], [0.5, 0.25, 0.25], ["Paris"])
    >>> b.p_gold, round(b.entropy, 4), b.n_classes      # H = -(0.75 log 0.75 + 0.25 log 0.25)
    (0.75, 0.5623, 2)
    """
    in_gold = [any(equivalent(a, g) for g in golds) for a in answers]
    p_gold = sum((w for w, y in zip(weights, in_gold) if y), 0.0)
    ids = semantic_classes(answers, equivalent)
    mass = [0.0] * (max(ids) + 1 if ids else 0)
    for c, w in zip(ids, weights):
        mass[c] += w
    entropy = -sum(p * math.log(p) for p in mass if p > 0)
    return Belief(p_gold=p_gold, entropy=entropy, n_classes=len(mass) + (not any(in_gold)))


def smoothed_p_gold(b, eps=IR_EPS):
    """METHOD §5.3: p̃(c*) = (p(c*) + ε) / (1 + ε·n_classes): log p̃ stays finite when no sample is right, and
    the smoothed classes still sum to 1 (hence the gold class is counted even when empty).

    >>> round(smoothed_p_gold(Belief(p_gold=0.0, entropy=0.0, n_classes=2)), 9)   # ε / (1 + 2ε)
    0.000998004
    """
    return (b.p_gold + eps) / (1 + eps * b.n_classes)


def information_gain(before, steps, estimator="prob", eps=IR_EPS):
    """METHOD §5.3: the IG of one rollout from its belief without evidence (B = before) and after each search
    step (steps = [C_1, ..., C_T], C_t = the evidence of steps 1..t). `prob` reads only C_T, all the
    evidence. No step -> 0 (§5.4).

    >>> B, C1, C2 = Belief(0.25, 1.0, 2), Belief(0.5, 0.75, 2), Belief(0.75, 0.25, 2)
    >>> information_gain(B, [C1, C2], "prob"), information_gain(B, [C1, C2], "entropy")
    (0.5, 0.5)
    """
    if not steps:
        return 0.0
    if estimator == "prob":      # METHOD §5.3: p(c*|all evidence) - p(c*|none), in [-1, 1]
        return steps[-1].p_gold - before.p_gold
    if estimator == "log":       # METHOD §5.3: (1/T) Σ_t [log p̃(c*|C_t) - log p̃(c*|B)]
        base = math.log(smoothed_p_gold(before, eps))
        return sum(math.log(smoothed_p_gold(c, eps)) - base for c in steps) / len(steps)
    if estimator == "entropy":   # METHOD §5.3: (1/T) Σ_t [H_sem(B) - H_sem(C_t)]
        return sum(before.entropy - c.entropy for c in steps) / len(steps)
    raise ValueError(f"unknown InfoReasoner estimator {estimator!r}; use prob, log or entropy")


# --nli-model: equivalence by bidirectional entailment (METHOD §5.2)

def nli_equivalent(entail, question):
    """METHOD §5.2: a ~ b when each entails the other with p > 0.5, each text prefixed by the question (a
    bare answer is too short for NLI). entail(premise, hypothesis) -> P(entailment), e.g. load_nli(name).

    >>> fake = lambda p, h: 0.9 if set(h.split()) <= set(p.split()) else 0.1   # more words entail fewer
    >>> eq = nli_equivalent(fake, "Capital of France?")
    >>> eq("Paris", "Paris"), eq("the city of Paris", "Paris")     # one way only: not equivalent
    (True, False)
    """
    def equivalent(a, b):
        pa, pb = f"{question.strip()} {a.strip()}", f"{question.strip()} {b.strip()}"
        return entail(pa, pb) > 0.5 and entail(pb, pa) > 0.5
    return equivalent


def entailment_index(id2label):
    """The class index of "entailment" in an NLI classifier's labels.

    >>> entailment_index({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})
    2
    """
    found = [int(i) for i, name in id2label.items() if "entail" in str(name).lower()]
    if len(found) != 1:
        raise DataError(f"--nli-model: no single 'entailment' label in config.id2label {dict(id2label)}; "
                        "give an MNLI classifier such as microsoft/deberta-large-mnli")
    return found[0]


_NLI = {}  # (name, device) -> entail function: the classifier is loaded once per process


def load_nli(name, device="cpu"):
    """entail(premise, hypothesis) -> P(entailment) from a Hugging Face MNLI sequence classifier, loaded
    lazily and memoized per pair (the same pairs come back for each rollout of a question)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    key = (name, str(device))
    if key in _NLI:
        return _NLI[key]
    try:
        nli_tok = AutoTokenizer.from_pretrained(name)
        nli = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as e:
        raise DataError(f"--nli-model {name!r} could not be loaded ({str(e).splitlines()[0][:120]}); give a "
                        "cached or reachable MNLI classifier, or leave --nli-model empty for the offline "
                        "default equivalence") from None
    yes = entailment_index(nli.config.id2label)
    memo = {}

    @torch.no_grad()
    def entail(premise, hypothesis):
        if (premise, hypothesis) not in memo:
            x = nli_tok(premise, hypothesis, return_tensors="pt", truncation=True).to(device)
            memo[premise, hypothesis] = float(nli(**x).logits[0].float().softmax(-1)[yes])
        return memo[premise, hypothesis]

    _NLI[key] = entail
    return entail


# Sampling the beliefs with the model (METHOD §5.1)

@torch.no_grad()
def sample_logprobs(model, prompts, samples, token_budget=None):
    """Mean token log-prob of each sample given its prompt, teacher-forced, no grad. Returns a list of N floats.

    The samples of one prompt (K of them, §5.1) share its forward: gold_scorer with equal weights runs the prompt
    once and scores every sample from its KV cache, in chunks of at most token_budget tokens (prompt + sample
    a row), instead of K forwards over the whole prompt."""
    rows = {}
    for j, p in enumerate(prompts):
        rows.setdefault(tuple(p), []).append(j)
    out = [0.0] * len(prompts)
    for p, js in rows.items():
        score = gold_scorer(model, list(p), head_tokens=0, head_weight=1.0, token_budget=token_budget)  # w_k = 1
        for j, x in zip(js, score([[]] * len(js), [samples[j] for j in js]).tolist()):
            out[j] = x
    return out


def sample_answers(model, tok, prompts, cfg, generator, stop="\n"):
    """METHOD §5.1: K = cfg.ir_samples brief answers per prompt (each prompt repeated K times, one
    generate_turn, batched by cfg.forward_budget) and their mean token log-probs. The mean covers every sampled
    token, the one that ended the sample (the stop string or EOS) included: stopping there is part of the
    answer the model chose.

    Returns (texts, mean_logps, n_generated): texts[p][k] = the k-th sample of prompt p, cut at its
    first `stop` (a newline for the plain prompt, </answer> for the agent's) and stripped."""
    K = cfg.ir_samples
    if not prompts:
        return [], [], 0
    seqs = [p for p in prompts for _ in range(K)]                      # [P*K] prompt p at rows p*K .. p*K+K-1
    gens, _ = engine.generate_turn(model, tok, seqs, [cfg.ir_max_tokens] * len(seqs), [stop],
                                   engine.stop_ids(tok, model), cfg.ir_temperature, generator, cfg.forward_budget)
    lps = sample_logprobs(model, seqs, gens, cfg.forward_budget)
    texts = [tok.decode(g, skip_special_tokens=True).split(stop)[0].strip() for g in gens]
    return ([texts[p * K:(p + 1) * K] for p in range(len(prompts))],
            [lps[p * K:(p + 1) * K] for p in range(len(prompts))], sum(len(g) for g in gens))


def trajectory_evidence(rollout, t):
    """C_t: the documents of the rollout's first t searches, formatted as the agent saw them (§5.3)."""
    return format_docs([d for s in rollout.searches[:t] for d in s["docs"]])


def inforeasoner_information_gain(model, tok, rollouts, cfg, generator, entail=None):
    """METHOD §5: the semantic information gain of each rollout, and the ir_* metrics of the step.

    Two batched sampling phases with `model` (the frozen reference): K answers without evidence, then K
    answers with evidence: all the rollout's documents for `prob`, the documents of steps 1..t for each t for
    `log` and `entropy`. A belief depends only on (question, evidence), so each distinct pair is sampled once
    and shared: the question alone by the G rollouts of its group, an evidence set by every rollout of the
    question that retrieved exactly it (same evidence, same belief, no sampling noise between them). A
    rollout that never searched gets IG = 0 (§5.4). entail(premise, hypothesis) -> P(entailment) overrides
    --nli-model (tests pass a fake one).

    Returns (ig, extra): ig = one float per rollout; extra = {"ir_ig_mean", ..., "ir_extra_tokens"} (ir_metrics).
    Under torchrun each rank calls inforeasoner_beliefs on its own rollouts (a question, hence its beliefs,
    lives on one rank) and ir_metrics runs on what all of them return."""
    ig, beliefs, n_generated = inforeasoner_beliefs(model, tok, rollouts, cfg, generator, entail)
    return ig, ir_metrics(ig, beliefs, n_generated)


def inforeasoner_beliefs(model, tok, rollouts, cfg, generator, entail=None):
    """The sampling and the IG of inforeasoner_information_gain. Returns (ig, beliefs, n_generated):
    beliefs[i] = (B, C_T), the beliefs without evidence and with all of it, for a rollout that searched, else
    None; n_generated = the answer tokens sampled."""
    if entail is None and cfg.nli_model:
        entail = load_nli(cfg.nli_model, next(model.parameters()).device)
    searched = [i for i, r in enumerate(rollouts) if r.searches]
    question = {i: rollouts[i].question["question"] for i in searched}
    golds = {question[i]: rollouts[i].question["golden_answers"] for i in searched}
    steps = {}                                                         # rollout -> evidence of C_1..C_T (prob: C_T)
    for i in searched:
        T = len(rollouts[i].searches)
        ts = [T] if cfg.ir_estimator == "prob" else range(1, T + 1)
        steps[i] = [trajectory_evidence(rollouts[i], t) for t in ts]
    bare = list(golds)                                                 # distinct questions, first seen first
    pairs = list(dict.fromkeys((question[i], e) for i in searched for e in steps[i]))  # distinct (question, evidence)

    ask, stop = BELIEF_PROMPTS[cfg.ir_belief]                         # METHOD §5.1: --ir-belief agent | plain
    texts0, lps0, n0 = sample_answers(model, tok, [ask(tok, q) for q in bare], cfg, generator, stop)
    texts1, lps1, n1 = sample_answers(model, tok, [ask(tok, q, e) for q, e in pairs], cfg, generator, stop)

    def belief_of(q, texts, lps):
        answers, weights = weigh_samples(texts, lps)
        return belief(answers, weights, golds[q], nli_equivalent(entail, q) if entail else default_equivalent)

    before = {q: belief_of(q, t, lp) for q, t, lp in zip(bare, texts0, lps0)}                # B
    after = {(q, e): belief_of(q, t, lp) for (q, e), t, lp in zip(pairs, texts1, lps1)}     # C_t
    ig = [0.0] * len(rollouts)                                         # METHOD §5.4: no search -> 0
    beliefs = [None] * len(rollouts)
    for i in searched:
        ig[i] = information_gain(before[question[i]], [after[question[i], e] for e in steps[i]], cfg.ir_estimator)
        beliefs[i] = (before[question[i]], after[question[i], steps[i][-1]])  # B, and C_T: all the evidence
    return ig, beliefs, n0 + n1


def ir_metrics(ig, beliefs, n_generated):
    """The ir_* metrics of a step from inforeasoner_beliefs' results. The ir_p_gold_*/ir_h_* means run over
    the searching rollouts (so p_gold_with - p_gold_without is the mean `prob` IG of those) and are left out
    of a step where no rollout searched."""
    n = max(len(ig), 1)
    mean = sum(ig) / n
    extra = {"ir_ig_mean": mean, "ir_ig_std": math.sqrt(sum((x - mean) ** 2 for x in ig) / n),
             "ir_frac_positive": sum(x > 0 for x in ig) / n, "ir_extra_tokens": n_generated / n}
    searched = [b for b in beliefs if b is not None]
    if searched:
        avg = lambda xs: sum(xs) / len(xs)  # noqa: E731
        extra.update(ir_p_gold_with=avg([last.p_gold for _, last in searched]),
                     ir_p_gold_without=avg([before.p_gold for before, _ in searched]),
                     ir_h_before=avg([before.entropy for before, _ in searched]),
                     ir_h_after=avg([last.entropy for _, last in searched]))
    return extra
