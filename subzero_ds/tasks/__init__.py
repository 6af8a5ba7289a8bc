"""The task suite: MeZO's prompts for SST-2, SuperGLUE, SQuAD, DROP and custom data, and their loader.

    task = get_task("rte")
    train = load_samples(task, "train", data_dir="data/RTE", limit=1000, seed=0)
    train[0].prompt, train[0].candidates, train[0].gold    # '...Yes or No?', (' Yes', ' No'), 1
"""

from .base import DataError, HubSource, Sample, Task, TaskKind
from .loading import find_local_file, load_samples
from .registry import TASK_NAMES, get_task

__all__ = [
    "TaskKind", "Sample", "Task", "DataError", "HubSource", "get_task", "TASK_NAMES", "load_samples", "find_local_file",
]
