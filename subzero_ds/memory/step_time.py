"""How long a ZO step takes under ZeRO-3, from bytes and bandwidths: parameter all-gathers plus matmuls.

A ZO step (SubZero, MeZO) runs two forwards over this rank's micro-batch (ℓ+ and ℓ−, in place) or
one over the doubled batch (fused), and under ZeRO-3 every forward all-gathers the whole model:
M = parameters × bytes of the parameter dtype, 2 gathers per step in place, 1 fused. A gather over
a group of G consecutive ranks (all N ranks in plain ZeRO-3; the K ranks of a node with ZeRO++
hpZ) brings each GPU the M·(G−1)/G bytes it does not hold; with g = min(G, GPUs per node) of the
group in its own node, M·(g−1)/G of them come from its node and M·(G−g)/G across nodes.

The gather is a ring over the group (NCCL's all-gather): each GPU receives M·(G−1)/G bytes and the
ring moves at the pace of its slowest link, so

    t_gather = M·(G−1)/G ÷ B,   B = inter_node_gbps if the group spans nodes, else intra_node_gbps

(per GPU, each way; Gbit/s ÷ 8 = bytes/s). This is how nccl-tests reports a multi-node all-gather:
its "bus bandwidth" is M·(G−1)/G ÷ time, and across H100 nodes it is about the NIC rate per GPU.
So plain ZeRO-3 on more than one node gathers at the network's rate; hpZ with K = GPUs per node
gathers over NVLink from the second forward on (the first gathers from the primary shards, as plain
ZeRO-3 does, once per run), and only the step's loss scalars cross nodes (one all-reduce of a few
float64 values, ``subzero_ds.distributed.mean_over_ranks``: latency, not bandwidth; left out of
the time).

Compute: 2·P FLOPs per parameter per token (the matmuls; attention's S² term is left out) at the
sustained rate ``tflops``: 4·P·B·S per step in place or fused. The step time is

    t_step = gathers per step × t_gather + 4·P·B·S ÷ tflops

not overlapped, so an upper bound for the rates given (ZeRO-3's prefetch overlaps gathers with
compute); the default link rates are peaks that NCCL does not reach, so pass measured bus
bandwidths for a tighter figure. Offloaded shards also cross PCIe (not modelled).

Replica-mode perturbation: with hpZ each of the R = N/K groups holds the whole model, so each can
evaluate its own direction: R directions per step at the same step time, plus one all-reduce of R
loss pairs across nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architectures import Architecture
from .errors import MemoryPlanError
from .settings import BatchShape, Cluster, Offload, ZeroSettings

# ℓ+ and ℓ− of one direction, float64: what the step's all-reduce carries across nodes.
LOSS_PAIR_BYTES = 2 * 8


@dataclass(frozen=True)
class StepTime:
    """One steady-state ZO step on one rank: what its gathers move, and how long they and the matmuls take.

    Attributes:
        gathers: parameter all-gathers per step (one per forward: 2 in place, 1 fused).
        group: ranks one gather spans (N in plain ZeRO-3, K with hpZ).
        within_node_bytes, across_node_bytes: what one GPU receives per gather from its own node / other nodes.
        first_across_node_bytes: the same across nodes for the run's first forward (hpZ: a plain gather).
        link_gbps: the rate the gather runs at (the network's if the group spans nodes, else NVLink's).
        comm_s, compute_s: seconds per step of gathers and of matmuls.
        replicas: R = N/K model copies with hpZ (directions per step in replica mode); 1 without.
    """

    gathers: int
    group: int
    within_node_bytes: float
    across_node_bytes: float
    first_across_node_bytes: float
    link_gbps: float
    comm_s: float
    compute_s: float
    replicas: int

    @property
    def total_s(self) -> float:
        """Seconds per step, gathers and matmuls not overlapped (an upper bound for these rates)."""
        return self.comm_s + self.compute_s

    @property
    def across_node_bytes_per_step(self) -> float:
        """Bytes one GPU receives from other nodes per steady-state step: gathers + the loss all-reduce."""
        return self.gathers * self.across_node_bytes + LOSS_PAIR_BYTES * self.replicas


def gather_bytes(model_bytes: float, group: int, gpus_per_node: int) -> tuple[float, float]:
    """(from its own node, from other nodes): bytes one GPU receives when ``group`` consecutive ranks all-gather."""
    local = min(group, gpus_per_node)
    return model_bytes * (local - 1) / group, model_bytes * (group - local) / group


def step_time(arch: Architecture, zero: ZeroSettings, cluster: Cluster, batch: BatchShape) -> StepTime:
    """The step time of the module docstring's model for this run (its :func:`check_hpz` must have passed)."""
    model_bytes = arch.total_params * zero.dtype_bytes
    hpz = zero.hpz_group(cluster.world)
    group = hpz if hpz > 1 else cluster.world
    within, across = gather_bytes(model_bytes, group, cluster.gpus_per_node)
    link_gbps = cluster.inter_node_gbps if across else cluster.intra_node_gbps
    gathers = 1 if zero.fused else 2
    flops = 2 * arch.total_params * 2 * batch.batch_size * batch.seq_len  # two forwards' tokens
    return StepTime(
        gathers=gathers, group=group, within_node_bytes=within, across_node_bytes=across,
        first_across_node_bytes=gather_bytes(model_bytes, cluster.world, cluster.gpus_per_node)[1],
        link_gbps=link_gbps, comm_s=gathers * (within + across) / (link_gbps * 1e9 / 8),
        compute_s=flops / (cluster.tflops * 1e12), replicas=cluster.world // hpz if hpz > 1 else 1,
    )  # fmt: skip


def check_hpz(zero: ZeroSettings, cluster: Cluster) -> None:
    """Refuse an hpZ group that DeepSpeed would refuse or that the planner does not model.

    Raises:
        MemoryPlanError: K does not divide the world size (DeepSpeed's ``_ensure_divisibility``); a
            group neither inside a node nor made of whole nodes (some groups would straddle nodes);
            NVMe offload (DeepSpeed allocates the secondary copy with ``torch.empty`` on the offload
            device, and "nvme" is none).
    """
    key = "`zero_optimization.zero_hpz_partition_size`"
    k, per_node = zero.hpz_group(cluster.world), cluster.gpus_per_node
    if k == 1:
        return
    if cluster.world % k:
        raise MemoryPlanError(
            f"{key} is {k}, which does not divide the {cluster.world} ranks; DeepSpeed refuses it. "
            f"Set it to the GPUs per node ({per_node})."
        )
    if per_node % k and k % per_node:
        raise MemoryPlanError(
            f"{key} is {k} with {per_node} GPUs per node: some hpZ groups would straddle two nodes. "
            f"Use a divisor or a multiple of {per_node} (normally {per_node})."
        )
    if zero.offload is Offload.NVME:
        raise MemoryPlanError(
            f"{key} is {k} with `zero_optimization.offload_param.device` \"nvme\": DeepSpeed allocates hpZ's "
            "secondary copy on the offload device, and NVMe is none. Use offload \"cpu\" or \"none\" with hpZ."
        )
