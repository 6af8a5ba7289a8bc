"""The task interface: what one dataset row becomes (`Sample`), and the data errors a user can fix.

A `Task` turns a row (a dict, as read from a JSONL/TSV/Parquet file or a Hugging Face dataset) into
samples. A sample is text only — tokenization happens in `subzero_ds.tasks.encoding` — and obeys one rule that
keeps tokenization stable: the prompt ends exactly where the answer starts, with no trailing
whitespace, and every answer continuation carries its own leading space (" great").
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Sequence

SPLITS = ("train", "validation", "test")
FILE_FORMATS = ("jsonl", "json", "parquet", "tsv", "csv")

# Names tried in a data directory for every task, after the task's own conventional names.
_GENERIC_STEMS = {"train": ("train",), "validation": ("validation", "val", "dev"), "test": ("test",)}


class TaskKind(Enum):
    """How a task is scored: pick a label word, pick one of several continuations, or generate."""

    CLASSIFICATION = "classification"
    MULTIPLE_CHOICE = "multiple_choice"
    GENERATION = "generation"


class DataError(ValueError):
    """A data problem the user can fix.

    The message names the file (or hub dataset), the row number (1-based), the field, the bad value
    and the fix.
    """


@dataclass(frozen=True)
class Sample:
    """One example, as text.

    Args:
        prompt: what the model conditions on; ends exactly where the answer starts (no trailing
            whitespace).
        candidates: answer continuations, each with its leading space (" great", " terrible");
            empty for generation tasks.
        gold: index into ``candidates`` of the correct one; None for generation tasks.
        answers: generation tasks: every acceptable answer, ``answers[0]`` being the training
            target; empty otherwise.

    Raises:
        ValueError: the fields break the rules above (a template bug or an unusable row).
    """

    prompt: str
    candidates: tuple[str, ...]
    gold: int | None
    answers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        object.__setattr__(self, "answers", tuple(self.answers))
        if self.prompt != self.prompt.rstrip():
            raise ValueError(
                f"the prompt ends with whitespace ({self.prompt[-20:]!r}); the answers carry the leading space"
            )
        if self.candidates:
            bad = [c for c in self.candidates if not c.startswith(" ") or not c.strip()]
            if bad:
                raise ValueError(f"candidates must be non-empty and start with a space; got {bad!r}")
            if self.gold is None or not 0 <= self.gold < len(self.candidates):
                raise ValueError(f"gold {self.gold!r} is not an index into {len(self.candidates)} candidates")
            if self.answers:
                raise ValueError("a sample with candidates takes no `answers`")
        else:
            if self.gold is not None:
                raise ValueError(f"a generation sample (no candidates) must have gold None, not {self.gold!r}")
            if not self.answers or not all(a.strip() for a in self.answers):
                raise ValueError(f"a generation sample needs at least one non-empty answer; got {self.answers!r}")

    @property
    def target(self) -> str:
        """The continuation trained on: the gold candidate, or " " + the first answer."""
        if self.candidates:
            return self.candidates[self.gold]
        return " " + self.answers[0]


@dataclass(frozen=True)
class HubSource:
    """Where `datasets.load_dataset` finds a task when no local file is given."""

    path: str
    config: str | None = None
    revision: str | None = None


class Task(ABC):
    """One task: its prompt template, how it is scored, and where its data lives.

    Attributes:
        name: registry name ("sst2", "rte", ...).
        kind: how samples are scored.
        metric: the headline metric: "accuracy" (classification, multiple choice) or "f1".
        hub: the Hugging Face dataset used when no local file is given (None: local files only).
        local_names: per split, the conventional file names looked for in a data directory.
        folder_names: sub-folders of a data directory that may hold the task (e.g. "RTE").
    """

    name: ClassVar[str]
    kind: TaskKind
    metric: str
    hub: ClassVar[HubSource | None] = None
    local_names: ClassVar[Mapping[str, tuple[str, ...]]] = MappingProxyType({})
    folder_names: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[str, ...]] = ()  # keyword arguments `get_task` may pass

    @abstractmethod
    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        """Turn one dataset row into its sample(s).

        Raises:
            KeyError: a required field is missing; the key is the field's dotted path.
            ValueError: a field has a value the task cannot use; the message names field and value.
        """

    def rows_from_json(self, document: Any) -> list[Any]:
        """The rows of a whole-file JSON document: a list of rows, ``{"data": [rows]}``, or one row.

        Tasks whose official release is a nested JSON document (SQuAD, DROP) flatten it here.
        """
        if isinstance(document, list):
            return document
        if isinstance(document, dict) and isinstance(document.get("data"), list):
            return document["data"]
        return [document]

    def local_file(self, split: str, directory: Path) -> Path | None:
        """The file holding ``split`` in ``directory``, or None.

        Tries the task's conventional names, then ``<split>.<ext>`` (also ``val``/``dev`` for
        validation) for every supported format.
        """
        for name in self.candidate_names(split):
            if (directory / name).is_file():
                return directory / name
        return None

    def candidate_names(self, split: str) -> list[str]:
        """File names `local_file` tries for ``split``, in order."""
        generic = [f"{stem}.{ext}" for stem in _GENERIC_STEMS[split] for ext in FILE_FORMATS]
        names = list(self.local_names.get(split, ()))
        return names + [n for n in generic if n not in names]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind.value})"


# Row helpers shared by the templates ---------------------------------------------------------------


def field(row: Mapping[str, Any], name: str, where: str = "") -> Any:
    """``row[name]``; raises KeyError(``where + name``) when it is absent or null."""
    if not isinstance(row, Mapping) or row.get(name) is None:
        raise KeyError(where + name)
    return row[name]


def text(row: Mapping[str, Any], name: str, where: str = "") -> str:
    """A text field, whitespace-stripped; raises ValueError when it holds something else."""
    value = field(row, name, where)
    if not isinstance(value, str):
        raise ValueError(f"`{where}{name}` should be text, got {value!r}")
    return value.strip()


def label_index(value: Any, names: Sequence[str], path: str = "label") -> int:
    """Index of a label given as an index (1, "1"), a name (any case), or a bool for false/true tasks.

    Args:
        value: the label as stored in the row.
        names: ``names[i]`` is the name of label i.
        path: the field's name, for the error message.

    Raises:
        ValueError: the value matches no label.
    """
    lowered = [n.lower() for n in names]
    if isinstance(value, bool):
        if lowered == ["false", "true"]:
            return int(value)
    elif isinstance(value, (int, float)):
        if float(value).is_integer() and 0 <= value < len(names):
            return int(value)
    elif isinstance(value, str):
        stripped = value.strip()
        if re.fullmatch(r"\d+", stripped) and int(stripped) < len(names):
            return int(stripped)
        if stripped.lower() in lowered:
            return lowered.index(stripped.lower())
    allowed = ", ".join([*map(str, range(len(names))), *map(repr, names)])
    raise ValueError(f"unknown `{path}` value {value!r}: expected one of {allowed}")
