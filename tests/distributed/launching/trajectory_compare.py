"""The comparison every multi-rank test makes: same losses and same final weights as the reference run."""

import torch


def assert_same_trajectory(reference: dict, other: dict) -> float:
    """Assert ``other`` (a trajectory.py result) followed ``reference``; returns the max abs weight difference."""
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    assert reference["state"].keys() == other["state"].keys()
    differences = {name: (other["state"][name] - t).abs().max().item() for name, t in reference["state"].items()}
    worst = max(differences, key=differences.get)
    print(f"max abs parameter difference {differences[worst]:.2e} ({worst})")
    assert differences[worst] <= 1e-5, f"{worst}: max abs difference {differences[worst]}"
    return differences[worst]
