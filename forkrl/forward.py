"""The policy-forward seam: ``(logp_NT, H_NT, mask_NT)`` of a batch under the policy, for every loss.

``PolicyForward.logprobs(batch, rows_N, *, temperature, entropy)`` gives, for the rows ``rows_N`` of ``batch``
(all rows when None) as ``batch.select(rows_N)`` lays them out, the per-token log π(y_t | y_<t) at
``temperature``, aligned to targets ``input_ids[:, 1:]`` (T = L − 1), the entropy H_t of the same tempered
distribution, and the COMPLETION mask. ``entropy``: "none" (H is zeros), "metric" (detached) or "grad"
(differentiable, for an entropy bonus). Positions before the batch's first completion target are 0.

Two implementations: ``ModelForward``, the model's own forward (any model, any device, with the logits too); and
the replay of the fused CPU decoder's record (``forkrl.cpu.ReplayForward``: the same values and gradients to
float rounding, without running the forward again). ``make_forward`` is the only place that chooses: a sampler's
backend may offer its own (the fused CPU backend does, where ``sampling.make_sampler(..., record=True)`` asked it to
keep its record and ``sampling.replay`` is on), else the model's forward.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .algos.logprobs import entropy_from_logits, token_logprobs
from .types import Role, Rollouts


@runtime_checkable
class PolicyForward(Protocol):
    model: torch.nn.Module  # whose parameters get the gradient
    replayed: int  # calls answered without the model's forward (a replay), for the step's metrics

    def logprobs(self, batch: Rollouts, rows_N: torch.Tensor | None = None, *, temperature: float = 1.0,
                 entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _rows(batch: Rollouts, rows_N: torch.Tensor | None) -> Rollouts:
    return batch if rows_N is None else batch.select(rows_N)


class ModelForward:
    """The model's own forward. ``logits`` also gives the logits themselves (the fork stage's exact KL)."""

    replayed = 0

    def __init__(self, model):
        self.model = model

    def logits(self, batch: Rollouts, rows_N: torch.Tensor | None = None):
        """(logits_NSV, targets_NS, start): the logits that predict ``input_ids[:, start+1:]``, from the first
        completion target of the batch on (``logits_to_keep``: prompts cost no LM-head work).

        Position ``start + j`` of a row predicts its token ``start + j + 1``; slice any [N, L-1] tensor aligned to
        targets ``input_ids[:, 1:]`` with ``[:, start:]`` to match."""
        batch = _rows(batch, rows_N)
        mask_NT = batch.role_NL[:, 1:] == Role.COMPLETION
        start = int(mask_NT.any(0).nonzero()[0]) if mask_NT.any() else 0
        device = next(self.model.parameters()).device
        ids = batch.input_ids_NL.to(device)
        out = self.model(input_ids=ids, attention_mask=batch.attention_mask_NL.to(device),
                         logits_to_keep=ids.shape[1] - start)
        return out.logits[:, :-1], ids[:, start + 1 :], start

    def logprobs(self, batch: Rollouts, rows_N: torch.Tensor | None = None, *, temperature: float = 1.0,
                 entropy: str = "none"):
        batch = _rows(batch, rows_N)
        mask_NT = batch.role_NL[:, 1:] == Role.COMPLETION
        logits_NSV, targets_NS, start = self.logits(batch)
        logp = token_logprobs(logits_NSV, targets_NS, temperature=temperature)
        pad = torch.zeros(logp.shape[0], start, dtype=logp.dtype, device=logp.device)
        logp_NT = torch.cat([pad, logp], dim=1)
        if entropy == "none":
            H_NT = torch.zeros_like(logp_NT)
        else:
            src = logits_NSV if entropy == "grad" else logits_NSV.detach()
            H_NT = torch.cat([pad, entropy_from_logits(src, temperature=temperature)], dim=1)
        return logp_NT, H_NT, mask_NT.to(logp.device)


def make_forward(model, sampler=None) -> PolicyForward:
    """The policy forward for an update that trains on ``sampler``'s rollouts: the sampler's own where its backend
    offers one (``sampler.policy_forward(model)``: the fused CPU backend's replay of its decode, when it records),
    else the model's forward."""
    own = getattr(sampler, "policy_forward", None)
    forward = own(model) if own is not None else None
    return forward if forward is not None else ModelForward(model)
