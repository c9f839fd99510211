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


def overlong(completion_ids, max_new_tokens, buffer, penalty=1.0):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to ``max_new_tokens - buffer`` tokens, then
    falling linearly to ``-penalty`` at ``max_new_tokens`` (where a completion is cut off): a length penalty
    that warns before the hard limit instead of only punishing the cut. ``{name: overlong, kwargs: {buffer: 64}}``."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong: buffer={buffer} must be in 1 … sampling.max_new_tokens={max_new_tokens}")
    over = len(completion_ids) - (max_new_tokens - buffer)
    return -penalty * min(max(over, 0), buffer) / buffer


REWARDS = {
    "correct": correct,
    "format": format_ok,
    "random": bernoulli,
    "overlong": overlong,
}
