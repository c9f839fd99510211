"""The replayed update's forward and backward, written out (``trace.DecodeTrace.logprobs`` calls ``replay``).

The decode kept, for every position of every sampled row, what the backward needs (``engine.record_widths``): per
layer the two RMSNorms' x̂ = x·r and r, q′|k′|v (bias added, q and k rotated), the attention's output and gate|up;
and the final norm's x̂ and r. So nothing the decode computed is computed again:

**Forward**: log π = log_softmax(lm_head(w·x̂_f) / T) at the completion-predicting positions, from the recorded
final norm. This is the whole no-grad pass (rows whose advantage is 0) and the forward of the differentiable one.

**Backward**, by hand, per layer from the top, dx the gradient of the layer's output (time-major rows m = l·R + r):

    down:     dW_d = dxᵀ·a,      da = dx·W_d          a = silu(g)·u, from the recorded gate|up [g | u]
    SwiGLU:   du = da·silu(g),   dg = da·u·(σ + silu(g)·(1 − σ)),   σ = sigmoid(g)
    gate|up:  dW_gu = dguᵀ·h₂,   dh₂ = dgu·W_gu       h₂ = w₂·x̂₂
    RMSNorm:  dw₂ = Σ dh₂·x̂₂,    dx′ = dx + r₂·(ĝ − x̂₂·mean(ĝ·x̂₂)),   ĝ = w₂·dh₂   (x′ = x + o, its input)
    o:        dW_o = dx′ᵀ·o,      do = dx′·W_o         o: the recorded attention output
    attention: p = softmax(q′·k′ᵀ/√d + mask) (recomputed), dv = pᵀ·do, ds = p·(do·vᵀ − rowsum(do·o)),
              dq′ = ds·k′/√d,  dk′ = dsᵀ·q′/√d
    rotary:   d(q|k) = dq′·cos + roll(dq′·sin, d/2)    (the rotation's transpose; sin carries the engine's signs)
    q|k|v:    dW_qkv = dqkvᵀ·h₁,  dh₁ = dqkv·W_qkv;    RMSNorm as above, into the layer input's dx
    head:     dz = dlogp·(onehot(y) − p) − dH·p·(log p + H),  dlogits = dz / T;  E gets dx₀ at each token's row

Biases, LoRA adapters (A, B, scale of each active adapter) and frozen parameters are handled per linear layer
(``Linears``). Every parameter's gradient equals autograd's through the Hugging Face forward to float rounding
(``tests/test_trace.py``). Why by hand: autograd through the same functions spent about half of the update
outside the matrix multiplies (a recomputed forward, fresh activation-sized temporaries that each pay their page
faults, concatenations, SDPA's layout copies); here the elementwise work runs in few passes over buffers reused
from layer to layer and from step to step, and the weight gradients of a fused group (q|k|v, gate|up) are one
product. SwiGLU and its backward, the RMSNorm backward and the rotary transpose with the packing are one pass each
in C where the kernels build (``kernels.py``; else the torch operations, the same to float rounding). On the
benchmark model's 64-row update: 0.61-0.68 s through autograd, about 0.44 s here with the torch operations and
0.38-0.39 s with the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels
from .threads import use


def _index(params: list[torch.Tensor], p: torch.Tensor) -> int:
    """p's position in ``params``, appended if new (a tied embedding and head share one position)."""
    for i, q in enumerate(params):
        if q is p:
            return i
    params.append(p)
    return len(params) - 1


def _acc(grads: list, i: int, g: torch.Tensor) -> None:
    grads[i] = g if grads[i] is None else grads[i].add_(g)


class Scratch:
    """Named buffers the backward reuses for its activation-sized temporaries, from one layer and one replay to the
    next. Why: a fresh tensor of that size pays a page fault per 4 KiB on first touch, and the elementwise work
    here is bound by memory traffic already. Only for temporaries of one backward (backwards run one at a time)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype, self.flat = dtype, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.numel() < n:
            buf = self.flat[name] = torch.empty(n, dtype=self.dtype)
        return buf[:n].view(shape)


def lora_terms(linear) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A [r, in], B [out, r], scaling) of each active, unmerged adapter of a peft LoRA layer (none for nn.Linear)."""
    if getattr(linear, "base_layer", None) is None or linear.disable_adapters or linear.merged:
        return []
    return [(linear.lora_A[n].weight, linear.lora_B[n].weight, float(linear.scaling[n]))
            for n in linear.active_adapters if n in linear.lora_A]


