"""A user's own task, from local files in one of two schemas.

* ``text`` + ``label`` rows — classification. The prompt is ``template`` filled from the row
  (default ``"{text} It was"``); candidate i is " " + ``label_words[i]``; a label is an index or
  the word itself. Needs ``label_words``.
* ``prompt`` + ``completion`` rows — generation; the completion (or each of a list of them) is an
  acceptable answer, the first one the training target.

The schema is fixed by the options, so the task's kind is known before any file is read:
``label_words`` given means text/label rows, none means prompt/completion rows. The first row
that does not fit (row 1 when the options do not match the file) is reported with the fields it has.
"""

from __future__ import annotations

import string
from typing import Any, Mapping, Sequence

from .base import DataError, Sample, Task, TaskKind, field, label_index, text

CLASSIFICATION_FIELDS = ("text", "label")
GENERATION_FIELDS = ("prompt", "completion")


class Custom(Task):
    """A classification or generation task over user files (no hub dataset).

    Args:
        label_words: the verbalizer word of each label, in label order (e.g. ["negative", "positive"]).
            Given: rows are ``text`` + ``label``. Absent: rows are ``prompt`` + ``completion``.
        template: the prompt of a text/label row, a ``str.format`` template over the row's fields.

    Raises:
        DataError: ``label_words`` is not a list of distinct non-empty words, or ``template`` is
            not a valid format string.
    """

    name = "custom"
    options = ("label_words", "template")

    def __init__(self, label_words: Sequence[str] | None = None, template: str = "{text} It was") -> None:
        self.label_words = _check_label_words(label_words) if label_words is not None else None
        self.template = _check_template(template)
        self.kind = TaskKind.CLASSIFICATION if self.label_words else TaskKind.GENERATION
        self.metric = "accuracy" if self.label_words else "f1"

    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        _check_schema(row, CLASSIFICATION_FIELDS if self.label_words else GENERATION_FIELDS)
        if self.label_words:
            prompt = self.template.format_map(_TemplateFields(row)).rstrip()
            candidates = tuple(" " + word for word in self.label_words)
            return [Sample(prompt, candidates, label_index(field(row, "label"), self.label_words))]
        completion = field(row, "completion")
        completions = completion if isinstance(completion, list) else [completion]
        answers = tuple(dict.fromkeys(str(c).strip() for c in completions if str(c).strip()))
        if not answers:
            raise ValueError(f"`completion` is empty ({completion!r}): give the answer text")
        return [Sample(text(row, "prompt"), (), None, answers=answers)]


class _TemplateFields(dict):
    """Row fields for ``str.format_map``: text stripped; a missing field is a KeyError naming it."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        super().__init__({k: v.strip() if isinstance(v, str) else v for k, v in row.items() if v is not None})

    def __missing__(self, key: str) -> Any:
        raise KeyError(key)


def _check_schema(row: Mapping[str, Any], expected: tuple[str, ...]) -> None:
    if all(name in row for name in expected):
        return
    found = ", ".join(f"`{k}`" for k in row) or "none"
    other = GENERATION_FIELDS if expected == CLASSIFICATION_FIELDS else CLASSIFICATION_FIELDS
    if all(name in row for name in other):
        hint = ("these are prompt/completion (generation) rows: leave out --label_words"
                if expected == CLASSIFICATION_FIELDS else
                "these are text/label (classification) rows: pass --label_words, one word per label")
    else:
        hint = "custom rows need `text` + `label` (with --label_words) or `prompt` + `completion`"
    raise ValueError(f"expected fields `{expected[0]}` and `{expected[1]}` but found {found}; {hint}")


def _check_label_words(label_words: Any) -> tuple[str, ...]:
    if isinstance(label_words, str) or not isinstance(label_words, Sequence):
        raise DataError(
            f"`label_words` must be a list of words, one per label (e.g. negative positive); got {label_words!r}"
        )
    words = tuple(str(w).strip() for w in label_words)
    if len(words) < 2 or not all(words) or len(set(words)) != len(words):
        raise DataError(
            f"`label_words` needs two or more distinct non-empty words, one per label; got {list(label_words)!r}"
        )
    return words


def _check_template(template: Any) -> str:
    try:
        list(string.Formatter().parse(template))
    except (TypeError, ValueError) as error:
        raise DataError(f"`template` {template!r} is not a format string like '{{text}} It was': {error}") from None
    return template
