"""The built-in rewards, written as any user's reward is (``rewards.api``): parameters filled by name."""

from __future__ import annotations


def correct(task, problem, completion):
    """The task's verifier: 1.0 for a correct answer, 0.0 for a wrong or missing one."""
    return task.score(problem, completion)


def format_ok(task, completion):
    """1.0 when the task can find an answer in the completion at all (it need not be right)."""
    return float(task.has_answer(completion))


def bernoulli(rng):
    """Random Bernoulli(0.5) reward, the Spurious Rewards control (arXiv 2506.10947)."""
    return float(rng.random() < 0.5)


REWARDS = {
    "correct": correct,
    "format": format_ok,
    "random": bernoulli,
}
