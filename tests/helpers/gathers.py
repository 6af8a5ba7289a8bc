"""Counting what a few ZO steps gather, by parameter and by process group (tests/distributed's gather tests)."""

from __future__ import annotations


def counted_steps(zero: dict, fused: bool, steps: int, global_batch: int):
    """(engine, counter): a tiny LLaMA under ZeRO-3 with ``zero`` merged in, its collectives counted over ``steps``
    steps after a first one (which traces the modules). Run on every rank."""
    import subzero_ds
    from harness.collectives import CollectiveCounter
    from helpers.tiny import pattern_batch, rank_slice, tiny_model
    from subzero_ds.distributed import get_world_size_and_rank

    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero},
              "subzero": {"lr": 1e-4, "eps": 1e-3, "rank": 4, "seed": 1, "fused": fused}}
    engine = subzero_ds.initialize(model=tiny_model("llama"), config=config)
    world_size, rank = get_world_size_and_rank()
    counter = CollectiveCounter()
    counter.install()
    counter.count_parameter_gathers(engine.module.named_parameters())
    batch = lambda step: rank_slice(pattern_batch(global_batch, seed=step), rank, world_size)  # noqa: E731
    engine.step(batch(0))
    counter.active = True
    for step in range(1, steps + 1):
        engine.step(batch(step))
    counter.active = False
    return engine, counter
