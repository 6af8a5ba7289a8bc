"""``python -m subzero_ds.train``: validate everything, train, exit 0; a fault exits with its own code and one message."""

from __future__ import annotations

import logging
import sys
import time

from subzero_ds.checkpoint.sharded import CheckpointError, DiskFullError, is_disk_full
from subzero_ds.config import ConfigError
from subzero_ds.distributed import barrier, exit_process, is_local_main_process
from subzero_ds.engine import NonFiniteLossError
from subzero_ds.faults import CollectiveTimeoutError, ExitCode, Preempted
from subzero_ds.kernels.build_locks import BuildLockError
from subzero_ds.tasks import DataError

from .args import UsageError, parse_args
from .recipe import train

# Mistakes a user fixes by changing an argument, a config or a file: reported in one paragraph, exit code 2.
USER_ERRORS = (UsageError, ConfigError, DataError, CheckpointError, NonFiniteLossError, BuildLockError, OSError)


def main(argv: list[str] | None = None) -> None:
    """The command line: validate everything, train, exit 0; a fault exits with its :class:`ExitCode`, no traceback.

    Every rank runs this; the first rank of each node prints the message (ranks on a node read the
    same files, so the others would only repeat it).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        args = parse_args(argv)
        args.validate()
    except USER_ERRORS as e:
        _report(e)
        sys.exit(ExitCode.USAGE)  # no process group, model or output exists yet: a plain exit
    try:
        train(args)
    except Preempted as stop:
        if is_local_main_process():
            print(f"subzero-train: {stop}", file=sys.stderr, flush=True)
        barrier()  # the group is healthy: every rank leaves together, so no launcher cuts the message short
        exit_process(ExitCode.PREEMPTED)
    except CollectiveTimeoutError as e:
        # Every live rank says so (the one that did not answer is the one without the message); no barrier: it
        # would wait for that rank too.
        print(f"subzero-train: error: {e}", file=sys.stderr, flush=True)
        exit_process(ExitCode.COLLECTIVE_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - anything not named below keeps its traceback
        if is_disk_full(e):  # a checkpoint's DiskFullError, or the final model's raw OSError/SafetensorError
            _report(e if isinstance(e, DiskFullError) else DiskFullError(
                f"{args.output.output_dir} is full ({type(e).__name__}: {e}); any checkpoint written before is "
                "intact. Free space there or pass an --output_dir on a larger disk."))
            exit_process(ExitCode.DISK_FULL)
        if not isinstance(e, USER_ERRORS):
            raise
        _report(e)
        exit_process(ExitCode.USAGE)
    exit_process(ExitCode.OK)


def _report(error: Exception) -> None:
    if is_local_main_process():
        print(f"subzero-train: error: {error}", file=sys.stderr, flush=True)
    else:
        # The deepspeed launcher kills every rank as soon as one exits non-zero: give the reporting
        # rank time to print before this one's exit gets it killed.
        time.sleep(3)


if __name__ == "__main__":
    main()
