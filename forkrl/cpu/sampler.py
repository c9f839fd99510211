"""The fused CPU decoder as a sampler (``sampling.backend: fused``, and ``auto`` where it applies).

``FusedSampler`` is the shared decode loop (``sampling.decode``) over ``engine.FastEngine``. With ``record`` (the
GRPO update will train on the rollouts) each ``sample`` call also keeps the decode's record as a ``RolloutTrace``
(``self.trace``) for ``forward.ReplayForward``: until the next call, or until ``sync_weights`` (after an optimizer
step the record is stale, and its memory, the step's largest allocation, goes back to the arena).

Each call runs on the threads ``threads.Meter`` finds free (all of torch's where no other process competes), and a
record's replay on the same number (``self.threads``).

With ``auto`` (``sampling.backend: auto``) a call of at most ``SMALL_ROWS`` rows and ``SMALL_TOKENS`` new tokens
decodes through the model's own forward instead (on the same threads): setting up the fused weights then costs
more than the few steps save. Measured on a 2-core AMD EPYC, quiet, in three runs of ``python
benchmarks/backends.py --configs default short 30m``, the Hugging Face decode's time over the fused one's was
0.86, 0.79 and 0.90 for 1 row × 4 new tokens; 1.02, 0.99 and 1.10 for 8 × 4 (a tie); and above 1 at every larger
call, by 1.07 to 2.9 (1.3 to 1.6 at 1 row × 8 tokens, except a first run's 0.78; 1.19 to 1.35 for the
31.6M-parameter model).
"""

from __future__ import annotations

import torch

from ..sampling.decode import EngineSampler
from ..sampling.hf import HFEngine
from .engine import FastEngine, RecordArena, fast_unsupported
from .threads import meter, use
from .trace import MAX_TRACE_BYTES, DecodeTrace, RolloutTrace, replay_unsupported, trace_bytes

SMALL_ROWS, SMALL_TOKENS = 1, 4  # with ``auto``, calls at most this small decode through the model's forward


class FusedSampler(EngineSampler):
    def __init__(self, model, tokenizer, *, batch_size: int = 256, record: bool = False, auto: bool = False):
        super().__init__(model, tokenizer, batch_size=batch_size)
        self.record, self.auto = record, auto
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

    def small(self, rows: int, new_tokens: int) -> bool:
        """Whether ``auto`` decodes a call of ``rows`` rows and ``new_tokens`` new tokens through the model's
        forward."""
        return self.auto and rows <= SMALL_ROWS and new_tokens <= SMALL_TOKENS

    def _engine_for(self, prompt_ids, group_size: int, params):
        return HFEngine if self.small(len(prompt_ids) * group_size, params.max_new_tokens) else None

    def sample(self, prompt_ids, group_size: int, params, *, seeds=None):
        self.trace = None  # released before this decode, so the arena can reuse its memory
        engine = self._engine_for(prompt_ids, group_size, params)
        if engine is not None or not (self.record and self._traceable(prompt_ids, group_size, params)):
            if engine is not None and self.record:
                self.untraced_why = (f"a call of at most {SMALL_ROWS} rows and {SMALL_TOKENS} new tokens, which the "
                                     "model's forward decodes faster (sampling.backend: auto)")
            with self._threads():
                return self.decode(prompt_ids, group_size, params, seeds, engine=engine)[0]
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
            rollouts, H_NL, _ = self.decode(prompt_ids, group_size, params, seeds, entropy=True,
                                            engine=self._engine_for(prompt_ids, group_size, params))
        return rollouts, H_NL[:, 1:]

    def lockstep(self, other, prompt_ids, group_size: int, params, *, seeds, rule):
        with self._threads():
            rollouts, _, subs_N = self.decode(prompt_ids, group_size, params, seeds, other=other, rule=rule,
                                              engine=self._engine_for(prompt_ids, group_size, params))
        return rollouts, subs_N

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
