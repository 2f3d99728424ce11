"""Rewards: the outcome reward (EM/F1) and the two step-level information-gain rewards.

    extract_answer("<think>..</think><answer> Paris </answer>")   -> "Paris"
    exact_match("the Paris!", ["Paris"])                          -> 1.0
    f1_score("Paris France", ["Paris"])                           -> 0.667

Section numbers refer to METHOD.md (the math this project implements).
"""
import re
import string
from collections import Counter

import torch

import grpo  # rollouts, spans and log-probs (grpo imports this module back for extract_answer)


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


def extract_answer(response):
    """The last complete <answer>...</answer> of the response, stripped; None when there is none.

    Pass the response only: the prompt holds an example answer (METHOD §1).
    >>> extract_answer("<answer>Lyon</answer> no, <answer> Paris </answer><answer>unfinished")
    'Paris'
    """
    end = response.rfind("</answer>")
    if end < 0:
        return None
    start = response.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return response[start + len("<answer>"):end].strip()


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
def gold_scores(model, contexts, golds, head_tokens=3, head_weight=3.0, max_context=2048, micro_batch=8):
    """METHOD §4.1: s(a* | C) = Σ_k w_k log π(a*_k | C, a*_<k) / Σ_k w_k for each (context ids, gold ids)
    pair, teacher-forced in one batched forward (in micro-batches). Contexts are cut from the left to
    max_context tokens. Returns a tensor [M]."""
    seqs = [list(c[-max_context:]) + list(g) for c, g in zip(contexts, golds)]
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    gold_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (s, g) in enumerate(zip(seqs, golds)):
        ids[b, :len(s)] = torch.tensor(s)
        attn[b, :len(s)] = 1
        gold_mask[b, len(s) - len(g):len(s)] = True
    device = next(model.parameters()).device
    lp = grpo.token_logprobs(model, ids.to(device), attn.to(device), gold_mask.to(device), micro_batch).cpu()  # [M, T]
    scores = []
    for b, g in enumerate(golds):
        w = head_weights(len(g), head_tokens, head_weight)
        scores.append(float((lp[b][gold_mask[b]] * w).sum() / w.sum()))
    return torch.tensor(scores)


def baseline_blocks(rollouts, i, t, n, rng, retriever, tok, how="batch"):
    """METHOD §4.2: n counterfactual information blocks (token ids) for search step t of rollout i.

    "batch": blocks retrieved for *other questions* of the batch (drawn with replacement); "corpus", or an
    empty pool: k random corpus documents (k = the real step's document count) formatted like a real block."""
    r = rollouts[i]
    if how == "batch":
        pool = [o.ids[slice(*s["info_span"])] for o in rollouts
                if o.group != r.group and o.question["question"] != r.question["question"] for s in o.searches]
        if pool:
            return [pool[rng.randrange(len(pool))] for _ in range(n)]
    real = r.searches[t]["docs"]
    exclude = {d["id"] for d in real}
    k = max(len(real), 1)
    return [tok.encode(grpo.information_block(retriever.random_documents(k, rng, exclude)), add_special_tokens=False)
            for _ in range(n)]


def igsearch_information_gain(score_fn, tok, rollouts, retriever, n_samples=3, baseline="batch", rng=None):
    """METHOD §4.2: IG_{i,t} = s(a* | C_t^real) - (1/N) Σ_j s(a* | C_t^rand,j) for every search step.

    C_t^real = the rollout's ids up to the end of step t's information block, then the cue "<answer>";
    C_t^rand,j = the same with that block's ids replaced by a baseline block. Gold answers are scored as
    " " + alias (the natural tokenization after "<answer>"). With several aliases, the alias with the best
    real score is used for the baseline too. score_fn(contexts, golds) -> tensor [M] (gold_scores with the
    rollout policy; tests pass a fake). Returns (ig: one list of floats per rollout, per-step details)."""
    cue = tok.encode("<answer>", add_special_tokens=False)
    steps = [(i, t) for i, r in enumerate(rollouts) for t in range(len(r.searches))]
    if not steps:
        return [[] for _ in rollouts], []
    aliases = {i: [tok.encode(" " + a.strip(), add_special_tokens=False) for a in rollouts[i].question["golden_answers"]]
               for i, _ in steps}
    # pass 1: the real context of every step with every alias
    ctx, gold, owner = [], [], []
    for k, (i, t) in enumerate(steps):
        end = rollouts[i].searches[t]["info_span"][1]
        for a in aliases[i]:
            ctx.append(rollouts[i].ids[:end] + cue)
            gold.append(a)
            owner.append(k)
    real_all = score_fn(ctx, gold)
    real, best = [], []
    for k in range(len(steps)):
        vals = [(float(real_all[m]), m) for m in range(len(owner)) if owner[m] == k]
        v, m = max(vals)
        real.append(v)
        best.append(gold[m])
    # pass 2: N counterfactual contexts per step, scored with that step's best alias
    ctx, gold = [], []
    for k, (i, t) in enumerate(steps):
        s, e = rollouts[i].searches[t]["info_span"]
        for blk in baseline_blocks(rollouts, i, t, n_samples, rng, retriever, tok, baseline):
            ctx.append(rollouts[i].ids[:s] + list(blk) + cue)
            gold.append(best[k])
    rand = score_fn(ctx, gold).view(len(steps), n_samples).mean(-1)  # [S]
    ig = [[] for _ in rollouts]
    details = []
    for k, (i, t) in enumerate(steps):
        ig[i].append(real[k] - float(rand[k]))
        details.append({"rollout": i, "step": t, "real": real[k], "baseline": float(rand[k]), "ig": ig[i][-1]})
    return ig, details
