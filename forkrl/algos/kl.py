"""Per-token KL estimators to a reference policy, from log-probs of the sampled tokens.

Both have the signature ``fn(logp_NT, ref_logp_NT) -> kl_NT``, unmasked: the caller masks. For y ~ π,
both are unbiased estimates of KL(π ‖ π_ref); k3 has lower variance and is never negative
(Schulman, "Approximating KL divergence", 2020).
"""

from __future__ import annotations

import torch

from . import lookup


def k1(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor) -> torch.Tensor:
    """k1 = log π(y) − log π_ref(y)."""
    return logp_NT - ref_logp_NT


def k3(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor) -> torch.Tensor:
    """k3 = π_ref/π − log(π_ref/π) − 1 = exp(d) − d − 1 with d = ref_logp − logp; ≥ 0.

    Computed as expm1(d) − d, which keeps precision when d is small (the usual case near π_ref).
    """
    d_NT = ref_logp_NT - logp_NT
    return torch.expm1(d_NT) - d_NT


KL_ESTIMATORS = {
    "k1": k1,
    "k3": k3,
}


def get_kl(name: str):
    """The KL estimator registered as ``name``; ValueError listing the valid names otherwise."""
    return lookup(KL_ESTIMATORS, name, "KL estimator")
