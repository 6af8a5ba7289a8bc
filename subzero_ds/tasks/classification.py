"""Classification tasks: SST-2 and the SuperGLUE label tasks, with MeZO's prompts.

Each label is verbalized as one continuation (" Yes", " great"); the model picks the most likely.
Rows may follow the official SuperGLUE JSONL release (FewGLUE uses the same fields) or the
Hugging Face ``super_glue`` schema; labels may be names ("entailment"), indices or booleans.
"""

from __future__ import annotations

import csv
from abc import abstractmethod
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..distributed import log
from .base import DataError, HubSource, Sample, Task, TaskKind, field, label_index, text

SUPERGLUE_FILES = MappingProxyType({
    "train": ("train.jsonl",),
    # val.jsonl is the official validation set; FewGLUE's dev32.jsonl stands in where it is absent (ReCoRD).
    "validation": ("val.jsonl", "validation.jsonl", "dev32.jsonl"),
    "test": ("test.jsonl",),
})


def superglue(config: str) -> HubSource:
    """The Hugging Face copy of SuperGLUE task ``config`` (its Parquet export: datasets>=4 runs no scripts)."""
    return HubSource("aps/super_glue", config, revision="refs/convert/parquet")


class LabelTask(Task):
    """A task whose row has one prompt and one label, verbalized by a fixed word per label.

    Subclasses set ``label_names`` (label i's name in the data) and ``verbalizers`` (candidate i).
    """

    kind = TaskKind.CLASSIFICATION
    metric = "accuracy"
    label_names: tuple[str, ...]
    verbalizers: tuple[str, ...]
    local_names = SUPERGLUE_FILES

    @abstractmethod
    def prompt(self, row: Mapping[str, Any]) -> str:
        """The prompt of ``row``, ending where the label word starts."""

    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        gold = label_index(field(row, "label"), self.label_names)
        return [Sample(self.prompt(row), self.verbalizers, gold)]