def _weight_grad(dy_MF: torch.Tensor, x_MI: torch.Tensor) -> torch.Tensor:
    """dyᵀ·x [F, I]. For F > I as (xᵀ·dy)ᵀ: here MKL runs [I, M]·[M, F] faster than [F, M]·[M, I] (11.6 against
    14.4 ms at M = 4416, F = 1536, I = 256, the transposing copy included)."""
    return (x_MI.t() @ dy_MF).t().contiguous() if dy_MF.shape[1] > x_MI.shape[1] else dy_MF.t() @ x_MI


class Linears:
    """Linear layers that read one input and whose outputs lie side by side (q|k|v, gate|up, or a single one), as
    positions in a flat parameter list: per layer its output width, weight, bias (or None), and each active LoRA
    adapter's (A, B, scaling)."""

    def __init__(self, modules, params: list[torch.Tensor]):
        self.parts = []
        for m in modules:
            base = getattr(m, "base_layer", m)
            bias = None if base.bias is None else _index(params, base.bias)
            adapters = [(_index(params, a), _index(params, b), s) for a, b, s in lora_terms(m)]
            self.parts.append((base.weight.shape[0], _index(params, base.weight), bias, adapters))

    def weight(self, P) -> torch.Tensor:
        """The [out, in] weight the layers compute with: adapters' deltas added, detached."""
        ws = []
        for _, w, _, adapters in self.parts:
            w = P[w].detach()
            for a, b, s in adapters:
                w = w + s * (P[b].detach() @ P[a].detach())
            ws.append(w)
        return ws[0] if len(ws) == 1 else torch.cat(ws)

    def bias(self, P) -> torch.Tensor | None:
        if all(b is None for _, _, b, _ in self.parts):
            return None
        return torch.cat([P[b].detach() if b is not None else P[w].new_zeros(width) for width, w, b, _ in self.parts])

    def backward(self, dy_MF, x_MI, P, needs, grads: list, *, dx: torch.Tensor | None) -> torch.Tensor | None:
        """Accumulate the gradients of y = x·Wᵀ (+ b, + Σ s·x·Aᵀ·Bᵀ) into ``grads``; write dx into ``dx`` (if
        given) and return it. The weights' gradients are one matrix product for the group when all of them train."""
        whole = _weight_grad(dy_MF, x_MI) if all(needs[w] for _, w, _, _ in self.parts) else None
        at = 0
        for width, w, b, adapters in self.parts:
            dy = dy_MF if len(self.parts) == 1 else dy_MF[:, at : at + width]
            if needs[w]:
                _acc(grads, w, whole[at : at + width] if whole is not None else _weight_grad(dy, x_MI))
            if b is not None and needs[b]:
                _acc(grads, b, dy.sum(0))
            for a, bb, s in adapters:
                A, B = P[a].detach(), P[bb].detach()
                if needs[a]:
                    _acc(grads, a, s * ((dy @ B).t() @ x_MI))
                if needs[bb]:
                    _acc(grads, bb, s * (dy.t() @ (x_MI @ A.t())))
            at += width
        return torch.mm(dy_MF, self.weight(P), out=dx) if dx is not None else None


@dataclass(frozen=True)
class Layer:
    ln1: int
    qkv: Linears
    o: Linears
    ln2: int
    gu: Linears
    down: Linears


