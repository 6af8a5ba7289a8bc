"""The side paths of the fused ± pass: per served module, the output of θ ± εD on each half of [B; B]."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ..distributed import log
from ..loss import no_cache, replaced_forward, scored_in_head, scores_language_model, scoring_head
from ..methods.base import Direction, LowRank
from ..zero.shards import ParamShard
from .batches import batch_rows, concat, doubled, first_rows, half_of, half_signs, repeat_rows

UPCAST_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per chunk of a half-precision layer input


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls at full precision inside (no TF32 on NVIDIA GPUs, whatever the user enabled)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@dataclass
class _Served:
    """The trainable parameters of one module and how the fused pass perturbs them."""

    module: nn.Module
    params: dict[str, ParamShard] = field(default_factory=dict)  # attribute name -> shard
    side_path: bool = True  # False: materialize θ ± εD per half


class FusedPass:
    """Installs, for one step at a time, the hooks that make one forward compute ℓ+ and ℓ−.

    Args:
        model: the (DeepSpeed-wrapped) module whose forwards are fused.
        shards: this rank's trainable shards (their full shapes and names key the directions).
        direction: the ZO method's direction generator.
        eps: perturbation scale ε.
    """

    def __init__(self, model: nn.Module, shards: list[ParamShard], direction: Direction, eps: float) -> None:
        self.direction, self.eps = direction, eps
        self._sign_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        # Inside a materialized module each half runs alone: everything below it takes that half's sign.
        self._sign_of_half: float | None = None
        self._rows: int | None = None  # rows of the doubled batch of the model call running now (2B)
        by_param = {id(shard.param): shard for shard in shards}
        self.served: list[_Served] = []
        for module in model.modules():
            owned = {a: by_param[id(p)] for a, p in module._parameters.items() if p is not None and id(p) in by_param}
            if owned:
                self.served.append(_Served(module, owned, side_path=all(
                    self._has_side_path(module, attr, shard) for attr, shard in owned.items())))
        # peft's prompt tuning embeds the prompt once (1 row) and repeats it over the batch: build the
        # ± prompts for [B; B] as two half-batch calls instead.
        config = getattr(model, "active_peft_config", None)
        self._split_get_prompt = getattr(getattr(config, "peft_type", None), "value", None) == "PROMPT_TUNING"
        self.model = model
        # The LM head, if its logits can be computed a chunk of rows at a time (language_model_losses).
        head = scoring_head(model)
        materialized = any(s.module is head and not s.side_path for s in self.served)
        self._head = head if not materialized else None
        fallback = Counter(type(s.module).__name__ for s in self.served if not s.side_path)
        side = sum(len(s.params) for s in self.served if s.side_path)
        log(f"fused ± pass: {side} parameter uses served by a side path"
            + ("; materialized per gathered layer (in-place arithmetic on each half): "
               + ", ".join(f"{n}×{k}" for k, n in sorted(fallback.items())) if fallback else ""))

    def _has_side_path(self, module: nn.Module, attr: str, shard: ParamShard) -> bool:
        if type(module) is nn.Linear or type(module) is Conv1D:
            return attr == "bias" or self.direction.has_lowrank(shard.shape)
        if type(module) is nn.Embedding and module.max_norm is None:
            return attr == "weight" and self.direction.has_lowrank(shard.shape)
        return False

    @contextlib.contextmanager
    def active(self, step: int, query: int = 0, skip: nn.Module | None = None) -> Iterator[None]:
        """Within this block, forwards over a doubled batch compute θ + εD_step on the first half
        and θ − εD_step on the second. ``skip``: a module whose side path the caller applies itself
        (the LM head, when the loss is scored inside it)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.model.register_forward_pre_hook(self._record_rows, with_kwargs=True))
            stack.callback(setattr, self, "_rows", None)
            for served in self.served:
                if served.module is skip:
                    continue
                if served.side_path:
                    hook = self._side_path_hook(served, step, query)
                    stack.enter_context(served.module.register_forward_hook(hook))
                else:
                    stack.enter_context(replaced_forward(served.module, self._split_forward(served, step, query)))
            if self._split_get_prompt:
                stack.enter_context(replaced_forward(self.model, self._split_get_prompt_fn(), "get_prompt"))
            yield

    def _record_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: remember the doubled batch's rows (for inputs shared by the batch)."""
        self._rows = first_rows(args, kwargs)

    def _broadcast_rows(self, inputs: torch.Tensor) -> int | None:
        """The doubled batch's rows if ``inputs`` is one row shared by the whole batch, else None."""
        if self._sign_of_half is None and inputs.ndim and inputs.shape[0] == 1 and (self._rows or 0) > 1:
            return self._rows
        return None

    def serves_language_model_loss(self, batch: Any) -> bool:
        """Whether :meth:`language_model_losses` can compute this batch's default loss."""
        return self._head is not None and scores_language_model(self.model, batch)

    def language_model_losses(self, batch: Mapping[str, Any], step: int, query: int = 0) -> tuple[float, float]:
        """(ℓ+, ℓ−) of the model's own language-model loss from one forward over [B; B].

        The LM head computes its logits, adds its side path and scores them a chunk of rows at a
        time, inside its forward (where ZeRO-3 has gathered its weight once): the logits of the
        doubled batch (824 MB for OPT-125M at 16 × 128 in fp32) never exist whole.
        """
        head, served = self._head, next((s for s in self.served if s.module is self._head), None)
        side_path = self._side_path_hook(served, step, query) if served is not None else None

        def logits(rows: torch.Tensor, half: int) -> torch.Tensor:
            out = nn.Linear.forward(head, rows)  # ZeRO-3's hooks around the head's call gathered the weight
            if side_path is not None:
                outer, self._sign_of_half = self._sign_of_half, 1.0 if half == 0 else -1.0
                try:
                    side_path(head, (rows,), out)
                finally:
                    self._sign_of_half = outer
            return out

        inputs = {k: doubled(v) for k, v in batch.items() if k != "labels"}
        with self.active(step, query=query, skip=head), scored_in_head(self.model, head, batch["labels"], halves=2,
                                                                       logits_of=logits) as scores:
            self.model(**inputs, **no_cache(self.model))
        loss_pos, loss_neg = torch.stack(scores.losses()).tolist()
        return loss_pos, loss_neg

    def _split_get_prompt_fn(self) -> Callable:
        get_prompt = self.model.get_prompt

        def split_get_prompt(batch_size: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            halves = []
            for sign in (1.0, -1.0):
                outer, self._sign_of_half = self._sign_of_half, sign
                try:
                    halves.append(get_prompt(batch_size // 2, *args, **kwargs))
                finally:
                    self._sign_of_half = outer
            return torch.cat(halves)

        return split_get_prompt

    def _signs(self, inputs: torch.Tensor, ndim: int, module: nn.Module) -> torch.Tensor | float:
        if self._sign_of_half is not None:
            return self._sign_of_half * self.eps
        key = (inputs.shape[0], ndim, inputs.device)
        if key not in self._sign_cache:  # built once per shape and device, not once per module call
            self._sign_cache[key] = half_signs(inputs.shape[0], self.eps, ndim, module, inputs.device)
        return self._sign_cache[key]

    def _side_path_hook(self, served: _Served, step: int, query: int = 0) -> Callable:
        embedding = isinstance(served.module, nn.Embedding)
        # D's rows index the input features (x·D) for Conv1D and Embedding, its columns for Linear (x·Dᵀ).
        input_rows = embedding or isinstance(served.module, Conv1D)
        weight, bias = served.params.get("weight"), served.params.get("bias")
        # Per device of the layer's output (the gathered layer's): factors made there once per step.
        factors_on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        bias_on: dict[torch.device, torch.Tensor] = {}

        def factors(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            """(left fp32, right in the output's dtype): Linear x Dᵀ = ((x V) Cᵀ) Uᵀ, Conv1D x D = ((x U) C) Vᵀ,
            Embedding D[ids] = (U[ids] C) Vᵀ."""
            if (device, dtype) not in factors_on:
                low: LowRank = self.direction.lowrank(weight.name, weight.shape, step, device, query)
                with full_fp32_matmuls():
                    right = low.core_vt if input_rows else low.core.T @ low.u.T
                factors_on[device, dtype] = (low.u if input_rows else low.v, right.to(dtype))
            return factors_on[device, dtype]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            inputs = args[0]
            rows = self._broadcast_rows(inputs)
            if rows is not None:  # one output shared by the batch: give each half its own copy to perturb
                output = output.expand(rows, *output.shape[1:]).contiguous()
                inputs = inputs.expand(rows, *inputs.shape[1:])
            signs = self._signs(inputs, inputs.ndim + (1 if embedding else 0), module)
            if weight is not None:
                left, right = factors(output.device, output.dtype)
                with full_fp32_matmuls():
                    projected = F.embedding(inputs, left) if embedding else _project(inputs, left)  # rows × r, fp32
                    projected = (projected * signs).to(output.dtype)
                    # Accumulate into the output: no rows × m temporary (824 MB for OPT's LM head at 16×128).
                    output.view(-1, output.shape[-1]).addmm_(projected.view(-1, projected.shape[-1]), right)
            if bias is not None:
                if output.device not in bias_on:
                    bias_on[output.device] = self.direction.full(bias.name, bias.shape, step, output.device, query)
                output.add_(signs * bias_on[output.device])
            return output

        return hook

    def _split_forward(self, served: _Served, step: int, query: int = 0) -> Callable:
        forward = served.module.forward

        def split_forward(*args: Any, **kwargs: Any) -> Any:
            params = {attr: getattr(served.module, attr) for attr in served.params}
            gathered = {attr: p.data for attr, p in params.items()}  # what DeepSpeed gathered; put back after
            directions = {a: self.direction.full(s.name, s.shape, step, gathered[a].device, query)
                          for a, s in served.params.items()}

            def run(sign: float, *args: Any, **kwargs: Any) -> Any:
                for attr, p in params.items():
                    theta = gathered[attr].to(torch.float32, copy=True)  # the in-place mode's arithmetic
                    p.data = theta.add_(directions[attr].view(theta.shape), alpha=sign * self.eps).to(p.dtype)
                outer, self._sign_of_half = self._sign_of_half, sign
                try:
                    return forward(*args, **kwargs)
                finally:
                    self._sign_of_half = outer

            try:
                if self._sign_of_half is not None:  # already one half: run once with its sign
                    return run(self._sign_of_half, *args, **kwargs)
                first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim), None)
                shared = self._broadcast_rows(first) if first is not None else None
                if shared is not None:  # one input row shared by the batch: each sign's output for its half
                    halves = [repeat_rows(run(sign, *args, **kwargs), shared // 2) for sign in (1.0, -1.0)]
                    return concat(halves, served.module)
                rows = batch_rows(args, kwargs, served.module)
                halves = [run(sign, *half_of(args, rows, h), **half_of(kwargs, rows, h)) for h, sign in ((0, 1.0), (1, -1.0))]
                return concat(halves, served.module)
            finally:
                for attr, p in params.items():
                    p.data = gathered[attr]

        return split_forward


def _project(inputs: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """x·V in fp32; a half-precision x is upcast a chunk of rows at a time, never whole (fc2's input is ffn wide)."""
    if inputs.dtype == torch.float32:
        return inputs @ left
    flat = inputs.reshape(-1, inputs.shape[-1])
    rows = max(1, UPCAST_CHUNK_ELEMENTS // flat.shape[-1])
    return torch.cat([chunk.float() @ left for chunk in flat.split(rows)]).view(*inputs.shape[:-1], -1)
