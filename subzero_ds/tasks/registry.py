"""Task names → task classes."""

from __future__ import annotations

from typing import Any

from .base import DataError, Task
from .choice import COPA, ReCoRD
from .classification import CB, RTE, SST2, WSC, BoolQ, MultiRC, WiC
from .custom import Custom
from .qa import DROP, SQuAD

_TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (SST2, RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD, SQuAD, DROP, Custom)
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name`` (any case), built with ``options``.

    Args:
        name: one of `TASK_NAMES`.
        **options: task options; only ``custom`` takes any (``label_words``, ``template``).

    Raises:
        DataError: unknown task name, or an option the task does not take.
    """
    cls = _TASKS.get(str(name).strip().lower())
    if cls is None:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(TASK_NAMES)}")
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        takes = f"takes only {', '.join(f'`{o}`' for o in cls.options)}" if cls.options else "takes no options"
        raise DataError(f"task {cls.name!r} {takes}; got {', '.join(f'`{o}`' for o in unknown)}")
    return cls(**options)
