"""The update's forward, taken from the decode (``forward.ReplayForward`` uses it): ``DecodeTrace`` holds what the
fused decoder computed while it sampled (``engine.record_widths``: per layer the norms' normalized inputs,
q′|k′|v, the attention output and gate|up, time-major), and ``RolloutTrace.completion_logprobs`` gives the policy's differentiable log-probs of the
sampled rows from it without running the model's forward again (``replay.py``).

Why: with μ = 1 (one optimizer step per batch) the update differentiates the very function the sampler just
evaluated, at the very same weights. A Hugging Face forward over the batch repeats the decode's matrix
multiplies (2·P FLOPs per token of the 6·P a training token costs) and everything between them; here the
forward is the LM head on the recorded final norm, and the backward (written out in ``replay.py``) reads the
record for every activation it needs. The log-probs equal a teacher-forced forward's to float rounding (about
1e-6; ``tests/test_trace.py`` compares log-probs and every parameter's gradient with the Hugging Face forward's,
full fine-tuning and LoRA).

Where it does not apply the update runs the model's forward: another backend (bf16, GPU, an architecture
``FastEngine`` does not run), dropout active, μ > 1 after the first iteration (the optimizer step released the
record), or a trace larger than ``MAX_TRACE_BYTES``. A trace refuses to replay once any trainable parameter has
changed since the decode (a fingerprint of their values), instead of giving a gradient at stale weights.
"""

from __future__ import annotations

import torch

from ..types import Role, Rollouts
from .engine import causal_mask, record_widths
from .replay import Inputs, Plan, Scratch, packing, replay

MAX_TRACE_BYTES = 4 << 30  # a decode whose recorded outputs would exceed this is not recorded


def trace_bytes(model, rows: int, positions: int) -> int:
    """Bytes ``FastEngine(record=True)`` holds for ``rows`` × ``positions`` (prompt width + new tokens)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    per_layer, final = record_widths(hf.config)
    return 4 * rows * positions * (sum(per_layer.values()) * hf.config.num_hidden_layers + sum(final.values()))


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
        return [float(torch.sum(p.detach(), dtype=torch.float64)) for p in params]  # no float64 copy


class DecodeTrace:
    """One decode chunk's record (``FastEngine(record=True)``) and what replaying it needs: the chunk's prompts,
    its sampled tokens ``new_BS``, the engine (rotary tables, layer layout) and the model whose parameters get
    the gradient."""

    def __init__(self, model, engine, prompts: list[list[int]], new_BS: torch.Tensor):
        self.model, self.engine, self.prompts, self.new_BS = model, engine, prompts, new_BS
        self.record, self.length = engine.record, engine.length
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.plan = Plan(hf)  # the parameters as the decode computed with them (adapters active then)

    def logprobs(self, rows: torch.Tensor, completion_len_R: torch.Tensor, *, temperature: float,
                 entropy: str = "none", scratch: Scratch, threads: int):
        """(logp_RS, H_RS) of the chunk's ``rows``' sampled tokens ``new_BS[rows]``, differentiable in the
        model's trainable parameters (``entropy`` as in ``forward.ModelForward.logprobs``); positions past a row's EOS
        (``completion_len_R``: its sampled tokens up to and including EOS) carry finite values that a loss must
        mask, and no gradient (``replay.Packing``). At the decode's weights only: ``RolloutTrace`` checks."""
        e, rec = self.engine, self.record
        L, W, B = self.length, rec["real_BW"].shape[1], rec["ids"].shape[1]
        every = rows.numel() == B and bool((rows == torch.arange(rows.numel())).all())
        pick = (lambda t: t[:L]) if every else (lambda t: t[:L].index_select(1, rows))  # small records only
        ids_LR, pos_LR = pick(rec["ids"]), pick(rec["pos"])
        d = e.head_dim
        real = torch.ones(rows.numel(), L, dtype=torch.bool, device=ids_LR.device)  # generated tokens are real
        real[:, :W] = rec["real_BW"][rows.to(rec["real_BW"].device)].to(real.device)
        pk = packing(real, W, completion_len_R, [tuple(self.prompts[r]) for r in rows.tolist()], rows, B)
        inp = Inputs(ids_LR=ids_LR, cos_M1D=e.cos[pos_LR].view(-1, 1, d), sin_M1D=e.sin[pos_LR].view(-1, 1, d),
                     mask_R1LL=causal_mask(real),
                     records=[{k: v[:L] for k, v in layer.items()} for layer in rec["layers"]],
                     rows_R=rows, all_rows=every, final={k: pick(v) for k, v in rec["final"].items()},
                     width=W, targets_SR=self.new_BS[rows, : L - W + 1].t().to(ids_LR.device),
                     temperature=temperature, entropy=entropy != "none", eps=e.eps, n_heads=e.n_heads,
                     n_kv=e.n_kv, head_dim=d, scratch=scratch, packing=pk, threads=threads)
        logp_SR, H_SR = replay(inp, self.plan)
        return logp_SR.t(), (H_SR if entropy == "grad" else H_SR.detach()).t()


class RolloutTrace:
    """The traces of one sampling call's chunks (``FusedSampler.sample`` with ``record``), for the ``rollouts`` that
    call returned: row n of them is row ``n % chunk_rows`` of chunk ``n // chunk_rows``. Built right after the decode
    (which changes no weight), it stamps the trainable parameters' fingerprint, and refuses to replay once they
    moved."""

    def __init__(self, chunks: list[DecodeTrace], chunk_rows: int, rollouts: Rollouts, *, threads: int = 0):
        self.chunks, self.chunk_rows, self.rollouts = chunks, chunk_rows, rollouts
        self.threads = threads or torch.get_num_threads()  # what the decode ran on; the replay runs on as many
        self.params = [p for p in chunks[0].model.parameters() if p.requires_grad]
        self.stamp = _fingerprint(self.params)

    def completion_logprobs(self, batch: Rollouts, rows_N: torch.Tensor, *, temperature: float = 1.0,
                            entropy: str = "none", scratch: Scratch | None = None):
        """What ``forward.ModelForward.logprobs`` returns, (logp_NT, H_NT, mask_NT) aligned to targets
        ``batch.input_ids_NL[:, 1:]``, for ``batch`` made of the sampled rows ``rows_N`` (in order). ``scratch``: the
        backward's temporaries, reused from one replay to the next by their owner (fresh ones by default)."""
        scratch = scratch if scratch is not None else Scratch()
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
            logp_RS, H_RS = self.chunks[c].logprobs(local_N[sel], comp_N[sel], temperature=temperature,
                                                    entropy=entropy, scratch=scratch, threads=self.threads)
            j_S = torch.arange(logp_RS.shape[1])
            # completion token j of a row sits at target index prompt_len - 1 + j; j past its EOS goes to column T
            index_RS = torch.where(j_S < comp_N[sel, None], prompt_N[sel, None] - 1 + j_S, T).to(logp_RS.device)
            parts.append([torch.zeros(len(sel), T + 1, dtype=t.dtype, device=t.device).scatter(1, index_RS, t)[:, :T]
                          for t in (logp_RS, H_RS)])
            order.append(sel)
        inverse = torch.cat(order).argsort()
        logp_NT, H_NT = (torch.cat([p[i] for p in parts])[inverse.to(parts[0][i].device)] for i in (0, 1))
        return logp_NT, H_NT, mask_NT.to(logp_NT.device)