class Plan:
    """Where a Llama/Qwen2 model's parameters sit in the flat list ``params`` that the replay differentiates."""

    def __init__(self, hf):
        self.params: list[torch.Tensor] = []
        emb = hf.model.embed_tokens
        self.embed, self.padding_idx = _index(self.params, emb.weight), emb.padding_idx
        self.layers = []
        for layer in hf.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(Layer(
                _index(self.params, layer.input_layernorm.weight), Linears((a.q_proj, a.k_proj, a.v_proj), self.params),
                Linears((a.o_proj,), self.params), _index(self.params, layer.post_attention_layernorm.weight),
                Linears((mlp.gate_proj, mlp.up_proj), self.params), Linears((mlp.down_proj,), self.params)))
        self.norm = _index(self.params, hf.model.norm.weight)
        self.head = Linears((hf.lm_head,), self.params)


@dataclass(frozen=True)
class Packing:
    """The positions the backward works on, out of the L·R of the record (flat time-major m = l·R + r): every
    position some loss term depends on, once. A position past a row's last completion token predicts nothing and
    no later position of its row is live, so no gradient reaches it: left out. Rows with the same prompt have the
    same activations at its positions (causal attention): one copy of each prompt is kept, and the gradients
    reaching the others are added into it (the backward is linear in the incoming gradient). Attention still runs
    over each row's own positions.

    ``idx_P``: the flat positions kept (P of them); ``src_M``: for each flat position, the kept row whose values it
    has (its own, or its prompt's representative), or P where no gradient reaches it; ``own_M``: its own kept row,
    or P (a zero row) where it is not kept; ``rec_idx_P``: the kept positions in the record, whose rows may be more
    than the replayed ones (l·B + the row's index there)."""

    idx_P: torch.Tensor
    src_M: torch.Tensor
    own_M: torch.Tensor
    rec_idx_P: torch.Tensor

    @property
    def size(self) -> int:
        return self.idx_P.numel()


def packing(real_RL: torch.Tensor, width: int, completion_len_R: torch.Tensor, prompt_key_R: list,
            rows_R: torch.Tensor, record_rows: int) -> Packing:
    """``real_RL``: not left padding (prompt positions; later positions are generated); ``width`` W the prompt width;
    ``completion_len_R`` n_r the sampled tokens up to and including EOS: positions W … W + n_r − 2 feed completion
    tokens that predict later ones; ``prompt_key_R``: equal for rows with the same prompt; ``rows_R``: the replayed
    rows' indices among the record's ``record_rows``."""
    R, L = real_RL.shape
    l_L1 = torch.arange(L)[:, None]
    live_LR = torch.where(l_L1 < width, real_RL.t(), l_L1 <= width + completion_len_R[None] - 2)
    first: dict = {}
    rep_R = torch.tensor([first.setdefault(key, r) for r, key in enumerate(prompt_key_R)])
    shared_LR = (l_L1 < width) & (rep_R != torch.arange(R))[None]  # a prompt position a representative row holds
    own_LR = live_LR & ~shared_LR
    idx_P = own_LR.flatten().nonzero().squeeze(1)
    own_M = torch.full((L * R,), idx_P.numel(), dtype=torch.long)
    own_M[idx_P] = torch.arange(idx_P.numel())
    src_LR = own_M.view(L, R).clone()
    src_LR[:width] = torch.where(shared_LR[:width], own_M.view(L, R)[:width, rep_R], src_LR[:width])
    src_LR[~live_LR] = idx_P.numel()
    rec_idx_P = idx_P // R * record_rows + rows_R[idx_P % R]
    return Packing(idx_P, src_LR.flatten(), own_M, rec_idx_P)


@dataclass(frozen=True)
class Inputs:
    """What one replay reads, for R rows over L positions (time-major): the tokens fed ``ids_LR``, the rotary tables
    at their positions ``cos_M1D``/``sin_M1D`` (M = L·R; sin signed as the engine's), the additive attention mask
    ``mask_R1LL``, the decode's record (``engine.record_widths``): per layer ``records`` [L, B, F] of all B rows of
    the decode, of which the replayed ones are ``rows_R``, and ``final`` [L, R, F] of the replayed rows alone,
    the prompt width W, the targets of the completion-predicting positions W − 1 … L − 1 (``targets_SR``), the
    model's shape, and which positions the backward works on (``packing``)."""

    ids_LR: torch.Tensor
    cos_M1D: torch.Tensor
    sin_M1D: torch.Tensor
    mask_R1LL: torch.Tensor
    records: list[dict[str, torch.Tensor]]
    rows_R: torch.Tensor
    all_rows: bool  # rows_R is every row of the record, in order
    final: dict[str, torch.Tensor]
    width: int
    targets_SR: torch.Tensor
    temperature: float
    entropy: bool
    eps: float
    n_heads: int
    n_kv: int
    head_dim: int
    scratch: Scratch
    packing: Packing
    threads: int  # torch's intra-op threads for the backward (threads.py): the decode's


