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

from .batches import FusedPassError
from .halves import half_losses
from .side_paths import FusedPass, full_fp32_matmuls

__all__ = ["FusedPass", "FusedPassError", "full_fp32_matmuls", "half_losses"]
