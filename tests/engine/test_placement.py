"""Every tensor of a ZO step lives on the device it serves: checked without a GPU.

``FakeTensorMode`` makes ``device="cuda"`` tensors on this CPU-only build (no memory, no values)
and raises ``FakeTensorDeviceMismatchError`` when an operation mixes cuda and cpu tensors. The
optimizer's save/perturb/restore/update, the fused pass's side paths (Linear with bias, Embedding,
a tied head) and its materialized path (a LayerNorm), the task scoring and the scalar collectives
run here with parameters, modules and batches on fake cuda tensors.

The limits of the fake mode, and how the tests live with them: a fake tensor has no values, so
nothing may be read back to Python (``tolist()``, ``int(t)``): the collectives' test checks what
``all_reduce`` received and expects the read-back to be refused. Slicing and ``setitem`` of fake
cuda tensors, advanced indexing and ``copy_`` can raise "not linked with support for cuda devices"
on a CPU build: the code under test slices through ``narrow`` and indexes through
``index_select``/``embedding`` (as fast on a GPU), and the fixture replaces ``copy_`` by a
same-device check.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from subzero_ds import distributed, methods
from subzero_ds.tasks.encoding import candidate_scores, classification_loss
from subzero_ds.fused import FusedPass
from subzero_ds.config import SubZeroConfig, UpdateRounding
from subzero_ds.methods import registry
from subzero_ds.methods.base import UpdateStep
from subzero_ds.methods.mezo import GaussianDirection
from subzero_ds.methods.subzero import SubspaceDirection
from subzero_ds.writer import Backup, ShardWriter
from subzero_ds.zero.shards import ParamShard

CUDA = torch.device("cuda")
DIRECTIONS = {
    "subzero": lambda: SubspaceDirection(seed=1, rank=4, interval=10, reshape=False),
    "subzero-reshape": lambda: SubspaceDirection(seed=1, rank=4, interval=10, reshape=True),
    "mezo": lambda: GaussianDirection(seed=1),
}


@pytest.fixture
def fake_cuda(monkeypatch):
    """Fake cuda tensors; ``copy_`` (which the fake mode refuses between fake cuda tensors on a CPU
    build) replaced by a check that source and target share a device, stricter than real torch:
    nothing in a step may copy across devices here."""

    def same_device_copy(target: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if target.device != source.device:
            raise RuntimeError(f"copy_ across devices: {source.device} -> {target.device}")
        return target

    monkeypatch.setattr(torch.Tensor, "copy_", same_device_copy)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # host tensors allowed in: a mix still raises
        yield mode


class Tiny(nn.Module):
    """Embedding → LayerNorm → Linear(bias) → head tied to the embedding."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.norm(self.embed(input_ids))))


