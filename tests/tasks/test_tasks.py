"""Task templates, the local/hub loader and its errors (subzero_ds/tasks)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from subzero_ds.tasks import TASK_NAMES, DataError, Sample, TaskKind, get_task, load_samples

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "superglue").is_dir(),
    reason=f"real data not present at {SHARED_DATA} (see shared/data/README.md)",
)


def one(task_name: str, row: dict, **options) -> Sample:
    (sample,) = get_task(task_name, **options).to_samples(row)
    return sample


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Templates on hand-written rows -------------------------------------------------------------------


def test_sst2_template_strips_the_sentence_and_reads_string_labels():
    sample = one("sst2", {"sentence": "a gripping , heartfelt film ", "label": "1"})
    assert sample == Sample("a gripping , heartfelt film It was", (" terrible", " great"), 1)
    assert sample.target == " great"
    assert one("sst2", {"sentence": "dull", "label": 0}).gold == 0


@pytest.mark.parametrize("label, gold", [("entailment", 0), ("not_entailment", 1), (0, 0), (1, 1)])
def test_rte_template(label, gold):
    sample = one("rte", {"premise": "Cats purr.", "hypothesis": "Cats make sounds.", "label": label})
    assert sample.prompt == 'Cats purr.\nDoes this mean that "Cats make sounds." is true? Yes or No?'
    assert sample.candidates == (" Yes", " No")
    assert sample.gold == gold


def test_cb_template():
    sample = one("cb", {"premise": "It may rain.", "hypothesis": "it rains", "label": "neutral"})
    assert sample.prompt == 'Suppose It may rain. Can we infer that "it rains"? Yes, No, or Maybe?'
    assert sample.candidates == (" Yes", " No", " Maybe")
    assert sample.gold == 2


@pytest.mark.parametrize("label, gold", [(True, 1), (False, 0), ("False", 0), ("true", 1), (1, 1)])
def test_boolq_template_capitalizes_the_question_and_adds_a_question_mark(label, gold):
    sample = one("boolq", {"passage": "The sky is blue.", "question": "is the sky blue", "label": label})
    assert sample.prompt == "The sky is blue. Is the sky blue?"
    assert sample.candidates == (" No", " Yes")
    assert sample.gold == gold


def test_wsc_template_reads_official_and_hf_span_fields():
    text = "The trophy didn't fit in the suitcase because It was too big."
    official = {"text": text, "target": {"span1_text": "The trophy", "span2_text": "It"}, "label": True}
    flat = {"text": text, "span1_text": "The trophy", "span2_text": "It", "label": 1}
    expected = Sample(
        f'{text}\nIn the previous sentence, does the pronoun "it" refer to The trophy? Yes or No?', (" No", " Yes"), 1
    )
    assert one("wsc", official) == expected
    assert one("wsc", flat) == expected


def test_wic_template():
    sample = one("wic", {"word": "bank", "sentence1": "A river bank.", "sentence2": "A bank loan.", "label": False})
    assert sample.prompt == (
        'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nA river bank.\nA bank loan.'
    )
    assert (sample.candidates, sample.gold) == ((" No", " Yes"), 0)


def test_multirc_gives_one_sample_per_answer_option():
    row = {"passage": {"text": "Tom has a cat. ", "questions": [
        {"question": "What does Tom have?", "answers": [{"text": "A cat", "label": 1}, {"text": "A dog", "label": 0}]},
        {"question": "Who has a cat?", "answers": [{"text": "Tom", "label": 1}]},
    ]}}
    samples = get_task("multirc").to_samples(row)
    assert [s.gold for s in samples] == [1, 0, 1]
    assert samples[1].prompt == (
        'Tom has a cat.\nQuestion: What does Tom have?\nI found this answer "A dog". Is that correct? Yes or No?'
    )
    assert all(s.candidates == (" No", " Yes") for s in samples)
    flat = {"paragraph": "Tom has a cat.", "question": "What does Tom have?", "answer": "A dog", "label": 0}
    assert one("multirc", flat) == samples[1]


def test_copa_template_joins_premise_and_lowercased_choice():
    cause = {"premise": "The man fell.", "choice1": "He slipped on ice.", "choice2": "He won a prize.",
             "question": "cause", "label": 0}
    assert one("copa", cause) == Sample("The man fell because", (" he slipped on ice.", " he won a prize."), 0)
    effect = {"premise": "I was hungry.", "choice1": "I ate.", "choice2": "TV news was on.",
              "question": "effect", "label": "1"}
    assert one("copa", effect) == Sample("I was hungry so", (" I ate.", " TV news was on."), 1)
    assert get_task("copa").kind is TaskKind.MULTIPLE_CHOICE


def test_record_official_row_fills_each_distinct_entity():
    text = "Bob met Ann in Paris. Ann left.\n@highlight\nBob meets Ann"
    spans = [(0, 2), (8, 10), (15, 19), (22, 24)]  # Bob, Ann, Paris, Ann again (inclusive ends)
    row = {"passage": {"text": text, "entities": [{"start": s, "end": e} for s, e in spans]},
           "qas": [{"query": "Later, @placeholder went home.", "answers": [{"start": 8, "end": 10, "text": "Ann"}]},
                   {"query": "@placeholder said hi.", "answers": [{"start": 0, "end": 2, "text": "Bob"}]}]}
    first, second = get_task("record").to_samples(row)
    assert first.prompt == "Bob met Ann in Paris. Ann left.\n- Bob meets Ann\n- Later,"
    assert first.candidates == (" Bob went home.", " Ann went home.", " Paris went home.")
    assert first.gold == 1
    assert second.prompt == "Bob met Ann in Paris. Ann left.\n- Bob meets Ann\n-"
    assert (second.candidates[0], second.gold) == (" Bob said hi.", 0)


def test_record_hf_row_takes_the_first_answer_among_entities_and_fills_every_placeholder():
    row = {"passage": "Ann met Ann Lee.", "query": "They chant 'live @placeholder', '@placeholder!'",
           "entities": ["Ann", "Ann Lee"], "answers": ["Lee", "Ann Lee", "Ann"]}
    sample = one("record", row)
    assert sample.prompt == "Ann met Ann Lee.\n- They chant 'live"
    assert sample.candidates == (" Ann', 'Ann!'", " Ann Lee', 'Ann Lee!'")
    assert sample.gold == 1
    quoted = one("record", dict(row, query="They chant '@placeholder'."))
    assert (quoted.prompt, quoted.candidates[0]) == ("Ann met Ann Lee.\n- They chant", " 'Ann'.")


def test_squad_template_dedupes_answers_in_order():
    row = {"title": "Rome", "context": "Rome is in Italy.", "question": "Where is Rome? ",
           "answers": {"text": ["Italy", "in Italy", "Italy"], "answer_start": [11, 8, 11]}}
    sample = one("squad", row)
    assert sample.prompt == "Title: Rome\nContext: Rome is in Italy.\nQuestion: Where is Rome?\nAnswer:"
    assert (sample.candidates, sample.gold, sample.answers) == ((), None, ("Italy", "in Italy"))
    assert sample.target == " Italy"
    assert get_task("squad").metric == "f1"


def test_drop_template_reads_hf_spans_and_official_number_date_and_spans():
    hf = {"passage": "Two goals.", "question": "How many goals?", "answers_spans": {"spans": ["2", "two"]}}
    sample = one("drop", hf)
    assert sample.prompt == "Passage: Two goals.\nQuestion: How many goals?\nAnswer:"
    assert sample.answers == ("2", "two")
    number = {"passage": "P", "question": "Q", "answer": {"number": "7", "date": {}, "spans": []},
              "validated_answers": [{"number": "", "date": {"day": "", "month": "", "year": ""}, "spans": ["seven"]}]}
    assert one("drop", number).answers == ("7", "seven")
    date = {"passage": "P", "question": "Q", "answer": {"number": "", "spans": [],
                                                        "date": {"day": "4", "month": "July", "year": "1776"}}}
    assert one("drop", date).answers == ("4 July 1776",)


def test_custom_classification_uses_label_words_and_template():
    task = get_task("custom", label_words=["negative", "positive"])
    assert (task.kind, task.metric) == (TaskKind.CLASSIFICATION, "accuracy")
    expected = Sample("Loved it. It was", (" negative", " positive"), 1)
    assert task.to_samples({"text": "Loved it. ", "label": 1}) == [expected]
    assert task.to_samples({"text": "Meh", "label": "negative"})[0].gold == 0
    titled = get_task("custom", label_words=["no", "yes"], template="{title}: {text}\nAnswer: ")
    assert titled.to_samples({"title": "Q", "text": "Is it?", "label": "yes"})[0].prompt == "Q: Is it?\nAnswer:"


def test_custom_generation_schema():
    task = get_task("custom")
    assert task.kind is TaskKind.GENERATION
    sample = task.to_samples({"prompt": "2+2=", "completion": " 4\n"})[0]
    assert (sample.prompt, sample.answers, sample.target) == ("2+2=", ("4",), " 4")


def test_sample_rejects_a_prompt_ending_in_whitespace_and_a_gold_out_of_range():
    with pytest.raises(ValueError, match="whitespace"):
        Sample("It was ", (" great",), 0)
    with pytest.raises(ValueError, match="gold 2"):
        Sample("It was", (" bad", " great"), 2)
    with pytest.raises(ValueError, match="start with a space"):
        Sample("It was", ("great",), 0)


def test_get_task_is_case_insensitive_and_lists_names_when_unknown():
    assert get_task("RTE").name == "rte"
    assert TASK_NAMES == ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop",
                          "custom")
    with pytest.raises(DataError, match="unknown task 'mnli'") as error:
        get_task("mnli")
    assert all(name in str(error.value) for name in TASK_NAMES)
    with pytest.raises(DataError, match="takes no options; got `label_words`"):
        get_task("rte", label_words=["a", "b"])
    with pytest.raises(DataError, match="label_words"):
        get_task("custom", label_words=["same", "same"])


# Real data in ../shared/data -----------------------------------------------------------------------

REAL_SETS = [  # task, folder, split, samples, gold counts
    ("rte", "RTE", "validation", 277, {0: 146, 1: 131}),
    ("cb", "CB", "validation", 56, {0: 23, 1: 28, 2: 5}),
    ("boolq", "BoolQ", "validation", 3270, {0: 1237, 1: 2033}),
    ("wsc", "WSC", "validation", 104, {0: 66, 1: 38}),
    ("wic", "WiC", "validation", 638, {0: 319, 1: 319}),
    ("copa", "COPA", "validation", 100, {0: 55, 1: 45}),
    ("multirc", "MultiRC", "validation", 4848, {0: 2773, 1: 2075}),
    ("rte", "RTE", "train", 32, {0: 13, 1: 19}),
    ("multirc", "MultiRC", "train", 154, {0: 86, 1: 68}),
    ("record", "ReCoRD", "train", 32, None),
]


@needs_shared_data
@pytest.mark.parametrize("name, folder, split, count, golds", REAL_SETS)
def test_real_superglue_files(name, folder, split, count, golds):
    samples = load_samples(get_task(name), split, data_dir=SHARED_DATA / "superglue" / folder)
    assert len(samples) == count
    assert all(s.gold is not None and 0 <= s.gold < len(s.candidates) for s in samples)
    if golds is not None:
        assert dict(Counter(s.gold for s in samples)) == golds


@needs_shared_data
def test_real_data_dir_may_be_the_superglue_root_and_record_validation_falls_back_to_dev32():
    assert len(load_samples(get_task("rte"), "validation", data_dir=SHARED_DATA / "superglue")) == 277
    record = load_samples(get_task("record"), "validation", data_dir=SHARED_DATA / "superglue" / "ReCoRD")
    assert len(record) == 32 and all(len(s.candidates) > 1 for s in record)


@needs_shared_data
def test_real_sst2_validation_is_the_labelled_test_tsv():
    samples = load_samples(get_task("sst2"), "validation", data_dir=SHARED_DATA / "sst2")
    assert len(samples) == 872
    assert Counter(s.gold for s in samples) == {1: 444, 0: 428}
    train = load_samples(get_task("sst2"), "train", data_dir=SHARED_DATA / "sst2", limit=1000, seed=0)
    assert len(train) == 1000 and {s.gold for s in train} == {0, 1}


@needs_shared_data
def test_limit_on_real_data_is_deterministic_and_seeded():
    task, path = get_task("boolq"), SHARED_DATA / "superglue" / "BoolQ" / "val.jsonl"
    first = load_samples(task, "validation", file=path, limit=100, seed=1)
    assert first == load_samples(task, "validation", file=path, limit=100, seed=1)
    assert first != load_samples(task, "validation", file=path, limit=100, seed=2)
    assert len(first) == 100 and set(first) <= set(load_samples(task, "validation", file=path))


# Local formats --------------------------------------------------------------------------------------

RTE_ROWS = [{"premise": f"P{i}.", "hypothesis": f"H{i}.", "label": ["entailment", "not_entailment"][i % 2]}
            for i in range(5)]


@pytest.mark.parametrize("suffix", ["jsonl", "json-list", "json-lines", "csv", "tsv", "parquet"])
def test_every_local_format_gives_the_same_samples(tmp_path, suffix):
    frame = pd.DataFrame(RTE_ROWS)
    if suffix == "jsonl":
        path = write_jsonl(tmp_path / "train.jsonl", RTE_ROWS)
    elif suffix == "json-list":
        path = tmp_path / "train.json"
        path.write_text(json.dumps({"data": RTE_ROWS}))
    elif suffix == "json-lines":
        path = write_jsonl(tmp_path / "train.json", RTE_ROWS)
    elif suffix == "csv":
        path = tmp_path / "train.csv"
        frame.to_csv(path, index=False)
    elif suffix == "tsv":
        path = tmp_path / "train.tsv"
        frame.to_csv(path, sep="\t", index=False)
    else:
        path = tmp_path / "train.parquet"
        frame.to_parquet(path)
    samples = load_samples(get_task("rte"), "train", file=path)
    assert [s.gold for s in samples] == [0, 1, 0, 1, 0]
    assert samples[3].prompt == 'P3.\nDoes this mean that "H3." is true? Yes or No?'
    assert load_samples(get_task("rte"), "train", data_dir=tmp_path) == samples


def test_csv_keeps_quoted_commas_and_tsv_keeps_quote_characters(tmp_path):
    (tmp_path / "a.csv").write_text('sentence,label\n"slow, then great",1\n')
    (tmp_path / "b.tsv").write_text('sentence\tlabel\n"a film" that works\t1\n')
    assert load_samples(get_task("sst2"), "train", file=tmp_path / "a.csv")[0].prompt == "slow, then great It was"
    assert load_samples(get_task("sst2"), "train", file=tmp_path / "b.tsv")[0].prompt == '"a film" that works It was'


def test_squad_official_nested_json_is_flattened(tmp_path):
    document = {"version": "1.1", "data": [{"title": "Rome", "paragraphs": [{"context": "Rome is in Italy.", "qas": [
        {"id": "a", "question": "Where is Rome?", "answers": [{"text": "Italy", "answer_start": 11},
                                                               {"text": "Italy", "answer_start": 11}]},
        {"id": "b", "question": "What is in Italy?", "answers": [{"text": "Rome", "answer_start": 0}]},
    ]}]}]}
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(document))
    samples = load_samples(get_task("squad"), "validation", data_dir=tmp_path)
    assert [s.answers for s in samples] == [("Italy",), ("Rome",)]
    assert samples[1].prompt == "Title: Rome\nContext: Rome is in Italy.\nQuestion: What is in Italy?\nAnswer:"


def test_drop_official_json_and_hf_jsonl(tmp_path):
    official = {"nfl_1": {"passage": "Two goals.", "qa_pairs": [
        {"question": "How many goals?", "query_id": "q1", "answer": {"number": "2", "date": {}, "spans": []}},
        {"question": "What was scored?", "query_id": "q2", "answer": {"number": "", "date": {}, "spans": ["goals"]}},
    ]}}
    (tmp_path / "drop_dataset_dev.json").write_text(json.dumps(official))
    samples = load_samples(get_task("drop"), "validation", data_dir=tmp_path)
    assert [s.answers for s in samples] == [("2",), ("goals",)]
    hf = write_jsonl(tmp_path / "hf.jsonl", [{"passage": "P", "question": "Q", "answers_spans": {"spans": ["x"]}}])
    assert load_samples(get_task("drop"), "train", file=hf)[0].answers == ("x",)


def test_custom_jsonl_in_both_schemas(tmp_path):
    labelled = write_jsonl(tmp_path / "cls.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": "no"}])
    samples = load_samples(get_task("custom", label_words=["no", "yes"]), "train", file=labelled)
    assert [(s.prompt, s.gold) for s in samples] == [("good It was", 1), ("bad It was", 0)]
    generation = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Q: 1+1?\nA:", "completion": "2"}])
    assert load_samples(get_task("custom"), "train", file=generation)[0].target == " 2"


def test_sst2_validation_is_dev_tsv_when_test_tsv_has_no_labels(tmp_path):
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    (tmp_path / "test.tsv").write_text("index\tsentence\n0\tunlabelled\n")
    assert load_samples(get_task("sst2"), "validation", data_dir=tmp_path)[0].prompt == "fine It was"
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nlabelled\t0\n")
    assert load_samples(get_task("sst2"), "validation", data_dir=tmp_path)[0].prompt == "labelled It was"


def test_limit_keeps_a_seeded_subset_of_the_right_size(tmp_path):
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(50)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    task = get_task("sst2")
    everything = load_samples(task, "train", file=path)
    subset = load_samples(task, "train", file=path, limit=10, seed=3)
    assert len(subset) == 10 and len(set(subset)) == 10 and set(subset) <= set(everything)
    assert subset == load_samples(task, "train", file=path, limit=10, seed=3)
    assert subset != load_samples(task, "train", file=path, limit=10, seed=4)
    assert subset != everything[:10]
    assert sorted(load_samples(task, "train", file=path, limit=500), key=everything.index) == everything


# Errors ---------------------------------------------------------------------------------------------


def test_missing_file_names_the_path_and_the_flag(tmp_path):
    with pytest.raises(DataError, match="does not exist: check the path given as --train_file") as error:
        load_samples(get_task("rte"), "train", file=tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(error.value)


def test_missing_file_in_data_dir_lists_the_names_tried(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", RTE_ROWS)
    with pytest.raises(DataError, match="no validation file for task rte") as error:
        load_samples(get_task("rte"), "validation", data_dir=tmp_path)
    assert "val.jsonl" in str(error.value) and "train.jsonl" in str(error.value)


def test_empty_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="train.jsonl has no rows"):
        load_samples(get_task("rte"), "train", data_dir=tmp_path)


def test_missing_field_names_file_row_and_field(tmp_path):
    rows = [dict(r) for r in RTE_ROWS]
    del rows[2]["hypothesis"]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_samples(get_task("rte"), "train", file=path)
    message = str(error.value)
    assert "rows.jsonl, row 3:" in message and "missing field `hypothesis`" in message and "`premise`" in message


def test_missing_field_in_a_nested_row_names_its_path(tmp_path):
    row = {"passage": {"text": "T", "questions": [{"question": "Q", "answers": [{"text": "A"}]}]}}
    path = write_jsonl(tmp_path / "multirc.jsonl", [row])
    with pytest.raises(DataError, match=r"row 1: missing field `passage.questions\[0\].answers\[0\].label`"):
        load_samples(get_task("multirc"), "train", file=path)


def test_missing_cell_in_tsv_gives_row_and_line(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t1\nb\t0\nc\n")
    with pytest.raises(DataError, match=r"train.tsv, row 3 \(line 4\): missing field `label`"):
        load_samples(get_task("sst2"), "train", data_dir=tmp_path)


def test_unknown_label_value(tmp_path):
    rows = [dict(RTE_ROWS[0]), dict(RTE_ROWS[1], label="maybe")]
    path = write_jsonl(tmp_path / "rte.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_samples(get_task("rte"), "train", file=path)
    message = str(error.value)
    assert "rte.jsonl, row 2:" in message and "unknown `label` value 'maybe'" in message
    assert "'not_entailment'" in message  # lists the accepted values


def test_custom_schema_mismatch_names_the_row_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "good", "label": 1}])
    with pytest.raises(DataError, match=r"row 1: .*found `text`, `label`.*pass --label_words"):
        load_samples(get_task("custom"), "train", file=path)
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "good", "label": 1}, {"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"m.jsonl, row 2: .*found `prompt`, `completion`"):
        load_samples(get_task("custom", label_words=["no", "yes"]), "train", file=mixed)


def test_invalid_json_line_and_unsupported_extension(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(RTE_ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl, line 2: not valid JSON"):
        load_samples(get_task("rte"), "train", file=tmp_path / "bad.jsonl")
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'"):
        load_samples(get_task("rte"), "train", file=tmp_path / "rows.txt")


def test_unreachable_hub_says_to_pass_local_files(monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="--data_dir DIR .* or --validation_file FILE"):
        load_samples(get_task("rte"), "validation")
    assert calls == [(("aps/super_glue", "rte"), {"split": "validation", "revision": "refs/convert/parquet"})]
    with pytest.raises(DataError, match="task 'custom' has no hub dataset"):
        load_samples(get_task("custom"), "train")


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_samples(get_task("rte"), "dev", file="x.jsonl")
