"""The metrics log: one JSON line per optimizer step in ``RUN/metrics.jsonl``, every stage, strict JSON (a NaN is
written as null); a progress bar on a TTY, log lines otherwise."""

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
        row = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **metrics}
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        line = (json.dumps(row, allow_nan=False) + "\n").encode()  # strict JSON: a NaN is written as null
        from ..checkpoint import guarded_write

        with guarded_write("the metrics line", self.path, len(line)):  # a torn last line is dropped on resume
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
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


def truncate_metrics(path: Path, stage: str, keep_through: int) -> None:
    """Keep other stages' lines and this stage's lines up to ``keep_through``: no duplicate steps."""
    if not path.exists():
        return
    from ..checkpoint import atomic_write_text

    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if row.get("stage") != stage or row.get("step", 0) <= keep_through:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def stage_sums(path: Path, stage: str, keys: tuple[str, ...]) -> dict:
    """Sums of ``keys`` over ``stage``'s lines of the metrics file ``path`` (so a resumed stage counts every step)."""
    sums = dict.fromkeys(keys, 0)
    if not path.exists():
        return sums
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == stage:
            for k in keys:
                sums[k] += row.get(k) or 0
    return sums