class SST2(LabelTask):
    """GLUE SST-2 sentiment: ``<sentence> It was`` → " terrible" / " great".

    Local files (``data_dir``): ``train.tsv`` is the training split and ``test.tsv`` the test split.
    For validation, ``dev.tsv`` as in the GLUE release — except when ``test.tsv`` has a ``label``
    column: then the directory follows the LM-BFF/ALPS layout (as in ``shared/data/sst2``), where
    ``test.tsv`` is the labelled GLUE validation set and ``dev.tsv`` is carved out of GLUE train,
    so validation reads ``test.tsv``. GLUE's own test.tsv has no labels.
    """

    name = "sst2"
    label_names = ("negative", "positive")
    verbalizers = (" terrible", " great")
    hub = HubSource("nyu-mll/glue", "sst2")
    local_names = MappingProxyType({"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)})
    folder_names = ("SST-2", "sst2", "SST2")

    def prompt(self, row: Mapping[str, Any]) -> str:
        return f"{text(row, 'sentence')} It was"

    def local_file(self, split: str, directory: Path) -> Path | None:
        labelled_test = directory / "test.tsv"
        if split == "validation" and labelled_test.is_file() and _has_column(labelled_test, "label"):
            log(f"sst2: {labelled_test} has labels (LM-BFF layout): using it as the validation split")
            return labelled_test
        return super().local_file(split, directory)


def _has_column(tsv: Path, column: str) -> bool:
    try:
        with tsv.open(newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{tsv} cannot be read as a .tsv file ({error}): re-save it as UTF-8 text "
                        "with a header row") from None
    return column in header


class RTE(LabelTask):
    """SuperGLUE RTE: does the premise entail the hypothesis? → " Yes" / " No"."""

    name = "rte"
    label_names = ("entailment", "not_entailment")
    verbalizers = (" Yes", " No")
    hub = superglue("rte")
    folder_names = ("RTE", "rte")

    def prompt(self, row: Mapping[str, Any]) -> str:
        return f"{text(row, 'premise')}\nDoes this mean that \"{text(row, 'hypothesis')}\" is true? Yes or No?"


class CB(LabelTask):
    """SuperGLUE CommitmentBank: three-way entailment → " Yes" / " No" / " Maybe"."""

    name = "cb"
    label_names = ("entailment", "contradiction", "neutral")
    verbalizers = (" Yes", " No", " Maybe")
    hub = superglue("cb")
    folder_names = ("CB", "cb")

    def prompt(self, row: Mapping[str, Any]) -> str:
        return f"Suppose {text(row, 'premise')} Can we infer that \"{text(row, 'hypothesis')}\"? Yes, No, or Maybe?"


class BoolQ(LabelTask):
    """SuperGLUE BoolQ: a yes/no question about a passage → " No" / " Yes".

    As in MeZO, the question is capitalized and gets a question mark if it lacks one.
    """

    name = "boolq"
    label_names = ("false", "true")
    verbalizers = (" No", " Yes")
    hub = superglue("boolq")
    folder_names = ("BoolQ", "boolq")

    def prompt(self, row: Mapping[str, Any]) -> str:
        question = text(row, "question")
        if not question.endswith("?"):
            question += "?"
        return f"{text(row, 'passage')} {question[:1].upper()}{question[1:]}"


class WSC(LabelTask):
    """SuperGLUE Winograd Schema: does the pronoun refer to the noun phrase? → " No" / " Yes".

    Span texts live under ``target`` in the official release, at the top level in the HF schema.
    The pronoun is lowercased, as in MeZO.
    """

    name = "wsc"
    label_names = ("false", "true")
    verbalizers = (" No", " Yes")
    hub = superglue("wsc.fixed")
    folder_names = ("WSC", "wsc")

    def prompt(self, row: Mapping[str, Any]) -> str:
        spans, where = (field(row, "target"), "target.") if "target" in row else (row, "")
        pronoun, noun = text(spans, "span2_text", where), text(spans, "span1_text", where)
        return (f"{text(row, 'text')}\nIn the previous sentence, does the pronoun \"{pronoun.lower()}\" "
                f"refer to {noun}? Yes or No?")


class WiC(LabelTask):
    """SuperGLUE Words in Context: same sense of the word in both sentences? → " No" / " Yes"."""

    name = "wic"
    label_names = ("false", "true")
    verbalizers = (" No", " Yes")
    hub = superglue("wic")
    folder_names = ("WiC", "wic")

    def prompt(self, row: Mapping[str, Any]) -> str:
        return (f"Does the word \"{text(row, 'word')}\" have the same meaning in these two sentences? Yes, No?\n"
                f"{text(row, 'sentence1')}\n{text(row, 'sentence2')}")


class MultiRC(Task):
    """SuperGLUE MultiRC: one sample per answer option — is this answer correct? → " No" / " Yes".

    Accepts the official nested rows (``passage.text``, ``passage.questions[].answers[]``; one row
    per passage, many samples) and the HF flat rows (``paragraph``, ``question``, ``answer``, ``label``).
    """

    name = "multirc"
    kind = TaskKind.CLASSIFICATION
    metric = "accuracy"
    hub = superglue("multirc")
    local_names = SUPERGLUE_FILES
    folder_names = ("MultiRC", "multirc")
    verbalizers = (" No", " Yes")

    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        if not isinstance(row.get("passage"), Mapping):  # HF flat schema: one row, one answer option
            return [self._sample(text(row, "paragraph"), text(row, "question"), text(row, "answer"),
                                 field(row, "label"), "label")]
        passage = field(row, "passage")
        paragraph = text(passage, "text", "passage.")
        samples = []
        for q, question in enumerate(field(passage, "questions", "passage.")):
            where = f"passage.questions[{q}]."
            for a, answer in enumerate(field(question, "answers", where)):
                at = f"{where}answers[{a}]."
                samples.append(self._sample(paragraph, text(question, "question", where), text(answer, "text", at),
                                            field(answer, "label", at), at + "label"))
        return samples

    def _sample(self, paragraph: str, question: str, answer: str, label: Any, label_path: str) -> Sample:
        prompt = f"{paragraph}\nQuestion: {question}\nI found this answer \"{answer}\". Is that correct? Yes or No?"
        return Sample(prompt, self.verbalizers, label_index(label, ("false", "true"), label_path))
