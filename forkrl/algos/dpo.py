"""The DPO loss (Rafailov et al., arXiv 2305.18290), offline on preference pairs or online with a judge picking
the preferred of two fresh samples (OAIF, Guo et al., arXiv 2402.04792).

For a pair (x, y_w, y_l), with sequence log-probs summed over the completion's tokens,

    z = β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]
    ℓ = −log σ(z)

and the step's loss is Σ ℓ over the step's pairs divided by their number, every rank's counted (the fixed
denominator of METHODS §1, so the gradient does not depend on how the step is split).

Hand case (the test's): β = 0.5, policy log-probs (−2, −3), reference (−2.5, −2.5): z = 0.5 · (0.5 − (−0.5)) = 0.5,
ℓ = log(1 + e^(−0.5)) = 0.474077; ∂ℓ/∂log π(y_w) = −β σ(−z) = −0.5 · 0.377541 = −0.188771, and +0.188771 for y_l.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_margin(logp_w_P: torch.Tensor, logp_l_P: torch.Tensor, ref_w_P: torch.Tensor, ref_l_P: torch.Tensor, *,
               beta: float) -> torch.Tensor:
    """z per pair: β times the chosen's log-ratio to the reference minus the rejected's."""
    return beta * ((logp_w_P - ref_w_P) - (logp_l_P - ref_l_P))


def dpo_loss(logp_w_P: torch.Tensor, logp_l_P: torch.Tensor, ref_w_P: torch.Tensor, ref_l_P: torch.Tensor, *,
             beta: float, total_pairs: int) -> torch.Tensor:
    """Σ −log σ(z) over these pairs, divided by the step's number of pairs ``total_pairs``; the reference's
    log-probs get no gradient."""
    z_P = dpo_margin(logp_w_P, logp_l_P, ref_w_P.detach(), ref_l_P.detach(), beta=beta)
    return -F.logsigmoid(z_P).sum() / max(total_pairs, 1)
