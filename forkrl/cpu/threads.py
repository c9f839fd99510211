"""Threads for the fused path on a machine whose cores other processes use too (a laptop, a shared server).

The fused decoder and the replayed update run thousands of short OpenMP regions per call (each kernel and each
BLAS product of every layer and step is one). A region ends when its slowest thread does, so when another process
holds one of the cores, every region waits for a descheduled thread to get a slice of it: measured on a 2-core
AMD EPYC with one busy process beside it (``benchmarks/grpo_step.py --contend 1``), the default GRPO step took
5.6 s on torch's 2 threads and 2.5 s with this module's choice (1 thread), against 1.4–1.6 s with the cores free
(README, "On a machine whose cores are busy").

So each fused call runs on as many of torch's intra-op threads as there are cores that other processes left free
since the previous call: ``Meter.threads`` reads the busy time of this process's CPUs from ``/proc/stat``, takes
away this process's own CPU time (its ended children's included), and counts a core as taken for every whole
core's worth that remains, rounded (steal time included: a VM's host taking the core counts too). With the cores
free the count is torch's, so nothing changes; under load results may differ from an unloaded run's in float rounding (BLAS sums in another order on
fewer threads), as they may between machines. ``FORKRL_ADAPTIVE_THREADS=0`` keeps torch's count always. Where
``/proc/stat`` cannot be read (not Linux), torch's count is kept.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

import torch

MIN_INTERVAL_S = 0.05  # shorter gaps between calls keep the last decision (too few clock ticks to count)


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU-seconds the kernel counts as busy on ``cpus`` since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and ln[3:4].isdigit()]
    except OSError:
        return None
    ticks = 0
    for name, *values in lines:
        if int(name[3:]) in cpus:
            v = [int(x) for x in values] + [0] * 8
            ticks += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return ticks / os.sysconf("SC_CLK_TCK")


class Meter:
    """Counts the cores other processes used between two calls of ``threads``."""

    def __init__(self):
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.last = self._reading()
        self.decided: int | None = None

    def _reading(self):
        busy = _busy_seconds(self.cpus) if self.cpus else None
        own = os.times()  # this process's threads, and its children that ended (a reward's sandbox)
        return None if busy is None else (time.monotonic(), busy,
                                          own.user + own.system + own.children_user + own.children_system)

    def threads(self, limit: int) -> int:
        """How many threads (at most ``limit``) a fused call should use now: the cores of this process's CPU set
        that other processes left free since the last call, at least 1."""
        if limit <= 1 or os.environ.get("FORKRL_ADAPTIVE_THREADS", "1") == "0":
            return limit
        now = self._reading()
        if now is None or self.last is None:
            return limit
        wall = now[0] - self.last[0]
        if wall < MIN_INTERVAL_S:
            return min(limit, self.decided or limit)
        others = (now[1] - self.last[1]) - (now[2] - self.last[2])  # core-seconds used by other processes
        self.last = now
        self.decided = max(1, len(self.cpus) - math.floor(max(others, 0.0) / wall + 0.5))
        return min(limit, self.decided)


_meter: Meter | None = None


def meter() -> Meter:
    """The process's meter, started at its first use (a sampler's construction)."""
    global _meter
    if _meter is None:
        _meter = Meter()
    return _meter


@contextmanager
def use(n: int):
    """torch's intra-op threads (OpenMP and BLAS, which the kernels share) set to ``n`` inside the block."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
