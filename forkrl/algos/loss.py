"""The GRPO-family loss of one micro-batch, as one pure function (METHODS §1–2).

    ℓ_t = w_t·ℓ_obj,t + β·kl_t − c·H_t      per token: objective, KL penalty (in the loss), entropy bonus
    L   = Σ_it w_it · ℓ_it                  w from the named reduction, with the step's fixed totals

``ℓ_obj`` is a registered objective (``objectives``: PPO's clipped surrogate or GSPO's sequence ratio), ``kl_t`` a
registered estimator of KL(π ‖ π_ref) (``kl``) from the reference's log-probs, H_t the policy's entropy at the
sampling temperature, w_t the sampler correction's weight (``correction``: 1, or an importance weight
π_old/π_sampler truncated or masked, for rows an engine sampled), and ``w_it`` the reduction's weights (``reductions``): the denominators ``total_tokens`` /
``total_seqs`` count the whole optimizer step (every micro-batch and rank), so summing this function over a step's
micro-batches gives the full batch's loss exactly.

The KL estimate is returned whenever a reference is given (it is logged under a KL-in-reward penalty too, where
``kl_coef`` is 0 in the loss); it is 0 at positions outside the mask, whose inputs are never read (as in the
objectives). Disabling the clip (the Spurious Rewards control) is ``eps_low = eps_high = inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .correction import get_correction
from .kl import get_kl
from .objectives import get_objective
from .reductions import Total, reduce_loss


@dataclass(frozen=True)
class GrpoLoss:
    loss: torch.Tensor  # scalar: this micro-batch's share of the step's loss
    kl_NT: torch.Tensor  # the KL estimate at every position (zeros without a reference), unmasked
    clip_low_NT: torch.Tensor  # bool: the objective's clip flags (see ``objectives``)
    clip_high_NT: torch.Tensor
    weight_NT: torch.Tensor  # the sampler correction's w_t (1 on the mask without one, 0 off it)


def grpo_loss(logp_NT: torch.Tensor, old_logp_NT: torch.Tensor, adv_N: torch.Tensor, mask_NT: torch.Tensor, *,
              total_tokens: Total, total_seqs: Total, objective: str = "ppo_clip", eps_low: float = 0.2,
              eps_high: float = 0.28, dual_clip: float | None = None, ref_logp_NT: torch.Tensor | None = None,
              kl_estimator: str = "k3", kl_coef: float = 0.0, entropy_NT: torch.Tensor | None = None,
              entropy_coef: float = 0.0, reduction: str = "token_mean", t_max: int | None = None,
              sampler_logp_NT: torch.Tensor | None = None, correction: str = "none",
              correction_cap: float = 2.0) -> GrpoLoss:
    """L = Σ_it w_it·(c_it·ℓ_obj,it + kl_coef·kl_it − entropy_coef·H_it) over the masked positions (module
    docstring), c_it the sampler correction's weight (``algos.correction``; needs ``sampler_logp_NT``).

    ``old_logp_NT``: the ratio's denominator (``logp_NT.detach()`` on-policy); ``ref_logp_NT``: the reference's
    log-probs, or None (no KL term, ``kl_NT`` zeros); ``entropy_NT``: needed when ``entropy_coef`` > 0 (pass it
    differentiable for the bonus to have a gradient).

    Worked case (the first test in tests/test_algos_loss.py): one row of two tokens, on-policy (r = 1), A = 2:
    ℓ_obj = [−2, −2]; k1 with log π − log π_ref = [.5, .1] and β = .1 adds [.05, .01]; H = [1, .5] with c = .2
    subtracts [.2, .1]: ℓ = [−2.15, −2.09], and under ``token_mean`` over the row's 2 tokens L = −2.12."""
    loss_NT, clip_low_NT, clip_high_NT = get_objective(objective)(
        logp_NT, old_logp_NT, adv_N.to(logp_NT.device), mask_NT, eps_low=eps_low, eps_high=eps_high,
        dual_clip=dual_clip)
    if correction == "none":
        weight_NT = mask_NT.to(logp_NT.dtype)
    else:
        weight_NT = get_correction(correction)(old_logp_NT, sampler_logp_NT, mask_NT, cap=correction_cap)
        loss_NT = loss_NT * weight_NT
    if ref_logp_NT is None:
        kl_NT = torch.zeros_like(logp_NT)
    else:  # read at masked positions only: garbage elsewhere (inf, NaN) must not reach the gradient through 0·∞
        kl_NT = get_kl(kl_estimator)(logp_NT, torch.where(mask_NT, ref_logp_NT, logp_NT.detach()))
    if kl_coef:
        loss_NT = loss_NT + kl_coef * kl_NT
    if entropy_coef > 0:
        loss_NT = loss_NT - entropy_coef * entropy_NT
    loss = reduce_loss(loss_NT, mask_NT, reduction, total_tokens=total_tokens, total_seqs=total_seqs, t_max=t_max)
    return GrpoLoss(loss, kl_NT, clip_low_NT, clip_high_NT, weight_NT)


# objectives of the form −A·f(ratio) (dual-clip's cap −c·A included), whose clip flags need A ≠ 0
ADVANTAGE_SCALED = ("ppo_clip", "gspo")


def zero_advantage_rows_vanish(*, objective: str, kl_coef: float, entropy_coef: float,
                               echo_coef: float = 0.0) -> bool:
    """Whether a row with advantage exactly 0 contributes exactly 0 to ``grpo_loss`` and to its gradient: true for
    the objectives in ``ADVANTAGE_SCALED`` unless a KL, an entropy or an ECHO term is in the loss. (The trainer then
    skips such rows' backward.)"""
    return objective in ADVANTAGE_SCALED and not kl_coef and not entropy_coef > 0 and not echo_coef


def echo_loss(logp_NT: torch.Tensor, env_NT: torch.Tensor, *, total_env_tokens: int) -> torch.Tensor:
    """ECHO's environment loss (arXiv 2604.09427; METHODS §8): the next-token cross-entropy of the observations'
    tokens, −Σ_{ENV} log π(o_t | o_<t, history), over ``total_env_tokens``, the whole step's ENV tokens (every
    micro-batch and rank; fixed before the loop, as every denominator here). The trainer adds λ times it to the
    policy loss, from the same forward. ``env_NT``: the ENV positions of the targets (aligned like ``logp_NT``).

    Worked case (tests/test_echo.py): ENV log-probs [−1, −3] in a step of 4 ENV tokens: (1 + 3) / 4 = 1."""
    return -(logp_NT * env_NT).sum() / max(total_env_tokens, 1)
