"""launch/slurm.sbatch's preemption logic, with stand-ins for srun and scontrol (no slurm here): the batch
script passes SIGUSR1 on to the ranks, requeues the job when they exit with code 4, and a requeued start
resumes (--resume)."""

import os
import signal
import subprocess
import time
from pathlib import Path

from subzero_ds.faults import ExitCode

SBATCH = Path(__file__).resolve().parents[2] / "launch" / "slurm.sbatch"
# srun stand-in: records its arguments; on SIGUSR1 (the ranks' checkpoint-and-stop) exits with the preempted code.
FAKE_SRUN = f"""#!/usr/bin/env bash
echo "$@" > "$FAKE_LOG/srun_args"
trap 'echo USR1 >> "$FAKE_LOG/srun_signals"; exit {int(ExitCode.PREEMPTED)}' USR1
end=$((SECONDS + ${{FAKE_SRUN_SECONDS:-600}}))
while [ "$SECONDS" -lt "$end" ]; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo node0; echo node1; else echo "$@" >> "$FAKE_LOG/scontrol"; fi
"""


def batch_job(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    variables = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path),
                 "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_ID": "77", **env}
    return subprocess.Popen(["bash", str(SBATCH), "--output_dir", "runs/x"], env=variables, stderr=subprocess.PIPE,
                            text=True)


def test_a_signal_before_the_time_limit_reaches_the_ranks_and_requeues_the_job(tmp_path):
    job = batch_job(tmp_path, SLURM_RESTART_COUNT="1")
    while not (tmp_path / "srun_args").exists():
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # as --signal=B:USR1@180 sends it
    assert job.wait(timeout=30) == ExitCode.PREEMPTED
    assert (tmp_path / "srun_signals").read_text().split() == ["USR1"]
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "77"]
    assert (tmp_path / "srun_args").read_text().split()[-3:] == ["--output_dir", "runs/x", "--resume"]


def test_a_run_that_ends_is_not_requeued_and_a_first_start_does_not_resume(tmp_path):
    job = batch_job(tmp_path, FAKE_SRUN_SECONDS="0")
    assert job.wait(timeout=30) == 0
    assert not (tmp_path / "scontrol").exists()
    assert "--resume" not in (tmp_path / "srun_args").read_text()
