"""The ``subzero-memory`` command line: flags, then :func:`~subzero_ds.memory.estimate` or a table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .architectures import BUILTIN_MODELS, load_architecture
from .errors import MemoryPlanError
from .estimate import estimate
from .report import prediction_table, step_time_table
from .settings import (
    DTYPE_BYTES,
    H100_NIC_GBPS,
    H100_NVLINK_GBPS,
    H100_SUSTAINED_TFLOPS,
    BatchShape,
    Cluster,
    Offload,
    check_positive,
    load_zero_settings,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subzero-memory",
        description="Predict per-rank GPU/CPU/NVMe memory of a SubZero/MeZO ZeRO-3 run (and of first-order AdamW), "
                    "and the time of its step from bytes, bandwidths and FLOPs.",
    )
    parser.add_argument("--model", help=f"built-in name ({', '.join(BUILTIN_MODELS)}), a config.json path/directory, or a hub id "
                        "(e.g. facebook/opt-13b; its config through the Hugging Face cache)")
    parser.add_argument("--config", help="DeepSpeed JSON config (ZeRO stage 3, with a \"subzero\" section)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--cpu-memory-gib", type=float, default=1024.0, help="CPU memory per node")
    parser.add_argument("--nvme-gib", type=float, default=None, help="NVMe per node (unchecked if absent)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per rank (micro-batch; 1, or 4 with --table)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--precision", choices=list(DTYPE_BYTES), help="override the config's precision")
    parser.add_argument("--offload", choices=[o.value for o in Offload], help="override offload_param.device")
    parser.add_argument("--fused", choices=["on", "off"], help="override subzero.fused")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a CPU-only run (GPU bytes live in host RAM; used for validation)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--hpz-partition-size", type=int, default=None, metavar="K",
                        help="override zero_optimization.zero_hpz_partition_size (ZeRO++ hpZ: a 1/K secondary copy "
                             "per rank, so that forwards gather inside a group of K ranks; normally the GPUs per "
                             "node; 0 or 1: off)")
    parser.add_argument("--intra-node-gbps", type=float, default=H100_NVLINK_GBPS,
                        help="Gbit/s each way between GPUs of a node, per GPU (default: H100 SXM NVLink 4, 900 GB/s "
                             "both ways = 450 GB/s = 3600 Gbit/s each way)")
    parser.add_argument("--inter-node-gbps", type=float, default=H100_NIC_GBPS,
                        help="Gbit/s each way across nodes, per GPU (default: an H100 node's one 400 Gbit/s "
                             "ConnectX-7 NIC per GPU)")
    parser.add_argument("--tflops", type=float, default=H100_SUSTAINED_TFLOPS,
                        help="sustained dense TFLOP/s per GPU (default: ~40%% of an H100 SXM's 989 bf16 peak)")
    parser.add_argument("--table", nargs="?", const="memory", choices=["memory", "time"],
                        help="print a table and exit: memory (the published prediction table; uses --gpus-per-node, "
                             "--gpu-memory-gib, --cpu-memory-gib, --batch-size, --seq-len, --precision) or time "
                             "(plain ZeRO-3 against hpZ, OPT-13B to 175B on 1 to 16 nodes; also uses --fused and "
                             "the link and TFLOP/s flags)")
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    """Every number given, named by its flag: finite and > 0 (``--hpz-partition-size``: a whole number >= 0)."""
    check_positive(**{"--nodes": args.nodes, "--gpus-per-node": args.gpus_per_node,
                      "--gpu-memory-gib": args.gpu_memory_gib, "--cpu-memory-gib": args.cpu_memory_gib,
                      "--seq-len": args.seq_len, "--intra-node-gbps": args.intra_node_gbps,
                      "--inter-node-gbps": args.inter_node_gbps, "--tflops": args.tflops})  # fmt: skip
    check_positive(**{flag: value for flag, value in (("--nvme-gib", args.nvme_gib), ("--batch-size", args.batch_size))
                      if value is not None})  # fmt: skip
    if args.hpz_partition_size is not None and args.hpz_partition_size < 0:
        raise MemoryPlanError(f"`--hpz-partition-size` is {args.hpz_partition_size}; it must be >= 0 (0 or 1: hpZ "
                              "off). Pass the GPUs per node.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``subzero-memory``; exit status 2 on a user mistake (message, no traceback)."""
    from ..config import ConfigError

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _check_numbers(args)
        cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.cpu_memory_gib, args.nvme_gib,
                          args.intra_node_gbps, args.inter_node_gbps, args.tflops)  # fmt: skip
        if args.table:
            batch = BatchShape(4 if args.batch_size is None else args.batch_size, args.seq_len)
            if args.table == "time":
                print(step_time_table(cluster, batch, args.precision or "bf16", args.fused == "on"), end="")
            else:
                print(prediction_table(batch, args.precision or "bf16", args.gpu_memory_gib, args.cpu_memory_gib,
                                       args.gpus_per_node), end="")  # fmt: skip
            return 0
        if not args.model or not args.config:
            raise MemoryPlanError(
                "both `--model` and `--config` are needed (or `--table`). Example: subzero-memory --model opt-13b "
                "--config ds_configs/zero3_subzero_bf16.json --nodes 2"
            )
        arch = load_architecture(args.model)  # the model's error first: it is the first argument
        zero = load_zero_settings(args.config)
        overrides: dict[str, Any] = {}
        if args.precision:
            overrides["precision"] = args.precision
        if args.offload:
            overrides["offload"] = Offload(args.offload)
        if args.hpz_partition_size is not None:
            overrides["hpz_partition_size"] = args.hpz_partition_size
        if args.fused:
            zero = zero.with_fused(args.fused == "on")
        result = estimate(arch, replace(zero, **overrides), cluster, BatchShape(1 if args.batch_size is None else args.batch_size, args.seq_len),
                          device=args.device, attention=args.attention)  # fmt: skip
    except (MemoryPlanError, ConfigError) as error:
        print(f"subzero-memory: error: {error}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.fits else 1
