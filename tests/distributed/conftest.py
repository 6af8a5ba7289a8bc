import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the launch/trajectory helpers beside the tests

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def one_rank(tmp_path_factory):
    """The reference: every trajectory.py case on 1 rank, in-place mode (shared by several test files)."""
    from test_equivalence import trajectories

    return trajectories(tmp_path_factory, "python", 1)
