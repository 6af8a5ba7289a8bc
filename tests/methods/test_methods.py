"""Every ZO method against a dense single-process reference written here, step by step.

The engine runs on 1 rank under ZeRO-3 (every parameter partitioned). The reference keeps the
trainable parameters as whole tensors and applies each method's update rule with plain loops and
fp64 arithmetic, from the losses and projected gradients the engine measured (the estimator is
checked by the equivalence tests: 1 ≡ 2 ranks, accumulation ≡ a bigger batch) and from the
directions of the library's own generators (checked by test_kernels.py / test_perturbation.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import subzero_ds
from helpers.configs import zo_section
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.checkpoint.export import iter_full_state
from subzero_ds.methods import registry
from subzero_ds.methods.mezo import GaussianDirection
from subzero_ds.methods.subzero import SubspaceDirection

STEPS = 10
LR, EPS, DECAY = 2e-3, 1e-3, 0.1


def config(method: str = "subzero", **subzero) -> dict:
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "subzero": zo_section(method, **{"lr": LR, "eps": EPS, "weight_decay": DECAY, "rank": 3,
                                             "subspace_interval": 4, "seed": 7, **subzero})}


def run_engine(settings: dict, steps: int = STEPS, arch: str = "llama"):
    engine = subzero_ds.initialize(model=tiny_model(arch), config=settings)
    initial = {k: v.double() for k, v in iter_full_state(engine.module) if k in trainable(engine)}
    results = [engine.step(pattern_batch(4, seed=i)) for i in range(steps)]
    final = {k: v for k, v in iter_full_state(engine.module) if k in initial}
    return engine, initial, results, final


def trainable(engine) -> set[str]:
    return {s.name for s in engine.shards}


def assert_close(final: dict, reference: dict, atol: float = 1e-6) -> None:
    worst = max((final[k].double() - reference[k]).abs().max().item() for k in reference)
    assert worst <= atol, worst


def is_matrix(theta: torch.Tensor) -> bool:
    return theta.dim() == 2


def sgd_reference(initial: dict, results, direction_of) -> dict:
    theta = {k: v.clone() for k, v in initial.items()}
    for r in results:
        for name, value in theta.items():
            mean = sum(g * direction_of(name, value.shape, r.step, j) for j, g in enumerate(r.projected_grads))
            mean = mean / len(r.projected_grads)
            decay = DECAY if is_matrix(value) else 0.0
            theta[name] = value - LR * (mean + decay * value)
    return theta


def gaussian_of(seed: int):
    generator = GaussianDirection(seed)
    return lambda name, shape, step, query=0: generator.full(name, tuple(shape), step, query=query).double()


def subzero_of(seed: int, rank: int = 3, interval: int = 4):
    generator = SubspaceDirection(seed, rank, interval, reshape=False)
    return lambda name, shape, step, query=0: generator.full(name, tuple(shape), step, query=query).double()


@pytest.mark.parametrize("method,queries", [("mezo", 1), ("subzero", 1), ("subzero", 3), ("mezo", 2)])
def test_zo_sgd_matches_the_dense_reference(method, queries):
    _, initial, results, final = run_engine(config(method, queries=queries))
    assert all(len(r.projected_grads) == queries for r in results)
    direction_of = subzero_of(7) if method == "subzero" else gaussian_of(7)
    assert_close(final, sgd_reference(initial, results, direction_of))


@pytest.mark.parametrize("method", ["mezo", "subzero"])
def test_momentum_matches_the_dense_reference(method):
    beta = 0.8
    engine, initial, results, final = run_engine(config(method, update="momentum", momentum=beta))
    theta = {k: v.clone() for k, v in initial.items()}
    generator = SubspaceDirection(7, 3, 4, reshape=False) if method == "subzero" else GaussianDirection(7)
    moments: dict[str, torch.Tensor] = {}
    for r in results:
        for name, value in theta.items():
            g = r.projected_grads[0]
            if method == "subzero" and value.dim() == 2:  # r×r coordinates, reset at each refresh (every 4 steps)
                z = generator.z(name, tuple(value.shape), r.step).double()
                if r.step % 4 == 0:
                    moments.pop(name, None)
                moments[name] = beta * moments.get(name, torch.zeros_like(z)) + g * z
                space = generator.subspace(name, tuple(value.shape), r.step)
                mu = math.sqrt(value.numel()) / z.shape[0]
                step_dir = mu * space.u.double() @ moments[name] @ space.vt.double()
            else:
                d = generator.full(name, tuple(value.shape), r.step).double()
                moments[name] = beta * moments.get(name, torch.zeros_like(d)) + g * d
                step_dir = moments[name]
            decay = DECAY if is_matrix(value) else 0.0
            theta[name] = value - LR * (step_dir + decay * value)
    assert_close(final, theta)


@pytest.mark.parametrize("method,on_refresh", [("mezo", "reset"), ("subzero", "reset"), ("subzero", "project")])
def test_adam_matches_the_dense_reference(method, on_refresh):
    (beta1, beta2), adam_eps = (0.9, 0.99), 1e-6
    extra = {"state_on_refresh": on_refresh} if method == "subzero" else {}
    _, initial, results, final = run_engine(config(method, update="adam", betas=[beta1, beta2], adam_eps=adam_eps,
                                                   **extra))
    theta = {k: v.clone() for k, v in initial.items()}
    generator = SubspaceDirection(7, 3, 4, reshape=False) if method == "subzero" else GaussianDirection(7)
    m: dict[str, torch.Tensor] = {}
    v: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    bases: dict[str, object] = {}
    for r in results:
        for name, value in theta.items():
            g = r.projected_grads[0]
            shape = tuple(value.shape)
            subspace = method == "subzero" and value.dim() == 2
            if subspace:
                estimate = g * generator.z(name, shape, r.step).double()
                space = generator.subspace(name, shape, r.step)
                if r.step % 4 == 0 and name in m:  # a new window
                    if on_refresh == "reset":
                        m.pop(name), v.pop(name), counts.pop(name)
                    else:
                        old = bases[name]
                        left = space.u.double().T @ old.u.double()
                        right = old.vt.double() @ space.vt.double().T
                        m[name] = left @ m[name] @ right
                        v[name] = left.square() @ v[name] @ right.square()
                bases[name] = space
            else:
                estimate = g * generator.full(name, shape, r.step).double()
            counts[name] = counts.get(name, 0) + 1
            m[name] = beta1 * m.get(name, torch.zeros_like(estimate)) + (1 - beta1) * estimate
            v[name] = beta2 * v.get(name, torch.zeros_like(estimate)) + (1 - beta2) * estimate.square()
            t = counts[name]
            normalized = (m[name] / (1 - beta1**t)) / ((v[name] / (1 - beta2**t)).sqrt() + adam_eps)
            if subspace:
                mu = math.sqrt(value.numel()) / estimate.shape[0]
                normalized = mu * space.u.double() @ normalized @ space.vt.double()
            decay = DECAY if is_matrix(value) else 0.0
            theta[name] = value - LR * (normalized + decay * value)
    assert_close(final, theta, atol=2e-6)


def test_hizoo_matches_the_authors_update_rule():
    # Larger than the published 1e-8, so that H visibly moves in 10 steps, yet small enough that its
    # growth (the curvature term is ~100 here) keeps the trajectory tame.
    smooth = 1e-3
    engine, initial, results, final = run_engine(config("hizoo", hessian_smooth=smooth))
    theta = {k: v.clone() for k, v in initial.items()}
    hessian = {k: torch.ones_like(v) for k, v in theta.items()}
    z_of = gaussian_of(7)
    for r in results:
        assert r.loss_clean is not None
        curvature = abs(r.loss_pos + r.loss_neg - 2 * r.loss_clean) / (2 * EPS**2)
        for name, value in theta.items():
            z = z_of(name, value.shape, r.step)
            hessian[name] = (1 - smooth) * hessian[name] + smooth * curvature * z.square() / hessian[name]
            decay = DECAY if is_matrix(value) else 0.0
            theta[name] = value - LR * (r.projected_grad * z * hessian[name].sqrt() + decay * value)
    assert_close(final, theta)
    assert max((h - 1).abs().max().item() for h in hessian.values()) > 1e-3  # H did move


def test_hizoo_probes_use_the_hessian_scaled_direction():
    """ℓ± are taken at θ ± ε·√H·z: after H has moved, the probes differ from plain MeZO's."""
    engine, _, results, _ = run_engine(config("hizoo", hessian_smooth=0.5, lr=0.0), steps=3)
    _, _, mezo, _ = run_engine(config("mezo", lr=0.0), steps=3)
    assert results[0].loss_pos == pytest.approx(mezo[0].loss_pos, abs=1e-6)  # H = 1 at step 0
    assert results[2].loss_pos != pytest.approx(mezo[2].loss_pos, abs=1e-6)


