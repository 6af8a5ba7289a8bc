"""Rademacher directions: ±1 from the top bit of MeZO's Philox words, any slice equal to the whole.

The world-size, resume, placement, learning and reference tests every registered method gets cover
it too (they read the registry)."""

import torch

from subzero_ds.kernels import philox
from subzero_ds.methods import registry
from subzero_ds.methods.mezo import gaussian_key
from subzero_ds.methods.rademacher import RademacherDirection

SHAPE = (96, 64)


def test_every_element_is_plus_or_minus_one_and_balanced():
    d = RademacherDirection(seed=3).full("w", SHAPE, step=5)
    assert d.shape == SHAPE and set(d.unique().tolist()) == {-1.0, 1.0}
    assert abs(d.mean().item()) < 4 / d.numel() ** 0.5  # E = 0; 4 standard deviations


def test_the_sign_is_the_top_bit_of_mezos_philox_word():
    d = RademacherDirection(seed=3).full("w", SHAPE, step=5, query=1).view(-1)
    words, lane = philox.counter_words(0, d.numel(), gaussian_key(3, 5, "w", SHAPE, 1))
    word = words.gather(0, lane.unsqueeze(0)).squeeze(0)
    assert torch.equal(d, torch.where(word >= 2**31, -1.0, 1.0))


def test_a_slice_is_the_same_range_of_the_whole():
    direction = RademacherDirection(seed=3)
    whole = direction.full("w", SHAPE, step=2).view(-1)
    theta = torch.randn(whole.numel())
    out = torch.empty(1000)
    direction.apply_(out, theta[777:1777].clone(), "w", SHAPE, 2, 777, beta=1.0, alpha=0.5)
    assert torch.equal(out, theta[777:1777] + 0.5 * whole[777:1777])


def test_it_is_registered_as_mezo_with_signs():
    spec = registry.method("rademacher")
    assert spec.fusable and spec.multi_query and spec.update_rule is None and spec.forwards_per_step() == 2
