"""An adapter for text-rendered ``gymnasium`` environments (an optional extra: ``pip install forkrl[gym]``).

``task: {type: env, env: gym, kwargs: {id: FrozenLake-v1, actions: [Left, Down, Right, Up], make: {is_slippery:
false}}}``. The environment is made with ``render_mode="ansi"``; an observation is its text rendering, with the
highlighted cell of an ANSI rendering (the agent's position in FrozenLake, Taxi, CliffWalking) written as
``highlight`` (``[S]``) since the colour codes are stripped. The action space must be ``Discrete``: ``actions`` names
its actions in order (default ``0 … n−1``), parsed as the built-in environments parse theirs
(``<answer>Left</answer>``, ``envs.base.parse_actions``); a turn that names no action, or more than one, is an
invalid step (the state unchanged, ``action_valid`` 0). ``reset(seed)`` passes the seed to gymnasium's ``reset``.
An episode ends when gymnasium's ``terminated`` or ``truncated`` says so; it succeeds when ``info["success"]`` is
true, else when it terminated with a positive reward (FrozenLake's goal).
"""

from __future__ import annotations

import re

from .base import StepResult, parse_actions

HIGHLIGHTED = re.compile(r"\x1b\[[0-9;]*m(.*?)\x1b\[0m", re.S)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class GymText:
    INSTRUCTION = "Act in the environment shown. Answer with one action, e.g. <answer>0</answer>."

    def __init__(self, id: str, *, actions: list[str] | None = None, make: dict | None = None,
                 highlight: str = "[{}]", invalid_penalty: float = 0.0):
        from ..tasks.base import TaskError

        try:
            import gymnasium
        except ImportError:
            raise TaskError("task.env gym: gymnasium is not installed; pip install 'forkrl[gym]' (or gymnasium)") \
                from None
        try:
            self.env = gymnasium.make(id, render_mode="ansi", **(make or {}))
        except Exception as e:  # noqa: BLE001 - an unknown id, wrong kwargs, a missing extra of gymnasium's
            raise TaskError(f"task.kwargs: gymnasium.make({id!r}, render_mode='ansi', **{make or {}}) failed: "
                            f"{type(e).__name__}: {e}") from None
        n = getattr(self.env.action_space, "n", None)
        if n is None:
            raise TaskError(f"task.kwargs.id: {id!r} has a {type(self.env.action_space).__name__} action space; the "
                            "adapter takes Discrete ones (actions named by text)")
        self.actions = list(actions) if actions is not None else [str(i) for i in range(int(n))]
        if len(self.actions) != n:
            raise TaskError(f"task.kwargs.actions: {id!r} has {n} actions; {len(self.actions)} names were given")
        self.highlight, self.invalid_penalty, self.done = highlight, invalid_penalty, True

    def render(self) -> str:
        text = self.env.render()
        text = HIGHLIGHTED.sub(lambda m: self.highlight.format(m.group(1)), text if isinstance(text, str) else "")
        return ANSI.sub("", text).strip("\n")

    def reset(self, seed: int) -> str:
        self.env.reset(seed=seed)
        self.done = False
        return self.render()

    def step(self, action: str) -> StepResult:
        if self.done:
            return StepResult(None, 0.0, True, {"success": 0.0, "action_valid": 0.0})
        names = parse_actions(action, self.actions, 1)
        if names is None:
            return StepResult(self.render(), -self.invalid_penalty, False, {"success": 0.0, "action_valid": 0.0})
        _, reward, terminated, truncated, info = self.env.step(self.actions.index(names[0]))
        self.done = bool(terminated or truncated)
        success = bool(info.get("success", terminated and reward > 0))
        return StepResult(self.render(), float(reward), self.done, {"success": float(success), "action_valid": 1.0})
