"""Fork-gated contrastive training, RL-free (ReasonMaxxer, Sparse Policy Selection, arXiv 2605.06241 §4).

From n scored base rollouts per problem: a clipped group advantage per row, a decision set D of
high-entropy positions under the frozen base π_b, and the loss

    L = Σ_{t∈D} A_i · (−log π_θ(y_t)) / |D|  +  λ · Σ_{t∉D} KL(π_b ‖ π_θ)_t / |¬D|

(METHODS §4, step 6). |D| and |¬D| are counted over the whole optimizer step, before the micro-batch
loop (the global-denominator rule of METHODS §1), so the gradient does not depend on how a step is split.

Choices the paper leaves open, made here:
* the group std in the advantage is the population std (ddof = 0) of the problem's valid rewards; an
  unscorable row gets advantage 0 and is left out of the statistics, as in forkrl's GRPO advantages;
* the KL anchor is the exact full-vocabulary KL(π_b ‖ π_θ) at each non-decision position (not a sampled
  estimator), at temperature 1, as are the entropies that define the gate;
* an all-token gate leaves no anchor tokens: the KL term is then 0 (|¬D| = 0 is treated as 1).
"""

from __future__ import annotations

import math

import torch

from . import lookup
from .filters import group_stats


def fork_advantages(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor, *,
                    clip: float = 2.5, eps: float = 1e-8) -> torch.Tensor:
    """A_i = clip((r_i − mean_g r) / max(std_g r, eps), −clip, clip), std with ddof = 0 over the group's
    valid rows (METHODS §4 step 4). Flat groups, singleton groups and invalid rows get exactly 0.

    Worked case: rewards [1, 0, 0, 0] → mean .25, population std √(.75·.25) = .4330,
    A = [1.7321, −.5774, −.5774, −.5774]; with clip 1.5 the first becomes 1.5."""
    s = group_stats(reward_N, group_N, valid_N)
    pop_std_N = s.std_N * ((s.count_N - 1) / s.count_N.clamp(min=1)).clamp(min=0).sqrt()
    adv_N = s.centered_N / pop_std_N.clamp(min=eps)
    return torch.where(s.zero_N, torch.zeros_like(adv_N), adv_N.clamp(-clip, clip))


def reweighted_advantages(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor,
                          logw_N: torch.Tensor, *, clip: float = 2.5, eps: float = 1e-8):
    """The group advantage of ``fork_advantages`` with the group's mean and population std taken under
    self-normalised importance weights w_i ∝ exp(logw_i) (w_i = π_θ(y_i) / π_b(y_i) for base rollouts y_i):
    the current policy's pass rate and spread estimated from the base's samples, with no new sampling.

    With equal weights it is exactly ``fork_advantages``. Returns (adv_N, ess_N): ess is each row's group's
    effective sample size (Σw)² / Σw², from 1 (one row carries all the weight) to the group's valid count.
    Invalid rows and groups whose valid rewards are all equal get 0, as in ``fork_advantages``."""
    s = group_stats(reward_N, group_N, valid_N)
    groups, idx_N = torch.unique(group_N, return_inverse=True)
    logw = torch.where(valid_N, logw_N.double(), -math.inf)
    top_g = torch.full((len(groups),), -math.inf, dtype=torch.float64).scatter_reduce_(0, idx_N, logw, "amax")
    w_N = torch.where(valid_N, (logw - top_g[idx_N].clamp(min=-1e30)).exp(), 0.0)

    def group_sum(x_N):
        return torch.zeros(len(groups), dtype=torch.float64).index_add_(0, idx_N, x_N)

    w_N = w_N / group_sum(w_N).clamp(min=1e-300)[idx_N]
    r_N = torch.where(valid_N, reward_N.double(), 0.0)
    mean_g = group_sum(w_N * r_N)
    var_g = group_sum(w_N * (r_N - mean_g[idx_N]).square())
    adv_N = (r_N - mean_g[idx_N]) / var_g.sqrt().clamp(min=eps)[idx_N]
    ess_N = (1.0 / group_sum(w_N.square()).clamp(min=1e-300))[idx_N]
    adv_N = torch.where(s.zero_N, 0.0, adv_N.clamp(-clip, clip)).to(reward_N.dtype if reward_N.is_floating_point()
                                                                       else torch.get_default_dtype())
    return adv_N, ess_N.float()


