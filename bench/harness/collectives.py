"""Counting the bytes that collectives move, per rank, by wrapping DeepSpeed's and torch's collectives.

bench/harness/step_worker.py counts a step's bytes with it; tests/distributed/test_gather_count.py
counts a step's gathers per parameter and its all-reduces with it.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable, Iterable

import torch


class CollectiveCounter:
    """Counts the bytes that collectives move while :attr:`active` (per rank, this process).

    Wraps the gathers and reductions of DeepSpeed's communication backend (``deepspeed.comm``'s
    ``cdb``: ZeRO-3's parameter gathers go through it) and of ``torch.distributed`` (anything
    that calls it directly). Nested calls (DeepSpeed's backend calling torch) count once.
    An all-gather counts its output: the whole gathered tensor that lands on this rank. A
    reduction counts its input.

    Attributes:
        active: whether calls are counted now.
        gathered, reduced: bytes all-gathered and reduced since the last :meth:`take`.
        all_reduces: the number of elements of every all-reduce counted, in order.
        gathered_by_group: bytes all-gathered per process group, keyed by the group's global ranks (ZeRO++
            hpZ gathers inside a node's group, plain ZeRO-3 over the world).
        parameter_gathers: per parameter name, how often ZeRO-3 gathered it (only for the parameters
            given to :meth:`count_parameter_gathers`).
    """

    # name -> (bytes moved, gather?) from the call's positional and keyword arguments
    _SIZES: dict[str, tuple[Callable[[tuple, dict], int], bool]] = {
        "all_gather": (lambda a, k: _nbytes(k.get("tensor_list", a[0] if a else None)), True),
        "all_gather_into_tensor": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "all_gather_single": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "all_gather_base": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "_all_gather_base": (lambda a, k: _nbytes(k.get("output_tensor", a[0] if a else None)), True),
        "all_gather_coalesced": (lambda a, k: _nbytes(k.get("output_tensors", a[0] if a else None)), True),
        "all_reduce": (lambda a, k: _nbytes(k.get("tensor", a[0] if a else None)), False),
        "reduce_scatter_tensor": (lambda a, k: _nbytes(k.get("input_tensor", a[1] if len(a) > 1 else None)), False),
        "reduce_scatter": (lambda a, k: _nbytes(k.get("input_list", a[1] if len(a) > 1 else None)), False),
        "all_reduce_coalesced": (lambda a, k: _nbytes(k.get("tensors", a[0] if a else None)), False),
    }

    def __init__(self) -> None:
        self.active = False
        self.gathered = self.reduced = 0
        self.all_reduces: list[int] = []
        self.gathered_by_group: Counter[tuple[int, ...]] = Counter()
        self.parameter_gathers: Counter[str] = Counter()
        self._depth = 0

    def install(self) -> None:
        """Wrap the collectives (after ``init_distributed``: DeepSpeed's backend exists then)."""
        import deepspeed.comm.comm as ds_comm

        for owner in (ds_comm.cdb, torch.distributed, torch.distributed.distributed_c10d):
            for name, (size, gather) in self._SIZES.items():
                fn = getattr(owner, name, None)
                if callable(fn):
                    setattr(owner, name, self._wrap(fn, size, gather, name == "all_reduce"))

    def count_parameter_gathers(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Also count, by name, how often ZeRO-3 gathers each of these parameters while :attr:`active`.

        ZeRO-3 fetches a module's parameters with ``param.all_gather_coalesced(params)``, one
        collective for the group; each parameter of the group counts once.
        """
        named_parameters = list(named_parameters)
        names = {id(param): name for name, param in named_parameters}
        for _, param in named_parameters:
            param.all_gather_coalesced = self._per_parameter(param.all_gather_coalesced, names)

    def _per_parameter(self, gather: Callable[..., Any], names: dict[int, str]) -> Callable[..., Any]:
        @functools.wraps(gather)
        def counted(params: list[torch.nn.Parameter], *args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.parameter_gathers.update(names[id(p)] for p in params if id(p) in names)
            return gather(params, *args, **kwargs)

        return counted

    def _wrap(self, fn: Callable[..., Any], size: Callable[[tuple, dict], int], gather: bool, all_reduce: bool
              ) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active and self._depth == 0:
                moved = size(args, kwargs)
                if gather:
                    self.gathered += moved
                    self.gathered_by_group[_ranks(kwargs.get("group", args[2] if len(args) > 2 else None))] += moved
                else:
                    self.reduced += moved
                if all_reduce:
                    self.all_reduces.append(_numel(kwargs.get("tensor", args[0] if args else None)))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def take(self) -> tuple[int, int]:
        """(gathered, reduced) bytes since the last call, then reset."""
        counts = (self.gathered, self.reduced)
        self.gathered = self.reduced = 0
        return counts


def _ranks(group: Any) -> tuple[int, ...]:
    """The global ranks of a process group (None: the world). Every gather named here takes it third."""
    import torch.distributed as dist

    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _numel(value: Any) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
