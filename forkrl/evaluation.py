"""Held-out evaluation: pass@1 of a sampler's completions under the task's verifier, and each row's score.

Shared by the trainers (interim and final evaluation) and the diagnostics (the causal test's pass@1)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .sampling import completion_texts, row_seeds
from .types import Rollouts


@dataclass(frozen=True)
class EvalResult:
    pass_at_1: float
    per_strategy: dict[str, list[float]]  # strategy -> [share of samples, accuracy]
    seconds: float


def evaluate(sampler, task, problems, prompt_ids, params, samples: int, *, seed: int = 0) -> EvalResult:
    """Held-out pass@1: the mean score over ``samples`` completions of each problem (unbiased for k=1)."""
    t0 = time.time()
    seeds = row_seeds(f"eval:{seed}", list(range(len(problems))), samples)
    rollouts = sampler.sample(prompt_ids, samples, params, seeds=seeds)
    texts, scores = heldout_scores(task, problems, sampler.tokenizer, rollouts)
    strat = {}
    for text, s in zip(texts, scores):
        if hasattr(task, "strategy"):
            strat.setdefault(task.strategy(text), []).append(s)
    per = {k: [len(v) / len(scores), sum(v) / len(v)] for k, v in sorted(strat.items())}
    return EvalResult(sum(scores) / max(len(scores), 1), per, time.time() - t0)


def heldout_scores(task, problems, tokenizer, rollouts: Rollouts) -> tuple[list[str], list[float]]:
    """(completion texts, task scores) of every row; for held-out pass@1 an unscorable row (None / NaN)
    counts as a failure, 0."""
    texts = completion_texts(tokenizer, rollouts)
    scores = []
    for text, pi in zip(texts, rollouts.problem_N.tolist()):
        s = task.score(problems[pi], text)
        scores.append(0.0 if s is None or s != s else float(s))
    return texts, scores


def evaluate_episodes(sampler, task, codec, params, samples: int, *, num_seeds: int | None = None,
                      seed: int = 0) -> EvalResult:
    """Held-out success of an env task (``task.multi_turn``): ``samples`` episodes on each of the first
    ``num_seeds`` held-out env seeds; an episode whose environment raised counts as a failure."""
    from .envs.episodes import play

    t0 = time.time()
    env_seeds = list(task.seeds("heldout"))[:num_seeds]
    rows = row_seeds(f"eval:{seed}", env_seeds, samples)
    episodes = play(task, sampler, codec, env_seeds, samples, params, seeds=rows)
    success = [float(task.success(e)) for e in episodes]
    return EvalResult(sum(success) / max(len(success), 1), {}, time.time() - t0)
