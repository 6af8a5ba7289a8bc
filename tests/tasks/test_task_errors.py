"""Bad data, generated: every wrong data file or over-long example gets one clear DataError.

The properties: the message names the file and the row (or line) and what is wrong with it, or
the example and --max_length; any file gives samples or such an error, never another exception.
The same files through the command line: tests/cli/test_cli_errors.py.
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers.bad_input import FAST, SLOW, json_values
from subzero_ds.tasks.encoding import SampleEncoder, check_examples
from subzero_ds.tasks import DataError, Sample, find_local_file, get_task, load_samples

# Data files --------------------------------------------------------------------------------------

SST2 = get_task("sst2")
RTE = get_task("rte")
CUSTOM = get_task("custom", label_words=["bad", "good"])
VALID_ROWS = [
    (SST2, {"sentence": "a fine film", "label": 1}),
    (RTE, {"premise": "It rains.", "hypothesis": "It is wet.", "label": "entailment"}),
    (CUSTOM, {"text": "a fine film", "label": "good"}),
]
words = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=12)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@FAST
@given(st.sampled_from(VALID_ROWS), st.data(), st.integers(min_value=0, max_value=5))
def test_a_missing_field_names_file_row_and_field(tmp_path_factory, task_row, data, good_rows):
    task, row = task_row
    missing = data.draw(st.sampled_from(sorted(row)))
    bad = {k: v for k, v in row.items() if k != missing}
    path = write_jsonl(tmp_path_factory.mktemp("d") / "train.jsonl", [row] * good_rows + [bad])
    with pytest.raises(DataError) as caught:
        load_samples(task, "train", file=path)
    message = str(caught.value)
    assert f"{path}, row {good_rows + 1}" in message and f"`{missing}`" in message


LABEL_NAMES = {SST2: ("negative", "positive"), RTE: ("entailment", "not_entailment"), CUSTOM: ("bad", "good")}


def expected_label(value, names):
    """The label index a row's ``value`` means (an index, its digits, a name in any case, a bool for
    false/true labels), or None: written from the data docs, not from the loader."""
    if isinstance(value, bool):
        return int(value) if [n.lower() for n in names] == ["false", "true"] else None
    if isinstance(value, (int, float)):
        return int(value) if value == value and float(value).is_integer() and 0 <= value < len(names) else None
    if isinstance(value, str):
        if value.strip().isascii() and value.strip().isdigit() and int(value.strip()) < len(names):
            return int(value.strip())
        lowered = [n.lower() for n in names]
        return lowered.index(value.strip().lower()) if value.strip().lower() in lowered else None
    return None


@FAST
@given(st.sampled_from(VALID_ROWS), json_values | st.sampled_from(["Positive", " good ", "2", "1", 1.0, 2, -1, "maybe"]))
def test_a_bad_label_names_the_value_and_the_allowed_ones(tmp_path_factory, task_row, label):
    task, row = task_row
    names = LABEL_NAMES[task]
    stored = json.loads(json.dumps(label))  # what the loader reads back from the file
    path = write_jsonl(tmp_path_factory.mktemp("d") / "t.jsonl", [{**row, "label": label}])
    gold = expected_label(stored, names)
    if gold is not None:  # a valid label in some spelling (1, "1", "good", 1.0 ...): loaded as that index
        assert [s.gold for s in load_samples(task, "train", file=path)] == [gold]
        return
    with pytest.raises(DataError) as caught:
        load_samples(task, "train", file=path)
    message = str(caught.value)
    assert f"{path}, row 1" in message and "`label`" in message
    if stored is None:  # null is an absent value
        assert "missing field `label`" in message
    else:
        assert repr(stored) in message and "expected one of 0, 1, " + ", ".join(map(repr, names)) in message


@FAST
@given(st.sampled_from(["train.jsonl", "train.json", "train.tsv", "train.csv"]), st.sampled_from(["", "\n", "  \n\n "]))
def test_an_empty_file_is_rejected(tmp_path_factory, name, content):
    path = tmp_path_factory.mktemp("d") / name
    path.write_text(content if not name.endswith(("tsv", "csv")) else content.strip())
    with pytest.raises(DataError, match="has no rows") as caught:
        load_samples(SST2, "train", file=path)
    assert str(path) in str(caught.value)


@FAST
@given(st.integers(min_value=0, max_value=6), st.sampled_from(['{"sentence": "x", "label": 1', "{sentence: 1}", "nan]",
                                                               '"unterminated', "{} {}", "label\t1"]))
def test_a_malformed_jsonl_line_is_named_by_number(tmp_path_factory, before, broken):
    good = json.dumps({"sentence": "a fine film", "label": 1})
    path = tmp_path_factory.mktemp("d") / "train.jsonl"
    path.write_text("\n".join([good] * before + [broken, good]) + "\n")
    with pytest.raises(DataError) as caught:
        load_samples(SST2, "train", file=path)
    assert f"{path}, line {before + 1}" in str(caught.value) and "not valid JSON" in str(caught.value)


@SLOW
@given(st.sampled_from(["sst2", "rte", "copa", "record", "squad", "drop", "multirc", "wsc"]),
       st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(["jsonl", "json", "tsv", "csv", "parquet"]))
def test_any_file_gives_samples_or_a_data_error_naming_it(tmp_path_factory, task, content, extension):
    path = tmp_path_factory.mktemp("d") / f"train.{extension}"
    path.write_bytes(content)
    try:
        samples = load_samples(get_task(task), "train", file=path)
    except DataError as error:
        assert str(path) in str(error)
    else:
        assert samples and all(isinstance(s, Sample) for s in samples)


def test_a_cell_longer_than_csvs_default_limit_is_read(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "word " * 40000 + "\t1\n")
    assert len(load_samples(SST2, "train", file=path)[0].prompt) > 200000


def test_find_local_file_checks_paths_without_reading(tmp_path):
    with pytest.raises(DataError, match="no train file for task sst2"):
        find_local_file(SST2, "train", data_dir=tmp_path)
    with pytest.raises(DataError, match="has no hub dataset"):
        find_local_file(CUSTOM, "validation")
    assert find_local_file(SST2, "validation") is None  # the hub
    (tmp_path / "dev.tsv").write_text("not read")
    assert find_local_file(SST2, "validation", data_dir=tmp_path) == tmp_path / "dev.tsv"


# Over-long examples --------------------------------------------------------------------------------


class WordTokenizer:
    """One token per word, ids from a growing vocabulary; BOS 1 first, as in LLaMA's tokenizer."""

    bos_token_id, eos_token_id, pad_token_id, mask_token_id, mask_token = 1, 2, 0, 3, " <mask>"

    def __init__(self):
        self.vocabulary = {"<mask>": 3}

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocabulary.setdefault(w, len(self.vocabulary) + 4) for w in text.split()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def sample_of(prompt_words, answer_words):
    return Sample(" ".join(f"p{i}" for i in range(prompt_words)), (" " + " ".join(["a"] * answer_words), " b"), 0)