def on_fake_cuda(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``module`` with every parameter replaced by a fake cuda one (tied parameters stay tied).

    ``module.to("cuda")`` itself is refused by a CPU build even under the fake mode.
    """
    replaced: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                if id(param) not in replaced:
                    replaced[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=CUDA))
                sub._parameters[name] = replaced[id(param)]
    return module


def shards_of(model: nn.Module) -> list[ParamShard]:
    return [ParamShard(name=n, param=p, shape=tuple(p.shape), start=0, end=p.numel())
            for n, p in model.named_parameters()]


# Every method of the family (direction × update rule), as the "subzero" section configures it: each
# registered method with its defaults, and the update rules and options that change where state lives.
METHODS = {
    **{name: {"method": name} for name in registry.method_names()},
    "subzero": {"method": "subzero", "rank": 4},
    "subzero-reshape": {"method": "subzero", "rank": 4, "reshape": "always"},
    "mezo": {"method": "mezo"},
    "subzero-momentum-q2": {"method": "subzero", "rank": 4, "update": "momentum", "queries": 2},
    "subzero-adam-project": {"method": "subzero", "rank": 4, "update": "adam", "state_on_refresh": "project",
                             "subspace_interval": 1},
    "mezo-adam": {"method": "mezo", "update": "adam"},
    "hizoo": {"method": "hizoo"},
    "sparse_mezo": {"method": "sparse_mezo"},
}


def method_of(name: str) -> methods.ZOMethod:
    settings = SubZeroConfig.model_validate({"seed": 1, "weight_decay": 0.1, **METHODS[name]})
    return methods.build(settings)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_backups_and_method_state_stay_on_the_shards_device(fake_cuda, method, dtype):
    model = on_fake_cuda(Tiny(), dtype)
    shards = shards_of(model)
    assert all(s.device.type == "cuda" for s in shards)
    writer = ShardWriter(shards, method_of(method), eps=1e-3)
    theta = Backup(shards)
    assert len(theta.local) == len(shards) and all(b.device.type == "cuda" for b in theta.local.values())  # beside it
    if method == "sparse_mezo":  # its thresholds come from a bisection that reads counts back: given here
        writer.load_scalars_({"direction": {"thresholds": {shard.name: 0.5 for shard in shards}}})
    queries = writer.method.estimator.queries
    for step in (0, 1):  # step 1 refreshes the subspace of "subspace_interval": 1 (Adam state projected)
        theta.save_()
        for query in range(queries):
            writer.perturb_(step, +1.0, query, theta)
            writer.perturb_(step, -1.0, query, theta)
        writer.restore_(theta)
        grads = [0.5 - query for query in range(queries)]
        losses = [1.0] * len(writer.method.estimator.probes())
        writer.update_(UpdateStep(step, lr=1e-3, grads=grads, losses=losses, eps=1e-3), theta)
    assert all(state.tensor.device.type == "cuda" for state in writer.state())


@pytest.mark.parametrize("method", ["subzero", "mezo", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hpz_secondary_copies_are_written_on_their_device(fake_cuda, method, dtype):
    """Under ZeRO++ hpZ every write also reaches the rank's range of the secondary copy (here its second half),
    computed on that copy's device; in place only it is perturbed, and it alone is backed up."""
    model = on_fake_cuda(Tiny(), dtype)
    shards = []
    for name, param in model.named_parameters():
        param.ds_secondary_tensor = torch.empty(param.numel() - param.numel() // 2, dtype=dtype, device=CUDA)
        shards.append(ParamShard(name=name, param=param, shape=tuple(param.shape), start=0, end=param.numel(),
                                 secondary_start=param.numel() // 2, secondary_end=param.numel()))
    writer = ShardWriter(shards, method_of(method), eps=1e-3, update_rounding=UpdateRounding.STOCHASTIC
                         if dtype == torch.bfloat16 else UpdateRounding.NEAREST)
    theta = Backup(shards)
    assert not theta.local and all(b.device.type == "cuda" for b in theta.secondary.values())
    for step in (0, 1):
        theta.save_()
        writer.perturb_(step, +1.0, 0, theta)
        writer.perturb_(step, -1.0, 0, theta)
        writer.restore_(theta)
        writer.update_(UpdateStep(step, lr=1e-3, grads=[0.5], losses=[1.0, 1.0], eps=1e-3), theta)
    assert len(theta.secondary) == len(shards) and not theta.local


def test_stochastic_rounding_update_stays_on_the_device(fake_cuda):
    model = on_fake_cuda(Tiny(), torch.bfloat16)
    writer = ShardWriter(shards_of(model), method_of("subzero"), eps=1e-3, update_rounding=UpdateRounding.STOCHASTIC)
    writer.update_(UpdateStep(3, lr=1e-6, grads=[-2.0], losses=[1.0, 1.0], eps=1e-3), None)


@pytest.mark.parametrize("method", ["subzero", "mezo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_side_paths_and_materialized_layers_stay_on_the_device(fake_cuda, method, dtype):
    model = on_fake_cuda(Tiny(), dtype)
    fused = FusedPass(model, shards_of(model), DIRECTIONS[method](), eps=1e-3)
    served = {type(s.module).__name__: s.side_path for s in fused.served}
    if method == "subzero":  # the kinds this test means to cover
        assert served == {"Embedding": True, "LayerNorm": False, "Linear": True}
    ids = torch.randint(0, 50, (4, 7), device=CUDA)
    with torch.no_grad(), fused.active(step=0):
        logits = model(torch.cat([ids, ids]))
    assert logits.device.type == "cuda" and logits.shape == (8, 7, 50)


class LogitsModel(nn.Module):
    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask):
        class Output:
            logits = self.embed(input_ids)

        return Output()


def test_candidate_scores_follow_the_logits_device(fake_cuda):
    model = on_fake_cuda(LogitsModel())
    def on(values):  # built on the device (a host->fake-cuda .to() is refused by the CPU build)
        return torch.tensor(values, device=CUDA)

    on_device = {  # what data.candidate_batch builds (then moved): two samples, two single-token candidates
        "input_ids": torch.randint(0, 11, (2, 5), device=CUDA), "attention_mask": on([[1] * 5] * 2),
        "score_row": on([0, 0, 1, 1]), "score_position": on([4, 4, 3, 3]), "score_token": on([2, 3, 2, 3]),
        "score_sample": on([0, 0, 1, 1]), "score_slot": on([0, 1, 0, 1]), "gold": on([1, 0]), "score_slots": 2,
    }
    with torch.no_grad():  # as evaluation and ZO steps run (autograd on fake cuda aborts a CPU build)
        scores = candidate_scores(model, on_device)
        assert scores.device.type == "cuda" and scores.shape == (2, 2)
        assert classification_loss(model, on_device).device.type == "cuda"


def test_scalar_collectives_use_the_collective_device(fake_cuda, monkeypatch):
    received = []

    def all_reduce(tensor, op=None):
        received.append(tensor.device)

    monkeypatch.setattr(distributed, "collective_device", lambda: CUDA)
    monkeypatch.setattr(distributed, "get_world_size_and_rank", lambda: (2, 0))
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    for call in (lambda: distributed.sum_over_ranks(1.0, 2.0), lambda: distributed.disagreements({"seed": 3})):
        with pytest.raises(DataDependentOutputException):
            call()  # a fake tensor has no values to read back: the collectives ran before that
    assert received and all(device.type == "cuda" for device in received)
