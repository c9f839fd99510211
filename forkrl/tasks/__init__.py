"""Tasks: problems with gold answers and a verifier. Each task module defines its task and its config section (a
``base.TaskConfig`` whose ``build`` makes the task); ``TASKS`` names them, and ``task.type`` in a config is one of its
keys. A new task is one module here and one entry below (or, without touching forkrl, any object following the Task
protocol passed to ``forkrl.train(..., task=...)``)."""

from __future__ import annotations

from .arithmetic import ArithmeticCfg, ArithmeticTask
from .env import EnvCfg, EnvTask
from .base import Problem, Task, TaskConfig, TaskError
from .jsonl import JsonlCfg
from .rgym import ReasoningGymCfg

__all__ = ["TASKS", "ArithmeticTask", "EnvTask", "Problem", "Task", "TaskConfig", "TaskError", "build_task"]


def build_task(cfg: TaskConfig) -> Task:
    """The Task a ``task`` config section describes."""
    return cfg.build()


TASKS = {
    "arithmetic": ArithmeticCfg,
    "reasoning_gym": ReasoningGymCfg,
    "jsonl": JsonlCfg,
    "env": EnvCfg,
}
