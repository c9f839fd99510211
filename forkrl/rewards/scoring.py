"""Scoring a batch of rollouts with a stage's rewards (``api.Reward``): every row's reward as the weighted sum of
its components, a failure making the row unscorable (``Scored.valid_N`` False), never a silent 0 (METHODS §2).

Order, which fixes what a seeded reward draws: each row has one ``random.Random(seed)`` that every reward sees in
config order; row-mode rewards are called row by row, each row's in config order; then each ``async def`` row-mode
reward, its rows' calls awaited together on one event loop (at most ``ASYNC_CONCURRENCY`` at a time, each under the
reward's time limit), and each process-isolated one, its rows' calls spread over its pool of ``workers`` (each gets
a copy of the row's generator: what it draws does not advance the trainer's); then each batch-mode reward once; then each group-mode reward once per group (groups in order
of first appearance).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Real

import torch

from ..types import Rollouts, Scored
from .isolation import Pool, RewardCallError, RewardTimeout


@dataclass(frozen=True)
class RewardFailures:
    count: int
    first_message: str | None


@contextmanager
def time_limit(seconds: float | None):
    """Raise RewardTimeout in the block after ``seconds`` of wall time (SIGALRM, main thread only).

    Stops Python code that loops or waits; a call stuck inside C code that never returns to the
    interpreter is not interrupted (``isolation: process`` is for that)."""
    usable = seconds and threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise RewardTimeout(f"took longer than {seconds:g}s (the reward's timeout_s, or reward_timeout_s)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


ASYNC_CONCURRENCY = 16  # an async reward's calls in flight at once (a judge endpoint's rate limits, say)

_POOLS: dict[tuple[str, int], Pool] = {}  # the worker processes of each isolated reward, kept for the process's life


def _pool(reward) -> Pool:
    return _POOLS.setdefault((reward.spec, reward.workers), Pool(reward.spec, reward.workers))


def _call(reward, kwargs: dict):
    if reward.isolation == "process":
        (out,) = _pool(reward).map([kwargs], reward.timeout_s)
        if isinstance(out, Exception):
            raise out
        return out
    with time_limit(reward.timeout_s):
        out = reward.fn(**kwargs)
        return asyncio.run(out) if inspect.iscoroutine(out) else out  # an async batch or group reward


def _is_async(reward) -> bool:
    return reward.isolation == "inline" and inspect.iscoroutinefunction(reward.fn)


def _await_rows(reward, calls: list[dict]) -> list:
    """Every call of an async row-mode reward, awaited together; each result or the exception it raised."""
    async def one(gate, kwargs):
        async with gate:
            return await asyncio.wait_for(reward.fn(**kwargs), reward.timeout_s)

    async def every():
        gate = asyncio.Semaphore(ASYNC_CONCURRENCY)
        return await asyncio.gather(*(one(gate, kw) for kw in calls), return_exceptions=True)

    out = asyncio.run(every())
    return [RewardTimeout(f"took longer than {reward.timeout_s:g}s") if isinstance(v, asyncio.TimeoutError) else v
            for v in out]


def _value(v, label: str) -> tuple[float, dict[str, float]]:
    """(score, logged components) of one returned value; ValueError for one that makes the row unscorable."""
    extra = {}
    if isinstance(v, dict):
        if "score" not in v:
            raise ValueError(f"reward {label!r} returned a mapping without 'score' (keys: {sorted(v)})")
        extra = {str(k): float(x) for k, x in v.items() if k != "score" and isinstance(x, Real)}
        v = v["score"]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if v is None or not isinstance(v, Real):
        shown = repr(v) if len(repr(v)) < 80 else repr(v)[:80] + "..."
        raise ValueError(f"reward {label!r} returned {shown}" + ("" if v is None else
                                                                  f" ({type(v).__name__}, not a number)"))
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"reward {label!r} returned {v!r}")
    return v, extra


@dataclass
class _Rows:
    """What forkrl knows of each row, for the rewards' parameters."""

    texts: list[str]
    problems: list
    rngs: list[random.Random]
    completion_ids: list[list[int]]
    truncated: list[bool]
    group_index: list[int]
    group_N: list[int]
    episodes: list | None = None

    def row(self, r: int) -> dict:
        p = self.problems[r]
        return {"completion": self.texts[r], "prompt": p.prompt, "answer": p.answer, "problem": p, "meta": p.meta,
                "rng": self.rngs[r], "completion_ids": self.completion_ids[r], "truncated": self.truncated[r],
                "group_index": self.group_index[r], "episode": self.episodes[r] if self.episodes else None}

    def rows(self, index: list[int]) -> dict:
        from .api import PLURAL

        out = {PLURAL[k]: [] for k in PLURAL}
        for r in index:
            for k, v in self.row(r).items():
                out[PLURAL[k]].append(v)
        return out


