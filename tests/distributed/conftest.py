import os
import sys
from pathlib import Path

# launching/ holds launch.py, the scripts the tests launch as ranks and their shared helpers: importable
# here and in every process a test starts (test_offload.py and test_gather_count.py run as rank scripts).
LAUNCHING = str(Path(__file__).parent / "launching")
sys.path.insert(0, LAUNCHING)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [LAUNCHING, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def one_rank(tmp_path_factory):
    """The reference: every trajectory.py case on 1 rank, in-place mode (shared by several test files)."""
    from launch import trajectories

    return trajectories(tmp_path_factory, "python", 1)
