"""Replica groups: the ranks that hold one whole model between them, and what the groups share.

A replica group is K consecutive ranks: a ZeRO++ hpZ group (``zero_hpz_partition_size``, normally the
GPUs of one node), the whole world under plain ZeRO-3, a single rank under ZeRO-0. There are
R = world / K of them. Two ways to use them (``subzero.replica_mode``):

- ``"data"``: every rank takes its own share of the global batch; the step's q directions are the
  same on every rank, and each probe's loss is the mean over all ranks.
- ``"perturbation"``: every group takes the same batch (rank i of a group its i-th share) and its own
  q directions: group G evaluates the step's queries G·q … G·q + q − 1, so a step estimates R·q
  directions in the time of q. One all-reduce still carries every probe's loss (zeros where a rank
  did not evaluate it), and every rank applies the mean of the R·q updates to its shards.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.subzero import ReplicaMode
from ..methods.estimators import Probe


@dataclass(frozen=True)
class Replicas:
    """This rank's place among the replica groups.

    Attributes:
        mode: what the groups share.
        size: K, ranks per group.
        count: R, groups in the world.
        group: this rank's group G.
        rank: this rank's index in its group.
        queries: q, the directions each group evaluates per step (``subzero.queries``).
    """

    mode: ReplicaMode = ReplicaMode.DATA
    size: int = 1
    count: int = 1
    group: int = 0
    rank: int = 0
    queries: int = 1

    @classmethod
    def of(cls, mode: ReplicaMode, stage: int, hpz_partition_size: int, world_size: int, rank: int,
           queries: int) -> Replicas:
        """The groups of a run: hpZ's under ZeRO-3 with ``hpz_partition_size`` > 1, else one per model copy."""
        size = 1 if stage == 0 else min(hpz_partition_size, world_size) if hpz_partition_size > 1 else world_size
        return cls(mode, size, world_size // size, rank // size, rank % size, queries)

    @property
    def splits_directions(self) -> bool:
        """Whether groups evaluate different directions (perturbation mode with more than one group)."""
        return self.mode is ReplicaMode.PERTURBATION and self.count > 1

    @property
    def step_queries(self) -> int:
        """Directions per step over all groups: R·q in perturbation mode, else q."""
        return self.queries * self.count if self.splits_directions else self.queries

    def evaluates(self, probe: Probe) -> bool:
        """Whether this rank measures ``probe``: its group's queries, and a clean probe (θ itself) everywhere."""
        return probe.sign == 0 or not self.splits_directions or probe.query // self.queries == self.group

    @property
    def world_size(self) -> int:
        return self.size * self.count

    def contributors(self, probe: Probe) -> int:
        """How many ranks' losses the all-reduce sums into ``probe``'s slot: its group's, or every rank's."""
        return self.size if self.splits_directions and probe.sign != 0 else self.world_size

    def batch_share(self) -> tuple[int, int]:
        """(index, count): which share of the batch this rank takes, of how many (a group shares one batch)."""
        if self.splits_directions:
            return self.rank, self.size
        return self.group * self.size + self.rank, self.world_size

    def describe(self) -> str:
        if not self.splits_directions:
            return f"replica mode data ({self.count} group(s) of {self.size} rank(s))"
        return (f"replica mode perturbation: {self.count} groups of {self.size} rank(s), each its own {self.queries} "
                f"direction(s): {self.step_queries} per step")
