"""Token log-probabilities and entropies from logits, at a sampling temperature.

Both work in the dtype of the logits; pass float32 logits if the model runs in bf16 and the
log-probs must match a sampler's to better than bf16 precision.
"""

from __future__ import annotations

import torch


def _scaled(logits_NTV: torch.Tensor, temperature: float) -> torch.Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    return logits_NTV if temperature == 1.0 else logits_NTV / temperature


def token_logprobs(logits_NTV: torch.Tensor, targets_NT: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """logp_t = log softmax(z_t / τ)[y_t] = z_t[y_t]/τ − logsumexp(z_t / τ).

    Gathers one logit per position and subtracts the logsumexp, so no [N, T, V] log-softmax copy is
    kept (only the scaled logits when τ ≠ 1).
    """
    z_NTV = _scaled(logits_NTV, temperature)
    picked_NT = torch.gather(z_NTV, dim=-1, index=targets_NT.long().unsqueeze(-1)).squeeze(-1)
    return picked_NT - torch.logsumexp(z_NTV, dim=-1)


def entropy_from_logits(logits_NTV: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """H_t = −Σ_v p_v log p_v with p = softmax(z_t / τ).

    Computed from log_softmax (max-shifted, so large logits are safe); log p is clamped at the dtype's
    most negative finite value so that vocabulary entries masked to −inf give 0·finite = 0, not NaN,
    in the value and in the gradient.
    """
    logp_NTV = torch.log_softmax(_scaled(logits_NTV, temperature), dim=-1)
    finite_logp_NTV = logp_NTV.clamp(min=torch.finfo(logp_NTV.dtype).min)
    return -(logp_NTV.exp() * finite_logp_NTV).sum(dim=-1)