def full_kl(ref_logits_NTV: torch.Tensor, logits_NTV: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π)_t = Σ_v π_ref(v) · (log π_ref(v) − log π(v)), exact over the vocabulary; ≥ 0.

    Gradient flows into ``logits_NTV`` only (detach the reference's logits before calling)."""
    ref_logp_NTV = torch.log_softmax(ref_logits_NTV, dim=-1)
    logp_NTV = torch.log_softmax(logits_NTV, dim=-1)
    return (ref_logp_NTV.exp() * (ref_logp_NTV - logp_NTV)).sum(dim=-1)


def fork_loss(logp_NT: torch.Tensor, kl_NT: torch.Tensor, adv_N: torch.Tensor, gate_NT: torch.Tensor,
              mask_NT: torch.Tensor, *, kl_coef: float, total_decision: int | torch.Tensor,
              total_anchor: int | torch.Tensor, base_logp_NT: torch.Tensor | None = None,
              neg_floor: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, contrastive term, anchor term) of one micro-batch's share of a step.

    contrastive = Σ_{m ∧ gate} A_i · (−logp_t) / |D|,  anchor = Σ_{m ∧ ¬gate} kl_t / |¬D|,
    loss = contrastive + kl_coef · anchor. ``total_decision`` = |D| and ``total_anchor`` = |¬D| are the
    whole step's counts (all micro-batches, all ranks); a count of 0 is treated as 1 (the sum is 0 then).

    ``neg_floor`` (forkrl's option, not the paper's): a decision token of a row with A < 0 whose probability
    has already fallen below ``neg_floor`` × its base probability (logp − base_logp < log neg_floor) drops
    out of the contrastive sum (it still counts in |D|). For A < 0 the paper's term A·(−log π) is unbounded
    below, so with enough steps it keeps pushing the token down and the freed mass lands anywhere; the
    floor bounds it, as PPO's clip bounds a ratio, while a positive row's pull saturates by itself as π → 1.

    Worked case: two tokens of one row, A = 2, logp = [log .5, log .25], gate = [1, 0], kl = [·, .3],
    kl_coef .1, |D| = |¬D| = 1 → contrastive = 2·log 2 = 1.3863, anchor = .3, loss = 1.4163."""
    m = mask_NT.to(logp_NT.dtype)
    decision_NT = m * gate_NT.to(logp_NT.dtype)
    anchor_NT = m - decision_NT
    if neg_floor is not None:
        floored_NT = (adv_N[:, None] < 0) & (logp_NT.detach() - base_logp_NT < math.log(neg_floor))
        decision_NT = decision_NT * ~floored_NT
    dec = torch.as_tensor(total_decision, dtype=logp_NT.dtype).clamp(min=1)
    anc = torch.as_tensor(total_anchor, dtype=logp_NT.dtype).clamp(min=1)
    contrastive = (adv_N[:, None].to(logp_NT.dtype) * -logp_NT * decision_NT).sum() / dec
    anchor = (kl_NT * anchor_NT).sum() / anc
    return contrastive + kl_coef * anchor, contrastive, anchor


# ---------------------------------------------------------------- gates: which positions are decisions
def entropy_tau(H_NT: torch.Tensor, mask_NT: torch.Tensor, *, tau: float | None, quantile: float) -> float:
    """τ: ``tau`` when given (an absolute entropy in nats), else the ``quantile`` of the base entropy over
    the masked positions. A vocabulary of 320 tokens caps H at log 320 = 5.8 nats, a 150k one at 11.9, so
    an absolute τ from a large model's recipe (1.4) means something else on a tiny one: the quantile rule
    transfers across vocabularies."""
    if tau is not None:
        return float(tau)
    values = H_NT[mask_NT.bool()].double()
    return float(torch.quantile(values, quantile)) if values.numel() else float("inf")


def entropy_gate(H_NT: torch.Tensor, mask_NT: torch.Tensor, *, tau: float, seed: int = 0) -> torch.Tensor:
    """D = {t : H_t > τ} among masked positions (METHODS §4 step 5). ``seed`` is unused (shared signature)."""
    return mask_NT.bool() & (H_NT > tau)


def random_gate(H_NT: torch.Tensor, mask_NT: torch.Tensor, *, tau: float, seed: int = 0) -> torch.Tensor:
    """The ablation: as many positions as the entropy gate picks (the same token budget), drawn uniformly
    at random among the masked positions with a generator seeded by ``seed``."""
    mask = mask_NT.bool()
    budget = int(entropy_gate(H_NT, mask, tau=tau).sum())
    flat = mask.flatten().nonzero().squeeze(1)
    pick = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:budget]]
    gate = torch.zeros(mask.numel(), dtype=torch.bool)
    gate[pick] = True
    return gate.view_as(mask)


def all_gate(H_NT: torch.Tensor, mask_NT: torch.Tensor, *, tau: float, seed: int = 0) -> torch.Tensor:
    """The ablation: every masked position is a decision (advantage-weighted SFT, no anchor)."""
    return mask_NT.bool().clone()


GATES = {
    "entropy": entropy_gate,
    "random": random_gate,
    "all": all_gate,
}


def get_gate(name: str):
    """The gate registered as ``name``; ValueError listing the valid names otherwise."""
    return lookup(GATES, name, "fork gate")
