"""Injected non-finite losses: skipped with the weights untouched, counted, logged, and a limit that stops the run."""

import pytest
import torch

import subzero_ds
from helpers.tiny import pattern_batch, tiny_model
from subzero_ds.engine import NonFiniteLossError
from subzero_ds.checkpoint.export import iter_full_state


def poisoned_loss(poisoned_steps: set[int], engine_ref: list):
    """The model's loss, but NaN (on ℓ+ or ℓ−) at the given steps."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        loss = model(**batch).loss
        step = engine_ref[0].global_step
        calls["n"] += 1
        return loss * float("nan") if step in poisoned_steps and calls["n"] % 2 else loss

    return loss_fn


@pytest.mark.parametrize("fused", [False, True], ids=["in-place", "fused"])
def test_non_finite_steps_are_skipped_counted_and_stop_the_run_at_the_limit(fused, caplog):
    engine_ref = []
    config = {"zero_optimization": {"stage": 3},
              "subzero": {"lr": 1e-3, "eps": 1e-3, "rank": 4, "seed": 1, "fused": fused, "max_consecutive_skips": 3}}
    engine = subzero_ds.initialize(model=tiny_model("opt"), config=config,
                                   loss_fn=poisoned_loss({1, 2, 4, 5, 6}, engine_ref))
    engine_ref.append(engine)
    assert not engine.step(pattern_batch(4)).skipped  # step 0 trains
    before = dict(iter_full_state(engine.module))
    with caplog.at_level("INFO"):
        assert [engine.step(pattern_batch(4)).skipped for _ in range(2)] == [True, True]  # steps 1, 2
    after = dict(iter_full_state(engine.module))
    assert all(torch.equal(before[k], after[k]) for k in before)  # exactly as before
    assert engine.consecutive_skips == 2
    assert sum("non-finite loss" in r.getMessage() and "in a row, limit 3" in r.getMessage() for r in caplog.records) == 2
    assert not engine.step(pattern_batch(4)).skipped  # step 3 trains: the count starts again
    assert engine.consecutive_skips == 0
    engine.step(pattern_batch(4))
    engine.step(pattern_batch(4))  # steps 4, 5 skipped
    with pytest.raises(NonFiniteLossError, match="max_consecutive_skips` = 3"):
        engine.step(pattern_batch(4))  # step 6: the third in a row
