"""trajectory.py's runs for the architectures beyond OPT and LLaMA: GPT-2, Mistral and Qwen2.

The same script, the same training loop and the same saved results as trajectory.py (launched by
tests/distributed/test_architecture_equivalence.py as 1 plain process and as 2 ranks);
only the cases differ. No architecture has code of its own in subzero_ds: each must follow the
same trajectory on 1 and 2 ranks.
"""

import trajectory

# name -> (architecture, ZeRO stage, method, stage3_param_persistence_threshold, tuning), as trajectory.CASES
CASES = {
    "gpt2-zero3-subzero-partitioned": ("gpt2", 3, "subzero", 0, "full"),  # Conv1D: weight stored in×out
    "gpt2-zero3-mezo": ("gpt2", 3, "mezo", 100_000, "full"),  # persistent parameters: their gathered copies
    "mistral-zero3-subzero-partitioned": ("mistral", 3, "subzero", 0, "full"),
    "qwen2-zero3-subzero-partitioned": ("qwen2", 3, "subzero", 0, "full"),  # q/k/v biases, tied LM head
}

STEPS = 10  # half of trajectory.py's 20: four models per launch, and each launch costs ~20 s on 2 cores

if __name__ == "__main__":
    trajectory.CASES = CASES  # main() reads its cases from the module
    trajectory.main()
