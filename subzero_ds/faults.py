"""Faults a cluster job meets at run time, and how a training process ends on each.

A scheduler or a wrapper script acts on the exit status alone (requeue, page someone, give up), so every
fault a user or operator can act on has its own code, the same from every rank and under every launcher
that passes a rank's status on (deepspeed, srun, mpirun).

Preemption: slurm (at a time limit, or ``--signal=USR1@N`` before it) and Kubernetes (on eviction) send
SIGTERM or SIGUSR1 and kill the job a grace period later. :class:`PreemptionSignals` only records the
signal; the training loop asks, after every step, whether any rank received one (an all-reduce of one
flag: the signal reaches ranks at different moments, or only some of them), so every rank stops after the
same step, writes a checkpoint and exits with :attr:`ExitCode.PREEMPTED`.

A hung rank (a wedged GPU, a stalled file system, SIGSTOP) leaves the others waiting in a collective until
the process group's timeout (``subzero.collective_timeout`` / ``--collective_timeout``); the error gloo then
raises names neither the step nor what to do. :func:`stop_on_collective_timeout` turns it into a
:class:`CollectiveTimeoutError` that does, and the CLI exits with :attr:`ExitCode.COLLECTIVE_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
from enum import IntEnum
from pathlib import Path
from types import FrameType, TracebackType
from typing import Callable, Iterator

from .distributed import all_gather_objects, get_world_size_and_rank, log, sum_over_ranks
from .phases import phase_of


class ExitCode(IntEnum):
    """The exit status of ``subzero-train`` (README: "Faults a cluster job meets")."""

    OK = 0
    ERROR = 1  # an unexpected error: a traceback (Python's own status for an uncaught exception)
    USAGE = 2  # a mistake in an argument, the config, the data or a checkpoint: one message names it
    DISK_FULL = 3  # a checkpoint or the final model did not fit on the disk; earlier checkpoints are intact
    PREEMPTED = 4  # SIGTERM/SIGUSR1: stopped after a step with a checkpoint; requeue and --resume
    COLLECTIVE_TIMEOUT = 5  # another rank did not answer within the collective timeout; --resume from the last checkpoint


class PreemptionSignals:
    """SIGTERM and SIGUSR1 recorded instead of ending the process, while the context is active.

    A second signal (say, a launcher passing the scheduler's on) is only noted: the checkpoint being
    written is finished first. Outside the main thread (where Python cannot install handlers) nothing
    is caught, and each signal keeps its default action.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _record(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = name
            log(f"{name} received: stopping after this step with a checkpoint", all_ranks=True)
        else:
            log(f"{name} received again: the checkpoint is finished first", all_ranks=True)

    def agreed(self) -> str | None:
        """The signal(s) any rank received (e.g. "SIGTERM"), or None. Collective: every rank calls it after each step."""
        (count,) = sum_over_ranks(1.0 if self.received else 0.0)
        if count == 0:
            return None
        return "/".join(sorted({name for name in all_gather_objects(self.received) if name}))


class Preempted(Exception):
    """The run stopped on a preemption signal after ``step``, with ``checkpoint`` written."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        super().__init__(f"{signal_name} received: stopped after step {step} and wrote {checkpoint}. Run the same "
                         "command with --resume to continue (launch/slurm.sbatch requeues the job and does so).")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


# What the step's phases (subzero_ds.phases) wait for from the other ranks.
_PHASE_COLLECTIVES = {"forward": "a forward pass, where ZeRO-3 gathers each layer's weights from every rank",
                      "all-reduce": "the all-reduce of the step's losses"}


class Activity:
    """What the run is doing now ("step 13", "writing checkpoint-12"), for the message of a fault that stops it."""

    def __init__(self, now: str = "the set-up") -> None:
        self.now = now


class CollectiveTimeoutError(RuntimeError):
    """Another rank did not answer within the collective timeout; the message says where, and how to resume."""


def is_collective_timeout(error: BaseException) -> bool:
    """Whether ``error`` (or its cause) is a collective or rendezvous that timed out (gloo, NCCL, the store)."""
    while error is not None:
        if isinstance(error, RuntimeError) and re.search(r"timed out|timeout", str(error), re.IGNORECASE):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def stop_on_collective_timeout(activity: Activity, timeout: float, last_checkpoint: Callable[[], Path | None],
                               resume: str) -> Iterator[None]:
    """Turn a timed-out collective inside the block into a :class:`CollectiveTimeoutError` naming this rank,
    ``activity.now`` and its phase, ``last_checkpoint()`` and how to ``resume`` from it ("run the same command
    with --resume")."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, CollectiveTimeoutError) or not is_collective_timeout(error):
            raise
        world_size, rank = get_world_size_and_rank()
        where = activity.now + (f" ({_PHASE_COLLECTIVES.get(name, f'its {name} phase')})"
                                if (name := phase_of(error)) else "")
        last = last_checkpoint()
        restart = (f"The last good checkpoint is {last}: {resume} to continue from it." if last
                   else "No checkpoint was written yet: start it again.")
        detail = re.sub(r"^\[[^]]*\]\s*", "", str(error).splitlines()[0])  # gloo's source location says nothing here
        raise CollectiveTimeoutError(
            f"rank {rank} of {world_size} waited {timeout:g} s for the other ranks during {where}, and they did not "
            f"answer ({detail}). A rank is stopped, hung or dead (a wedged GPU, a stalled file system); every rank "
            f"that answered prints this message. {restart} If a step can take that long, raise "
            "`subzero.collective_timeout` (--collective_timeout)."
        ) from error


__all__ = ["ExitCode", "PreemptionSignals", "Preempted", "Activity", "CollectiveTimeoutError", "is_collective_timeout",
           "stop_on_collective_timeout"]
