"""Sampler/trainer mismatch corrections: per-token weights on the policy objective (SCALE.md; METHODS §2).

An engine that samples for the trainer (vLLM, a bf16 decoder, a compiled step) draws from π_sampler, which is
never exactly the π_old the trainer recomputes: kernels, precision and (worst) stale weights differ. The PPO
surrogate assumes the rows came from π_old, so its gradient is biased by the gap. Importance sampling on the
ratio ρ_t = π_old(y_t) / π_sampler(y_t) removes the bias; these corrections bound its variance:

    none:  w_t = 1
    tis:   w_t = min(ρ_t, C)                         truncated IS (Yao et al., "Your efficient RL framework
                                                     secretly brings you off-policy RL training", 2025; as in verl)
    mis:   w_t = ρ_t · 1[1/C ≤ ρ_t ≤ C]              masked IS (Liu, Li et al., "When speed kills stability", 2025):
                                                     a token far off the trainer's distribution is dropped, not kept
                                                     at weight C

and the loss's objective term becomes w_t · ℓ_obj,t (``loss.grpo_loss``); the KL and entropy terms are not
weighted. w is a constant (no gradient flows through it): it reweights samples, it is not a learned term.

Departure from verl: a token ``mis`` drops keeps its place in the step's denominator. forkrl fixes the
denominators before the micro-batch loop (METHODS §1), and which tokens leave is only known once the trainer's
log-probs are computed inside it; dividing by the unmasked count keeps every micro-batch split exact.

Every function: ``fn(old_logp_NT, sampler_logp_NT, mask_NT, *, cap) -> w_NT``, 0 off the mask, and the log-ratio
is zeroed off the mask before ``exp`` (padding's garbage cannot overflow).
"""

from __future__ import annotations

import torch

from . import lookup


def _ratio(old_logp_NT: torch.Tensor, sampler_logp_NT: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    log_rho = torch.where(mask_NT, (old_logp_NT - sampler_logp_NT.to(old_logp_NT.dtype)).detach(), 0.0)
    return torch.exp(log_rho)


def no_correction(old_logp_NT, sampler_logp_NT, mask_NT, *, cap: float) -> torch.Tensor:
    """w_t = 1 on the mask: the sampler's rows are taken as π_old's."""
    return mask_NT.to(old_logp_NT.dtype)


def tis(old_logp_NT, sampler_logp_NT, mask_NT, *, cap: float) -> torch.Tensor:
    """Truncated importance sampling: w_t = min(ρ_t, C). Worked case (tests/test_algos_correction.py): ρ = [0.5, 3]
    with C = 2 gives w = [0.5, 2]."""
    return torch.where(mask_NT, _ratio(old_logp_NT, sampler_logp_NT, mask_NT).clamp(max=cap), 0.0)


def mis(old_logp_NT, sampler_logp_NT, mask_NT, *, cap: float) -> torch.Tensor:
    """Masked importance sampling: w_t = ρ_t inside [1/C, C], 0 outside. Worked case: ρ = [0.25, 0.5, 3] with C = 2
    gives w = [0, 0.5, 0]."""
    rho = _ratio(old_logp_NT, sampler_logp_NT, mask_NT)
    keep = mask_NT & (rho >= 1.0 / cap) & (rho <= cap)
    return torch.where(keep, rho, 0.0)


def get_correction(name: str):
    return lookup(CORRECTIONS, name, "sampler correction")


CORRECTIONS = {
    "none": no_correction,
    "tis": tis,
    "mis": mis,
}