def _rows(rollouts: Rollouts, texts, problems, seeds, episodes=None) -> _Rows:
    mask = rollouts.completion_mask_NL
    group_N = rollouts.group_N.tolist()
    seen: dict[int, int] = {}
    index = []
    for g in group_N:
        index.append(seen.get(g, 0))
        seen[g] = seen.get(g, 0) + 1
    return _Rows(texts=list(texts), problems=[problems[i] for i in rollouts.problem_N.tolist()],
                 rngs=[random.Random(s) for s in seeds],
                 completion_ids=[ids[m].tolist() for ids, m in zip(rollouts.input_ids_NL, mask)],
                 truncated=rollouts.truncated_N.tolist(), group_index=index, group_N=group_N,
                 episodes=episodes)


def score_rollouts(rollouts: Rollouts, texts: list[str], problems, task, rewards, *, seeds: list[int],
                   step: int = 0, progress: float = 0.0, max_new_tokens: int | None = None, episodes=None
                   ) -> tuple[Scored, RewardFailures]:
    """Every row's weighted reward. ``problems``: indexed by ``rollouts.problem_N``; ``seeds`` (one per row) seed
    the rows' random generators, so a row's reward never depends on its batch; ``rewards``: the stage's loaded
    rewards (``api.load``)."""
    N = len(texts)
    rows = _rows(rollouts, texts, problems, seeds, episodes)
    if max_new_tokens is None:  # what the sampler was allowed: every completion position of the batch
        max_new_tokens = int(rollouts.completion_mask_NL.sum(1).max()) if N else 0
    shared = {"task": task, "step": step, "progress": progress, "max_new_tokens": max_new_tokens}
    values = {r.label: torch.full((N,), float("nan")) for r in rewards}
    logged: dict[str, torch.Tensor] = {}
    failures = {"count": 0, "first": None}

    def fail(where: str, label: str, e: Exception, count: int = 1):
        failures["count"] += count
        failures["first"] = failures["first"] or f"{where}, reward {label!r}: {type(e).__name__}: {e}"

    def keep(reward, r: int, v) -> None:
        try:
            score, extra = _value(v, reward.label)
        except (ValueError, TypeError) as e:
            fail(f"row {r}", reward.label, e)
            return
        values[reward.label][r] = score
        for k, x in extra.items():
            logged.setdefault(f"{reward.label}/{k}", torch.full((N,), float("nan")))[r] = x

    def plural(reward, index: list[int], known: dict) -> None:
        try:
            out = _call(reward, reward.arguments(known))
            out = list(out)
            if len(out) != len(index):
                raise ValueError(f"returned {len(out)} values for {len(index)} rows")
        except Exception as e:  # noqa: BLE001 - a failed call makes each of its rows unscorable
            fail(f"rows {index[0]}…{index[-1]}", reward.label, e, len(index))
            return
        for r, v in zip(index, out):
            keep(reward, r, v)

    for r in range(N):
        known = {**rows.row(r), **shared}
        for reward in rewards:
            if reward.mode == "row" and reward.isolation == "inline" and not _is_async(reward):
                try:
                    keep(reward, r, _call(reward, reward.arguments(known)))
                except Exception as e:  # noqa: BLE001 - any reward failure is a per-row outcome, not a crash
                    fail(f"row {r}", reward.label, e)
    for reward in rewards:
        if reward.mode == "row" and (_is_async(reward) or reward.isolation == "process"):
            calls = [reward.arguments({**rows.row(r), **shared}) for r in range(N)]
            answers = _await_rows(reward, calls) if _is_async(reward) else _pool(reward).map(calls, reward.timeout_s)
            for r, v in enumerate(answers):
                if isinstance(v, BaseException):
                    fail(f"row {r}", reward.label, v)
                else:
                    keep(reward, r, v)
    for reward in rewards:
        if reward.mode == "batch":
            plural(reward, list(range(N)), {**rows.rows(list(range(N))), **shared})
        elif reward.mode == "group":
            for g in dict.fromkeys(rows.group_N):
                index = [r for r in range(N) if rows.group_N[r] == g]
                first = rows.row(index[0])
                plural(reward, index, {**rows.rows(index), **shared,
                                       **{k: first[k] for k in ("prompt", "answer", "problem", "meta")}})
    valid_N = torch.ones(N, dtype=torch.bool)
    reward_N = torch.zeros(N)
    for reward in rewards:
        valid_N &= ~values[reward.label].isnan()
        reward_N += reward.weight * torch.nan_to_num(values[reward.label], nan=0.0)
    reward_N = torch.where(valid_N, reward_N, torch.zeros_like(reward_N))
    return Scored(rollouts, reward_N, valid_N, {**values, **logged}), RewardFailures(failures["count"],
                                                                                     failures["first"])


__all__ = ["RewardCallError", "RewardFailures", "RewardTimeout", "score_rollouts", "time_limit"]