def test_sparse_mezo_matches_the_dense_reference():
    sparsity, interval = 0.6, 3
    _, initial, results, final = run_engine(config("sparse_mezo", sparsity=sparsity, mask_interval=interval))
    theta = {k: v.clone() for k, v in initial.items()}
    z_of = gaussian_of(7)
    thresholds = {}
    for r in results:
        if r.step % interval == 0:
            for name, value in theta.items():
                k = max(1, math.ceil((1 - sparsity) * value.numel()))
                thresholds[name] = value.float().abs().reshape(-1).kthvalue(k).values.double()
        for name, value in theta.items():
            mask = (value.float().abs().double() <= thresholds[name]).double()
            d = mask * z_of(name, value.shape, r.step)
            decay = DECAY if is_matrix(value) else 0.0
            theta[name] = value - LR * (r.projected_grad * d + decay * value)
    assert_close(final, theta)
    kept = [(theta[k].float() != initial[k].float() * (1 - LR * DECAY) ** STEPS).float().mean().item()
            for k in theta if theta[k].dim() == 2]
    assert max(kept) < 0.9  # the large weights were not probed or updated


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_accumulation_equals_one_bigger_micro_batch(fused):
    """k = 3 micro-batches of 2 rows ≡ one micro-batch of 6 (every row has the same token count)."""
    settings = config("subzero", fused=fused)
    big = subzero_ds.initialize(model=tiny_model("llama"), config=settings)
    small = subzero_ds.initialize(model=tiny_model("llama"),
                                  config={**settings, "gradient_accumulation_steps": 3,
                                          "train_micro_batch_size_per_gpu": 2})
    for step in range(4):
        batch = pattern_batch(6, seed=step)
        expected = big.step(batch)
        for part in range(3):
            result = small.step({k: v[2 * part : 2 * part + 2] for k, v in batch.items()})
            assert result.updated == (part == 2)
        assert result.loss_pos == pytest.approx(expected.loss_pos, rel=1e-6)
        assert result.projected_grad == pytest.approx(expected.projected_grad, rel=1e-3, abs=1e-3)
    a = dict(iter_full_state(big.module))
    b = dict(iter_full_state(small.module))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_weights_are_not_left_perturbed_between_micro_batches():
    engine = subzero_ds.initialize(model=tiny_model("llama"), config={**config("mezo"), "gradient_accumulation_steps": 2})
    before = dict(iter_full_state(engine.module))
    assert not engine.step(pattern_batch(2, seed=0)).updated
    after = dict(iter_full_state(engine.module))
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("settings", [
    {"update": "momentum"}, {"update": "adam", "state_on_refresh": "project"}, {"method": "hizoo"},
    {"method": "sparse_mezo", "mask_interval": 2}, {"method": "mezo", "update": "adam"}, {"queries": 2},
    *({"method": name} for name in registry.method_names() if name not in ("hizoo", "sparse_mezo")),
], ids=str)
def test_resume_is_bit_exact_with_the_method_state(tmp_path, settings):
    settings = config(**{"method": "subzero", **settings})
    reference = subzero_ds.initialize(model=tiny_model("llama"), config=settings)
    for step in range(7):
        reference.step(pattern_batch(4, seed=step))
        if step == 2:
            reference.save_checkpoint(tmp_path)
    resumed = subzero_ds.initialize(model=tiny_model("llama"), config=settings)
    resumed.load_checkpoint(tmp_path)
    assert resumed.global_step == 3
    for step in range(3, 7):
        resumed.step(pattern_batch(4, seed=step))
    a, b = dict(iter_full_state(reference.module)), dict(iter_full_state(resumed.module))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_another_update_rule_is_refused(tmp_path):
    from subzero_ds.checkpoint.sharded import CheckpointError

    engine = subzero_ds.initialize(model=tiny_model("llama"), config=config(update="momentum"))
    engine.step(pattern_batch(4))
    engine.save_checkpoint(tmp_path)
    other = subzero_ds.initialize(model=tiny_model("llama"), config=config(update="adam"))
    with pytest.raises(CheckpointError, match="subzero.update"):
        other.load_checkpoint(tmp_path)


