"""Tasks: problems with gold answers and a verifier. ``build_task`` makes one from its config section."""

from __future__ import annotations

from .arithmetic import ArithmeticTask
from .base import Problem, Task, TaskError

__all__ = ["ArithmeticTask", "Problem", "Task", "TaskError", "build_task"]


def build_task(cfg) -> Task:
    """A Task from ``cfg`` (one of the ``task`` config variants, chosen by ``task.type``)."""
    if cfg.type == "arithmetic":
        return ArithmeticTask(digits=cfg.digits, train_size=cfg.train_size, heldout_size=cfg.heldout_size,
                              strategy_weights=tuple(cfg.strategy_weights), wrong_turn_rate=cfg.wrong_turn_rate,
                              seed=cfg.seed)
    if cfg.type == "reasoning_gym":
        from .rgym import ReasoningGymTask

        return ReasoningGymTask(cfg.name, dict(cfg.config), size=cfg.size, seed=cfg.seed, heldout_size=cfg.heldout_size)
    if cfg.type == "jsonl":
        from .jsonl import JsonlTask

        return JsonlTask(cfg.train_path, cfg.heldout_path, prompt_field=cfg.prompt_field,
                         answer_field=cfg.answer_field, completion_field=cfg.completion_field,
                         id_field=cfg.id_field, verifier=cfg.verifier, answer_pattern=cfg.answer_pattern)
    raise TaskError(f"unknown task.type {cfg.type!r}; valid: arithmetic, reasoning_gym, jsonl")
