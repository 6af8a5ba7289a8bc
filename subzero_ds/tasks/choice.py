"""Multiple-choice tasks: COPA and ReCoRD, where each candidate is its own continuation."""

from __future__ import annotations

import re
from typing import Any, Mapping

from .base import Sample, Task, TaskKind, field, label_index, text
from .classification import SUPERGLUE_FILES, superglue

PLACEHOLDER = "@placeholder"


class COPA(Task):
    """SuperGLUE COPA: which alternative is the cause (" because") or effect (" so") of the premise?

    Prompt: the premise without its final period + " because" / " so". Candidates: each choice with
    its first letter lowercased, as it continues the sentence — except "I", "I'm"-style words and
    acronyms, which keep their capitals (MeZO keeps "I"; it would also lowercase "I'm" to "i'm").
    """

    name = "copa"
    kind = TaskKind.MULTIPLE_CHOICE
    metric = "accuracy"
    hub = superglue("copa")
    local_names = SUPERGLUE_FILES
    folder_names = ("COPA", "copa")
    conjunctions = {"cause": " because", "effect": " so"}

    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        question = text(row, "question")
        if question not in self.conjunctions:
            raise ValueError(f"unknown `question` value {question!r}: expected 'cause' or 'effect'")
        premise = text(row, "premise").removesuffix(".")
        candidates = tuple(" " + _continue_sentence(text(row, choice)) for choice in ("choice1", "choice2"))
        gold = label_index(field(row, "label"), ("choice1", "choice2"))
        return [Sample(premise + self.conjunctions[question], candidates, gold)]


def _continue_sentence(sentence: str) -> str:
    """``sentence`` as the continuation of another: first letter lowercased unless "I…" or an acronym."""
    first_word = sentence.split(" ", 1)[0]
    if first_word == "I" or first_word.startswith("I'") or first_word[1:2].isupper():
        return sentence
    return sentence[:1].lower() + sentence[1:]


class ReCoRD(Task):
    """SuperGLUE ReCoRD: which passage entity fills ``@placeholder`` in the query?

    Prompt: the passage, its ``@highlight`` lines as "- " bullets, then "- " and the query up to the
    last whitespace before the placeholder. Candidates: " " + the rest of the query with each
    distinct entity filled in (MeZO's GPT-3 style template, with the shared query prefix moved into
    the prompt). Gold: the first answer (in the row's order) that is among the entities — a row may
    list several surface forms of the right entity; the others count as wrong candidates.

    Accepts the official nested rows (``passage.text``, ``passage.entities[{start, end}]`` with
    inclusive ends, ``qas[{query, answers}]``: one sample per query) and the HF flat rows
    (``passage``, ``query``, ``entities``, ``answers`` as lists of strings).
    """

    name = "record"
    kind = TaskKind.MULTIPLE_CHOICE
    metric = "accuracy"
    hub = superglue("record")
    local_names = SUPERGLUE_FILES
    folder_names = ("ReCoRD", "record")

    def to_samples(self, row: Mapping[str, Any]) -> list[Sample]:
        passage = field(row, "passage")
        if not isinstance(passage, Mapping):  # HF flat schema
            entities = [str(e) for e in field(row, "entities")]
            return [self._sample(text(row, "passage"), entities, text(row, "query"), list(field(row, "answers")), "")]
        passage_text = field(passage, "text", "passage.")
        entities = []
        for i, span in enumerate(field(passage, "entities", "passage.")):
            where = f"passage.entities[{i}]."
            entities.append(passage_text[int(field(span, "start", where)) : int(field(span, "end", where)) + 1])
        samples = []
        for i, qa in enumerate(field(row, "qas")):
            where = f"qas[{i}]."
            answers = [text(answer, "text", f"{where}answers[{j}].")
                       for j, answer in enumerate(field(qa, "answers", where))]
            samples.append(self._sample(passage_text.strip(), entities, text(qa, "query", where), answers, where))
        return samples

    def _sample(self, passage: str, entities: list[str], query: str, answers: list[str], where: str) -> Sample:
        entities = list(dict.fromkeys(e.strip() for e in entities if e.strip()))
        if PLACEHOLDER not in query:
            raise ValueError(f"`{where}query` has no {PLACEHOLDER}: {query!r}")
        before, after = query.split(PLACEHOLDER, 1)
        # Cut at the last whitespace before the placeholder so that candidates keep their leading space.
        cut = re.fullmatch(r"(.*?)\s*\s(\S*)", before, flags=re.DOTALL)
        head, lead = (cut[1], cut[2]) if cut else ("", before)
        gold = next((entities.index(a.strip()) for a in answers if a.strip() in entities), None)
        if gold is None:
            raise ValueError(f"none of the `{where}answers` {answers!r} is among the passage's entities")
        bullets = passage.replace("@highlight\n", "- ")
        prompt = f"{bullets}\n- {head}".rstrip()
        candidates = tuple(f" {lead}{entity}{after.replace(PLACEHOLDER, entity)}" for entity in entities)
        return Sample(prompt, candidates, gold)
