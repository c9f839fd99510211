"""The built-in rewards, written as any user's reward is (``rewards.api``): parameters filled by name."""

from __future__ import annotations

import re

from .majority import majority

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)


def correct(task, problem, completion, episode):
    """The task's verifier: 1.0 for a correct answer, 0.0 for a wrong or missing one; for an env task, 1.0 for an
    episode that succeeded (``task.success``)."""
    if episode is not None:
        if episode.error is not None:
            raise ValueError(f"the environment raised: {episode.error}")
        return float(task.success(episode))
    return task.score(problem, completion)


def env_return(episode):
    """An env task's episode return, the sum of its turns' rewards (RAGEN's reward; FrozenLake's is its success,
    Sokoban's −0.1 a step, ±1 for a box onto or off a target and +10 when solved)."""
    if episode is None:
        raise ValueError("env_return needs an env task (task.type: env); this row has no episode")
    if episode.error is not None:
        raise ValueError(f"the environment raised: {episode.error}")
    return episode.ret


def format_ok(task, completion):
    """1.0 when the task can find an answer in the completion at all (it need not be right)."""
    return float(task.has_answer(completion))


def bernoulli(rng):
    """R ~ Bernoulli(0.5), drawn from the row's seeded generator and independent of the completion: the Spurious
    Rewards control (arXiv 2506.10947), ``{name: random}``, with ``grpo.clip: false`` as its other half.

    Why it is a control: given the completions, a group's rewards are i.i.d. and exchangeable, so every row's GRPO
    advantage has expectation 0 (the advantages sum to 0 and share one distribution), and the unclipped gradient
    −Σ A_i·r_i·∇log π_i, taken at r = 1 (on-policy, the first of μ inner iterations), has expectation 0: nothing but
    noise moves the model. Where ratios leave 1 (μ > 1, or the paper's mini-batches), the clipped objective drops the
    gradient of a row whose ratio left [1 − ε_low, 1 + ε_high] in its advantage's direction; a token whose old
    probability is high cannot reach the upper clip (r ≤ 1/π_old), a rare one can, so the expectation is no longer
    0: the clipping bias toward the base's high-probability behaviour, to which the paper attributes the random
    reward's +21.4 MATH-500 points on Qwen2.5-Math-7B (and its code reasoning rising from 65% to over 90% of answers).
    tests/test_spurious.py derives both expectations by hand; benchmarks/repro/spurious.py runs the control."""
    return float(rng.random() < 0.5)


def overlong(completion_ids, max_new_tokens, buffer, penalty=1.0):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): 0 up to ``max_new_tokens - buffer`` tokens, then
    falling linearly to ``-penalty`` at ``max_new_tokens`` (where a completion is cut off): a length penalty
    that warns before the hard limit instead of only punishing the cut. ``{name: overlong, kwargs: {buffer: 64}}``."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"overlong: buffer={buffer} must be in 1 … sampling.max_new_tokens={max_new_tokens}")
    over = len(completion_ids) - (max_new_tokens - buffer)
    return -penalty * min(max(over, 0), buffer) / buffer


def code_tests(completion, meta, field="tests", cpu_s=5, wall_s=10.0, memory_mb=512):
    """The share of a problem's test cases that the completion's program passes, run in the sandbox
    (``rewards.sandbox``: its own process group, resource limits, no network, an audit hook). The program is the last
    fenced code block of the completion (the whole completion when it has none); the cases are ``meta[field]``, a
    list of ``[stdin, expected stdout]`` pairs (or ``{"input": …, "output": …}`` mappings), e.g. a JSONL row's extra
    ``tests`` field. ``{name: code_tests, isolation: process, timeout_s: 60}`` keeps a stuck sandbox call away from
    the trainer too."""
    from .sandbox import Limits, pass_rate

    cases = meta.get(field) if isinstance(meta, dict) else None
    if not isinstance(cases, list) or not cases:
        raise ValueError(f"code_tests: the problem has no test cases in meta[{field!r}] (a list of [stdin, "
                         "expected stdout] pairs)")
    pairs = [(c["input"], c["output"]) if isinstance(c, dict) else tuple(c) for c in cases]
    if not all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise ValueError(f"code_tests: meta[{field!r}] must hold [stdin, expected stdout] pairs of strings")
    blocks = FENCE.findall(completion)
    return pass_rate(blocks[-1] if blocks else completion, pairs,
                     limits=Limits(cpu_s=cpu_s, wall_s=wall_s, memory_mb=memory_mb))


REWARDS = {
    "correct": correct,
    "env_return": env_return,
    "format": format_ok,
    "random": bernoulli,
    "majority": majority,
    "overlong": overlong,
    "code_tests": code_tests,
}
