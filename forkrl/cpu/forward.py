"""The update's log-probs replayed from the fused decoder's record (``trace.RolloutTrace``), behind the policy-forward
seam (``forward.PolicyForward``).

``ReplayForward.logprobs(batch, rows_N)`` replays when ``batch`` is the very ``Rollouts`` object that its sampler's
last recorded call returned (the rows are then known exactly: ``rows_N`` of that decode), and otherwise runs the
model's forward: a batch the sampler did not just record (an evaluation, a second inner iteration after the
optimizer step released the record, a call that could not be recorded). ``replayed`` counts the replays, for the
step's metrics. A record whose weights moved without the sampler being told refuses to replay (``trace.py``).
"""

from __future__ import annotations

import torch

from ..forward import ModelForward
from ..types import Rollouts
from .replay import Scratch
from .threads import use


class ReplayForward:
    def __init__(self, model, sampler):
        self.sampler, self.model = sampler, model
        self.fallback = ModelForward(model)
        self.scratch = Scratch()  # the replayed backward's temporaries, reused from one replay to the next
        self.replayed = 0

    def logprobs(self, batch: Rollouts, rows_N: torch.Tensor | None = None, *, temperature: float = 1.0,
                 entropy: str = "none"):
        trace = self.sampler.trace
        if trace is None or batch is not trace.rollouts:
            return self.fallback.logprobs(batch, rows_N, temperature=temperature, entropy=entropy)
        rows_N = torch.arange(batch.num_rows) if rows_N is None else rows_N
        self.replayed += 1
        with use(trace.threads):  # the decode's thread count, and its backward's (replay.py)
            return trace.completion_logprobs(batch.select(rows_N), rows_N, temperature=temperature,
                                             entropy=entropy, scratch=self.scratch)
