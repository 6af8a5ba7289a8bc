"""SQuAD-style EM / F1: hand-computed cases and a comparison with the official v1.1 script."""

import re
import string
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from subzero_ds.tasks.qa_metrics import aggregate, exact_match, normalize_answer, token_f1


# --- the official SQuAD v1.1 evaluation functions, verbatim apart from formatting ----------------
def official_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def official_exact_match_score(prediction, ground_truth):
    return official_normalize_answer(prediction) == official_normalize_answer(ground_truth)


def official_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


# --- hand-computed cases ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The Cat", "cat"),
        ("  An apple,  a day! ", "apple day"),
        ("theatre Anne", "theatre anne"),  # articles only as whole words
        ("U.S. well-known", "us wellknown"),  # punctuation is deleted, not replaced by a space
        ("Tab\tand\nnewline", "tab and newline"),
        ("the", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_case_articles_and_punctuation_do_not_matter():
    assert exact_match("The Cat", ["cat"]) == 1.0
    assert token_f1("The Cat", ["cat"]) == 1.0
    assert exact_match("Cat.", ["the cat!"]) == 1.0


def test_hyphen_is_deleted_as_in_the_official_script():
    # "well-known" -> "wellknown", a different token from "well" and "known".
    assert exact_match("well-known", ["well known"]) == 0.0
    assert token_f1("well-known", ["well known"]) == 0.0


def test_partial_overlap_f1_worked_example():
    # prediction -> [big, black, cat, sat] (4 tokens), gold -> [black, cat] (2 tokens), overlap 2:
    # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert token_f1("the big black cat sat", ["a black cat"]) == pytest.approx(2 / 3)
    assert exact_match("the big black cat sat", ["a black cat"]) == 0.0
    # overlap 1 of 2 each way: P = R = 1/2, F1 = 1/2.
    assert token_f1("Denver Broncos", ["Broncos won"]) == pytest.approx(0.5)


def test_repeated_tokens_count_only_as_often_as_in_both():
    # overlap min(2, 1) = 1: P = 1/2, R = 1, F1 = 2/3.
    assert token_f1("paris paris", ["Paris"]) == pytest.approx(2 / 3)


def test_multiple_gold_answers_take_the_best():
    answers = ["Broncos", "the Denver Broncos", "Carolina Panthers"]
    assert exact_match("Denver Broncos", answers) == 1.0
    assert token_f1("Denver Broncos", answers) == 1.0
    # against "Paris" and "France" alike: P = 1/3, R = 1, F1 = 1/2; no exact match.
    assert token_f1("in Paris France", ["Paris", "France"]) == pytest.approx(0.5)
    assert exact_match("in Paris France", ["Paris", "France"]) == 0.0
    # P = 2/2, R = 2/3 against the second answer: F1 = 0.8, the best though not an exact match.
    assert token_f1("black cat", ["dog", "a black cat sat"]) == pytest.approx(0.8)


def test_empty_prediction():
    assert exact_match("", ["Paris"]) == 0.0
    assert token_f1("", ["Paris"]) == 0.0
    assert token_f1("Paris", [""]) == 0.0


def test_empty_vs_empty_scores_one_on_both():
    # The v1.1 script gives EM 1 but F1 0 here; we follow v2.0 (F1 1) so that F1 >= EM.
    assert exact_match("", [""]) == 1.0
    assert token_f1("", [""]) == 1.0
    assert token_f1("The", ["a"]) == 1.0  # both normalize to ""


def test_a_bare_string_is_one_answer_not_a_list_of_characters():
    assert exact_match("cat", "The cat") == 1.0
    assert token_f1("c", "cat") == 0.0


def test_no_gold_answer_is_an_error():
    with pytest.raises(ValueError, match="at least one gold answer"):
        exact_match("cat", [])
    with pytest.raises(ValueError, match="at least one gold answer"):
        token_f1("cat", [])


def test_aggregate_is_the_mean_fraction():
    scores = aggregate(["The Cat", "the big black cat sat", ""], [["cat"], ["a black cat"], ["Paris"]])
    assert scores.keys() == {"f1", "exact_match"}
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_aggregate_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="2 entries but `answers_list` has 1"):
        aggregate(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="empty"):
        aggregate([], [])


# --- agreement with the official script -------------------------------------------------------
_WORDS = st.sampled_from(["the", "a", "an", "The", "Cat", "cat", "cat.", "dog", "U.S.", "well-known", "", "!", "Paris"])
_ANSWER = st.lists(_WORDS, max_size=5).map(" ".join)


@given(prediction=_ANSWER, answers=st.lists(_ANSWER, min_size=1, max_size=3))
def test_matches_the_official_v11_script(prediction, answers):
    assert normalize_answer(prediction) == official_normalize_answer(prediction)
    assert exact_match(prediction, answers) == float(
        official_max_over_ground_truths(official_exact_match_score, prediction, answers)
    )
    expected_f1 = official_max_over_ground_truths(official_f1_score, prediction, answers)
    if normalize_answer(prediction) == "" and any(normalize_answer(a) == "" for a in answers):
        expected_f1 = 1.0  # the one documented difference: empty vs empty
    assert token_f1(prediction, answers) == pytest.approx(expected_f1)
