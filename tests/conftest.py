import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# tests/helpers holds fixtures that are not part of the package, and bench/harness the benchmarks'
# measuring code that tests share (its collective counter): both importable here and in every process a
# test starts (launched ranks, `python -c` children).
TESTS = str(Path(__file__).parent)
BENCH = str(Path(__file__).parents[1] / "bench")
sys.path[:0] = [TESTS, BENCH]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, BENCH, os.environ.get("PYTHONPATH")]))