def _rows(t_LRF: torch.Tensor) -> torch.Tensor:
    return t_LRF.reshape(-1, t_LRF.shape[-1])


def forward(inp: Inputs, plan: Plan, P):
    """(logp_SR, H_SR or zeros, what the head's backward needs): the LM head on the recorded final norm."""
    R, W = inp.ids_LR.shape[1], inp.width
    xhat, r = _rows(inp.final["xf"][W - 1 :]), _rows(inp.final["rf"][W - 1 :])
    h = xhat * P[plan.norm].detach()
    b = plan.head.bias(P)
    logits = h @ plan.head.weight(P).t() if b is None else torch.addmm(b, h, plan.head.weight(P).t())
    if inp.temperature != 1.0:
        logits.div_(inp.temperature)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, inp.targets_SR.reshape(-1, 1)).view(-1, R)
    H = -(logp_all.exp() * logp_all).sum(-1).view(-1, R) if inp.entropy else torch.zeros_like(logp)
    # H detached: the autograd node keeps what the backward needs, and an output of the node kept there would make a
    # reference cycle (output → node → output), which holds the whole record until the garbage collector runs
    return logp, H, (xhat, r, h, logp_all, H.detach())


def _rms_backward(dh_MD, xhat_MD, r_M1, w, need_w: bool, dx_MD: torch.Tensor | None, ws: Scratch):
    """Gradients of h = w·(x·r), r = (mean(x²) + ε)^−½: returns dw (or None); adds dx = r·(ĝ − x̂·mean(ĝ·x̂)),
    ĝ = w·dh, into ``dx_MD`` (if given). May overwrite ``dh_MD``. One pass of a fused kernel where there is one."""
    lib = kernels.get()
    if lib is not None:
        dw = torch.zeros(w.shape) if need_w else None
        kernels.rms_backward(lib, dh_MD, xhat_MD, r_M1, w, dx_MD, dw)
        return dw
    dw = torch.mul(dh_MD, xhat_MD, out=ws.get("rms", *dh_MD.shape)).sum(0) if need_w else None
    if dx_MD is not None:
        g = dh_MD.mul_(w)
        c = torch.mul(g, xhat_MD, out=ws.get("rms", *dh_MD.shape)).mean(-1, keepdim=True)
        dx_MD.addcmul_(g.addcmul_(xhat_MD, c, value=-1.0), r_M1)
    return dw


def _packed(t_LRF: torch.Tensor, inp: Inputs, key: str) -> torch.Tensor:
    """The kept positions' rows [P, F] of a record [L, R, F], in a scratch buffer."""
    rows = _rows(t_LRF)
    return torch.index_select(rows, 0, inp.packing.rec_idx_P, out=inp.scratch.get(key, inp.packing.size,
                                                                                   rows.shape[1]))


def _head_backward(inp: Inputs, plan: Plan, P, needs, grads: list, head, dlogp_SR, dH_SR) -> torch.Tensor:
    """The gradient reaching the final residual stream at the kept positions, [P + 1, D] (the last row collects
    what reaches positions no loss depends on, and is never read)."""
    R, pk = inp.ids_LR.shape[1], inp.packing
    xhat, r, h, logp_all, H = head
    # log-softmax and entropy at temperature T: dz = dlogp·(onehot(y) − p) − dH·p·(log p + H), dlogits = dz/T
    p = logp_all.exp()
    dlogp = dlogp_SR.reshape(-1, 1) if dlogp_SR is not None else torch.zeros_like(p[:, :1])
    dz = p * -dlogp
    dz.scatter_add_(1, inp.targets_SR.reshape(-1, 1), dlogp)
    if dH_SR is not None:
        dz.sub_(p.mul_(logp_all.add(H.reshape(-1, 1))).mul_(dH_SR.reshape(-1, 1)))
    if inp.temperature != 1.0:
        dz.div_(inp.temperature)
    dh = plan.head.backward(dz, h, P, needs, grads, dx=torch.empty(h.shape))
    dx_tail = torch.zeros(h.shape)
    dw = _rms_backward(dh, xhat, r, P[plan.norm].detach(), needs[plan.norm], dx_tail, inp.scratch)
    if dw is not None:
        _acc(grads, plan.norm, dw)
    return torch.zeros(pk.size + 1, h.shape[1]).index_add_(0, pk.src_M[(inp.width - 1) * R :], dx_tail)


