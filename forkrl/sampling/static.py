"""The static-cache backend (``sampling.backend: static``): the model's own forward over a preallocated KV cache,
with every decode step of one shape, so that on CUDA the step can be one compiled graph (CUDA graphs under
``torch.compile(mode="reduce-overhead")``) instead of hundreds of small kernel launches from Python.

Why a separate engine: ``hf.HFEngine`` runs the forward with a dynamic cache that grows by one column a step, so no
two steps have the same shapes and nothing can be captured once and replayed. ``StaticEngine`` keeps, per shape
bucket, a transformers ``StaticCache`` of [rows, heads, L, head dim] per layer, a full-width [rows, L] attention mask
(0 for left padding and for the columns not yet written), and [rows, 1] token and position buffers, all written
in place. The cache writes each step's key/value at its own counter, the same column for every row (left padding
makes every row's next token land at column W + t); positions are per row (``cumsum(mask) - 1``, as ``generate``
and ``HFEngine`` give them). Rows are padded up to a multiple of ``row_multiple`` and L up to a multiple of
``len_multiple``, so calls with nearby shapes reuse one cache and one compiled graph; a padding row copies row 0
(finite, and dropped from the logits).

The draws and the sampler log-probs are the shared loop's (``decode.decode_chunk``, ``RowSampler``): only the
forward differs from ``hf``'s, so the two agree token for token wherever float rounding (a longer, masked
attention; a padded batch) does not move a draw across a boundary of the cumulative distribution.

Unmeasured on a GPU so far: ``auto`` does not take it. ``benchmarks/gpu_sampler.py`` compares it with ``hf`` and
with transformers' continuous batching.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .decode import EngineSampler
from .hf import cache_kwarg


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def static_unsupported(model) -> str | None:
    """Why ``StaticEngine`` cannot run ``model`` (None when it can)."""
    import transformers
    from transformers.cache_utils import StaticLayer

    if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
        return "not a transformers causal LM"
    if not hasattr(StaticLayer(max_cache_len=1), "cumulative_length"):  # older caches take the caller's positions
        return (f"transformers {transformers.__version__}'s StaticCache needs the caller's cache positions; this "
                "backend needs one that counts its own (transformers 5.x; written against 5.25)")
    return None


def _decode_forward(model, cache, ids_P1: torch.Tensor, pos_P1: torch.Tensor, mask_PL: torch.Tensor, kw: str):
    """Rows through the model, their keys/values written into ``cache`` in place; the last position's logits. The
    function that is compiled (for the one-token step)."""
    out = model(input_ids=ids_P1, attention_mask=mask_PL, position_ids=pos_P1, use_cache=True, logits_to_keep=1,
                **{kw: cache})
    return out.logits[:, -1]


@dataclass
class Slot:
    """What one shape bucket (P rows, L columns) keeps between calls: the cache, the step's input buffers and the
    decode forward (compiled or not). Allocating a cache is a real cost on a GPU and a compiled graph is tied to
    its buffers' shapes (and, under CUDA graphs, addresses), so both live as long as the slot."""

    cache: object
    ids_P1: torch.Tensor
    pos_P1: torch.Tensor
    mask_PL: torch.Tensor
    forward: object
    compiled: bool