@pytest.mark.parametrize("settings,keys", [
    ({"method": "hizoo", "fused": True}, ["`subzero.fused`", "`subzero.method`"]),
    ({"method": "hizoo", "update": "adam"}, ["`subzero.update`", "`subzero.method`"]),
    ({"method": "sparse_mezo", "queries": 2}, ["`subzero.queries`", "`subzero.method`"]),
    ({"method": "mezo", "state_on_refresh": "project", "update": "adam"}, ["`subzero.state_on_refresh`", "method"]),
])
def test_settings_that_cannot_combine_are_refused_naming_both_keys(settings, keys):
    from subzero_ds.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"subzero": settings})
    assert all(key in str(caught.value) for key in keys), str(caught.value)


# (settings, steps): update rules and options at their own learning rates, 40 steps each; then every registered
# method with its defaults at lr 2e-3 for 60 steps, where each drops the loss by 0.10-0.15 (5x the margin; at
# lr 5e-3 the same methods stall or climb past ~60 steps).
LEARNING_CASES = [
    ({"method": "subzero", "update": "momentum", "lr": 5e-4}, 40),
    ({"method": "subzero", "update": "adam", "lr": 2e-3}, 40), ({"method": "mezo", "update": "adam", "lr": 2e-3}, 40),
    ({"method": "sparse_mezo", "sparsity": 0.5, "lr": 5e-3}, 40), ({"method": "subzero", "queries": 4, "lr": 5e-3}, 40),
    *(({"method": name, "lr": 2e-3}, 60) for name in registry.method_names()),
]