def _mlp_backward(lay: Layer, rec, dx, P, needs, grads: list, inp: Inputs) -> None:
    """down, SwiGLU, gate|up and the second RMSNorm at the kept positions; turns ``dx`` [P, D] (the layer output's
    gradient) into x′'s."""
    ws, (M, D), lib = inp.scratch, dx.shape, kernels.get()
    I = rec["gu"].shape[-1] // 2
    dgu = ws.get("dgu", M, 2 * I)
    if lib is not None:  # one pass each way, reading the record's gate|up through the packing (kernels.c)
        gu, idx = _rows(rec["gu"]), inp.packing.rec_idx_P
        a = kernels.swiglu(lib, gu, ws.get("a", M, I), idx)
        da = lay.down.backward(dx, a, P, needs, grads, dx=ws.get("da", M, I))
        kernels.swiglu_backward(lib, da, gu, dgu, idx)
    else:
        g, u = _packed(rec["gu"], inp, "rec_gu").chunk(2, dim=-1)  # the recorded gate|up
        silu = torch.ops.aten.silu.out(g, out=ws.get("silu", M, I))
        a = torch.mul(silu, u, out=ws.get("a", M, I))  # the down projection's input
        da = lay.down.backward(dx, a, P, needs, grads, dx=ws.get("da", M, I))
        dg, du = dgu.chunk(2, dim=-1)
        torch.mul(da, silu, out=du)
        torch.ops.aten.silu_backward.grad_input(torch.mul(da, u, out=a), g, grad_input=dg)  # silu'(g)·da·u
    w, xhat = P[lay.ln2].detach(), _packed(rec["x2"], inp, "rec_x2")
    dh = lay.gu.backward(dgu, torch.mul(xhat, w, out=ws.get("h", M, D)), P, needs, grads, dx=ws.get("dh", M, D))
    dw = _rms_backward(dh, xhat, _packed(rec["r2"], inp, "rec_r2"), w, needs[lay.ln2], dx, ws)
    if dw is not None:
        _acc(grads, lay.ln2, dw)


def _rotate_back(dy, cos, sin, out) -> None:
    """The transpose of the engine's rotation y = x·cos + roll(x, d/2)·sin (sin signed, ``engine._signed_sin``):
    out = dy·cos + roll(dy·sin, d/2), by halves, so no rolled copy is made. ``out`` may be any layout."""
    h = dy.shape[-1] // 2
    torch.mul(dy[..., :h], cos[..., :h], out=out[..., :h]).addcmul_(dy[..., h:], sin[..., h:])
    torch.mul(dy[..., h:], cos[..., h:], out=out[..., h:]).addcmul_(dy[..., :h], sin[..., :h])


def _attention_probs(q, k, mask_R1LL, ws: Scratch) -> torch.Tensor:
    """p = softmax(q·kᵀ/√d + mask) [R·K, G·L, L] of causal grouped-query attention, in the layout batched products
    want: q [R, K, G, L, d] (query head h = k·G + g uses key/value head k), k [R, K, L, d]. Batched products, not
    torch's fused CPU kernel: 6.2 against 11.2 ms per layer for SDPA and its backward on the benchmark model's
    shapes (R = 64, L = 70), and no layout copies around it."""
    R, K, G, L, d = q.shape
    s = torch.bmm(q.view(R * K, G * L, d), k.view(R * K, L, d).transpose(1, 2), out=ws.get("s", R * K, G * L, L))
    s.mul_(d**-0.5).view(R, K, G, L, L).add_(mask_R1LL.view(R, 1, 1, L, L))
    return torch.ops.aten._softmax.out(s, -1, False, out=ws.get("p", R * K, G * L, L))


