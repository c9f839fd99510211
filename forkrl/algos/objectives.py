"""Per-token policy objectives (losses to minimise), not reduced: reduction lives in ``reductions``.

Every objective has the signature
``fn(logp_NT, old_logp_NT, adv_N, mask_NT, *, eps_low, eps_high, dual_clip)``
``-> (loss_NT, clipped_low_NT, clipped_high_NT)``:
``loss_NT`` is 0 where ``mask_NT`` is False and has exactly zero gradient there (the log-ratio is
replaced by 0 with ``torch.where`` before ``exp``, so garbage at padded positions cannot overflow);
``clipped_low_NT`` marks A < 0 with r < 1 − eps_low, ``clipped_high_NT`` marks A > 0 with
r > 1 + eps_high, both only on masked positions. ``eps_low = eps_high = inf`` disables clipping
(vanilla r·A). ``dual_clip`` None disables dual-clip; a float c > 1 caps the loss of A < 0 tokens at −c·A
(a token capped there is in neither clip flag).
"""

from __future__ import annotations

import torch

from . import lookup


def _clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, *, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """−min(r·A, clip(r, 1−eps_low, 1+eps_high)·A), then min(·, −c·A) where A < 0 if dual_clip = c."""
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or a float > 1 (it caps the loss at -c*A), got {dual_clip!r}")
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, min=1.0 - eps_low, max=1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    low = (adv < 0) & (ratio < 1.0 - eps_low)
    high = (adv > 0) & (ratio > 1.0 + eps_high)
    return loss, low, high


def ppo_clip(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    adv_N: torch.Tensor,
    mask_NT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level clipped surrogate (PPO, arXiv 1707.06347; clip-higher eps_high > eps_low from DAPO,
    arXiv 2503.14476, defaults 0.2 / 0.28; dual-clip from arXiv 1912.09729):

        r_t = exp(logp_t − old_logp_t)
        ℓ_t = −min(r_t·A, clip(r_t, 1−eps_low, 1+eps_high)·A)
        ℓ_t = min(ℓ_t, −c·A)   where A < 0, if dual_clip = c.

    On-policy (old_logp = logp.detach()) r = 1 and ∇ℓ_t = −A·∇logp_t: the plain policy gradient.
    A clipped token has zero gradient, and so has a token in the dual-clip region.
    """
    adv_N1 = adv_N.to(logp_NT.dtype)[:, None]
    log_ratio_NT = torch.where(mask_NT, logp_NT - old_logp_NT, 0.0)
    loss_NT, low_NT, high_NT = _clipped_surrogate(
        torch.exp(log_ratio_NT), adv_N1, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
    )
    return torch.where(mask_NT, loss_NT, 0.0), low_NT & mask_NT, high_NT & mask_NT


def gspo(
    logp_NT: torch.Tensor,
    old_logp_NT: torch.Tensor,
    adv_N: torch.Tensor,
    mask_NT: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence-level clipped surrogate (GSPO, arXiv 2507.18071):

        s_i = exp( Σ_t m_t (logp_t − old_logp_t) / Σ_t m_t )
        ℓ_i = −min(s_i·A_i, clip(s_i, 1−eps_low, 1+eps_high)·A_i)   (dual-clip as in ``ppo_clip``)

    ℓ_i is broadcast to every masked token of row i (as are the clip flags), so each masked token carries
    the same loss value and the gradient reaches every token through the mean in s_i. With the
    ``seq_mean_token_mean`` reduction this equals the paper's objective (1/G) Σ_i ℓ_i. The paper's clip
    ranges are far narrower than PPO's (3e-4 / 4e-4): the caller chooses them. A row with no masked
    token gets s_i = 1 and loss 0.
    """
    adv_N1 = adv_N.to(logp_NT.dtype)[:, None]
    log_ratio_NT = torch.where(mask_NT, logp_NT - old_logp_NT, 0.0)
    len_N1 = mask_NT.sum(dim=1, keepdim=True).clamp(min=1).to(logp_NT.dtype)
    seq_ratio_N1 = torch.exp(log_ratio_NT.sum(dim=1, keepdim=True) / len_N1)
    loss_N1, low_N1, high_N1 = _clipped_surrogate(
        seq_ratio_N1, adv_N1, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
    )
    return torch.where(mask_NT, loss_N1, 0.0), low_N1 & mask_NT, high_N1 & mask_NT


OBJECTIVES = {
    "ppo_clip": ppo_clip,
    "gspo": gspo,
}


def get_objective(name: str):
    """The objective registered as ``name``; ValueError listing the valid names otherwise."""
    return lookup(OBJECTIVES, name, "objective")
