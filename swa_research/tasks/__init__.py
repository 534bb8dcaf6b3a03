"""Tasks: what the training loop learns (:mod:`swa_research.tasks.base`). The registry is filled
here: a new task is one file and one import line below."""

from swa_research.tasks import classification, lm  # noqa: F401 - register their tasks
from swa_research.tasks.base import (
    CLASSIFICATION,
    TASKS,
    Task,
    TaskMetrics,
    build_task,
    register_task,
    row_metrics,
)

__all__ = ["CLASSIFICATION", "TASKS", "Task", "TaskMetrics", "build_task", "register_task",
           "row_metrics"]
