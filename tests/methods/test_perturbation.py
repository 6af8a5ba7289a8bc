"""The direction generators: shapes, statistics, subspace laziness, and slice invariance."""

import math

import pytest
import torch

from subzero_ds.methods.mezo import GaussianDirection
from subzero_ds.methods.subzero import SubspaceDirection
from subzero_ds.methods.subzero import near_square_shape


def full(direction, name, shape, step):
    return direction.full(name, shape, step)


def direction_slice(direction, name, shape, step, start, end):
    """Elements [start, end) of D_step as a rank would generate them for its shard."""
    out = torch.empty(end - start)
    direction.apply_(out, out, name, shape, step, start, beta=0.0, alpha=1.0)
    return out


def zero3_ranges(numel: int, world_size: int) -> list[tuple[int, int]]:
    """The flat ranges DeepSpeed ZeRO-3 gives each rank (partition size ceil(numel/world), last padded)."""
    size = math.ceil(numel / world_size)
    return [(min(k * size, numel), min((k + 1) * size, numel)) for k in range(world_size)]


@pytest.mark.parametrize("shape", [(37, 23), (200, 64), (5, 300)])
def test_subzero_direction_is_rank_r_in_the_subspace(shape):
    direction = SubspaceDirection(seed=3, rank=4, interval=10, reshape=False)
    d = full(direction, "w", shape, step=7)
    subspace = direction.subspace("w", shape, step=7)
    u, v = subspace.u, subspace.v
    assert torch.linalg.matrix_rank(d).item() <= 4
    projected = u @ (u.T @ d @ v) @ v.T  # the component inside span(U) ⊗ span(V)
    torch.testing.assert_close(projected, d, atol=1e-4, rtol=1e-4)


def test_subspace_bases_are_orthonormal():
    direction = SubspaceDirection(seed=1, rank=8, interval=10, reshape=False)
    subspace = direction.subspace("w", (96, 40), step=0)
    for basis in (subspace.u, subspace.v):
        torch.testing.assert_close(basis.T @ basis, torch.eye(8), atol=1e-5, rtol=0)


def test_subspace_is_fixed_inside_a_window_and_changes_across_windows():
    direction = SubspaceDirection(seed=1, rank=4, interval=5, reshape=False)
    inside = [direction.subspace("w", (30, 20), step).u.clone() for step in range(5, 10)]
    for u in inside[1:]:
        assert torch.equal(u, inside[0])
    assert not torch.allclose(direction.subspace("w", (30, 20), 10).u, inside[0])
    # ... while the per-step core Z makes each step's direction differ inside the window
    assert not torch.allclose(full(direction, "w", (30, 20), 5), full(direction, "w", (30, 20), 6))


def test_subspace_depends_on_window_not_on_request_order():
    forward, backward = (SubspaceDirection(seed=2, rank=3, interval=4, reshape=False) for _ in range(2))
    a = [full(forward, "w", (12, 9), s) for s in range(12)]
    b = [full(backward, "w", (12, 9), s) for s in reversed(range(12))][::-1]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape,rank", [((64, 64), 8), ((128, 32), 4), ((8, 200), 8)])
def test_subzero_norm_matches_a_full_gaussian(shape, rank):
    direction = SubspaceDirection(seed=5, rank=rank, interval=1, reshape=False)
    squared_norms = torch.tensor([full(direction, "w", shape, step).pow(2).sum().item() for step in range(400)])
    assert squared_norms.mean().item() == pytest.approx(math.prod(shape), rel=0.1)


@pytest.mark.parametrize("m,n,expected", [(8, 5120, (160, 256)), (10, 2048, (128, 160)), (64, 64, (64, 64)), (7, 13, (7, 13)), (1, 12, (3, 4))])
def test_reshape_picks_the_near_square_factor_pair(m, n, expected):
    assert near_square_shape(m, n) == expected


def test_reshaped_direction_is_low_rank_in_the_reshaped_view():
    direction = SubspaceDirection(seed=0, rank=4, interval=10, reshape=True)
    d = full(direction, "lora_A", (8, 5120), step=0)
    assert direction.subspace("lora_A", (8, 5120), 0).u.shape == (160, 4)
    assert torch.linalg.matrix_rank(d.view(160, 256)).item() <= 4
    assert torch.linalg.matrix_rank(d).item() == 8  # in the original 8×5120 view it is not rank-limited


def test_mezo_direction_is_standard_normal():
    d = full(GaussianDirection(seed=11), "w", (300, 1000), step=3)
    assert abs(d.mean().item()) < 0.01
    assert d.var().item() == pytest.approx(1.0, abs=0.01)
    assert not torch.equal(d, full(GaussianDirection(seed=11), "w", (300, 1000), step=4))
    assert not torch.equal(d, full(GaussianDirection(seed=12), "w", (300, 1000), step=3))


def test_non_matrix_parameters_get_the_gaussian_direction():
    subzero = SubspaceDirection(seed=4, rank=8, interval=10, reshape=False)
    assert torch.equal(full(subzero, "b", (77,), 2), full(GaussianDirection(seed=4), "b", (77,), 2))


def test_directions_do_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    full(SubspaceDirection(seed=1, rank=4, interval=3, reshape=False), "w", (40, 30), 5)
    full(GaussianDirection(seed=1), "w", (40, 30), 5)
    assert torch.equal(torch.rand(3), expected)


SLICE_CASES = [
    ("subzero", (3 * 64 + 5, 33)),
    ("subzero", (101, 7)),
    ("subzero-reshape", (8, 515)),
    ("mezo", (2 * 65536 + 123,)),
    ("mezo", (61, 1001)),
]


def make(method, seed=9):
    if method == "mezo":
        return GaussianDirection(seed=seed)
    return SubspaceDirection(seed=seed, rank=5, interval=3, reshape=method.endswith("reshape"))


@pytest.mark.parametrize("method,shape", SLICE_CASES)
@pytest.mark.parametrize("world_size", range(1, 9))
def test_rank_slices_concatenate_to_the_full_direction(method, shape, world_size):
    """Each rank generates only its range; together the ranges are the whole direction, bit for bit
    (a value is a function of its position, computed in a fixed order)."""
    numel = math.prod(shape)
    reference = full(make(method), "p", shape, step=4).view(-1)
    pieces = [direction_slice(make(method), "p", shape, 4, start, end)  # each rank: its own generator and cache
              for start, end in zero3_ranges(numel, world_size)]
    assert torch.equal(torch.cat(pieces), reference)


def test_rank_with_no_elements_gets_an_empty_slice():
    direction = SubspaceDirection(seed=0, rank=2, interval=1, reshape=False)
    assert direction_slice(direction, "p", (3, 3), 0, 9, 9).numel() == 0


def test_directions_do_not_depend_on_the_thread_count():
    shape = (300, 120)
    values = {}
    threads = torch.get_num_threads()
    for count in (1, 2):
        torch.set_num_threads(count)
        values[count] = (full(make("subzero"), "w", shape, 0), full(make("mezo"), "w", shape, 0))
    torch.set_num_threads(threads)
    assert torch.equal(values[1][0], values[2][0]) and torch.equal(values[1][1], values[2][1])
