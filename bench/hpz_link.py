"""Claim (issue 22, "Across nodes at the speed of one"): under ZeRO++ hpZ, after the first step only scalars cross
the link between nodes, so a slow link no longer slows the step.

Run from the repository root, as root (it creates two network namespaces and shapes the link between them):

    .venv/bin/python bench/hpz_link.py

Two "nodes" on this machine (network namespaces joined by a veth pair, ``harness/netns.py``, built as
tests/distributed/test_two_nodes.py builds them), 2 ranks on each, started on each node with
``deepspeed --hostfile H --no_ssh --node_rank K --master_addr NODE0``. Ranks of a node talk over its
loopback, ranks of different nodes only over the link. OPT-125M shape, random weights, SubZero with
its default settings. One launch per configuration (``harness/link_worker.py``): plain ZeRO-3 over
the 4 ranks; hpZ 2 (one group per node) in data mode; hpZ 2 in perturbation mode. Each takes a first
step on the unshaped link, then ``--steps`` rounds of one step at each rate in turn (unshaped, 1 Gbit/s,
100 Mbit/s: a token bucket on the egress of both ends). Rank 0 runs in node 0 and reads rx + tx of
its end of the link around each step: every byte that crossed, frames' headers and ACKs included.
Options (``--help``): ``--configs``, ``--rates``, ``--steps``, ``--rows`` per rank, ``--seq-len``, ``--dtype``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.load import CpuUsage
from harness.netns import LINK, RATES, Node, shape_link, support, two_nodes
from harness.report import heading, publish, table

REPO = Path(__file__).resolve().parents[1]
RANKS_PER_NODE = 2
CONFIGS = {  # name -> the worker's options
    "plain": ["--hpz", "1"],
    "hpz-data": ["--hpz", "2"],
    "hpz-perturbation": ["--hpz", "2", "--replica-mode", "perturbation"],
}
TARGET_SLOWDOWN = 1.1  # hpZ: step time at the slowest rate ÷ unshaped
TARGET_BYTES = 64 * 1024  # hpZ: bytes across the link per step after the first
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--rates", nargs="+", choices=list(RATES), default=list(RATES))
    parser.add_argument("--steps", type=int, default=3, help="measured steps per rate (rounds of a step per rate)")
    parser.add_argument("--rows", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration before it is killed")
    parser.add_argument("--output", type=Path, default=Path("bench/results/hpz_link.md"))
    return parser.parse_args()


def run_nodes(commands: dict[str, list[str]], logs: Path, timeout: float) -> None:
    """Run one command per node at once; on a failure or a hang, kill them all and raise with every output tail."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    python_path = os.pathsep.join(filter(None, [str(REPO / "bench"), env.get("PYTHONPATH")]))  # harness.link_worker
    env |= {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "GLOO_SOCKET_IFNAME": LINK, "PYTHONPATH": python_path}  # gloo over the link, not 127.0.0.1
    processes = {}
    for name, command in commands.items():
        with open(logs / f"{name}.log", "w") as log:
            processes[name] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in processes.values()):
        if any(p.returncode not in (None, 0) for p in processes.values()) or time.monotonic() > deadline:
            for p in processes.values():  # a rank that died leaves its peers waiting forever
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            break
        time.sleep(0.5)
    if any(p.returncode != 0 for p in processes.values()):
        tails = [f"----- {name} (tail) -----\n{(logs / f'{name}.log').read_text()[-3000:]}" for name in processes]
        status = ", ".join(f"{name} exit {p.returncode}" for name, p in processes.items())
        raise RuntimeError(f"the link worker failed or timed out ({status})\n" + "\n".join(tails))


def children_cpu_s() -> float:
    """CPU seconds of every finished child process (the launchers, and the ranks they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(nodes: list[Node], name: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration: the launcher on both nodes, the link unshaped at the start; rank 0's result, with the
    share of the machine's CPU that other processes used meanwhile (``other_load``)."""
    start, children_start = CpuUsage.now(), children_cpu_s()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "hostfile").write_text("".join(f"{n.hostname} slots={RANKS_PER_NODE}\n" for n in nodes))
        for node in nodes:
            shape_link("unshaped", node.namespace)
        worker = ["--module", "harness.link_worker", *CONFIGS[name], "--dtype", args.dtype, "--rows", str(args.rows),
                  "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--rates", *args.rates,
                  "--result", str(work / "result.json")]
        run_nodes({node.hostname: node.command(
            str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(work / "hostfile"), "--no_ssh",
            "--node_rank", str(k), "--master_addr", nodes[0].address, "--master_port", str(port), *worker)
            for k, node in enumerate(nodes)}, work, args.timeout)  # fmt: skip
        result = json.loads((work / "result.json").read_text())
    usage, ours = CpuUsage.since(start), children_cpu_s() - children_start
    result["other_load"] = max(0.0, usage.host_busy_s - usage.own_s - ours) / (usage.wall_s * usage.host_cores)
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table_rows(name: str, result: dict[str, Any]) -> list[list[str]]:
    """One row per window of a configuration: step s, ÷ unshaped, bytes and frames across, the collectives' bytes."""
    unshaped = mean(result["windows"]["unshaped"]["step_s"]) if "unshaped" in result["windows"] else None
    rows = []
    for window, w in result["windows"].items():
        steps, step_s = len(w["step_s"]), mean(w["step_s"])
        world = sum(b for g, b in w["gathered_by_group"].items() if len(g.split(",")) == result["world_size"])
        ratio = f"{step_s / unshaped:.2f}" if unshaped and window in RATES else "—"
        rows.append([name, window, f"{step_s:.2f}", ratio,
                     f"{w['link_bytes'] / steps / 1024:,.1f}", f"{w['link_frames'] / steps:,.0f}",
                     f"{(w['gathered_bytes'] - world) / steps / 2**20:,.0f}", f"{world / steps / 2**10:,.1f}",
                     f"{w['all_reduce_elements'] / steps:,.0f}"])
    return rows


