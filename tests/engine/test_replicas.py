"""Which probes a rank measures, how the all-reduce averages them, and which batch share it takes."""

import pytest

from subzero_ds.config import ReplicaMode
from subzero_ds.methods.estimators import Probe
from subzero_ds.zero.replicas import Replicas


@pytest.mark.parametrize("stage,hpz,world,size,count", [(3, 1, 8, 8, 1), (3, 2, 8, 2, 4), (3, 8, 4, 4, 1),
                                                        (0, 1, 4, 1, 4)])
def test_groups_are_hpz_groups_the_world_or_single_ranks(stage, hpz, world, size, count):
    replicas = Replicas.of(ReplicaMode.PERTURBATION, stage, hpz, world, world - 1, queries=3)
    assert (replicas.size, replicas.count) == (size, count)
    assert replicas.group == (world - 1) // size and replicas.rank == (world - 1) % size
    assert replicas.step_queries == 3 * count


def test_perturbation_mode_gives_each_group_its_own_queries_and_the_clean_probe_to_all():
    groups = [Replicas.of(ReplicaMode.PERTURBATION, 3, 2, 6, rank, queries=2) for rank in range(6)]
    probes = [Probe(query, sign) for query in range(6) for sign in (1.0, -1.0)] + [Probe(0, 0.0)]
    for rank, replicas in enumerate(groups):
        measured = {p.query for p in probes if p.sign and replicas.evaluates(p)}
        assert measured == {2 * (rank // 2), 2 * (rank // 2) + 1}
        assert replicas.evaluates(Probe(0, 0.0))
        assert replicas.contributors(Probe(0, 1.0)) == 2 and replicas.contributors(Probe(0, 0.0)) == 6
        assert replicas.batch_share() == (rank % 2, 2)  # a group shares one batch


def test_data_mode_measures_every_probe_on_its_own_share():
    replicas = Replicas.of(ReplicaMode.DATA, 3, 2, 4, 3, queries=2)
    assert replicas.step_queries == 2 and not replicas.splits_directions
    assert all(replicas.evaluates(Probe(q, 1.0)) for q in range(2))
    assert replicas.contributors(Probe(0, 1.0)) == 4
    assert replicas.batch_share() == (3, 4)