def _attention_backward(q, k, v, p, rowsum, do, ws: Scratch):
    """(dq, dk, dv) of o = p·v given do (o's layout [R, K, G, L, d]) and rowsum(do·o) [R·K, G·L, 1]:
    dv = pᵀ·do, ds = p·(do·vᵀ − rowsum(do·o)) (the softmax's backward), dq = ds·k/√d, dk = dsᵀ·q/√d."""
    R, K, G, L, d = q.shape
    do = do.view(R * K, G * L, d)
    ds = torch.bmm(do, v.view(R * K, L, d).transpose(1, 2), out=ws.get("ds", R * K, G * L, L))
    ds.sub_(rowsum).mul_(p)
    dq = torch.bmm(ds, k.view(R * K, L, d), out=ws.get("dq", R * K, G * L, d)).mul_(d**-0.5)
    dk = torch.bmm(ds.transpose(1, 2), q.view(R * K, G * L, d), out=ws.get("dk", R * K, L, d)).mul_(d**-0.5)
    dv = torch.bmm(p.transpose(1, 2), do, out=ws.get("dv", R * K, L, d))
    return dq.view(R, K, G, L, d), dk.view(R, K, L, d), dv.view(R, K, L, d)


def _time_major(t: torch.Tensor) -> torch.Tensor:
    """The [L, R, heads, d] view of an attention-layout tensor, [R, K, G, L, d] (heads K·G) or [R, K, L, d]."""
    if t.dim() == 4:
        return t.permute(2, 0, 1, 3)
    R, K, G, L, d = t.shape
    return t.permute(3, 0, 1, 2, 4).view(L, R, K * G, d)


def _attention_block_backward(lay: Layer, rec, dx, P, needs, grads: list, inp: Inputs, *, need_dx: bool) -> None:
    """o, attention (its probabilities recomputed from the recorded q′|k′, over each row's positions), rotary,
    q|k|v and the first RMSNorm at the kept positions; turns ``dx`` [P, D] (x′'s gradient) into the layer input's."""
    ws, pk, (L, R), (M, D) = inp.scratch, inp.packing, inp.ids_LR.shape, dx.shape
    H, K, d = inp.n_heads, inp.n_kv, inp.head_dim
    G = H // K
    q, k, v = ws.get("q", R, K, G, L, d), ws.get("k", R, K, L, d), ws.get("v", R, K, L, d)
    qkv = rec["qkv"] if inp.all_rows else rec["qkv"].index_select(1, inp.rows_R)
    for buf, part in zip((q, k, v), qkv.split([H * d, K * d, K * d], dim=-1)):
        _time_major(buf).copy_(part.view(L, R, -1, d))  # into the batched products' layout
    p = _attention_probs(q, k, inp.mask_R1LL, ws)
    att = _packed(rec["att"], inp, "rec_att")  # the attention's output, the o projection's input
    do_rows = ws.get("do_rows", M + 1, H * d)  # the last row is 0: the gradient at positions not kept
    do_rows[M].zero_()
    lay.o.backward(dx, att, P, needs, grads, dx=do_rows[:M])
    do = ws.get("do", R, K, G, L, d)
    spread = torch.index_select(do_rows, 0, pk.own_M, out=ws.get("spread", L * R, H * d))
    _time_major(do).copy_(spread.view(L, R, H, d))
    rowsum = torch.mul(do_rows[:M], att, out=ws.get("do_o", M, H * d)).view(M, H, d).sum(-1)  # rowsum(do·o)
    rowsum = torch.cat([rowsum, rowsum.new_zeros(1, H)]).index_select(0, pk.own_M)  # [L·R, H]
    rowsum = rowsum.view(L, R, H).permute(1, 2, 0).reshape(R * K, G * L, 1)
    dq, dk, dv = _attention_backward(q, k, v, p, rowsum, do, ws)
    lib = kernels.get()
    if lib is not None:  # the rotation's transpose and the packing in one pass (kernels.c)
        dqkv = kernels.rope_back_pack(lib, dq, dk, dv, inp.cos_M1D.view(L * R, d), inp.sin_M1D.view(L * R, d),
                                      pk.own_M, pk.src_M, ws.get("dqkv", M, (H + 2 * K) * d))
    else:
        dq, dk, dv = _time_major(dq), _time_major(dk), _time_major(dv)
        cos, sin = inp.cos_M1D.view(L, R, 1, d), inp.sin_M1D.view(L, R, 1, d)
        dqkv_all = ws.get("dqkv_all", L, R, (H + 2 * K) * d)
        dq_t, dk_t, dv_t = dqkv_all.split([H * d, K * d, K * d], dim=-1)
        _rotate_back(dq, cos, sin, dq_t.view(L, R, H, d))
        _rotate_back(dk, cos, sin, dk_t.view(L, R, K, d))
        dv_t.view(L, R, K, d).copy_(dv)
        dqkv = ws.get("dqkv", M + 1, dqkv_all.shape[-1]).zero_().index_add_(0, pk.src_M, _rows(dqkv_all))[:M]
    w, xhat = P[lay.ln1].detach(), _packed(rec["x1"], inp, "rec_x1")
    dh = lay.qkv.backward(dqkv, torch.mul(xhat, w, out=ws.get("h", M, D)), P, needs, grads,
                          dx=ws.get("dh", M, D) if need_dx or needs[lay.ln1] else None)
    if dh is not None:
        dw = _rms_backward(dh, xhat, _packed(rec["r1"], inp, "rec_r1"), w, needs[lay.ln1], dx if need_dx else None, ws)
        if dw is not None:
            _acc(grads, lay.ln1, dw)