def verdicts(name: str, result: dict[str, Any], slowest: str, model_bytes: int) -> list[str]:
    """hpZ: step at the slowest rate ÷ unshaped ≤ 1.1 and ≤ 64 KiB across per step at every rate after the first
    step; plain: the same ratio (it should grow) and ≥ a forward's bytes across per step at every rate."""
    windows, plain = result["windows"], name == "plain"
    lines = []
    if "unshaped" in windows and slowest != "unshaped":
        ratio = mean(windows[slowest]["step_s"]) / mean(windows["unshaped"]["step_s"])
        met = "met" if ratio <= TARGET_SLOWDOWN else "missed"
        goal = "should grow" if plain else f"target ≤ {TARGET_SLOWDOWN}: {met}"
        lines.append(f"- `{name}`: step at {slowest} ÷ unshaped **{ratio:.2f}** ({goal})")
    per_step = [w["link_bytes"] / len(w["step_s"]) for window, w in windows.items() if window in RATES]
    worst = min(per_step) if plain else max(per_step)
    met = worst >= model_bytes if plain else worst <= TARGET_BYTES
    goal = f"≥ the model's bytes per forward, {model_bytes / 2**20:,.0f} MiB" if plain else \
        f"≤ {TARGET_BYTES // 1024} KiB"
    lines.append(f"- `{name}`: bytes across the link per step after the first, {'least' if plain else 'most'} of any "
                 f"rate **{worst / 1024:,.1f} KiB** (target {goal}: {'met' if met else 'missed'})")
    return lines


def markdown_report(results: dict[str, Any], loads: list[tuple[float, ...]], args: argparse.Namespace,
                    wall_s: float) -> str:
    """The set-up, one table (every configuration × window), the verdicts, and how it was counted."""
    any_result = next(iter(results.values()))
    model_bytes = any_result["params"] * any_result["bytes_per_param"]
    setup = (f"Two network namespaces joined by a veth pair, {RANKS_PER_NODE} ranks per node (4 in all), CPU + gloo, "
             f"one torch thread per rank, all sharing this machine's {os.cpu_count()} cores. OPT-125M shape "
             f"({any_result['params'] / 1e6:.1f}M parameters, {model_bytes / 2**20:,.0f} MiB in {args.dtype}), random "
             f"weights, SubZero defaults. Batch {args.rows} × {args.seq_len} tokens per rank. First step on the "
             f"unshaped link, then {args.steps} rounds of a step per rate in turn; step s: mean over a rate's steps "
             f"of the slower rank, each timed from a barrier. Wall time {wall_s / 60:.1f} min; load average (1, 5, "
             f"15 min) before {', '.join(f'{v:.2f}' for v in loads[0])}, after "
             f"{', '.join(f'{v:.2f}' for v in loads[-1])}.")
    lines = heading("Across nodes at the speed of one: ZeRO++ hpZ on a slow inter-node link", 4, "bench/hpz_link.py",
                    setup, command=" ".join([".venv/bin/python", "bench/hpz_link.py", *sys.argv[1:]]))
    lines += table(["configuration", "link", "step s", "÷ unshaped", "KiB across the link per step", "frames across",
                    "MiB all-gathered inside a node", "KiB all-gathered over all 4 ranks", "elements all-reduced"],
                   [row for name, result in results.items() for row in table_rows(name, result)])
    others = ", ".join(f"{name} {result['other_load']:.0%}" for name, result in results.items())
    barriers = ", ".join(f"{name} {r['barriers_bytes'] / 1024:.1f} KiB in {r['barriers_frames']} frames"
                         for name, r in results.items())
    lines += ["", *(v for name, result in results.items() for v in verdicts(name, result, args.rates[-1], model_bytes)),
              "", f"Other processes' share of the machine's CPU while each configuration ran: {others}. Bytes across: "
              "rx + tx of node 0's end of the veth (Ethernet frames: TCP/IP headers and ACKs included), read by rank 0 "
              "between barriers around each step; frames: rx + tx packets. Those barriers (the window's two and "
              f"`timed`'s one) cross too, measured alone after the steps: {barriers}. The collectives' columns are "
              "counted per rank and step in the worker (`harness/collectives.py`): an all-gather counts its whole "
              "output on the rank. Both nodes share the machine's cores, so perturbation mode's speed-up (R·q "
              "directions in the time of q) cannot show here; what it shows is that it sends no more across than data "
              "mode."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Build the two nodes, run every configuration, publish the report (and the raw numbers as JSON)."""
    args = parse_args()
    reason = support()
    if reason is not None:
        sys.exit(f"hpz_link: {reason}")
    start, loads, results = time.monotonic(), [os.getloadavg()], {}
    with two_nodes() as nodes:
        for index, name in enumerate(args.configs):
            print(f"hpz_link: {name} …", flush=True)
            try:
                results[name] = measure(nodes, name, 29500 + index, args)
            except RuntimeError as error:
                sys.exit(f"hpz_link: {name}: {error}")
            loads.append(os.getloadavg())
    raw = {"results": results, "load_averages": loads, "args": {k: str(v) for k, v in vars(args).items()}}
    publish(markdown_report(results, loads, args, time.monotonic() - start), args.output, "hpz_link", raw)


if __name__ == "__main__":
    main()
