"""What the built-in grid environments share: moves, breadth-first search, and demonstrations replayed through the
environment from a per-seed random stream (so a demonstration is a function of its seed and kind only).

A built-in environment offers, besides the protocol, ``ACTIONS``, ``optimal()`` (the shortest action list from the
current state, or None), ``random_action(rng)`` and, where it has one, ``greedy_action(rng)``; ``done`` and
``reason()`` (the short reasoning string a demonstration writes before its action)."""

from __future__ import annotations

import copy
from collections import deque
from typing import Callable, Hashable, Iterable, Sequence

from .base import Demo, StepResult, episode_rng, parse_actions

MOVES = {"Left": (0, -1), "Down": (1, 0), "Right": (0, 1), "Up": (-1, 0)}


def shift(cell: tuple[int, int], action: str) -> tuple[int, int]:
    dr, dc = MOVES[action]
    return cell[0] + dr, cell[1] + dc


def bfs(start: Hashable, goal: Callable[[Hashable], bool],
        successors: Callable[[Hashable], Iterable[tuple[str, Hashable]]]) -> list[str] | None:
    """The shortest action list from ``start`` to a state where ``goal`` holds (actions tried in the order
    ``successors`` yields them, so the answer is deterministic), or None."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        if goal(state):
            path = []
            while parent[state] is not None:
                state, action = parent[state]
                path.append(action)
            return path[::-1]
        for action, nxt in successors(state):
            if nxt not in parent:
                parent[nxt] = (state, action)
                queue.append(nxt)
    return None


def open_turn(env, action: str) -> list[str] | StepResult:
    """The turn's actions parsed from ``action``, or the turn's whole result: nothing for a finished episode, the
    invalid-action penalty with the state unchanged for text that names no valid actions."""
    if env.done:
        return StepResult(None, 0.0, True, env.info(valid=False))
    actions = parse_actions(action, env.ACTIONS, env.actions_per_turn)
    if actions is None:
        return StepResult(env.render(), -env.invalid_penalty, False, env.info(valid=False))
    return actions


def turn_text(reason: str, actions: Sequence[str]) -> str:
    """A turn as a demonstration writes it (and as the environments parse it): a short reasoning, then the actions."""
    return f"{reason} <answer>{' || '.join(actions)}</answer>"


def next_action(env, kind: str, rng) -> str:
    """The next action of a demonstration policy: ``optimal``; ``greedy`` (the environment's own greedy rule, e.g.
    toward the goal ignoring holes); ``noisy`` (optimal, one action in four random); ``wander`` (greedy or optimal
    half the time, random otherwise: goal-biased wandering)."""
    best = env.optimal()
    best = best[0] if best else None
    greedy = env.greedy_action(rng) if hasattr(env, "greedy_action") else best
    if kind == "optimal" and best:
        return best
    if kind == "greedy" and greedy:
        return greedy
    if kind == "noisy" and best and rng.random() >= 0.25:
        return best
    if kind == "wander" and (greedy or best) and rng.random() < 0.5:
        return greedy or best
    return env.random_action(rng)


def demonstrate(make, seed: int, kind: str, *, max_turns: int, actions_per_turn: int) -> Demo:
    """Play one demonstration of ``kind`` on env seed ``seed`` through a fresh environment from ``make``."""
    env, rng = make(), episode_rng(seed, f"demo-{kind}")
    env.reset(seed)
    turns = []
    while not env.done and len(turns) < max_turns:
        reason, actions, sim = env.reason(), [], copy.deepcopy(env)  # a turn's actions chosen one by one on a copy
        while len(actions) < actions_per_turn and not sim.done:
            actions.append(next_action(sim, kind, rng))
            sim.step(turn_text("", actions[-1:]))
        turns.append(turn_text(reason, actions))
        env.step(turns[-1])
    return Demo(seed=seed, turns=tuple(turns), kind=kind)


def mixed_demos(make, seeds: Sequence[int], mix: dict[str, float], *, max_turns: int,
                actions_per_turn: int) -> list[Demo]:
    """One demonstration per seed, its kind drawn from ``mix`` (weights) by the seed's own stream."""
    kinds, weights = list(mix), list(mix.values())
    return [demonstrate(make, s, episode_rng(s, "demo-kind").choices(kinds, weights)[0], max_turns=max_turns,
                        actions_per_turn=actions_per_turn) for s in seeds]