class SlotPool:
    """Slots per model, the ``capacity`` most recently used shape buckets each (a call of a new shape evicts the
    least recent one, so GPU memory stays bounded when eval and training calls alternate)."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self.by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model, key: tuple, make) -> Slot:
        slots = self.by_model.setdefault(model, OrderedDict())
        if key in slots:
            slots.move_to_end(key)
            return slots[key]
        while len(slots) >= self.capacity:
            slots.popitem(last=False)
        slots[key] = make()
        return slots[key]

    def count(self, model) -> int:
        return len(self.by_model.get(model, ()))


class StaticEngine:
    """A decode engine (``prefill``/``step``/``device``, as ``hf.HFEngine``) over a static KV cache.

    ``compile``: wrap the one-token step in ``torch.compile`` (None: on CUDA only; on a CPU it buys little that the
    fused CPU backend does not give better, and inductor's C++ build costs seconds per shape bucket). ``mode``:
    inductor's mode, "reduce-overhead" (CUDA graphs) or "default"; ``backend``: ``torch.compile``'s (tests use
    "aot_eager" or a counting function). ``row_multiple``, ``len_multiple``: the shape buckets. ``pool``: where the
    slots live; a sampler passes its own so that they outlive one call."""

    def __init__(self, model, *, pool: SlotPool | None = None, compile: bool | None = None,
                 mode: str = "reduce-overhead", backend="inductor", row_multiple: int = 8, len_multiple: int = 64):
        self.model = model
        self.device = next(model.parameters()).device
        self.compile = self.device.type == "cuda" if compile is None else compile
        self.mode, self.backend, self.row_multiple, self.len_multiple = mode, backend, row_multiple, len_multiple
        self.pool = pool if pool is not None else SlotPool()
        self.kw = cache_kwarg(model)
        self.slot: Slot | None = None
        self.rows_P, self.B, self.col = None, 0, 0  # set by each prefill

    def _make_slot(self, P: int, L: int) -> Slot:
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=L)
        buffers = [torch.zeros(P, 1, dtype=torch.long, device=self.device) for _ in range(2)]
        mask_PL = torch.zeros(P, L, dtype=torch.long, device=self.device)
        forward = _decode_forward
        if self.compile:
            for t in (*buffers, mask_PL):  # fixed addresses: CUDA graphs read them in place, no copy per step
                torch._dynamo.mark_static_address(t)
            mode = {"mode": self.mode} if self.backend == "inductor" else {}  # a mode is inductor's option
            forward = torch.compile(_decode_forward, backend=self.backend, dynamic=False, **mode)
        return Slot(cache, *buffers, mask_PL, forward, self.compile)

    def prefill(self, ids_BW: torch.Tensor, attn_BW: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The prompts' forward (not compiled: its width changes every call), writing columns [0, W) of the cache."""
        B, W = ids_BW.shape
        P, L = round_up(B, self.row_multiple), round_up(W + max_new_tokens, self.len_multiple)
        key = (P, L, self.compile, self.mode, self.backend, next(self.model.parameters()).dtype, self.device)
        self.slot = s = self.pool.get(self.model, key, lambda: self._make_slot(P, L))
        self.B, self.col = B, W
        self.rows_P = torch.cat([torch.arange(B), torch.zeros(P - B, dtype=torch.long)]).to(self.device)
        attn_PW = attn_BW[self.rows_P]
        s.cache.reset()
        s.mask_PL.zero_()  # the causal mask hides a stale column anyway; zeroed, the mask means what it says
        s.mask_PL[:, :W] = attn_PW
        pos_PW = (attn_PW.cumsum(-1) - 1).masked_fill_(attn_PW == 0, 0)
        logits_PV = _decode_forward(self.model, s.cache, ids_BW[self.rows_P], pos_PW, s.mask_PL, self.kw)
        return logits_PV[:B].to(dtype=torch.float32, copy=True)

    def step(self, token_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        """One token per row at column ``col`` of the cache: same shapes at every step and every call of the bucket."""
        s = self.slot
        s.mask_PL[:, self.col] = 1
        s.ids_P1.copy_(token_B[self.rows_P, None])
        s.pos_P1.copy_(pos_B[self.rows_P, None])
        self.col += 1
        if s.compiled:  # CUDA graphs: the previous step's output buffer may be overwritten now (we copied it)
            torch.compiler.cudagraph_mark_step_begin()
        logits_PV = s.forward(self.model, s.cache, s.ids_P1, s.pos_P1, s.mask_PL, self.kw)
        return logits_PV[: self.B].to(dtype=torch.float32, copy=True)


class StaticSampler(EngineSampler):
    """Samples through ``StaticEngine`` (``sampling.backend: static``); the slots (cache, buffers, compiled step) are
    kept between calls, per model and shape bucket. Keyword options are ``StaticEngine``'s."""

    def __init__(self, model, tokenizer, *, batch_size: int = 256, pool_capacity: int = 2, **engine_options):
        super().__init__(model, tokenizer, batch_size=batch_size)
        self.pool = SlotPool(pool_capacity)
        self.engine_options = engine_options

    def engine(self, model):
        return StaticEngine(model, pool=self.pool, **self.engine_options)
