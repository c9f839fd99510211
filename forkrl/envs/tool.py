"""A tool environment: the policy may run Python (in ``rewards.sandbox``) before it answers a task's problem, and
the answer is scored by that task's own verifier.

``task: {type: env, env: python_tool, kwargs: {task: {type: arithmetic, digits: 2}}}``. Env seed s is the inner
task's train problem s, and held-out seed ``HELDOUT_SEED0 + i`` its held-out problem i, so the inner task's split
is the environment's. Each turn the policy either calls the tool, ``<python>code</python>`` (the program runs
under the sandbox's limits; the observation is its output, cut to ``max_output_chars``), or answers: a turn without a
call is scored by the wrapped task's own verifier (``task.score``, so the answer is written as that task expects it:
``ans 42`` for arithmetic, ``<answer>42</answer>`` for reasoning-gym); the score is the reward and the episode ends
(``info["success"]`` is 1 for a full score). Reaching ``max_calls`` tool calls ends the episode unanswered.

Demonstrations (``demonstration(seed)``): for a problem whose metadata gives an ``expression`` (or the arithmetic
task's operands ``a`` and ``b``), the tool run on it, then the task's gold completion (``gold_completion``) or
``<answer>`` and the printed value: what a policy that has learned to use the tool writes.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .base import HELDOUT_SEED0, StepResult

CALL = re.compile(r"<python>(.*?)</python>", re.S | re.I)


@lru_cache(maxsize=4096)
def run_tool(code: str, cpu_s: int, wall_s: float):
    """The sandbox's result of a tool program, memoised in this process: a tool call is taken to be a function of
    its program (a program that reads the clock or draws random numbers sees its first run's output again), which
    saves a process start for every replayed demonstration and repeated call."""
    from ..rewards.sandbox import Limits, run_python

    return run_python(code, limits=Limits(cpu_s=cpu_s, wall_s=wall_s))


class PythonTool:
    INSTRUCTION = ("Solve the problem. You may run Python first: <python>print(2 * 21)</python> shows its output. "
                   "Then answer.")

    def __init__(self, task: dict | None = None, *, max_calls: int = 2, max_output_chars: int = 200,
                 cpu_s: int = 2, wall_s: float = 5.0):
        from ..tasks import TASKS, TaskError

        spec = dict(task or {"type": "arithmetic", "digits": 2})
        if spec.get("type") not in TASKS or spec.get("type") == "env":
            raise TaskError(f"task.kwargs.task: the tool environment wraps a single-turn task; its type must be one of "
                            f"{', '.join(t for t in TASKS if t != 'env')} (got {spec.get('type')!r})")
        self.task = TASKS[spec["type"]](**spec).build()
        self.max_calls, self.max_output_chars = max_calls, max_output_chars
        self.cpu_s, self.wall_s = cpu_s, wall_s
        self.done = True

    def problem_of(self, seed: int):
        split, i = ("heldout", seed - HELDOUT_SEED0) if seed >= HELDOUT_SEED0 else ("train", seed)
        problems = self.task.problems(split)
        if not 0 <= i < len(problems):
            raise ValueError(f"env seed {seed}: the wrapped task has {len(problems)} {split} problems")
        return problems[i]

    def reset(self, seed: int) -> str:
        self.problem, self.calls, self.done = self.problem_of(seed), 0, False
        return self.problem.prompt

    def step(self, action: str) -> StepResult:
        if self.done:
            return StepResult(None, 0.0, True, {"success": 0.0, "action_valid": 0.0})
        call = CALL.search(action)
        if call is None:  # an answer: the wrapped task's verifier scores it
            score = self.task.score(self.problem, action)
            score = 0.0 if score is None or score != score else float(score)
            self.done = True
            return StepResult(None, score, True, {"success": float(score >= 1 - 1e-9), "action_valid": 1.0,
                                                  "tool_calls": float(self.calls)})
        self.calls += 1
        result = run_tool(call.group(1), self.cpu_s, self.wall_s)
        text = (result.stdout + (("\n" + result.stderr.strip().splitlines()[-1]) if result.stderr.strip() else ""))
        shown = text.strip()[: self.max_output_chars] or "(no output)"
        if result.limit:
            shown += f" [stopped: {result.limit} limit]"
        self.done = self.calls >= self.max_calls
        return StepResult(f"output: {shown}", 0.0, self.done, {"success": 0.0, "action_valid": 1.0,
                                                               "tool_calls": float(self.calls)})

    def demonstration(self, seed: int) -> list[str] | None:
        """The tool run on the problem's expression, then the answer it prints; None without an expression."""
        p = self.problem_of(seed)
        expression = p.meta.get("expression") or (f"{p.meta['a']}+{p.meta['b']}" if {"a", "b"} <= set(p.meta) else None)
        if expression is None:
            return None
        gold = getattr(self.task, "gold_completion", None)
        if gold is not None:
            return [f"<python>print({expression})</python>", gold(p).strip()]
        printed = run_tool(f"print({expression})", self.cpu_s, self.wall_s).stdout.strip()
        return [f"<python>print({expression})</python>", f"<answer>{printed}</answer>"]
