"""SQuAD-style answer scoring: normalization, exact match and token F1.

The normalization and the per-answer scores follow the official SQuAD v1.1 evaluation script
(``evaluate-v1.1.py``): lowercase, drop ASCII punctuation, drop the articles *a*, *an*, *the*,
collapse whitespace; a prediction's score is its best score over the gold answers.

One deliberate difference, for empty answers: when the prediction and a gold answer both
normalize to nothing (e.g. ``""`` vs ``"The"``), the v1.1 script gives exact match 1 but F1 0.
Here F1 is 1 in that case, as in the SQuAD v2.0 script, so that F1 >= exact match always holds.
An empty prediction against a non-empty gold answer scores 0 on both, as in both scripts.

Scores are fractions in [0, 1], not the official script's percentages in [0, 100].
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalize an answer the way the SQuAD v1.1 script does.

    Args:
        text: a predicted or gold answer.

    Returns:
        ``text`` lowercased, without ASCII punctuation, without the words a/an/the, with runs of
        whitespace collapsed to one space and no leading or trailing space.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0.

    Args:
        prediction: the model's answer.
        answers: the gold answers (a single string counts as one answer).

    Returns:
        1.0 or 0.0.

    Raises:
        ValueError: if ``answers`` is an empty list.
    """
    answers = _as_answer_list(answers)
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in answers))


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Best bag-of-tokens F1 = 2PR / (P + R) of the prediction against any gold answer.

    Tokens are the whitespace-separated words of the normalized strings; a repeated word counts
    as often as it occurs in both. Both normalizing to empty scores 1.0 (see the module docstring).

    Args:
        prediction: the model's answer.
        answers: the gold answers (a single string counts as one answer).

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: if ``answers`` is an empty list.
    """
    answers = _as_answer_list(answers)
    predicted = normalize_answer(prediction).split()
    return max(_f1(predicted, normalize_answer(gold).split()) for gold in answers)


def aggregate(predictions: Sequence[str], answers_list: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 over a set of questions.

    Args:
        predictions: one predicted answer per question.
        answers_list: for each question, its gold answers.

    Returns:
        ``{"f1": ..., "exact_match": ...}``, each a mean of per-question scores, a fraction in
        [0, 1] (multiply by 100 for the numbers the official script prints).

    Raises:
        ValueError: if the two sequences differ in length, are empty, or a question has no
            gold answer.
    """
    if len(predictions) != len(answers_list):
        raise ValueError(
            f"`predictions` has {len(predictions)} entries but `answers_list` has {len(answers_list)}; "
            "pass one prediction per question, in the same order as the gold answers."
        )
    if not predictions:
        raise ValueError("`predictions` is empty: there is nothing to score.")
    n = len(predictions)
    return {
        "f1": sum(token_f1(p, a) for p, a in zip(predictions, answers_list)) / n,
        "exact_match": sum(exact_match(p, a) for p, a in zip(predictions, answers_list)) / n,
    }


def _as_answer_list(answers: str | Sequence[str]) -> list[str]:
    # A bare string is a Sequence[str] too; iterating it would score against single characters.
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("`answers` is empty: every question needs at least one gold answer.")
    return answers


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    overlap = sum((Counter(predicted) & Counter(gold)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(gold)
    return 2 * precision * recall / (precision + recall)