@FAST
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 4)), min_size=1, max_size=8), st.integers(8, 40))
def test_over_long_examples_are_truncated_with_one_warning_or_rejected(caplog, lengths, max_length):
    samples = [sample_of(p, a) for p, a in lengths]
    over = sum(1 + p + a > max_length for p, a in lengths)
    caplog.clear()
    encoder = SampleEncoder(WordTokenizer(), max_length)
    assert check_examples(samples, encoder, "training") == over
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == (1 if over else 0)
    if over:
        assert f"{over} of {len(samples)} training examples" in warnings[0].getMessage()
        assert "--no_truncation" in warnings[0].getMessage()
    for sample in samples:  # and every batch then fits, with the whole answer and the start token kept
        for candidate in sample.candidates:
            ids, start = encoder.pair(sample.prompt, candidate)
            assert len(ids) <= max_length and ids[0] == 1 and len(ids) - start == len(candidate.split())
    strict = SampleEncoder(WordTokenizer(), max_length, truncate=False)
    if over:
        with pytest.raises(DataError, match=rf"training example \d+ of {len(samples)}: .* over --max_length"):
            check_examples(samples, strict, "training")
    else:
        assert check_examples(samples, strict, "training") == 0


def test_an_example_whose_answer_alone_is_too_long_is_rejected_even_when_truncating():
    encoder = SampleEncoder(WordTokenizer(), max_length=6)
    with pytest.raises(DataError, match="evaluation example 1 of 1: .* cannot be cut to --max_length 6"):
        check_examples([sample_of(3, 6)], encoder, "evaluation")


def test_generation_evaluation_is_prompted_without_the_answer():
    sample = Sample("p q r", (), None, answers=("a b c d e f g",))
    encoder = SampleEncoder(WordTokenizer(), max_length=5)
    assert check_examples([sample], encoder, "evaluation", generate=True) == 0
    with pytest.raises(DataError, match="cannot be cut"):
        check_examples([sample], encoder, "training")


def test_a_masked_lm_keeps_its_mask_when_truncated():
    encoder = SampleEncoder(WordTokenizer(), max_length=4, masked_lm=True)
    ids, _ = encoder.pair("p0 p1 p2 p3 p4", "")
    assert ids == [1, *ids[1:-1], 3] and len(ids) == 4
