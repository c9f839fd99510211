"""The fused Llama/Qwen2 decode engine: a prefill over a left-padded batch, then one-token steps, each returning
float32 logits, as ``sampling.hf.HFEngine`` does through the model's own forward (the shared decode loop,
``sampling.decode.decode_chunk``, drives either).

``FastEngine`` runs the Llama/Qwen2 decoder (RMSNorm, rotary embeddings with the default rope, grouped-query
attention, SwiGLU) as a few fused tensor operations per layer: q/k/v in one matmul, gate/up in one, a key/value
cache preallocated for the whole completion and written in place, a precomputed rotary table applied to queries
and keys at once, elementwise steps in place where that changes no rounding. On a CPU a
one-token step of a small model is dominated by per-operation and per-module overhead, not by FLOPs; fusing
removes most of it (``benchmarks/grpo_step.py`` measures the effect). Where the C kernels build
(``kernels.py``), a one-token step's elementwise groups (RMSNorm with its record; bias, rotary and cache writes;
the one-query attention; SwiGLU) are one kernel each, and where BLAS is reachable from C the whole step through
every layer is one call (``kernels.decode_layers``); the torch operations remain the fallback. Weights are read
at construction, with a peft LoRA adapter's delta added when the adapter is active (``disable_adapter()`` gives
the base), so an engine is built per sampling call and sees the current parameters. Its logits equal
``HFEngine``'s to float rounding (about 1e-6; tested), so a sample can differ only where a uniform draw falls
within that distance of a boundary of the cumulative distribution.

With ``record=True`` it also keeps what the replayed update's backward needs (``record_widths``), in memory from a
``RecordArena``; ``trace.py`` and ``replay.py`` read it.
"""

from __future__ import annotations

import ctypes
import math
import weakref

import torch
import torch.nn.functional as F

from . import kernels

FAST_MODEL_TYPES = ("llama", "qwen2")


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


class RecordArena:
    """Memory for ``FastEngine`` records, reused from one sampling call to the next. Why: a record is the step's
    largest allocation (1.8 GB for the 30M-parameter benchmark model's 64 rows × 134 positions), and fresh memory
    costs a page fault per 4 KiB page on first touch, every step. ``start`` (at a sampling call) reuses the
    buffer only when no trace that ``hold`` registered is still alive, so a live trace's record is never
    overwritten; else the buffer is left to it and a new one is used. Views of one flat float32 buffer."""

    def __init__(self):
        self.flat, self.used, self.wanted, self.holders = torch.empty(0), 0, 0, []

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


def record_widths(cfg) -> tuple[dict[str, int], dict[str, int]]:
    """Features per position and row of a ``FastEngine`` record: per layer, the first norm's x̂ = x·r and r, q′|k′|v
    (bias included, queries and keys rotated), the attention's output, the second norm's x̂ and r, and gate|up; and
    once, the final norm's x̂ and r (the LM head's input)."""
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    D, H, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    return ({"x1": D, "r1": 1, "qkv": (H + 2 * K) * d, "att": H * d, "x2": D, "r2": 1,
             "gu": 2 * cfg.intermediate_size}, {"xf": D, "rf": 1})