@pytest.mark.parametrize("settings,steps", LEARNING_CASES, ids=lambda case: str(case))
def test_each_method_lowers_the_loss_of_the_pattern_task(settings, steps):
    """On one fixed batch: the mean loss of the last 5 steps is below the first 5's."""
    section = zo_section(**{"eps": 1e-3, "rank": 4, "subspace_interval": 1000, "seed": 0, **settings})
    engine = subzero_ds.initialize(model=tiny_model("llama"), config={"zero_optimization": {"stage": 0}, "subzero": section})
    batch = pattern_batch(8, seed=0)
    losses = [engine.step(batch).loss for _ in range(steps)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses


@pytest.mark.parametrize("settings", [
    {"update": "momentum", "lr": 2e-4}, {"update": "adam", "lr": 1e-3}, {"queries": 3, "lr": 2e-4},
    {"method": "mezo", "update": "adam", "lr": 1e-3},
])
def test_fused_follows_the_in_place_trajectory_for_every_update_rule(settings):
    """ℓ± within fp32 rounding of each other, so the weights within lr·Δg·|D| per step (see test_fused.py)."""
    _, _, in_place_results, in_place = run_engine(config(**settings, weight_decay=0.0))
    _, _, fused_results, fused = run_engine(config(**settings, weight_decay=0.0, fused=True))
    torch.testing.assert_close(torch.tensor([(r.loss_pos, r.loss_neg) for r in fused_results]),
                               torch.tensor([(r.loss_pos, r.loss_neg) for r in in_place_results]), rtol=1e-5, atol=1e-5)
    assert max((fused[k].double() - in_place[k].double()).abs().max().item() for k in in_place) <= 1e-5
