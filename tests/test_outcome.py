"""The outcome reward (METHOD §2): SQuAD normalization, exact match, token F1 and answer extraction."""
import pytest

from grpo import extract_answer
from rewards import exact_match, f1_score, normalize_answer


# ----------------------------------------------------------------------------------------------------
# normalize_answer

@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel-Tower!", "eiffeltower"),       # punctuation is deleted, not turned into a space
    ("A Tale of Two Cities", "tale of two cities"),
    ("an apple a day", "apple day"),
    ("Theatre Anthem", "theatre anthem"),         # articles only as whole words
    ("  x \t y\n", "x y"),
    ("U.S.A.", "usa"),
    ("ZÜRICH", "zürich"),
    ("", ""),
    ("The", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# ----------------------------------------------------------------------------------------------------
# exact_match

@pytest.mark.parametrize("prediction, golds, expected", [
    ("The Beatles", ["Beatles"], 1.0),             # articles
    ("beatles", ["The Beatles"], 1.0),
    ("Beatles!", ["beatles"], 1.0),               # punctuation and case
    ("BEATLES", ["The Beatles."], 1.0),
    ("USA", ["U.S.A."], 1.0),
    ("ZÜRICH", ["Zürich"], 1.0),                  # unicode lowercase
    ("Paris", ["London", "paris"], 1.0),          # any alias
    ("Paris", ["London", "Lyon"], 0.0),
    ("Paris, France", ["Paris"], 0.0),            # extra words are not exact
    ("Paris", [], 0.0),                           # no gold
    ("", ["x"], 0.0),                             # empty answer is wrong
    ("", [""], 1.0),
    ("the", ["a"], 1.0),                          # both empty after normalization
])
def test_exact_match(prediction, golds, expected):
    assert exact_match(prediction, golds) == expected


def test_no_answer_scores_zero():
    assert exact_match(None, ["Paris"]) == 0.0
    assert f1_score(None, ["Paris"]) == 0.0
    assert exact_match(None, [""]) == 0.0          # even against an empty gold
    assert f1_score(None, [""]) == 0.0


# ----------------------------------------------------------------------------------------------------
# f1_score (worked by hand: F1 = 2PR / (P + R) over normalized tokens)

@pytest.mark.parametrize("prediction, golds, expected", [
    ("Paris", ["Paris"], 1.0),
    ("The Beatles", ["Beatles"], 1.0),
    ("Paris France", ["Paris"], 2 / 3),                   # P 1/2, R 1
    ("Paris", ["Paris France"], 2 / 3),                   # P 1, R 1/2
    ("Paris is in France", ["Paris, France"], 2 / 3),     # common 2, P 2/4, R 2/2
    ("New York City", ["York", "New York"], 0.8),         # best alias: P 2/3, R 1 (vs 0.5 for "York")
    ("paris paris paris", ["paris"], 0.5),                # repeats count once per gold occurrence: P 1/3, R 1
    ("paris paris", ["paris paris london"], 0.8),         # common 2: P 1, R 2/3
    ("paris london", ["paris paris"], 0.5),               # common 1: P 1/2, R 1/2
    ("Lyon", ["Paris"], 0.0),
    ("", ["Paris"], 0.0),
    ("Paris", [""], 0.0),
    ("", [""], 1.0),
    ("the", ["a"], 1.0),
    ("Paris", [], 0.0),
])
def test_f1_score(prediction, golds, expected):
    assert f1_score(prediction, golds) == pytest.approx(expected)


def test_f1_is_one_exactly_when_exact_match_on_nonempty_answers():
    cases = [("The Beatles", ["Beatles"]), ("Paris France", ["Paris"]), ("France Paris", ["Paris France"])]
    got = [(exact_match(p, g), f1_score(p, g)) for p, g in cases]
    # word order does not matter to F1 but does to EM
    assert got == [(1.0, 1.0), (0.0, pytest.approx(2 / 3)), (0.0, 1.0)]


# ----------------------------------------------------------------------------------------------------
# extract_answer

@pytest.mark.parametrize("response, expected", [
    ("I think it is Paris.", None),                                          # no tag
    ("<answer>Paris", None),                                                 # never closed
    ("Paris</answer>", None),                                                # never opened
    ("<answer>Lyon</answer> no wait <answer>Paris</answer>", "Paris"),       # last one wins
    ("<answer>Lyon</answer> no, <answer> Paris </answer><answer>unfinished", "Paris"),  # last complete one
    ("<answer>\n  Paris \n</answer>", "Paris"),                              # whitespace stripped
    ("<answer> Zürich </answer>", "Zürich"),                                 # unicode kept as is
    ("<think>a</think>\n<answer>New York City</answer>\n", "New York City"),
    ("<answer></answer>", ""),                                               # empty answer is an answer
    ("<answer>   </answer>", ""),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_answer_ignores_prompt_example():
    # The prompt shows an example answer; only the response is passed, so a response without a tag has none.
    prompt = "Answer inside tags, for example <answer> Beijing </answer>.\nQuestion: capital of France?\n"
    response = "<think>It is Paris.</think> Paris"
    assert extract_answer(response) is None
    assert extract_answer(prompt + response) == "Beijing"  # what passing the prompt too would (wrongly) give


def test_empty_answer_scores_zero():
    answer = extract_answer("<answer></answer>")
    assert answer == ""
    assert exact_match(answer, ["x"]) == 0.0
    assert f1_score(answer, ["x"]) == 0.0


def test_extracted_answer_scores():
    answer = extract_answer("<think>The band from Liverpool.</think><answer> the Beatles. </answer>")
    assert exact_match(answer, ["The Beatles", "Beatles"]) == 1.0
    answer = extract_answer("<answer>Chief of Protocol of the United States</answer>")
    # pred: chief of protocol of united states (6 tokens); gold: chief of protocol (3): common 3 -> P 1/2, R 1
    assert exact_match(answer, ["Chief of Protocol"]) == 0.0
    assert f1_score(answer, ["Chief of Protocol"]) == pytest.approx(2 / 3)
