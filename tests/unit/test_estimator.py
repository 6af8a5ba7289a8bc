"""ZO gradient estimates against autograd on a tiny model, in plain PyTorch (no DeepSpeed).

One ZO estimate at step t is ĝ_t = ((L(θ + εD_t) − L(θ − εD_t)) / 2ε) · D_t, with D_t built from
the library's own :class:`Direction` generators over the whole flat parameter vector. We check that
averages of estimates line up with the true gradient as they grow, what happens when SubZero's
subspace is shared by a window of steps, and print per-estimate statistics of SubZero and MeZO
side by side (``pytest -s`` shows the table).

Precision: fp32, as the library runs. Measured on these models, the finite difference agrees with
the autograd directional derivative gᵀD equally well in fp32 and fp64: the gap comes from the
loss's nonlinearity over a step of ε·‖D‖ ≈ 0.3 (OPT's ReLU kinks above all), not from rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.func import functional_call

from subzero_ds.demo import pattern_batch, tiny_model
from subzero_ds.optimizer import Direction, GaussianDirection, SubspaceDirection
from subzero_ds.perturbation import collect

EPS = 1e-3
RANK = 4
STEPS = 64  # estimates per replicate; averages of the first K of them, K in K_VALUES
K_VALUES = (1, 8, 64)
REPLICATES = 4  # independent run seeds the K-trend is averaged over
ARCHS = ("opt", "llama")
METHODS = ("subzero", "mezo")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Run this module on one intra-op thread, then restore the setting.

    Every op here is tiny, so threads buy nothing; on a busy 2-core machine two spinning threads
    made each forward ~100× slower in a probe.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_direction(method: str, seed: int, interval: int = 1) -> Direction:
    """SubZero (rank ``RANK``, window ``interval``, no reshape) or MeZO, for run seed ``seed``."""
    if method == "subzero":
        return SubspaceDirection(seed, rank=RANK, interval=interval, reshape=False)
    return GaussianDirection(seed)


@dataclass
class Problem:
    """A tiny model, a fixed batch, the trainable parameters as one flat vector, and their gradient.

    Attributes:
        model: the model in eval mode (its own parameters are never edited).
        batch: the fixed batch every loss is computed on.
        names, shapes: the trainable parameters, in flat-vector order.
        grad: the autograd gradient of the loss at θ over the trainable parameters (flat fp32).
    """

    model: nn.Module
    batch: dict[str, torch.Tensor]
    names: list[str]
    shapes: list[tuple[int, ...]]
    theta: torch.Tensor
    grad: torch.Tensor

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flat vector as ``{name: tensor of its shape}``."""
        sizes = [math.prod(shape) for shape in self.shapes]
        pieces = flat.split(sizes)
        return {name: piece.view(shape) for name, shape, piece in zip(self.names, self.shapes, pieces)}

    def loss(self, flat: torch.Tensor) -> float:
        """L at the trainable parameters ``flat`` (the others as in the model), no autograd."""
        with torch.no_grad():
            return functional_call(self.model, self.unflatten(flat), args=(), kwargs=self.batch).loss.item()

    def direction(self, direction: Direction, step: int) -> torch.Tensor:
        """D_step over all trainable parameters, assembled from the generator's chunks (flat fp32)."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            numel = math.prod(shape)
            parts.append(collect(direction.chunks(name, shape, step, 0, numel), 0, numel))
        return torch.cat(parts)

    def projected_grad(self, d: torch.Tensor) -> float:
        """The ZO scalar (L(θ + εD) − L(θ − εD)) / 2ε."""
        return (self.loss(self.theta + EPS * d) - self.loss(self.theta - EPS * d)) / (2 * EPS)


def make_problem(arch: str, trainable: Callable[[str, torch.Tensor], bool] = lambda name, p: True) -> Problem:
    """The tiny ``arch`` model, seed 0, on an 8×16 batch; ``trainable`` picks the parameters."""
    model = tiny_model(arch, seed=0).eval()
    batch = pattern_batch(8, seed=1)
    chosen = [(name, p) for name, p in model.named_parameters() if trainable(name, p)]
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, [p for _, p in chosen])
    return Problem(
        model=model,
        batch=batch,
        names=[name for name, _ in chosen],
        shapes=[tuple(p.shape) for _, p in chosen],
        theta=torch.cat([p.detach().reshape(-1) for _, p in chosen]),
        grad=torch.cat([g.reshape(-1) for g in grads]),
    )


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity, accumulated in fp64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


@dataclass
class Run:
    """Estimates of one method on one model.

    Attributes:
        trend: ``trend[k]`` the cosine to the gradient of the average of the first k estimates,
            one value per replicate (run seed).
        single: the cosine to the gradient of every single estimate (all replicates).
        sq_norm: ‖ĝ‖² / (d·‖g‖²) of every single estimate (≈ 1 for MeZO: E‖ĝ‖² = (d + 2)‖g‖²).
    """

    trend: dict[int, list[float]]
    single: torch.Tensor
    sq_norm: torch.Tensor


def run_estimates(problem: Problem, method: str, interval: int = 1) -> Run:
    """``REPLICATES`` × ``STEPS`` estimates of ``method``; their prefix averages and single stats."""
    trend: dict[int, list[float]] = {k: [] for k in K_VALUES}
    single, sq_norm = [], []
    numel, grad_sq = problem.grad.numel(), problem.grad.double().square().sum().item()
    for seed in range(REPLICATES):
        direction = make_direction(method, seed, interval)
        total = torch.zeros(numel, dtype=torch.float64)
        for step in range(STEPS):
            d = problem.direction(direction, step)
            estimate = problem.projected_grad(d) * d.double()
            total += estimate
            single.append(cosine(estimate, problem.grad))
            sq_norm.append(estimate.square().sum().item() / (numel * grad_sq))
            if step + 1 in trend:
                trend[step + 1].append(cosine(total, problem.grad))
    return Run(trend, torch.tensor(single, dtype=torch.float64), torch.tensor(sq_norm, dtype=torch.float64))


@pytest.fixture(scope="module")
def problems() -> dict[str, Problem]:
    """Every parameter trainable, per architecture."""
    return {arch: make_problem(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def runs(problems: dict[str, Problem]) -> dict[tuple[str, str], Run]:
    """Fresh-subspace SubZero (interval 1) and MeZO, per architecture."""
    return {(arch, method): run_estimates(problems[arch], method) for arch in ARCHS for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_finite_difference_tracks_the_directional_derivative(problems, arch: str, method: str) -> None:
    """The ZO scalar estimates gᵀD: correlated across draws with the autograd value, same scale."""
    problem = problems[arch]
    direction = make_direction(method, seed=100)
    zo, exact = [], []
    for step in range(16):
        d = problem.direction(direction, step)
        zo.append(problem.projected_grad(d))
        exact.append(problem.grad.double() @ d.double())
    zo_t, exact_t = torch.tensor(zo, dtype=torch.float64), torch.stack(exact)
    assert cosine(zo_t, exact_t) > 0.95
    assert 0.8 < zo_t.norm().item() / exact_t.norm().item() < 1.25


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_average_of_more_estimates_aligns_better_with_the_gradient(runs, problems, arch: str, method: str) -> None:
    """cos(mean of K estimates, ∇L) grows with K (≈ √(K/d) for K ≪ d), clearly positive at K = 64."""
    run = runs[arch, method]
    mean = {k: sum(values) / len(values) for k, values in run.trend.items()}
    d = problems[arch].grad.numel()
    print(f"\n{arch:5s} {method:7s} d={d}: " + ", ".join(f"K={k}: {mean[k]:.4f}" for k in K_VALUES))
    ks = list(K_VALUES)
    for small, large in zip(ks, ks[1:]):
        # theory: × √(large/small) = × 2.83; ask for well under that
        assert mean[large] > 1.6 * mean[small], (small, large, mean)
    assert mean[64] > 0.4 * math.sqrt(64 / d), mean
    assert min(run.trend[64]) > 0, run.trend[64]


def test_per_estimate_alignment_subzero_vs_mezo(runs) -> None:
    """Print SubZero's and MeZO's single-estimate statistics side by side; assert only robust facts."""
    header = f"{'arch':5s} {'method':8s} {'n':>4s} {'mean cos':>9s} {'std cos':>9s} {'var cos':>9s} " \
             f"{'P(cos>0)':>8s} {'E|ĝ|²/d|g|²':>12s} {'K=1':>7s} {'K=8':>7s} {'K=64':>7s}"
    lines = ["", "per-estimate cosine to the autograd gradient (fresh subspace every step, rank 4, ε=1e-3, fp32)",
             header, "-" * len(header)]
    for (arch, method), run in runs.items():
        trend = {k: sum(v) / len(v) for k, v in run.trend.items()}
        lines.append(
            f"{arch:5s} {method:8s} {run.single.numel():4d} {run.single.mean().item():9.5f} "
            f"{run.single.std().item():9.5f} {run.single.var().item():9.2e} "
            f"{(run.single > 0).double().mean().item():8.3f} {run.sq_norm.mean().item():12.3f} "
            + " ".join(f"{trend[k]:7.4f}" for k in K_VALUES)
        )
    print("\n".join(lines))
    for run in runs.values():
        assert run.single.mean() > 0
        assert (run.single > 0).double().mean() > 0.75  # the finite difference mostly gets gᵀD's sign
