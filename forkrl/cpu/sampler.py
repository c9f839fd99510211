"""The fused CPU decoder as a sampler (``sampling.backend: fused``, and ``auto`` where it applies).

``FusedSampler`` is the shared decode loop (``sampling.decode``) over ``engine.FastEngine``. With ``record`` (the
GRPO update will train on the rollouts) each ``sample`` call also keeps the decode's record as a ``RolloutTrace``
(``self.trace``) for ``forward.ReplayForward``: until the next call, or until ``sync_weights`` (after an optimizer
step the record is stale, and its memory, the step's largest allocation, goes back to the arena).

Each call runs on the threads ``threads.Meter`` finds free (all of torch's where no other process competes), and a
record's replay on the same number (``self.threads``).
"""

from __future__ import annotations

import torch

from ..sampling.decode import EngineSampler
from ..sampling.hf import HFEngine
from .engine import FastEngine, RecordArena, fast_unsupported
from .threads import meter, use
from .trace import MAX_TRACE_BYTES, DecodeTrace, RolloutTrace, replay_unsupported, trace_bytes


class FusedSampler(EngineSampler):
    def __init__(self, model, tokenizer, *, batch_size: int = 256, record: bool = False):
        super().__init__(model, tokenizer, batch_size=batch_size)
        self.record = record
        self.trace: RolloutTrace | None = None  # the last sample call's record (with ``record``)
        self.untraced_why: str | None = None  # why the last sample call kept no record
        self.arena = RecordArena()  # the records' memory, reused across calls (engine.RecordArena)
        self.threads = torch.get_num_threads()  # what the last call ran on
        meter()  # counting from now: the first call's decision covers the time since the sampler was made

    def _threads(self):
        self.threads = meter().threads(torch.get_num_threads())
        return use(self.threads)

    def engine(self, model):
        """``FastEngine`` for a model it runs; the Hugging Face forward for one it does not (a lockstep partner of
        another dtype, say)."""
        return FastEngine(model) if fast_unsupported(model) is None else HFEngine(model)

    def sync_weights(self) -> None:
        self.trace = None

    def policy_forward(self, model):
        """The replay of this sampler's records (``forward.ReplayForward``) when it keeps them, else None (the
        model's forward, ``forward.make_forward`` decides)."""
        from .forward import ReplayForward

        return ReplayForward(model, self) if self.record else None

    def sample(self, prompt_ids, group_size: int, params, *, seeds=None):
        self.trace = None  # released before this decode, so the arena can reuse its memory
        if not (self.record and self._traceable(prompt_ids, group_size, params)):
            with self._threads():
                return self.decode(prompt_ids, group_size, params, seeds)[0]
        self.arena.start()
        traces = []

        def keep(engine, prompts, chunk):
            engine.end_decode()
            traces.append(DecodeTrace(self.model, engine, prompts, chunk[1]))
            self.arena.hold(traces[-1])

        with self._threads():
            rollouts = self.decode(prompt_ids, group_size, params, seeds, after_chunk=keep,
                                   engine=lambda m: FastEngine(m, record=True, arena=self.arena))[0]
        self.trace = RolloutTrace(traces, self.batch_size, rollouts, threads=self.threads)
        return rollouts

    def sample_with_entropy(self, prompt_ids, group_size: int, params, *, seeds=None):
        with self._threads():
            return super().sample_with_entropy(prompt_ids, group_size, params, seeds=seeds)

    def lockstep(self, other, prompt_ids, group_size: int, params, *, seeds, rule):
        with self._threads():
            return super().lockstep(other, prompt_ids, group_size, params, seeds=seeds, rule=rule)

    def _traceable(self, prompt_ids: list[list[int]], group_size: int, params) -> bool:
        """Whether this call's decode can be recorded for the update; if not, why goes to ``untraced_why``."""
        rows = min(self.batch_size, len(prompt_ids) * group_size)  # a chunk's
        size = trace_bytes(self.model, rows, max(len(p) for p in prompt_ids) + params.max_new_tokens)
        checks = [(fast_unsupported(self.model) is None, f"the fused decoder does not run this model "
                                                         f"({fast_unsupported(self.model)})"),
                  (replay_unsupported(self.model) is None, f"{replay_unsupported(self.model)} in training"),
                  (size <= MAX_TRACE_BYTES, f"a record of {size / 2**30:.1f} GiB per chunk (over "
                                            f"{MAX_TRACE_BYTES / 2**30:.0f} GiB; lower sampling.batch_size)")]
        self.untraced_why = next((why for ok, why in checks if not ok), None)
        return self.untraced_why is None
