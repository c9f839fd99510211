"""The update's forward, taken from the decode: ``DecodeTrace`` holds what the fused decoder computed while it
sampled (every layer's matmul outputs, time-major), and ``DecodeTrace.completion_logprobs`` rebuilds the
policy's differentiable log-probs of the sampled rows from it without running those matmuls again.

Why: with μ = 1 (one optimizer step per batch) the update differentiates the very function the sampler just
evaluated, at the very same weights. A Hugging Face forward over the batch repeats the decode's matrix
multiplies (2·P FLOPs per token of the 6·P a training token costs); here each linear layer is a ``_Replayed``
autograd node whose forward returns the recorded output and whose backward is the ordinary one (dX = dY·W,
dW = dYᵀ·X, LoRA's dA and dB). Everything between the matmuls (RMSNorm, rotary embeddings, attention, SwiGLU,
the residual adds, the LM head and the log-softmax) is recomputed under autograd, from the same inputs in the
same order of operations as ``FastEngine``; so the log-probs equal a teacher-forced forward's to float rounding
(about 1e-6; ``tests/test_trace.py`` compares log-probs and every parameter's gradient with the Hugging Face
forward's, full fine-tuning and LoRA).

Where it does not apply the trainer runs the model's forward as before: another decode engine (bf16, GPU,
an architecture ``FastEngine`` does not run), dropout active, μ > 1 after the first iteration, or a trace
larger than ``MAX_TRACE_BYTES``. A trace refuses to replay once any trainable parameter has changed since the
decode (a fingerprint of their values), instead of giving a gradient at stale weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..algos.logprobs import entropy_from_logits, token_logprobs
from ..types import Role, Rollouts
from .engine import causal_mask

MAX_TRACE_BYTES = 4 << 30  # a decode whose recorded outputs would exceed this is not recorded


def trace_bytes(model, rows: int, positions: int) -> int:
    """Bytes ``FastEngine(record=True)`` holds for ``rows`` × ``positions`` (prompt width + new tokens)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = hf.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_layer = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + 2 * cfg.hidden_size \
        + 2 * cfg.intermediate_size
    return 4 * rows * positions * per_layer * cfg.num_hidden_layers


def replay_unsupported(model) -> str | None:
    """Why the update cannot be replayed from a decode of ``model`` in training mode (None when it can)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(hf.config, "attention_dropout", 0.0):
        return "attention dropout"
    for name, m in hf.named_modules():
        for drop in getattr(m, "lora_dropout", {}).values():
            if not isinstance(drop, torch.nn.Identity) and getattr(drop, "p", 0.0) > 0:
                return f"LoRA dropout at {name}"
    return None


def _fingerprint(params: list[torch.Tensor]) -> list[float]:
    """Each parameter's float64 sum: it changes when an optimizer step does (fused AdamW bumps no ``_version``)."""
    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in params]


def _lora_terms(linear) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A [r, in], B [out, r], scaling) of each active, unmerged adapter of a peft LoRA layer (none for nn.Linear)."""
    if getattr(linear, "base_layer", None) is None or linear.disable_adapters or linear.merged:
        return []
    return [(linear.lora_A[n].weight, linear.lora_B[n].weight, float(linear.scaling[n]))
            for n in linear.active_adapters if n in linear.lora_A]


class _Replayed(torch.autograd.Function):
    """y = x·[W₁; W₂; …]ᵀ (+ biases, + LoRA terms), whose value the decode already computed: forward returns
    the recorded ``y_MF``; backward is the linear layers' own gradient. ``layout``: per linear, (its output
    width, has bias, number of LoRA adapters); ``params``: per linear, W, then b, then each adapter's A, B; and
    ``scalings`` the adapters' scale factors, in the same order."""

    @staticmethod
    def forward(ctx, x_MI, y_MF, layout, scalings, *params):
        ctx.layout, ctx.scalings = layout, scalings
        ctx.save_for_backward(x_MI, *params)
        return y_MF.view_as(y_MF)

    @staticmethod
    def backward(ctx, dy_MF):
        x_MI, *params = ctx.saved_tensors
        dy_MF = dy_MF.contiguous()
        grads, weights, at, p, s = [], [], 0, 0, 0
        for width, has_bias, n_lora in ctx.layout:
            dy = dy_MF[:, at : at + width]
            w, b = params[p], params[p + 1] if has_bias else None
            p += 1 + has_bias
            w_eff = w.detach()
            grads.append(dy.t() @ x_MI if w.requires_grad else None)
            if has_bias:
                grads.append(dy.sum(0) if b.requires_grad else None)
            for _ in range(n_lora):
                a, bb, scale = params[p], params[p + 1], ctx.scalings[s]
                p, s = p + 2, s + 1
                w_eff = w_eff + scale * (bb.detach() @ a.detach())
                dyb = dy @ bb.detach()  # [M, r]
                grads.append(scale * (dyb.t() @ x_MI) if a.requires_grad else None)
                grads.append(scale * (dy.t() @ (x_MI @ a.detach().t())) if bb.requires_grad else None)
            weights.append(w_eff)
            at += width
        if not ctx.needs_input_grad[0]:  # e.g. the first layer's input under LoRA: nothing below it trains
            return (None, None, None, None, *grads)
        dx = dy_MF @ (weights[0] if len(weights) == 1 else torch.cat(weights))
        return (dx, None, None, None, *grads)


