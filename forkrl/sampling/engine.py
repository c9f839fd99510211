"""Decode engines: a prefill over a left-padded batch, then one-token steps, each returning float32 logits.

The sampler (``hf.HFSampler``) and ``forkrl diff``'s lockstep decoding drive the same loop
(``hf.decode_chunk``) over an engine, so they draw the same tokens from the same logits.

* ``HFEngine`` runs any Hugging Face causal LM through its own ``forward`` and KV cache, exactly as
  ``generate`` does (position ids ``cumsum(mask) - 1``, the mask dropped when it is all ones,
  ``logits_to_keep=1``).
* ``FastEngine`` runs the Llama/Qwen2 decoder (RMSNorm, rotary embeddings with the default rope, grouped-query
  attention, SwiGLU) as a few fused tensor operations per layer: q/k/v in one matmul, gate/up in one, a key/value
  cache preallocated for the whole completion and written in place, a precomputed rotary table applied to queries
  and keys at once, elementwise steps in place where that changes no rounding. On a CPU a
  one-token step of a small model is dominated by per-operation and per-module overhead, not by FLOPs; fusing
  removes most of it (``benchmarks/grpo_step.py`` measures the effect). Weights are read at construction, with
  a peft LoRA adapter's delta added when the adapter is active (``disable_adapter()`` gives the base), so an
  engine is built per sampling call and sees the current parameters. Its logits equal ``HFEngine``'s to float
  rounding (about 1e-6; tested), so a sample can differ only where a uniform draw falls within that distance
  of a boundary of the cumulative distribution.

``engine_for(model, "auto")`` picks ``FastEngine`` for a float32 model on CPU that it supports and ``HFEngine``
otherwise; ``sampling.engine: hf`` forces the Hugging Face path.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from .replay import Scratch

FAST_MODEL_TYPES = ("llama", "qwen2")


class HFEngine:
    def __init__(self, model):
        self.model, self.device = model, next(model.parameters()).device
        self.cache = self.mask = None

    def prefill(self, ids_BW: torch.Tensor, attn_BW: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        pos = (attn_BW.cumsum(-1) - 1).masked_fill_(attn_BW == 0, 0)
        self.mask = None if bool(attn_BW.all()) else attn_BW  # generate drops an all-ones mask too
        return self._forward(ids_BW, pos)

    def step(self, token_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self._forward(token_B[:, None], pos_B[:, None])

    def _forward(self, ids, pos):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)


def fast_unsupported(model) -> str | None:
    """Why ``FastEngine`` cannot run ``model`` (None when it can)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(hf, "config", None)
    if cfg is None or not hasattr(hf, "model") or not hasattr(hf, "lm_head"):
        return "not a transformers causal LM with .model and .lm_head"
    p = next(hf.parameters())
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    checks = [
        (cfg.model_type in FAST_MODEL_TYPES, f"model_type {cfg.model_type!r} (supported: {FAST_MODEL_TYPES})"),
        (p.device.type == "cpu" and p.dtype == torch.float32, f"{p.dtype} on {p.device.type} (float32 on CPU only)"),
        (rope.get("rope_type", "default") == "default", f"rope_type {rope.get('rope_type')!r}"),
        (getattr(cfg, "hidden_act", None) == "silu", f"hidden_act {getattr(cfg, 'hidden_act', None)!r}"),
        (not getattr(cfg, "use_sliding_window", False), "sliding-window attention"),
        (not getattr(cfg, "mlp_bias", False), "mlp_bias"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    for name, m in hf.named_modules():
        if hasattr(m, "lora_A") and (getattr(m, "lora_variant", None) or getattr(m, "fan_in_fan_out", False)):
            return f"a LoRA variant (DoRA, fan_in_fan_out, …) at {name}"
        if hasattr(m, "lora_embedding_A") and m.lora_embedding_A:
            return f"a LoRA adapter on an embedding ({name})"
    return None


def causal_mask(real_BL: torch.Tensor) -> torch.Tensor:
    """Additive [B, 1, L, L] attention mask, 0 or −inf: each query sees the real keys (``real_BL``: not left
    padding) at or before it, and a padding query sees itself only (its output is never used; this keeps it
    finite). The prefill's, and the replay's over the whole decode (``trace.py``)."""
    L = real_BL.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=real_BL.device).tril()
    allowed = (causal[None] & real_BL[:, None, :]) | torch.eye(L, dtype=torch.bool, device=real_BL.device)
    return torch.zeros(allowed.shape, device=real_BL.device).masked_fill_(~allowed, float("-inf"))[:, None]


def _weight(linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear as it computes now: a peft LoRA layer's active adapters' deltas included."""
    base = getattr(linear, "base_layer", None)
    if base is None:
        return linear.weight, linear.bias
    w = base.weight
    if not linear.disable_adapters and not linear.merged:
        for name in linear.active_adapters:
            if name in linear.lora_A:
                w = w + linear.get_delta_weight(name)
    return w, base.bias


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, w·(x·rsqrt(mean(x²) + eps)), the same operations with fewer temporaries."""
    return (x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()).mul_(w)


class RecordArena:
    """Memory for ``FastEngine`` records, reused from one sampling call to the next. Why: a record is the step's
    largest allocation (1.8 GB for the 30M-parameter benchmark model's 64 rows × 134 positions), and fresh memory
    costs a page fault per 4 KiB page on first touch, every step. ``start`` (at a sampling call) reuses the
    buffer only when no trace that ``hold`` registered is still alive, so a live trace's record is never
    overwritten; else the buffer is left to it and a new one is used. Views of one flat float32 buffer."""

    def __init__(self):
        self.flat, self.used, self.wanted, self.holders = torch.empty(0), 0, 0, []
        self.scratch = Scratch()  # the replayed backward's temporaries (replay.Scratch), kept with the record's memory

    def start(self) -> None:
        if any(ref() is not None for ref in self.holders):
            self.flat = torch.empty(0)  # still read by a live trace
        if self.flat.numel() < self.wanted:  # sized by the last call's takes
            self.flat = torch.empty(self.wanted)
        self.used, self.wanted, self.holders = 0, 0, []

    def take(self, *shape: int, device) -> torch.Tensor:
        n = math.prod(shape)
        self.wanted += n
        if self.flat.device != torch.device(device) or self.used + n > self.flat.numel():
            return torch.empty(shape, device=device)
        self.used += n
        return self.flat[self.used - n : self.used].view(shape)

    def hold(self, trace) -> None:
        self.holders.append(weakref.ref(trace))


class FastEngine:
    """``record``: also keep every layer's matmul outputs of the prefill and each step (``self.record``, time-major
    ``[position, row, features]``), so the update can replay this forward instead of running it again
    (``sampling/trace.py``); ``arena``: where the record's memory comes from (a ``RecordArena``; fresh if None)."""

    def __init__(self, model, *, record: bool = False, arena: RecordArena | None = None):
        self.recording, self.arena = record, arena
        why = fast_unsupported(model)
        if why is not None:
            raise ValueError(f"FastEngine does not support this model: {why}")
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = hf.config
        self.cfg, self.eps = cfg, cfg.rms_norm_eps
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        core = hf.model
        self.embed = core.embed_tokens.weight.detach()
        self.device = self.embed.device
        self.layers = []
        with torch.no_grad():
            for layer in core.layers:
                a, mlp = layer.self_attn, layer.mlp
                (wq, bq), (wk, bk), (wv, bv) = _weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)
                bias = None if bq is None else torch.cat([bq, bk, bv])
                wo, bo = _weight(a.o_proj)
                (wg, _), (wu, _), (wd, _) = _weight(mlp.gate_proj), _weight(mlp.up_proj), _weight(mlp.down_proj)
                # [in, out] views of the [out, in] weights: MKL multiplies by a transposed operand as fast, and a
                # transposing copy of every weight at every sampling call is not free
                self.layers.append((layer.input_layernorm.weight.detach(), torch.cat([wq, wk, wv]).t(),
                                    bias, wo.detach().t(), bo, layer.post_attention_layernorm.weight.detach(),
                                    torch.cat([wg, wu]).t(), wd.detach().t()))
            self.norm = core.norm.weight.detach()
            self.head = _weight(hf.lm_head)[0].detach().t()

    def _rope(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, head_dim] as transformers' default rotary embedding computes them."""
        rope = getattr(self.cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(self.cfg, "rope_theta", 10000.0))
        d = self.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        freqs = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _signed_sin(self, sin: torch.Tensor) -> torch.Tensor:
        """sin with its first half negated: x·cos + roll(x, d/2)·that equals transformers' x·cos +
        rotate_half(x)·sin bit for bit (a negation is exact), in one roll instead of a negation and a cat."""
        h = self.head_dim // 2
        return torch.cat((-sin[:, :h], sin[:, h:]), dim=-1)

    @torch.no_grad()
    def prefill(self, ids_BW: torch.Tensor, attn_BW: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        B, W = ids_BW.shape
        cap = W + max_new_tokens
        dev = ids_BW.device
        self.cos, sin = self._rope(cap, dev)
        self.sin = self._signed_sin(sin)
        self.k = [torch.zeros(B, self.n_kv, cap, self.head_dim, device=dev) for _ in self.layers]
        self.v = [torch.zeros(B, self.n_kv, cap, self.head_dim, device=dev) for _ in self.layers]
        real = attn_BW.bool()
        # additive, -inf at left padding; one row per key/value head, the layout _attend's batched product adds
        self.key_mask = torch.zeros(B, self.n_kv, 1, cap, device=dev)
        self.key_mask[..., :W].masked_fill_(~real[:, None, None], float("-inf"))
        mask = causal_mask(real) if W > 1 else self.key_mask[..., :1]  # width 1: the one-query path's layout
        self.length = 0
        if self.recording:
            self._start_record(B, cap, dev)
            self.record["real_BW"] = real
        return self._forward(ids_BW, (attn_BW.cumsum(-1) - 1).clamp(min=0), mask)

    @torch.no_grad()
    def step(self, token_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        return self._forward(token_B[:, None], pos_B[:, None], self.key_mask[..., : self.length + 1])

    def _start_record(self, B: int, cap: int, dev) -> None:
        """Per layer, time-major buffers of the four matmul outputs: qkv (bias included), the attention's
        output projection, gate|up and down; plus the tokens fed and their positions."""
        d = self.head_dim
        widths = {"qkv": (self.n_heads + 2 * self.n_kv) * d, "o": self.cfg.hidden_size,
                  "gu": 2 * self.cfg.intermediate_size, "down": self.cfg.hidden_size}
        arena = self.arena or RecordArena()
        self.record = {"layers": [{k: arena.take(cap, B, w, device=dev) for k, w in widths.items()}
                                  for _ in self.layers],
                       "ids": torch.empty(cap, B, dtype=torch.long, device=dev),
                       "pos": torch.empty(cap, B, dtype=torch.long, device=dev)}

    def _mm(self, i: int, key: str, B: int, S: int, a: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
        """a·w (+ bias), kept in layer ``i``'s record under ``key`` when recording: a one-token step's straight
        into the record (the time-major row of this position), a prefill's by a transposing copy."""
        rec = self.record["layers"][i][key] if self.recording else None
        out = rec[self.length] if rec is not None and S == 1 else None
        if bias is None:
            y = torch.mm(a, w, out=out)
        else:
            y = torch.addmm(bias, a, w, out=out)
        if rec is not None and S > 1:
            rec[self.length : self.length + S].copy_(y.view(B, S, -1).transpose(0, 1))
        return y

    def _forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor, mask) -> torch.Tensor:
        B, S = ids_BS.shape
        H, K, d = self.n_heads, self.n_kv, self.head_dim
        nq, nk = H * d, K * d
        at, end = self.length, self.length + S
        cos, sin = self.cos[pos_BS][:, None], self.sin[pos_BS][:, None]  # sin: signed, see _signed_sin
        if self.recording:
            self.record["ids"][at:end].copy_(ids_BS.t())
            self.record["pos"][at:end].copy_(pos_BS.t())
        x = F.embedding(ids_BS, self.embed)
        for i, (ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_gu, w_down) in enumerate(self.layers):
            h = _rms(x, ln1, self.eps).view(B * S, -1)
            qkv = self._mm(i, "qkv", B, S, h, w_qkv, b_qkv)
            qk = qkv[:, : nq + nk].view(B, S, H + K, d).transpose(1, 2)  # queries and keys rotated together
            qk = (qk * cos).add_(qk.roll(d // 2, dims=-1).mul_(sin))
            self.k[i][:, :, at:end] = qk[:, H:]
            self.v[i][:, :, at:end] = qkv[:, nq + nk :].view(B, S, K, d).transpose(1, 2)
            o = self._attend(qk[:, :H], self.k[i][:, :, :end], self.v[i][:, :, :end], mask).reshape(B * S, nq)
            proj = self._mm(i, "o", B, S, o, w_o, b_o)
            x.add_(proj.view(B, S, -1))  # x: this call's own
            gu = self._mm(i, "gu", B, S, _rms(x, ln2, self.eps).view(B * S, -1), w_gu)
            half = gu.shape[1] // 2
            down = self._mm(i, "down", B, S, F.silu(gu[:, :half]).mul_(gu[:, half:]), w_down)
            x.add_(down.view(B, S, -1))
        self.length = end
        return _rms(x[:, -1], self.norm, self.eps) @ self.head

    def _attend(self, q_BHSD, k_BKLD, v_BKLD, mask) -> torch.Tensor:
        """softmax(q·kᵀ/√d + mask)·v with grouped-query heads, as [B, S, H, D]; ``mask`` is additive (0 or
        −inf). One query (a decode step) goes through two batched matmuls: at this size the fused CPU kernel
        costs more in setup than in work."""
        B, H, S, D = q_BHSD.shape
        if S > 1:
            o = F.scaled_dot_product_attention(q_BHSD, k_BKLD, v_BKLD, attn_mask=mask, enable_gqa=self.n_kv != H)
            return o.transpose(1, 2)
        K, L = self.n_kv, k_BKLD.shape[2]
        q = q_BHSD.reshape(B * K, H // K, D)  # query heads h = k·(H/K) + j share key/value head k
        scores = torch.baddbmm(mask.view(B * K, 1, L), q, k_BKLD.reshape(B * K, L, D).transpose(1, 2), alpha=D**-0.5)
        return torch.bmm(torch.softmax(scores, dim=-1), v_BKLD.reshape(B * K, L, D)).view(B, 1, H, D)


def engine_for(model, kind: str = "auto"):
    """``FastEngine`` when ``kind`` is "auto" and it supports ``model``, else ``HFEngine``."""
    if kind not in ("auto", "hf"):
        raise ValueError(f"unknown decode engine {kind!r}: use 'auto' or 'hf'")
    if kind == "auto" and fast_unsupported(model) is None:
        return FastEngine(model)
    return HFEngine(model)
