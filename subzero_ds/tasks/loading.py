"""Read a task's split from a local file, a data directory or the Hugging Face hub, as samples.

Local files are read with plain Python (pyarrow for Parquet) so that every error can name the
file, the row and the field; no cache directory is written.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, NamedTuple

from ..distributed import log
from .base import FILE_FORMATS, SPLITS, DataError, Sample, Task

_LONGEST_CELL = 2**31 - 1  # csv's field size limit is a C long; this fits on every platform


class _Row(NamedTuple):
    number: int  # 1-based position among the source's rows
    line: int | None  # 1-based line in a text file, where it differs from `number`
    data: Any


def load_samples(
    task: Task,
    split: str,
    *,
    data_dir: str | Path | None = None,
    file: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """The samples of one split of ``task``.

    The source is, in this order: ``file``; else the task's conventional file in ``data_dir``
    (e.g. ``train.jsonl``/``val.jsonl``/``test.jsonl`` for SuperGLUE, ``train.tsv``/``dev.tsv``
    for SST-2 — see each task's ``local_names`` and ``local_file``; a sub-folder such as ``RTE/``
    is also searched); else the Hugging Face hub. Formats by extension: ``.jsonl``, ``.json`` (JSON
    lines or one JSON document), ``.tsv``/``.csv`` (with a header row), ``.parquet``.

    Args:
        task: from `get_task`.
        split: "train", "validation" or "test".
        data_dir: directory holding the task's files.
        file: explicit path of this split's file.
        limit: keep at most this many samples, chosen by a shuffle seeded with ``seed`` (the same
            seed gives the same subset, in the same order). Samples, not rows: a MultiRC or ReCoRD
            row with several questions or answer options gives several samples. None keeps every
            sample in file order.
        seed: seed of that shuffle.

    Returns:
        The samples.

    Raises:
        DataError: unknown split, missing or unreadable file, no rows, a row missing a field or
            holding a value the task cannot use, or (without local files) the hub is unreachable.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 0:
        raise DataError(f"`limit` must be a number of samples >= 0, got {limit!r}")
    if file is not None:
        source = _checked_file(Path(file), f"--{split}_file")
        rows = _read_file(source, task)
    elif data_dir is not None:
        source = _find_in_directory(task, split, Path(data_dir))
        rows = _read_file(source, task)
    else:
        source, rows = _read_hub(task, split)
    log(f"{task.name} {split}: {len(rows)} rows from {source}")
    if not rows:
        raise DataError(f"{source} has no rows: check that it is the right file and that it is not truncated")
    samples = [sample for row in rows for sample in _to_samples(task, row, source)]
    if not samples:
        raise DataError(f"{source}: its {len(rows)} rows give no {task.name} samples (no questions or answer options)")
    if limit is not None:
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        samples = [samples[i] for i in order[:limit]]
    return samples


