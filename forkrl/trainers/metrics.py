"""The metrics log: one JSON line per optimizer step in ``RUN/metrics.jsonl``, every stage, strict JSON (a NaN is
written as null); a progress bar on a TTY, log lines otherwise. And the completions log, ``RUN/completions.jsonl``:
a sample of each GRPO step's rows (``completion_rows``). Both are appended through ``checkpoint.guarded_write`` and
cut back to the checkpoint's step when a stage resumes (``truncate_metrics``), so a resumed run's files equal an
uninterrupted one's."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsLog:
    """Appends one JSON line per step to ``metrics.jsonl``; a progress bar on a TTY, log lines otherwise."""

    KEYS = ("loss", "reward_mean", "pass_at_1", "entropy", "kl", "grad_norm")

    def __init__(self, path: Path, *, stage: str, total: int, start: int = 0, log_every: int = 1,
                 enabled: bool = True):
        self.path, self.stage, self.total, self.log_every = path, stage, total, log_every
        self.t0, self.start, self.enabled = time.time(), start, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:  # only rank 0 writes files
            return
        append_jsonl(self.path, [{"stage": self.stage, "step": step, "time": round(time.time(), 3), **metrics}],
                     what="the metrics line")
        shown = {k: metrics[k] for k in self.KEYS if k in metrics and metrics[k] is not None}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
            vals = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"[{self.stage}] step {step}/{self.total} {vals} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finite(value):
    """``value`` with every non-finite float (in dicts too) as None: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return {k: _finite(v) for k, v in value.items()} if isinstance(value, dict) else value


def append_jsonl(path: Path, rows: list[dict], *, what: str) -> None:
    """Append ``rows`` to ``path``, one strict-JSON line each (a NaN is written as null), in one guarded write: a
    full disk is one ``DiskFullError`` naming ``what``; a torn last line is dropped on resume."""
    data = "".join(json.dumps(_finite(row), allow_nan=False) + "\n" for row in rows).encode()
    if not data:
        return
    from ..checkpoint import guarded_write

    with guarded_write(what, path, len(data)):
        with open(path, "ab") as f:
            f.write(data)
            f.flush()


COMPLETIONS = "completions.jsonl"  # in the run directory: a sample of each GRPO step's rows


def episode_record(episode, decode) -> dict:
    """An episode for the report's viewer: its turns (action, observation, reward, info), return, error, and its
    row as (text, role) spans, each run of one role decoded (``decode``: the tokenizer's)."""
    from ..types import Role

    spans, start = [], 0
    for i in range(1, len(episode.roles) + 1):
        if i == len(episode.roles) or episode.roles[i] != episode.roles[start]:
            spans.append([decode(episode.ids[start:i]), Role(episode.roles[start]).name.lower()])
            start = i
    return {"turns": [{"action": t.action, "observation": t.observation, "reward": t.reward,
                       "info": {k: v for k, v in t.info.items() if isinstance(v, (int, float))}}
                      for t in episode.turns],
            "return": episode.ret, "error": episode.error, "spans": spans}


def completion_rows(stage: str, step: int, problems, texts: list[str], scored, adv_N, n: int, *, episodes=None,
                    decode=None) -> list[dict]:
    """The first ``n`` rows of the step in group order (the first group's rows, then the next group's, ...: the
    same rows every run, and whole groups, whose advantages compare within them), each as a completions.jsonl
    object. ``problems``, ``texts``, ``scored`` and ``adv_N``: the step's (this rank's) problems, completion texts,
    ``Scored`` rows and advantages. ``reward`` is the task's (before a KL-in-reward term), None where the row was
    unscorable; a component is None where it failed. An env task's rows carry their ``episode`` (``episode_record``)."""
    rollouts = scored.rollouts
    group_N, problem_N = rollouts.group_N.tolist(), rollouts.problem_N.tolist()
    picked = sorted(range(len(texts)), key=lambda i: (group_N[i], i))[:n]
    lens, valid = rollouts.completion_len_N.tolist(), scored.valid_N.tolist()
    components = {k: v.tolist() for k, v in scored.components.items()}
    rows = []
    for i in picked:
        problem = problems[problem_N[i]]
        rows.append({"stage": stage, "step": step, "row": i, "group": group_N[i], "problem_id": problem.id,
                     "prompt": problem.prompt, "completion": texts[i],
                     "reward": float(scored.reward_N[i]) if valid[i] else None, "valid": bool(valid[i]),
                     "components": {k: v[i] for k, v in components.items()}, "advantage": float(adv_N[i]),
                     "truncated": bool(rollouts.truncated_N[i]), "completion_tokens": int(lens[i]),
                     **({"episode": episode_record(episodes[i], decode)} if episodes is not None else {})})
    return rows


def truncate_metrics(path: Path, stage: str, keep_through: int) -> None:
    """Keep other stages' lines and this stage's lines up to ``keep_through``: no duplicate steps. (Any JSONL file
    of rows with ``stage`` and ``step``: metrics.jsonl and completions.jsonl.)"""
    if not path.exists():
        return
    from ..checkpoint import atomic_write_text

    text = path.read_text(errors="replace")
    lines, kept = text.splitlines(), []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if row.get("stage") != stage or row.get("step", 0) <= keep_through:
            kept.append(line)
    if len(kept) == len(lines) and text.endswith("\n"):
        return  # nothing to drop: a large completions.jsonl is not rewritten at every stage's start
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def stage_rows(path: Path, stage: str) -> list[dict]:
    """``stage``'s lines of the metrics file ``path``, in order (none if it does not exist)."""
    if not path.exists():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if row.get("stage") == stage]


def stage_sums(path: Path, stage: str, keys: tuple[str, ...]) -> dict:
    """Sums of ``keys`` over ``stage``'s lines of the metrics file ``path`` (so a resumed stage counts every step)."""
    sums = dict.fromkeys(keys, 0)
    for row in stage_rows(path, stage):
        for k in keys:
            sums[k] += row.get(k) or 0
    return sums


class SpreadWatch:
    """RAGEN-2's reward-std collapse ratio (arXiv 2604.06268): a step's mean in-group reward std over its mean across
    the stage's first ``warmup`` steps; None until those are seen, or when they had no spread at all. A resumed stage
    reads its first steps back from the metrics file ``path`` (already cut back to the checkpoint), so the ratio
    equals an uninterrupted run's."""

    def __init__(self, path: Path, stage: str, *, warmup: int = 10):
        self.warmup = warmup
        self.first = [row.get("group_reward_std") for row in stage_rows(path, stage) if row["step"] <= warmup]

    def ratio(self, step: int, std: float | None) -> float | None:
        if step <= self.warmup:
            self.first.append(std)
        first = [v for v in self.first if v is not None]
        if step < self.warmup or std is None or not first or sum(first) <= 0:
            return None
        return std / (sum(first) / len(first))
