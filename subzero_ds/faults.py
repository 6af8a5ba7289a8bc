"""Faults a cluster job meets at run time, and how a training process ends on each.

A scheduler or a wrapper script acts on the exit status alone (requeue, page someone, give up), so every
fault a user or operator can act on has its own code, the same from every rank and under every launcher
that passes a rank's status on (deepspeed, srun, mpirun).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit status of ``subzero-train`` (README: "Faults a cluster job meets")."""

    OK = 0
    ERROR = 1  # an unexpected error: a traceback (Python's own status for an uncaught exception)
    USAGE = 2  # a mistake in an argument, the config, the data or a checkpoint: one message names it
    DISK_FULL = 3  # a checkpoint or the final model did not fit on the disk; earlier checkpoints are intact


__all__ = ["ExitCode"]
