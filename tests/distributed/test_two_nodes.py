"""Two nodes, for real: 1 rank on each of two "machines" follows the 1-rank trajectory.

The two nodes are two Linux network namespaces joined by a veth pair (each with its own
loopback, address and hostname), so the ranks can reach each other only through the link, as
on a cluster. Each node runs the launcher the way launch/README.md tells a user to:

- ``deepspeed --hostfile H --no_ssh --node_rank K --master_addr NODE0`` started on every node;
- ``mpirun --hostfile H`` started on node 0, reaching node 1 through an rsh agent that does
  ``ip netns exec`` where a cluster would use ssh.

Needs root (``ip netns add``); elsewhere the tests skip and say why.
Run: .venv/bin/pytest tests/distributed/test_two_nodes.py -q
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import netns
from launch import BIN, RENDEZVOUS_VARIABLES, REPO, run
from trajectory_compare import assert_same_trajectory

pytestmark = pytest.mark.distributed
SCRIPT = str(REPO / "tests" / "distributed" / "launching" / "trajectory.py")
CASES = ("opt-zero3-subzero", "llama-zero3-mezo")
STEPS = 20
PORT = 29500  # the default: each node has a network stack of its own, nothing else listens there
TIMEOUT_S = 150  # a healthy 2-node run takes ~20 s; a broken rendezvous hangs instead of failing
MIN_LINK_BYTES = 100_000  # the final weights alone (gathered from both ranks) cross the link


@pytest.fixture(scope="module")
def two_nodes():
    """Two namespaces node0/node1 joined by a veth pair (bench/harness/netns.py); always torn down."""
    reason = netns.support(shaping=False)
    if reason is not None:
        pytest.skip(reason)
    with netns.two_nodes() as nodes:
        yield nodes


def _environment() -> dict[str, str]:
    # Not pytest's own RANK/MASTER_PORT…; gloo must use the link (else it advertises 127.0.0.1).
    inherited = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}
    return {**inherited, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
            "GLOO_SOCKET_IFNAME": netns.LINK}


def _run_nodes(commands: dict[str, list[str]], logs: Path) -> None:
    """Run one command per node at once; on a failure or a hang, raise with every node's output tail."""
    processes = {}
    for name, command in commands.items():
        with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
            processes[name] = subprocess.Popen(command, cwd=REPO, env=_environment(), stdout=out, stderr=err,
                                               start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    while any(p.poll() is None for p in processes.values()):
        failed = any(p.returncode not in (None, 0) for p in processes.values())
        if failed or time.monotonic() > deadline:  # a rank that died leaves its peer waiting forever
            timed_out = not failed
            for p in processes.values():
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.2)
    if timed_out or any(p.returncode != 0 for p in processes.values()):
        verdict = f"timed out after {TIMEOUT_S} s" if timed_out else "failed"
        report = [f"{verdict}: " + ", ".join(f"{name} exit {p.returncode}" for name, p in processes.items())]
        for name in processes:
            for stream in ("out", "err"):
                tail = (logs / f"{name}.{stream}").read_text()[-3000:]
                report.append(f"----- {name} std{stream} (tail) -----\n{tail}")
        pytest.fail("\n".join(report), pytrace=False)


def _load(out: Path) -> dict:
    saved = torch.load(out)
    assert saved["world_size"] == 2
    return saved["results"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank") / "trajectories.pt"
    finished = run("python", 1, SCRIPT, "--out", str(out), "--cases", *CASES, "--steps", str(STEPS))
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    return torch.load(out)["results"]


@pytest.fixture(scope="module")
def deepspeed_no_ssh(two_nodes, tmp_path_factory):
    """``deepspeed --no_ssh --node_rank K`` started on each node, as launch/multi_node.sh does."""
    work = tmp_path_factory.mktemp("deepspeed_no_ssh")
    hostfile = work / "hostfile"
    hostfile.write_text("".join(f"{n.hostname} slots=1\n" for n in two_nodes))
    out = work / "trajectories.pt"
    before = two_nodes[1].received_bytes()
    _run_nodes({node.hostname: node.command(
        str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
        "--master_addr", two_nodes[0].address, "--master_port", str(PORT),
        SCRIPT, "--out", str(out), "--cases", *CASES, "--steps", str(STEPS)) for k, node in enumerate(two_nodes)}, work)
    return _load(out), two_nodes[1].received_bytes() - before


def _open_mpi_4() -> str | None:
    """None when mpirun is Open MPI 4 (whose rsh agent option this test uses), else why not."""
    if shutil.which("mpirun") is None:
        return "mpirun not installed (apt-get install openmpi-bin)"
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True).stdout
    if not re.search(r"Open MPI\)? 4\.", version):
        return f"the rsh-agent recipe is written for Open MPI 4, found: {version.splitlines()[:1]}"
    try:
        import mpi4py  # noqa: F401  (DeepSpeed discovers rank/world through it)
    except ImportError:
        return "mpi4py not installed (pip install 'subzero_ds[mpi]')"
    return None


@pytest.fixture(scope="module")
def mpirun_hostfile(two_nodes, tmp_path_factory):
    """``mpirun --hostfile H`` on node 0; an rsh agent stands in for ssh to start Open MPI's daemon on node 1."""
    reason = _open_mpi_4()
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("mpirun")
    hostfile = work / "hostfile"
    hostfile.write_text("".join(f"{n.hostname} slots=1\n" for n in two_nodes))
    # Open MPI calls `AGENT HOST ORTED_COMMAND…` like `ssh HOST ORTED_COMMAND…`: the command is shell text.
    agent = work / "netns_rsh"
    agent.write_text("#!/bin/sh\nhost=$1; shift\ncase $host in\n"
                     + "".join(f"  {n.hostname}) ns={n.namespace};;\n" for n in two_nodes)
                     + '  *) echo "netns_rsh: unknown host $host" >&2; exit 1;;\nesac\n'
                     + 'exec ip netns exec "$ns" unshare --uts sh -c "hostname $host && $*"\n')
    agent.chmod(0o755)
    out = work / "trajectories.pt"
    before = two_nodes[1].received_bytes()
    _run_nodes({"mpirun@node0": two_nodes[0].command(
        shutil.which("mpirun"), "--allow-run-as-root", "--hostfile", str(hostfile), "-np", "2",
        "--mca", "plm_rsh_agent", str(agent), "--mca", "oob_tcp_if_include", netns.LINK,
        "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", netns.LINK,
        *[a for v in ("PATH", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "TRANSFORMERS_VERBOSITY")
          for a in ("-x", v)],
        sys.executable, SCRIPT, "--out", str(out), "--cases", *CASES, "--steps", str(STEPS))}, work)
    return _load(out), two_nodes[1].received_bytes() - before


@pytest.mark.parametrize("case", CASES)
def test_deepspeed_no_ssh_two_nodes_follow_the_one_rank_trajectory(one_rank, deepspeed_no_ssh, case):
    two_node_results, link_bytes = deepspeed_no_ssh
    assert link_bytes > MIN_LINK_BYTES, f"only {link_bytes} bytes crossed the link between the nodes"
    assert len(one_rank[case]["losses"]) == STEPS
    assert_same_trajectory(one_rank[case], two_node_results[case])


@pytest.mark.parametrize("case", CASES)
def test_mpirun_two_nodes_follow_the_one_rank_trajectory(one_rank, mpirun_hostfile, case):
    two_node_results, link_bytes = mpirun_hostfile
    assert link_bytes > MIN_LINK_BYTES, f"only {link_bytes} bytes crossed the link between the nodes"
    assert_same_trajectory(one_rank[case], two_node_results[case])