class _SwiGLU(torch.autograd.Function):
    """silu(g)·u of ``gu`` = [g | u] (the recorded gate|up output). Backward writes dg and du into one gradient of
    ``gu``'s shape, where autograd through ``chunk`` would concatenate them: a copy of the layer's widest
    activation. It keeps ``gu`` only (a view of the record) and recomputes the sigmoid; the formulas are
    torch's: d silu(g)/dg = σ(g)·(1 + g·(1 − σ(g)))."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, dh):
        # in place in the gradient's own halves, one temporary (σ): this elementwise work is bound by memory
        # traffic, not arithmetic, so each pass and each fresh buffer saved counts
        (gu,) = ctx.saved_tensors
        g, u = gu.chunk(2, dim=-1)
        dgu = torch.empty_like(gu)
        dg, du = dgu.chunk(2, dim=-1)
        sig = torch.sigmoid(g)
        torch.mul(g, sig, out=du)  # silu(g)
        torch.sub(1.0, sig, out=dg).mul_(du).add_(sig)  # σ + silu(g)·(1 − σ) = σ·(1 + g·(1 − σ))
        dg.mul_(dh).mul_(u)
        du.mul_(dh)
        return dgu


def _replay(x_LRI: torch.Tensor, y_LRF: torch.Tensor, linears) -> torch.Tensor:
    layout, scalings, params = [], [], []
    for lin in linears:
        base = getattr(lin, "base_layer", lin)
        lora = _lora_terms(lin)
        layout.append((base.weight.shape[0], base.bias is not None, len(lora)))
        params += [base.weight] + ([base.bias] if base.bias is not None else [])
        for a, b, scale in lora:
            params += [a, b]
            scalings.append(scale)
    L, R = x_LRI.shape[:2]
    y = _Replayed.apply(x_LRI.reshape(L * R, -1), y_LRF.reshape(L * R, -1), tuple(layout), tuple(scalings), *params)
    return y.view(L, R, -1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, w·(x·rsqrt(mean(x²) + eps)), differentiable (``engine._rms`` is the in-place one)."""
    return x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * w


