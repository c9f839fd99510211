"""Rewards: a registry of per-row reward functions and their weighted composition.

A reward function is ``fn(task, problem, completion, rng) -> float | None``. A call that raises, or
returns None, NaN or inf, makes that row *unscorable*: ``Scored.valid_N`` is False, the row is left out
of its group's baseline and gets advantage 0, and the failure is counted (with its first message) in the
step's metrics. It is never a silent 0 (METHODS §2).
"""

from __future__ import annotations

import math
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..types import Rollouts, Scored


def correct(task, problem, completion, rng):
    """The task's verifier: 1.0 for a correct answer, 0.0 for a wrong or missing one."""
    return task.score(problem, completion)


def format_ok(task, problem, completion, rng):
    """1.0 when the task can find an answer in the completion at all (it need not be right)."""
    return float(task.has_answer(completion))


def bernoulli(task, problem, completion, rng):
    """Random Bernoulli(0.5) reward, the Spurious Rewards control (arXiv 2506.10947)."""
    return float(rng.random() < 0.5)


def check_rewards(task, names: list[str]) -> None:
    """Fail before training, not on every row, when a reward cannot apply to the task."""
    from ..config import ConfigError

    if "format" in names and not hasattr(task, "has_answer"):
        raise ConfigError(f"grpo.rewards: the 'format' reward needs a task that can tell whether a completion "
                          f"has an answer, and task {task.name!r} cannot; remove it or use 'correct'")


@dataclass(frozen=True)
class RewardFailures:
    count: int
    first_message: str | None


class RewardTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise RewardTimeout in the block after ``seconds`` of wall time (SIGALRM, main thread only).

    Stops Python code that loops or waits; a call stuck inside C code that never returns to the
    interpreter is not interrupted (code execution goes through ``rewards.sandbox`` for that)."""
    usable = seconds and threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout(f"took longer than {seconds:g}s (grpo.reward_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def score_rollouts(rollouts: Rollouts, texts: list[str], problems, task, components: list[tuple[str, float]],
                   *, seeds: list[int], timeout_s: float | None = None) -> tuple[Scored, RewardFailures]:
    """Weighted sum of reward ``components`` [(name, weight)] for every row; failures mark rows invalid.

    ``seeds`` (one per row) feed the random rewards, so a row's reward never depends on its batch. A call
    that runs past ``timeout_s`` is a failure like any other: its row is unscorable."""
    N = len(texts)
    values = {name: torch.full((N,), float("nan")) for name, _ in components}
    failures, first = 0, None
    for r, (text, pi) in enumerate(zip(texts, rollouts.problem_N.tolist())):
        rng = random.Random(seeds[r])
        for name, _ in components:
            try:
                with time_limit(timeout_s):
                    v = REWARDS[name](task, problems[pi], text, rng)
                if v is None or not math.isfinite(float(v)):
                    raise ValueError(f"reward {name!r} returned {v!r}")
                values[name][r] = float(v)
            except Exception as e:  # noqa: BLE001 - any reward failure is a per-row outcome, not a crash
                failures += 1
                first = first or f"row {r}, reward {name!r}: {type(e).__name__}: {e}"
    valid_N = torch.ones(N, dtype=torch.bool)
    reward_N = torch.zeros(N)
    for name, weight in components:
        valid_N &= ~values[name].isnan()
        reward_N += weight * torch.nan_to_num(values[name], nan=0.0)
    reward_N = torch.where(valid_N, reward_N, torch.zeros_like(reward_N))
    return Scored(rollouts, reward_N, valid_N, values), RewardFailures(failures, first)


REWARDS = {"correct": correct, "format": format_ok, "random": bernoulli}
