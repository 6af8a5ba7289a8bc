"""Two "nodes" on one machine: network namespaces joined by a veth pair, and a link that can be slowed down.

tests/distributed/test_two_nodes.py runs its launchers across them too. Each namespace has its own loopback, address
and hostname, so ranks on one node reach the other only through the link (named alike on both ends,
like eth1 on a cluster), while ranks of the same node talk over their own loopback. The link's
egress can be limited with a token bucket (``tc qdisc … tbf``) on each end, so the link between the
nodes is slow and the one inside a node is not. Needs root (``ip netns add``, ``tc``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LINK = "szlink"  # the inter-node interface, named alike on both nodes
# rate name -> tbf's "rate R burst B latency L" (burst ≥ rate / HZ; latency bounds the queue), None: unshaped
RATES: dict[str, list[str] | None] = {
    "unshaped": None,
    "1gbit": ["rate", "1gbit", "burst", "1mb", "latency", "50ms"],
    "100mbit": ["rate", "100mbit", "burst", "128kb", "latency", "100ms"],
}


@dataclass(frozen=True)
class Node:
    """One "machine": a network namespace with a hostname and an address on the link."""

    namespace: str
    hostname: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside this node: its network namespace and a hostname of its own."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname, *argv]

    def received_bytes(self) -> int:
        """Bytes received on this node's end of the link so far (read from outside the node)."""
        counter = f"/sys/class/net/{LINK}/statistics/rx_bytes"
        return int(_run("ip", "netns", "exec", self.namespace, "cat", counter))


def _run(*argv: str, check: bool = True) -> str:
    """stdout of ``argv``; with ``check``, a failure raises with its stderr."""
    finished = subprocess.run(argv, check=False, capture_output=True, text=True)
    if check and finished.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {finished.stderr.strip()}")
    return finished.stdout


def support(shaping: bool = True) -> str | None:
    """None when this process may create namespaces (and, with ``shaping``, shape links), else why not."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    missing = [tool for tool in ("ip", "unshare", *(["tc"] if shaping else [])) if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (iproute2, util-linux)"
    if os.geteuid() != 0:
        return "needs root: `ip netns add` and `tc` need CAP_SYS_ADMIN / CAP_NET_ADMIN"
    probe = f"szprobe-{secrets.token_hex(4)}"  # root in a container may still lack the capability
    try:
        _run("ip", "netns", "add", probe)
    except RuntimeError as e:
        return f"`ip netns add` is not permitted here (needs CAP_SYS_ADMIN): {e}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def shape_link(rate: str, namespace: str | None = None) -> None:
    """Limit the egress of a node's end of the link to ``rate`` (a key of :data:`RATES`; "unshaped" lifts it).

    Args:
        rate: the rate's name.
        namespace: the node's namespace; None: the namespace this process runs in (a rank on its node).
    """
    tc = ["tc", *(["-n", namespace] if namespace else [])]
    _run(*tc, "qdisc", "del", "dev", LINK, "root", check=False)  # none yet: nothing to delete
    if RATES[rate] is not None:
        _run(*tc, "qdisc", "add", "dev", LINK, "root", "tbf", *RATES[rate])


def link_counters() -> tuple[int, int]:
    """(bytes, frames) received plus sent on this namespace's end of the link so far (headers and ACKs included)."""
    statistics = Path("/sys/class/net") / LINK / "statistics"
    rx_tx = [[int((statistics / f"{way}_{unit}").read_text()) for way in ("rx", "tx")] for unit in ("bytes", "packets")]
    return sum(rx_tx[0]), sum(rx_tx[1])


@contextlib.contextmanager
def two_nodes() -> Iterator[list[Node]]:
    """Namespaces node0/node1 joined by a veth pair on a /24 of their own; always torn down (with what runs there)."""
    tag = secrets.token_hex(3)
    subnet = f"10.232.{int(tag[:2], 16)}"
    nodes = [Node(f"subzero-bench-{tag}-node{k}", f"node{k}", f"{subnet}.{k + 1}") for k in range(2)]
    veths = [f"sz{tag}b{k}" for k in range(2)]  # unique in the root namespace while being created
    try:
        for node in nodes:
            _run("ip", "netns", "add", node.namespace)
        _run("ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for node, veth in zip(nodes, veths):
            _run("ip", "link", "set", veth, "netns", node.namespace)
            _run("ip", "-n", node.namespace, "link", "set", veth, "name", LINK)
            _run("ip", "-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", LINK)
            _run("ip", "-n", node.namespace, "link", "set", "lo", "up")
            _run("ip", "-n", node.namespace, "link", "set", LINK, "up")
        yield nodes
    finally:
        _tear_down(nodes, veths)


def _tear_down(nodes: list[Node], veths: list[str]) -> None:
    """Stop whatever still runs in the namespaces (all of it ours), then delete them and the link."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for n in nodes for p in _run("ip", "netns", "pids", n.namespace, check=False).split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if pids and sig == signal.SIGTERM:
            time.sleep(1)
    for node in nodes:
        _run("ip", "netns", "del", node.namespace, check=False)
    for veth in veths:  # only left in the root namespace if setup failed before moving it
        _run("ip", "link", "del", veth, check=False)
    for node in nodes:  # DeepSpeed's shm all-reduce buffers are keyed by the master address
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{node.address}_*"):
            with contextlib.suppress(OSError):
                os.unlink(path)
