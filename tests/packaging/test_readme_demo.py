"""The README's `make demo` output is the committed run's (docs/demo/), not numbers from an older build.

When the demo's trajectory changes (a new generator, a new default), rerun `make demo`, copy
outputs/demo/eval_results.json and metrics.jsonl into docs/demo/ and update the README's block.
"""

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "docs" / "demo"


def readme_demo_output() -> str:
    found = re.search(r"```\nzero-shot accuracy: .*?```", (REPO / "README.md").read_text(), re.S)
    assert found, "README.md: the demo's output block (starting 'zero-shot accuracy:') is gone"
    return found.group(0)


def makefile_flag(name: str) -> str:
    found = re.search(rf"--{name} (\S+)", (REPO / "Makefile").read_text())
    assert found, f"Makefile's demo target has no --{name}"
    return found.group(1)


def test_readme_demo_output_is_the_committed_run():
    output = readme_demo_output()
    results = json.loads((DEMO / "eval_results.json").read_text())
    evals = {row["step"]: row["eval_accuracy"]
             for row in map(json.loads, (DEMO / "metrics.jsonl").read_text().splitlines()) if "eval_accuracy" in row}

    zero_shot = float(re.search(r"zero-shot accuracy:\s+([0-9.]+)", output).group(1))
    final = re.search(r"final accuracy\s+([0-9.]+)\s+\(([0-9.]+) after (\d+) steps\)", output)
    assert final, "the README's summary lost its 'final accuracy X (Y after N steps)' line"
    assert zero_shot == round(results["zero_shot"]["accuracy"], 4) == round(evals[0], 4)
    assert float(final.group(1)) == round(results["final"]["accuracy"], 4)
    assert float(final.group(2)) == round(evals[int(final.group(3))], 4)
    assert f"{results['steps']}/{results['steps']}" in output


def test_committed_run_is_the_makefile_demo():
    results = json.loads((DEMO / "eval_results.json").read_text())
    assert (results["model"], results["task"], results["world_size"]) == (
        makefile_flag("model_name_or_path"), makefile_flag("task"), 2)
    assert results["steps"] == int(makefile_flag("max_steps")) and results["resumed_at_step"] == 0
    assert results["num_eval"] == int(makefile_flag("num_eval"))