def backward(inp: Inputs, plan: Plan, P, needs, head, dlogp_SR, dH_SR) -> list:
    """The gradient of every parameter in ``P`` (None where ``needs`` says it is not wanted), given the gradients
    of the log-probs and (or None) of the entropies."""
    grads = [None] * len(P)
    dx = _head_backward(inp, plan, P, needs, grads, head, dlogp_SR, dH_SR)[:-1]  # [P, D]: the kept positions
    for i in reversed(range(len(plan.layers))):
        _mlp_backward(plan.layers[i], inp.records[i], dx, P, needs, grads, inp)
        _attention_block_backward(plan.layers[i], inp.records[i], dx, P, needs, grads, inp,
                                  need_dx=i > 0 or needs[plan.embed])
    if needs[plan.embed]:  # as nn.Embedding: the padding row gets no gradient from lookups
        ids = inp.ids_LR.reshape(-1).index_select(0, inp.packing.idx_P)
        dE = torch.zeros_like(P[plan.embed]).index_add_(0, ids, dx)
        if plan.padding_idx is not None:
            dE[plan.padding_idx] = 0
        _acc(grads, plan.embed, dE)
    return grads


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp: Inputs, plan: Plan, *params):
        logp, H, head = forward(inp, plan, params)
        ctx.inp, ctx.plan, ctx.head = inp, plan, head
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*params)
        if not inp.entropy:
            ctx.mark_non_differentiable(H)
        return logp, H

    @staticmethod
    def backward(ctx, dlogp, dH):
        with use(ctx.inp.threads):
            grads = backward(ctx.inp, ctx.plan, ctx.saved_tensors, ctx.needs_input_grad[2:], ctx.head, dlogp,
                             dH if ctx.inp.entropy else None)
        return (None, None, *grads)


def replay(inp: Inputs, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp_SR, H_SR) at the completion-predicting positions; differentiable in the plan's parameters when grad
    mode is on and any of them trains (H_SR only with ``inp.entropy``, else zeros)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in plan.params):
        return _Replay.apply(inp, plan, *plan.params)
    with torch.no_grad():
        logp, H, _ = forward(inp, plan, plan.params)
    return logp, H
