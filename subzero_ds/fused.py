"""The fused ± pass: ℓ+ and ℓ− from ONE forward over the doubled batch [B; B].

Because SubZero's D = U·C·Vᵀ is low-rank (C = μ·Z), (W ± εD)x = Wx ± ε·U(C(Vᵀx)): the weights stay
untouched and a rank-r side path adds +… to the first half of a module's output and −… to the
second. Under ZeRO-3 every layer is then gathered once per step instead of twice, and only the
update writes to the shards (no restore, so no half-precision restore drift).

How each trainable parameter is served, decided once per model:

- ``nn.Linear`` weight with a low-rank direction: side path ``± ε·((x V) Cᵀ) Uᵀ``;
- GPT-2's ``Conv1D`` weight (``x W + b``, W stored in×out) with a low-rank direction: side path
  ``± ε·((x U) C) Vᵀ`` (x·D rather than x·Dᵀ: the factors swap roles relative to ``nn.Linear``);
- ``nn.Embedding`` weight with a low-rank direction: side path ``± ε·(U[ids] C) Vᵀ`` (a tied
  LM head is an ``nn.Linear`` with the same parameter, hence the same direction);
- ``nn.Linear`` and ``Conv1D`` bias: ``± ε·d``, its Gaussian direction added to the output;
- everything else (norm weights, MeZO's full-rank directions, reshaped PEFT factors, module
  types this file does not know): *materialized per gathered layer* — the module runs twice on
  the two halves of its input with its parameters set to θ + εD and θ − εD exactly as the
  in-place mode would write them, then its gathered tensors are put back untouched.

A layer whose input is shared by the whole batch (one row in dim 0, broadcast later: GPT-2's
position embedding gets ``position_ids`` of shape 1 × seq) has one output for both halves; its
output is repeated to the doubled batch's rows first, so each half gets its own sign.

The loss function is not changed: :func:`half_losses` runs it twice against stand-ins for the
model; the first run's model calls execute the real model once each on the doubled batch, and
every call hands back the half of the output that belongs to that run. With the default loss (a
Hugging Face causal/masked LM and its labels), :meth:`FusedPass.language_model_losses` instead
scores both halves inside the LM head's forward, a chunk of rows at a time, so that the logits
of the doubled batch never exist whole.
"""

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

from .distributed import log
from .loss import CHUNKED_LOSS_TYPES, logits_loss, loss_type, no_cache, replaced_forward, scored_in_head
from .loss import scores_language_model, scoring_head
from .methods.base import Direction, LowRank
from .zero.shards import ParamShard


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


