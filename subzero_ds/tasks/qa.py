"""Generation tasks: SQuAD and DROP, answered in free text and scored by token F1 (and exact match)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterable, Mapping

from .base import HubSource, Sample, Task, TaskKind, field, text


def _unique(answers: Iterable[Any]) -> tuple[str, ...]:
    """Non-empty answers, stripped, duplicates dropped, order kept."""
    return tuple(dict.fromkeys(str(a).strip() for a in answers if str(a).strip()))


class SQuAD(Task):
    """SQuAD v1.1 reading comprehension: ``Title: … Context: … Question: … Answer:`` → the answer span.

    Accepts HF rows (``title``, ``context``, ``question``, ``answers.text``) and the official nested
    JSON file (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``), flattened to
    one row per question. Questions without an answer (SQuAD 2.0's unanswerable ones) are rejected.
    """

    name = "squad"
    kind = TaskKind.GENERATION
    metric = "f1"
    hub = HubSource("rajpurkar/squad")
    local_names = MappingProxyType({"train": ("train-v1.1.json",), "validation": ("dev-v1.1.json",)})
    folder_names = ("SQuAD", "squad")

    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        answers = field(row, "answers")
        if isinstance(answers, Mapping):  # HF: {"text": [...], "answer_start": [...]}
            answers = field(answers, "text", "answers.")
        texts = _unique(a["text"] if isinstance(a, Mapping) else a for a in answers)
        if not texts:
            raise ValueError("`answers` is empty (an unanswerable question?): every SQuAD row needs an answer")
        prompt = (f"Title: {text(row, 'title')}\nContext: {text(row, 'context')}\n"
                  f"Question: {text(row, 'question')}\nAnswer:")
        return [Sample(prompt, (), None, answers=texts)]

    def rows_from_json(self, document: Any) -> list[Any]:
        articles = document.get("data") if isinstance(document, dict) else None
        official = isinstance(articles, list) and articles and isinstance(articles[0], dict)
        if not (official and "paragraphs" in articles[0]):
            return super().rows_from_json(document)
        rows = []
        for article in articles:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    rows.append({"id": qa.get("id"), "title": article.get("title", ""), "context": paragraph["context"],
                                 "question": qa["question"], "answers": qa.get("answers", [])})
        return rows


class DROP(Task):
    """DROP discrete reasoning over paragraphs: ``Passage: … Question: … Answer:`` → a number, date or spans.

    Accepts HF rows (``passage``, ``question``, ``answers_spans.spans``) and rows of the official
    JSON file (``{section_id: {"passage", "qa_pairs": [{"question", "answer": {"number", "date",
    "spans"}, "validated_answers"}]}}``), flattened to one row per question. Every span is an
    acceptable answer, as in MeZO; a date reads "day month year".
    """

    name = "drop"
    kind = TaskKind.GENERATION
    metric = "f1"
    hub = HubSource("ucinlp/drop")
    local_names = MappingProxyType({"train": ("drop_dataset_train.json",), "validation": ("drop_dataset_dev.json",)})
    folder_names = ("DROP", "drop")

    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        if "answers_spans" in row:
            answers = _unique(field(field(row, "answers_spans"), "spans", "answers_spans."))
        else:
            official = [field(row, "answer"), *(row.get("validated_answers") or [])]
            answers = _unique(a for answer in official for a in _official_answer(answer))
        if not answers:
            raise ValueError("the row has no answer (`answers_spans.spans` or `answer` is empty)")
        prompt = f"Passage: {text(row, 'passage')}\nQuestion: {text(row, 'question')}\nAnswer:"
        return [Sample(prompt, (), None, answers=answers)]

    def rows_from_json(self, document: Any) -> list[Any]:
        sections = document.values() if isinstance(document, dict) else ()
        if not sections or not all(isinstance(s, dict) and "qa_pairs" in s for s in sections):
            return super().rows_from_json(document)
        return [{"section_id": section_id, "passage": section["passage"], **qa}
                for section_id, section in document.items() for qa in section["qa_pairs"]]


def _official_answer(answer: Mapping[str, Any]) -> list[str]:
    """The strings of one official DROP answer: its number, its spans, or its date."""
    if str(answer.get("number") or "").strip():
        return [str(answer["number"])]
    if answer.get("spans"):
        return list(answer["spans"])
    date = answer.get("date") or {}
    return [" ".join(str(date[k]) for k in ("day", "month", "year") if str(date.get(k) or "").strip())]