class FastEngine:
    """``record``: also keep, for the prefill and each step, what the update's backward needs (``record_widths``;
    ``self.record``, time-major ``[position, row, features]``), so the update replays this forward instead of running
    it again (``trace.py``); ``arena``: where the record's memory comes from (a ``RecordArena``; fresh if
    None). A one-token step writes each of them straight into the record (``out=``), a prefill by a copy."""

    def __init__(self, model, *, record: bool = False, arena: RecordArena | None = None):
        self.recording, self.arena = record, arena
        self.lib = kernels.get()  # fused kernels for one-token steps (kernels.c); None: the torch operations
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
        self.intermediate = self.layers[0][7].shape[0]  # the down projection's input width
        # a one-token step through all layers in one C call (kernels.decode_layers), where BLAS is reachable from C
        # and every weight is a contiguous [out, in] matrix; else layer by layer from here
        self.whole_step = self.lib is not None and kernels.blas and all(
            b_o is None and all(w.is_contiguous() for w in (ln1, w_qkv.t(), w_o.t(), ln2, w_gu.t(), w_down.t()))
            for ln1, w_qkv, _, w_o, b_o, ln2, w_gu, w_down in self.layers)

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
        self.start = (W - attn_BW.sum(-1)).contiguous()  # each row's left padding: its first real position
        # additive, -inf at left padding; one row per key/value head, the layout _attend's batched product adds
        self.key_mask = torch.zeros(B, self.n_kv, 1, cap, device=dev)
        self.key_mask[..., :W].masked_fill_(~real[:, None, None], float("-inf"))
        mask = causal_mask(real) if W > 1 else self.key_mask[..., :1]  # width 1: the one-query path's layout
        self.length, self.bufs = 0, {}
        if self.recording:
            self._start_record(B, cap, dev)
            self.record["real_BW"] = real
        if self.whole_step:
            self._whole_step_args(B)
        return self._forward(ids_BW, (attn_BW.cumsum(-1) - 1).clamp(min=0), mask)

    @torch.no_grad()
    def step(self, token_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        return self._forward(token_B[:, None], pos_B[:, None], self.key_mask[..., : self.length + 1])

    def end_decode(self) -> None:
        """Free what only decoding reads: the key/value caches, the fused and packed weights, the scratch (for the
        30M-parameter benchmark model's 64 rows, about 400 MB). A trace keeps its engine for the record, the rotary
        tables and the sizes, and without this the rest would stay allocated through the update too."""
        self.k = self.v = self.layers = self.packs = self.bufs = None
        self.c_weights = self.c_packs = self.c_records = self.c_bufs = None

    def _start_record(self, B: int, cap: int, dev) -> None:
        per_layer, final = record_widths(self.cfg)
        arena = self.arena or RecordArena()
        self.record = {"layers": [{k: arena.take(cap, B, w, device=dev) for k, w in per_layer.items()}
                                  for _ in self.layers],
                       "final": {k: arena.take(cap, B, w, device=dev) for k, w in final.items()},
                       "ids": torch.empty(cap, B, dtype=torch.long, device=dev),
                       "pos": torch.empty(cap, B, dtype=torch.long, device=dev)}

    def _slot(self, rec: dict | None, key: str, S: int) -> torch.Tensor | None:
        """This position's rows of ``rec[key]`` where a one-token step writes straight into the record, else None."""
        return rec[key][self.length] if rec is not None and S == 1 else None

    def _keep(self, rec: dict | None, key: str, y: torch.Tensor, B: int, S: int) -> None:
        """A prefill's ``y`` (rows-major, [B·S, …] or [B, S, …]) into ``rec[key]``, time-major."""
        if rec is not None and S > 1:
            rec[key][self.length : self.length + S].copy_(y.reshape(B, S, -1).transpose(0, 1))

    def _norm(self, x_BSD, w, rec: dict | None, kx: str, kr: str, at: int | None = None) -> torch.Tensor:
        """transformers' RMSNorm w·(x·r), r = (mean(x²) + ε)^−½, the same operations; ``rec`` keeps x̂ = x·r and r
        (at position ``at`` for a [B, D] ``x``, else at this call's positions). One row per batch entry (a step, or
        the final norm): one fused kernel where there is one, into a buffer reused from layer to layer."""
        if self.lib is not None and (x_BSD.dim() == 2 or x_BSD.shape[1] == 1):
            x = x_BSD.reshape(x_BSD.shape[0], -1)
            if rec is None:
                return kernels.rms_norm(self.lib, x, w, self.eps, self._buf("h", *x.shape)).view(x_BSD.shape)
            at = self.length if at is None else at
            h = kernels.rms_norm(self.lib, x, w, self.eps, self._buf("h", *x.shape), rec[kx][at], rec[kr][at])
            return h.view(x_BSD.shape)
        if x_BSD.dim() == 2:
            out_r, out_x = (rec[kr][at], rec[kx][at]) if rec is not None else (None, None)
        else:
            B, S, D = x_BSD.shape
            out_r, out_x = self._slot(rec, kr, S), self._slot(rec, kx, S)
            out_r, out_x = (None, None) if out_r is None else (out_r.view(B, 1, 1), out_x.view(B, 1, D))
        r = torch.mean(x_BSD.pow(2), -1, keepdim=True, out=out_r).add_(self.eps).rsqrt_()
        xhat = torch.mul(x_BSD, r, out=out_x)
        if x_BSD.dim() == 3:
            self._keep(rec, kx, xhat, B, S)
            self._keep(rec, kr, r, B, S)
        return xhat * w

    def _whole_step_args(self, B: int) -> None:
        """The pointers ``kernels.decode_layers`` reads: per layer its weights and caches, and the record's bases."""
        weights = [None if t is None else t.data_ptr()
                   for i, (ln1, w_qkv, b_qkv, w_o, _, ln2, w_gu, w_down) in enumerate(self.layers)
                   for t in (ln1, w_qkv.t(), b_qkv, w_o.t(), ln2, w_gu.t(), w_down.t(), self.k[i], self.v[i])]
        self.c_weights = (ctypes.c_void_p * len(weights))(*weights)
        # each product's weight packed once for these B rows (MKL's layout), where MKL's packed products are there:
        # an sgemm call packs its weight again at every step (kernels.c, set_packed_gemm)
        self.packs, self.c_packs = None, None
        if kernels.packed:
            products = [w.t() for _, w_qkv, _, w_o, _, _, w_gu, w_down in self.layers
                        for w in (w_qkv, w_o, w_gu, w_down)]
            self.packs, addresses = kernels.pack_weights(self.lib, products, B)  # self.packs: kept while steps read it
            self.c_packs = (ctypes.c_void_p * len(addresses))(*addresses)
        self.c_records = None
        if self.recording:
            keys = ("x1", "r1", "qkv", "att", "x2", "r2", "gu")
            bases = [rec[k].data_ptr() for rec in self.record["layers"] for k in keys]
            assert all(rec[k].is_contiguous() for rec in self.record["layers"] for k in keys)
            self.c_records = (ctypes.c_void_p * len(bases))(*bases)
        D, F, I = self.embed.shape[1], self.layers[0][1].shape[1], self.intermediate
        widths = {"h": D, "qkv": F, "att": self.n_heads * self.head_dim, "gu": 2 * I, "a": I}
        self.c_bufs = [self._buf(name, B, n) for name, n in widths.items()]  # the layer-by-layer path's buffers

    def _buf(self, name: str, *shape: int) -> torch.Tensor:
        """A buffer of this engine's, reused from one layer and step to the next (its contents live until the next
        call with the same name)."""
        buf = self.bufs.get(name)
        if buf is None or buf.shape != shape:
            buf = self.bufs[name] = torch.empty(shape, device=self.device)
        return buf

    @staticmethod
    def _residual(x_BSD, a, w, bias) -> None:
        """x += a·w (+ bias), in place (x is this call's own); one product accumulating into x where there is no
        bias."""
        if bias is None:
            x_BSD.view(-1, x_BSD.shape[-1]).addmm_(a, w)
        else:
            x_BSD.add_(torch.addmm(bias, a, w).view(x_BSD.shape))

    @staticmethod
    def _mm(a: torch.Tensor, w: torch.Tensor, bias=None, out=None) -> torch.Tensor:
        return torch.mm(a, w, out=out) if bias is None else torch.addmm(bias, a, w, out=out)

    def _forward(self, ids_BS: torch.Tensor, pos_BS: torch.Tensor, mask) -> torch.Tensor:
        B, S = ids_BS.shape
        H, K, d = self.n_heads, self.n_kv, self.head_dim
        at, end = self.length, self.length + S
        fused = self.lib is not None and S == 1
        if fused:
            pos_B = pos_BS.reshape(B).contiguous()
        else:
            cos, sin = self.cos[pos_BS][:, :, None], self.sin[pos_BS][:, :, None]  # sin: signed, see _signed_sin
        if self.recording:
            self.record["ids"][at:end].copy_(ids_BS.t())
            self.record["pos"][at:end].copy_(pos_BS.t())
        x = F.embedding(ids_BS, self.embed)
        if fused and self.whole_step:
            kernels.decode_layers(self.lib, self.c_weights, self.c_packs, self.c_records, x.view(B, -1), self.c_bufs,
                                  self.cos, self.sin, pos_B, self.start, n_heads=H, n_kv=K, head_dim=d,
                                  intermediate=self.intermediate, cap=self.cos.shape[0], at=at, eps=self.eps)
        else:
            for i in range(len(self.layers)):
                self._layer(i, x, pos_B if fused else (cos, sin), mask)
        self.length = end
        return self._norm(x[:, -1], self.norm, self.record["final"] if self.recording else None, "xf", "rf",
                          at=end - 1) @ self.head

    def _layer(self, i: int, x: torch.Tensor, pos, mask) -> None:
        """Layer ``i`` of a prefill or one-token step, from Python, on this call's residual stream ``x`` [B, S, D] (in
        place); ``pos``: the rows' positions [B] for a one-token step with the kernels, else the rotary tables at
        the positions (cos, sin)."""
        B, S, _ = x.shape
        H, K, d = self.n_heads, self.n_kv, self.head_dim
        nq, nk = H * d, K * d
        at, end = self.length, self.length + S
        fused = self.lib is not None and S == 1
        ln1, w_qkv, b_qkv, w_o, b_o, ln2, w_gu, w_down = self.layers[i]
        rec = self.record["layers"][i] if self.recording else None
        h = self._norm(x, ln1, rec, "x1", "r1").view(B * S, -1)
        qkv = self._mm(h, w_qkv, None if fused else b_qkv, self._slot(rec, "qkv", S))
        qk = qkv[:, : nq + nk].view(B, S, H + K, d)
        if fused:  # the bias, the same rotation and the cache writes in one kernel
            kernels.rope_cache(self.lib, qkv, b_qkv, self.cos, self.sin, pos, self.k[i], self.v[i], H, at)
        else:
            cos, sin = pos
            rolled = qk.roll(d // 2, dims=-1).mul_(sin)
            qk.mul_(cos).add_(rolled)  # queries and keys rotated together, in place: a record keeps q′|k′|v
            self._keep(rec, "qkv", qkv, B, S)
            self.k[i][:, :, at:end] = qk[:, :, H:].transpose(1, 2)
            self.v[i][:, :, at:end] = qkv[:, nq + nk :].view(B, S, K, d).transpose(1, 2)
        if fused:  # one pass over each row's keys and values (kernels.c)
            out = self._slot(rec, "att", S) if rec is not None else self._buf("att", B, nq)
            o = kernels.attend_step(self.lib, qkv, self.k[i], self.v[i], self.start, out, H, end)
        else:
            o = self._attend(qk[:, :, :H].transpose(1, 2), self.k[i][:, :, :end], self.v[i][:, :, :end], mask,
                             out=self._slot(rec, "att", S)).reshape(B * S, nq)
        self._keep(rec, "att", o, B, S)
        self._residual(x, o, w_o, b_o)
        gu = self._mm(self._norm(x, ln2, rec, "x2", "r2").view(B * S, -1), w_gu, out=self._slot(rec, "gu", S))
        self._keep(rec, "gu", gu, B, S)
        half = gu.shape[1] // 2
        a = kernels.swiglu(self.lib, gu, self._buf("a", B, half)) if fused else \
            F.silu(gu[:, :half]).mul_(gu[:, half:])
        self._residual(x, a, w_down, None)

    def _attend(self, q_BHSD, k_BKLD, v_BKLD, mask, out: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q·kᵀ/√d + mask)·v with grouped-query heads, as [B, S, H, D]; ``mask`` is additive (0 or
        −inf). One query (a decode step) goes through two batched matmuls, the second into ``out`` if given: at
        this size the fused CPU kernel costs more in setup than in work."""
        B, H, S, D = q_BHSD.shape
        if S > 1:
            o = F.scaled_dot_product_attention(q_BHSD, k_BKLD, v_BKLD, attn_mask=mask, enable_gqa=self.n_kv != H)
            return o.transpose(1, 2)
        K, L = self.n_kv, k_BKLD.shape[2]
        q = q_BHSD.reshape(B * K, H // K, D)  # query heads h = k·(H/K) + j share key/value head k
        scores = torch.baddbmm(mask.view(B * K, 1, L), q, k_BKLD.reshape(B * K, L, D).transpose(1, 2), alpha=D**-0.5)
        o = torch.bmm(torch.softmax(scores, dim=-1), v_BKLD.reshape(B * K, L, D),
                      out=None if out is None else out.view(B * K, H // K, D))
        return o.view(B, 1, H, D)