class FusedPassError(RuntimeError):
    """A model or loss function that the fused ± pass cannot serve (the fix: ``"fused": false``)."""


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
            + (f"; materialized per gathered layer (in-place arithmetic on each half): "
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
        self._rows = _first_rows(args, kwargs)

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

        inputs = {k: _doubled(v) for k, v in batch.items() if k != "labels"}
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
            self._sign_cache[key] = _half_signs(inputs.shape[0], self.eps, ndim, module, inputs.device)
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
                    halves = [_repeat_rows(run(sign, *args, **kwargs), shared // 2) for sign in (1.0, -1.0)]
                    return _concat(halves, served.module)
                rows = _batch_rows(args, kwargs, served.module)
                halves = [run(sign, *_half(args, rows, h), **_half(kwargs, rows, h)) for h, sign in ((0, 1.0), (1, -1.0))]
                return _concat(halves, served.module)
            finally:
                for attr, p in params.items():
                    p.data = gathered[attr]

        return split_forward


def half_losses(loss_fn: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batch: Any) -> tuple[float, float]:
    """(ℓ+, ℓ−) of ``loss_fn(model, batch)`` from one model forward per model call, on the doubled batch.

    ``loss_fn`` runs twice against stand-ins for ``model``. In the first run each model call runs
    the real model once with every tensor argument doubled along dim 0; both runs get their half
    of that output. Labels are held back from the doubled call and each half's loss is computed
    with the model's own loss function, as its forward would.
    """
    cache: list[tuple[Any, Any]] = []
    losses = []
    for half in (0, 1):
        stand_in = _HalfModel(model, cache, half)
        losses.append(float(loss_fn(stand_in, batch).detach().float()))
        if stand_in.calls != len(cache):
            raise FusedPassError(
                f"the loss function called the model {len(cache)} times for ℓ+ but {stand_in.calls} times for "
                "ℓ−: the fused ± pass needs a loss function that calls the model the same way each time. "
                'Make it deterministic, or set "fused": false in the "subzero" section.'
            )
    return losses[0], losses[1]


class _HalfModel:
    """Stands in for the model inside ``loss_fn``: one half of each fused model call's output."""

    def __init__(self, model: nn.Module, cache: list[tuple[Any, Any]], half: int) -> None:
        self._model, self._cache, self._half, self.calls = model, cache, half, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._half == 0:
            labels = kwargs.pop("labels", None)
            doubled = self._model(*_doubled(args), **_doubled(kwargs))
            self._cache.append((doubled, labels))
        elif self.calls >= len(self._cache):
            raise FusedPassError(
                "the loss function called the model more often for ℓ− than for ℓ+: the fused ± pass needs the "
                'same calls each time. Make it deterministic, or set "fused": false in the "subzero" section.'
            )
        doubled, labels = self._cache[self.calls]
        self.calls += 1
        output = _take_half(doubled, self._half)
        if labels is not None:
            output["loss"] = _model_loss(self._model, output["logits"], labels)
        return output

    forward = __call__

    def get_output_embeddings(self) -> None:
        """None: the loss function must score the logits this stand-in returns, not inside the real LM head."""
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _model_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss the model's forward computes from ``labels`` (causal and masked LMs), in chunks."""
    kind = loss_type(model) or "ForCausalLM"
    if kind not in CHUNKED_LOSS_TYPES:
        raise FusedPassError(
            f"the fused ± pass computes ℓ+ and ℓ− from the logits, and knows causal- and masked-LM losses only; "
            f"this model's loss type is {kind!r}. Pass `loss_fn(model, batch)` computing the loss from "
            'the logits to subzero_ds.initialize, or set "fused": false in the "subzero" section.'
        )
    return logits_loss(model, logits, labels)


def _project(inputs: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """x·V in fp32; a half-precision x is upcast a chunk of rows at a time, never whole (fc2's input is ffn wide)."""
    if inputs.dtype == torch.float32:
        return inputs @ left
    flat = inputs.reshape(-1, inputs.shape[-1])
    rows = max(1, UPCAST_CHUNK_ELEMENTS // flat.shape[-1])
    return torch.cat([chunk.float() @ left for chunk in flat.split(rows)]).view(*inputs.shape[:-1], -1)


def _doubled(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return torch.cat([values, values]) if values.ndim else values
    if isinstance(values, dict):
        return {k: _doubled(v) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(_doubled(v) for v in values)
    return values


def _take_half(output: Any, half: int) -> Any:
    if isinstance(output, torch.Tensor):
        return output.narrow(0, half * (output.shape[0] // 2), output.shape[0] // 2) if output.ndim else output
    if isinstance(output, dict):  # ModelOutput is a dict; copy it without its fused-batch loss
        halved = type(output)(**{k: _take_half(v, half) for k, v in output.items() if k != "loss"})
        return halved
    if isinstance(output, (tuple, list)):
        return type(output)(_take_half(v, half) for v in output)
    return output


def _half_signs(rows: int, eps: float, ndim: int, module: nn.Module, device: torch.device | str = "cpu") -> torch.Tensor:
    """+ε for the first half of the rows, −ε for the second (on ``device``), shaped to broadcast over ``ndim`` dims."""
    if rows % 2:
        raise FusedPassError(
            f"{type(module).__name__} got an input with {rows} rows in dim 0; the fused ± pass needs the doubled "
            'batch [B; B] in dim 0 of every layer input. Set "fused": false in the "subzero" section for this model.'
        )
    half = torch.full((rows // 2,), eps, dtype=torch.float32, device=device)
    return torch.cat([half, -half]).view(rows, *([1] * (ndim - 1)))


def _first_rows(args: tuple, kwargs: dict) -> int | None:
    """Rows in dim 0 of the first tensor argument with a dim 0, or None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    return None


def _repeat_rows(output: Any, rows: int) -> Any:
    """``output`` (tensors with one row in dim 0, possibly nested in tuples) repeated to ``rows`` rows."""
    if isinstance(output, torch.Tensor):
        return output.expand(rows, *output.shape[1:]) if output.ndim and output.shape[0] == 1 else output
    if isinstance(output, (tuple, list)):
        return type(output)(_repeat_rows(v, rows) for v in output)
    return output


def _batch_rows(args: tuple, kwargs: dict, module: nn.Module) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim:
            _half_signs(value.shape[0], 0.0, 1, module)  # raises unless the rows split in halves
            return value.shape[0]
    raise FusedPassError(f"{type(module).__name__} was called without a tensor input to split into ± halves.")


def _half(values: Any, rows: int, half: int) -> Any:
    if isinstance(values, torch.Tensor):
        return values.narrow(0, half * rows // 2, rows // 2) if values.ndim and values.shape[0] == rows else values
    if isinstance(values, dict):
        return {k: _half(v, rows, half) for k, v in values.items()}
    if isinstance(values, (tuple, list)):
        return type(values)(_half(v, rows, half) for v in values)
    return values


def _concat(outputs: list[Any], module: nn.Module) -> Any:
    first, second = outputs
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second]) if first.ndim else first
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([a, b], module) for a, b in zip(first, second))
    if first is None:
        return None
    raise FusedPassError(
        f"{type(module).__name__} returned {type(first).__name__}; the fused ± pass can only join tensor outputs "
        'of a layer run on two halves. Set "fused": false in the "subzero" section for this model.'
    )
