import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the launch/trajectory helpers beside the tests
