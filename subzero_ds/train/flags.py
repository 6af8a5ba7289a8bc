"""subzero-train's command line from dataclasses: a field's name, type, default and help make its flag."""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import MISSING, Field, field, fields
from enum import Enum
from typing import Any, Literal

import deepspeed

from subzero_ds.distributed import is_local_main_process

DESCRIPTION = """\
Fine-tune a Hugging Face language model on a task with zeroth-order DeepSpeed ZeRO-3.

Launch it the way DeepSpeed jobs are launched; every launcher ends in this same module:

    deepspeed --num_gpus 2 --module subzero_ds.train --task sst2 --data_dir DATA ...   # one node
    deepspeed --hostfile hosts --module subzero_ds.train ...                           # many nodes
    mpirun -np 2 python -m subzero_ds.train ...                                        # MPI
    python -m subzero_ds.train ...                                                     # one process

Outputs in --output_dir: metrics.jsonl (a row per logged step and per evaluation),
eval_results.json, and final/ (model + tokenizer, loadable with from_pretrained).
"""



class UsageError(ValueError):
    """A command-line argument the user can fix; the message names the flag, the value and the fix."""


def arg(default: Any, help: str, lowest: int | None = None, **options: Any) -> Any:
    """A dataclass field that is the flag ``--<field name>``.

    Args:
        default: the flag's default (a list is copied for each instance).
        help: its ``--help`` text.
        lowest: the smallest value an integer flag accepts (its default None, "unset", is not checked).
        **options: further ``add_argument`` options (``nargs``, ``const``, ``metavar``).
    """
    metadata = {"help": help, "lowest": lowest, "options": options}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


def deepspeed_flag(help: str) -> Any:
    """A field filled from one of DeepSpeed's own flags (``deepspeed.add_config_arguments``), not made here."""
    return field(default=None, metadata={"help": help, "deepspeed": True})


def out_of_range(group: Any) -> list[str]:
    """A problem for each integer field of ``group`` below its ``lowest`` (unset, None, fields are not checked)."""
    return [f"--{f.name} must be an integer >= {f.metadata['lowest']}, got {getattr(group, f.name)}"
            for f in fields(group) if f.metadata.get("lowest") is not None and getattr(group, f.name) is not None
            and getattr(group, f.name) < f.metadata["lowest"]]


def raise_usage(problems: list[str]) -> None:
    """Raise one UsageError naming every problem, if there is any."""
    if problems:
        raise UsageError("; ".join(problems) + ".")


def parse_groups(top: type, argv: list[str] | None) -> Any:
    """Parse ``argv`` into ``top``, a dataclass of groups (dataclasses whose fields are flags).

    Every group is built, so the UsageErrors of all of them are reported together.
    """
    namespace = build_parser(top).parse_args(argv)
    groups, errors = {}, []
    for name, group_class in _groups(top).items():
        try:
            groups[name] = group_class(**{f.name: getattr(namespace, f.name) for f in fields(group_class)})
        except UsageError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    raise_usage([str(error).removesuffix(".") for error in errors])
    return top(**groups)


def build_parser(top: type) -> argparse.ArgumentParser:
    """subzero-train's parser: an argument group per group of ``top``, a flag per field of a group; DeepSpeed's own."""
    parser = _ArgumentParser(prog="subzero-train", description=DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, group_class in _groups(top).items():
        group = parser.add_argument_group(name, group_class.__doc__)
        hints = typing.get_type_hints(group_class)
        for f in fields(group_class):
            if not f.metadata.get("deepspeed"):
                group.add_argument(f"--{f.name}", **_flag_options(f, hints[f.name]))
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return deepspeed.add_config_arguments(parser)


def _groups(top: type) -> dict[str, type]:
    hints = typing.get_type_hints(top)
    return {f.name: hints[f.name] for f in fields(top)}


def _flag_options(f: Field, hint: Any) -> dict[str, Any]:
    """``add_argument`` options of the flag of field ``f``, typed ``hint``."""
    options = {"default": f.default_factory() if f.default is MISSING else f.default, "help": f.metadata["help"],
               **f.metadata["options"]}
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if _is_optional(hint) else hint
    if kind is bool:
        return {**options, "action": "store_true"}
    if typing.get_origin(kind) is list:
        kind, options["nargs"] = typing.get_args(kind)[0], "+"
    if typing.get_origin(kind) is Literal:
        kind, options["choices"] = str, list(typing.get_args(kind))
    elif isinstance(kind, type) and issubclass(kind, Enum):
        kind, options["choices"], options["default"] = str, [m.value for m in kind], options["default"].value
    return {**options, "type": kind}


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that answers a bad argument with one paragraph instead of the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if is_local_main_process():
            print(f"{self.prog}: error: {message}. Run `python -m subzero_ds.train --help` for every option.",
                  file=sys.stderr)
        sys.exit(2)