class DecodeTrace:
    """One decode chunk's record (``FastEngine(record=True)``) and what replaying it needs: the chunk's prompts,
    its sampled tokens ``new_BS``, the engine (rotary tables, layer layout) and the model whose parameters get
    the gradient."""

    def __init__(self, model, engine, prompts: list[list[int]], new_BS: torch.Tensor):
        self.model, self.engine, self.prompts, self.new_BS = model, engine, prompts, new_BS
        self.record, self.length = engine.record, engine.length

    def logprobs(self, rows: torch.Tensor, *, temperature: float, entropy: str = "none"):
        """(logp_RS, H_RS) of the chunk's ``rows``' sampled tokens ``new_BS[rows]``, differentiable in the
        model's trainable parameters (``entropy`` as in ``completion_logprobs``); positions past a row's EOS
        carry finite values that a loss must mask. At the decode's weights only: ``RolloutTrace`` checks."""
        e, rec = self.engine, self.record
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        L, W = self.length, rec["real_BW"].shape[1]
        every = rows.numel() == rec["ids"].shape[1] and bool((rows == torch.arange(rows.numel())).all())
        pick = (lambda t: t[:L]) if every else (lambda t: t[:L].index_select(1, rows))
        ids_LR, pos_LR = pick(rec["ids"]), pick(rec["pos"])
        cos, sin = e.cos[pos_LR][:, :, None], e.sin[pos_LR][:, :, None]  # [L, R, 1, d]
        real = torch.ones(rows.numel(), L, dtype=torch.bool, device=ids_LR.device)  # generated tokens are real
        real[:, :W] = rec["real_BW"][rows.to(rec["real_BW"].device)].to(real.device)
        mask = causal_mask(real)
        H, K, d = e.n_heads, e.n_kv, e.head_dim
        R = ids_LR.shape[1]
        emb = hf.model.embed_tokens  # its padding_idx row gets no gradient from lookups, as in nn.Embedding
        x = F.embedding(ids_LR, emb.weight, padding_idx=emb.padding_idx)
        for layer, rec_l in zip(hf.model.layers, rec["layers"]):
            a, mlp = layer.self_attn, layer.mlp
            qkv = _replay(_rms(x, layer.input_layernorm.weight, e.eps), pick(rec_l["qkv"]),
                          (a.q_proj, a.k_proj, a.v_proj))
            # split and chunk, not slices: their backward concatenates, where a slice's fills a zero tensor first
            qk, v = qkv.split([(H + K) * d, K * d], dim=-1)
            qk = qk.view(L, R, H + K, d)
            qk = qk * cos + qk.roll(d // 2, dims=-1) * sin
            q, k = (t.permute(1, 2, 0, 3) for t in qk.split([H, K], dim=2))
            v = v.view(L, R, K, d).permute(1, 2, 0, 3)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=K != H)  # [R, H, L, d]
            x = x + _replay(o.permute(2, 0, 1, 3).reshape(L, R, H * d), pick(rec_l["o"]), (a.o_proj,))
            gu = _replay(_rms(x, layer.post_attention_layernorm.weight, e.eps), pick(rec_l["gu"]),
                         (mlp.gate_proj, mlp.up_proj))
            x = x + _replay(_SwiGLU.apply(gu), pick(rec_l["down"]), (mlp.down_proj,))
        # position W - 1 + j predicts completion token j; the last sampled token was never fed
        logits_SRV = hf.lm_head(_rms(x[W - 1 :], hf.model.norm.weight, e.eps))
        targets_SR = self.new_BS[rows, : logits_SRV.shape[0]].t().to(logits_SRV.device)
        logp_RS = token_logprobs(logits_SRV, targets_SR, temperature=temperature).t()
        if entropy == "none":
            return logp_RS, torch.zeros_like(logp_RS)
        src = logits_SRV if entropy == "grad" else logits_SRV.detach()
        return logp_RS, entropy_from_logits(src, temperature=temperature).t()


class RolloutTrace:
    """The traces of a sampling call's chunks (``HFSampler.sample(trace=True)``): row n of the returned
    rollouts is row ``n % chunk_rows`` of chunk ``n // chunk_rows``. Built right after the decode (which changes
    no weight), it stamps the trainable parameters' fingerprint, and refuses to replay once they moved."""

    def __init__(self, chunks: list[DecodeTrace], chunk_rows: int):
        self.chunks, self.chunk_rows = chunks, chunk_rows
        self.params = [p for p in chunks[0].model.parameters() if p.requires_grad]
        self.stamp = _fingerprint(self.params)

    def completion_logprobs(self, batch: Rollouts, rows_N: torch.Tensor, *, temperature: float = 1.0,
                            entropy: str = "none"):
        """What ``trainers.common.completion_logprobs(model, batch, …)`` returns, (logp_NT, H_NT, mask_NT) aligned
        to targets ``batch.input_ids_NL[:, 1:]``, for ``batch`` made of the sampled rows ``rows_N`` (in order)."""
        mask_NT = batch.role_NL[:, 1:] == Role.COMPLETION
        T = mask_NT.shape[1]
        prompt_N = (batch.role_NL == Role.PROMPT).sum(1)
        comp_N = batch.completion_len_N
        if _fingerprint(self.params) != self.stamp:
            raise RuntimeError("this decode trace is stale: the trainable parameters changed since the decode, so "
                               "replaying it would give the gradient at the old weights (use the model's forward)")
        chunk_N, local_N = rows_N // self.chunk_rows, rows_N % self.chunk_rows
        parts, order = [], []
        for c in chunk_N.unique().tolist():
            sel = (chunk_N == c).nonzero().squeeze(1)
            logp_RS, H_RS = self.chunks[c].logprobs(local_N[sel], temperature=temperature, entropy=entropy)
            j_S = torch.arange(logp_RS.shape[1])
            # completion token j of a row sits at target index prompt_len - 1 + j; j past its EOS goes to column T
            index_RS = torch.where(j_S < comp_N[sel, None], prompt_N[sel, None] - 1 + j_S, T).to(logp_RS.device)
            parts.append([torch.zeros(len(sel), T + 1, dtype=t.dtype, device=t.device).scatter(1, index_RS, t)[:, :T]
                          for t in (logp_RS, H_RS)])
            order.append(sel)
        inverse = torch.cat(order).argsort()
        logp_NT, H_NT = (torch.cat([p[i] for p in parts])[inverse.to(parts[0][i].device)] for i in (0, 1))
        return logp_NT, H_NT, mask_NT.to(logp_NT.device)