def find_local_file(task: Task, split: str, *, data_dir: str | Path | None = None,
                    file: str | Path | None = None) -> Path | None:
    """The local file `load_samples` would read for ``split``, checked without reading it; None: the hub.

    Lets a caller reject a wrong path before anything slow (loading a model) starts.

    Raises:
        DataError: the file is missing, a directory or of an unsupported type; ``data_dir`` holds no
            file for the split; or there is no local source and the task has no hub dataset.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if file is not None:
        return _checked_file(Path(file), f"--{split}_file")
    if data_dir is not None:
        return _find_in_directory(task, split, Path(data_dir))
    if task.hub is None:
        raise DataError(f"task {task.name!r} has no hub dataset: pass --data_dir DIR or --{split}_file FILE")
    return None


def _to_samples(task: Task, row: _Row, source: Path | str) -> list[Sample]:
    where = f"{source}, row {row.number}" + (f" (line {row.line})" if row.line not in (None, row.number) else "")
    if not isinstance(row.data, dict):
        kind = type(row.data).__name__
        raise DataError(f"{where}: expected an object with named fields, got a {kind}: {row.data!r:.80}")
    try:
        return task.to_samples(row.data)
    except KeyError as error:
        name = error.args[0] if error.args else "?"
        found = ", ".join(f"`{k}`" for k in row.data) or "none"
        is_table = str(source).endswith((".tsv", ".csv"))
        header = " (.tsv/.csv files need a header row naming the columns)" if is_table else ""
        raise DataError(
            f"{where}: missing field `{name}` (the row has {found}){header}. Every {task.name} row needs "
            f"`{name}`: add it, or check that the task ({task.name}) matches this file."
        ) from None
    except (ValueError, TypeError, AttributeError, IndexError) as error:  # a value of the wrong kind
        raise DataError(
            f"{where}: {error}. Fix or remove this row, or check that the task ({task.name}) matches this file."
        ) from None


def _checked_file(path: Path, flag: str) -> Path:
    if path.is_dir():
        raise DataError(f"{path} is a directory: pass a file as {flag}, or the directory as --data_dir")
    if not path.is_file():
        raise DataError(f"{path} does not exist: check the path given as {flag}")
    if path.suffix.lstrip(".").lower() not in FILE_FORMATS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                        f"{', '.join('.' + f for f in FILE_FORMATS)}")
    return path


def _find_in_directory(task: Task, split: str, directory: Path) -> Path:
    if not directory.is_dir():
        raise DataError(f"--data_dir {directory} is not a directory: check the path")
    folders = [directory] + [directory / name for name in task.folder_names if (directory / name).is_dir()]
    for folder in folders:
        found = task.local_file(split, folder)
        if found is not None:
            return _checked_file(found, f"--{split}_file")
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise DataError(
        f"no {split} file for task {task.name} in {', '.join(map(str, folders))}: looked for "
        f"{', '.join(task.candidate_names(split)[:8])}, ... and found {present or 'an empty directory'}. "
        f"Rename the file, or pass it as --{split}_file."
    )


def _read_file(path: Path, task: Task) -> list[_Row]:
    extension = path.suffix.lstrip(".").lower()
    try:
        if extension in ("jsonl", "json"):
            return _read_json(path, task)
        if extension in ("tsv", "csv"):
            return _read_table(path, delimiter="\t" if extension == "tsv" else ",")
        return _read_parquet(path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error}): re-save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror or error}): check its permissions") from None


def _read_json(path: Path, task: Task) -> list[_Row]:
    content = path.read_text(encoding="utf-8-sig")
    if not content.strip():
        return []
    if path.suffix.lower() == ".json" or content.lstrip().startswith("["):
        try:
            document = json.loads(content)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # "Extra data": several values, i.e. JSON lines
                raise DataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}): "
                                "fix the file, or write one JSON object per line as .jsonl") from None
        else:
            try:
                rows = task.rows_from_json(document)
            except (KeyError, TypeError, AttributeError) as error:
                raise DataError(f"{path}: unexpected layout for {task.name} ({type(error).__name__}: {error}); "
                                "expected JSON lines, a list of rows, or the task's official JSON format") from None
            return [_Row(number, None, data) for number, data in enumerate(rows, 1)]
    rows = []
    for line_number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(_Row(len(rows) + 1, line_number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {line_number}: not valid JSON ({error.msg}, column {error.colno}): "
                            "each line of a JSON-lines file must be one complete JSON object") from None
    return rows


def _read_table(path: Path, delimiter: str) -> list[_Row]:
    # GLUE's .tsv files are not quoted: a '"' inside a sentence is just a character.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(_LONGEST_CELL)  # the default (128 KiB) is shorter than some passages
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
        rows = []
        try:
            for number, record in enumerate(reader, 1):
                record.pop(None, None)  # cells beyond the header
                rows.append(_Row(number, reader.line_num, record))
        except csv.Error as error:
            raise DataError(f"{path}, line {reader.line_num}: not a valid {path.suffix} row ({error}): fix the "
                            "quoting on that line, or re-export the file") from None
    return rows


def _read_parquet(path: Path) -> list[_Row]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DataError(f"{path} is a Parquet file, and reading it needs pyarrow, which did not import ({error}): "
                        'pip install "subzero_ds[hub]" (or pyarrow), or pass the data as JSONL, CSV or TSV') from None

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path} is not a readable Parquet file ({error})") from None
    return [_Row(number, None, data) for number, data in enumerate(table.to_pylist(), 1)]


def _read_hub(task: Task, split: str) -> tuple[str, list[_Row]]:
    if task.hub is None:
        raise DataError(f"task {task.name!r} has no hub dataset: pass --data_dir DIR or --{split}_file FILE")
    hub = task.hub
    source = f"hub dataset {hub.path}" + (f" ({hub.config})" if hub.config else "") + f", split {split}"
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"loading {source} needs the `datasets` package, which did not import ({error}): pip install "
            f'"subzero_ds[hub]", or pass local files: --data_dir DIR (holding e.g. '
            f"{', '.join(task.candidate_names(split)[:2])}) or --{split}_file FILE."
        ) from None

    try:
        dataset = datasets.load_dataset(hub.path, hub.config, split=split, revision=hub.revision)
    except Exception as error:  # offline, renamed, missing split...: all fixed the same way
        raise DataError(
            f"could not load {source} from the Hugging Face hub ({type(error).__name__}: {error}). Offline or "
            f"without hub access, pass local files: --data_dir DIR (holding e.g. "
            f"{', '.join(task.candidate_names(split)[:2])}) or --{split}_file FILE."
        ) from error
    return source, [_Row(number, None, data) for number, data in enumerate(dataset, 1)]
