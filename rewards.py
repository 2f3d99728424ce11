"""Rewards: the outcome reward (EM/F1) and the two step-level information-gain rewards.

    extract_answer("<think>..</think><answer> Paris </answer>")   -> "Paris"
    exact_match("the Paris!", ["Paris"])                          -> 1.0
    f1_score("Paris France", ["Paris"])                           -> 0.667

Section numbers refer to METHOD.md (the math this project implements).
"""
import re
import string
from collections import Counter


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
