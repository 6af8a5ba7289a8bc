"""The load guard: how much of the host's CPU other processes used while a benchmark measured."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import psutil
import torch.distributed as dist


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds spent during the measured iterations: by this process, and by the whole host."""

    own_s: float
    host_busy_s: float
    wall_s: float
    host_cores: int

    @classmethod
    def since(cls, start: CpuUsage) -> CpuUsage:
        """The usage from ``start`` (a :meth:`now`) until now."""
        now = cls.now()
        return cls(
            own_s=now.own_s - start.own_s,
            host_busy_s=now.host_busy_s - start.host_busy_s,
            wall_s=now.wall_s - start.wall_s,
            host_cores=now.host_cores,
        )

    @classmethod
    def now(cls) -> CpuUsage:
        """Cumulative counters at this instant (differences of two are meaningful)."""
        own, host = psutil.Process().cpu_times(), psutil.cpu_times()
        idle = host.idle + getattr(host, "iowait", 0.0)
        return cls(own.user + own.system, sum(host) - idle - _guest_time(host), time.perf_counter(), psutil.cpu_count())


def other_load(usage: CpuUsage) -> float:
    """Share of the host's CPU capacity that processes other than the benchmark's workers used.

    Collective: every rank passes its own :class:`CpuUsage` over the same window and gets the
    same answer, for rank 0's host (host busy CPU seconds minus the CPU seconds of every worker on
    that host, over window × cores). Well above zero means other work competed for the cores.
    """
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (socket.gethostname(), usage))
    host, reference = gathered[0]
    own = sum(u.own_s for h, u in gathered if h == host)
    return max(0.0, reference.host_busy_s - own) / (reference.wall_s * reference.host_cores)


def _guest_time(host: Any) -> float:
    """Guest time is already counted in user time on Linux; drop it from the busy sum."""
    return getattr(host, "guest", 0.0) + getattr(host, "guest_nice", 0.0)
