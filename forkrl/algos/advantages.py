"""Group-relative advantages: one scalar per row from its reward and its group's valid rewards.

Every estimator has the signature ``fn(reward_N, group_N, valid_N, *, eps=1e-4) -> adv_N`` and obeys
METHODS §2: an invalid (unscorable) row is excluded from its group's statistics and gets exactly 0,
and its reward is never read (it may be NaN); a group whose valid rewards are all equal, or that has
fewer than 2 valid rows, gets exactly 0.

Departure from TRL's GRPOTrainer: TRL computes group statistics over every row; here unscorable rows
are left out of the baseline instead of being scored 0.
"""

from __future__ import annotations

import torch

from . import lookup

from forkrl.algos.filters import _safe_sqrt, group_stats


def grpo(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor, *, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i − mean_g R) / (std_g R + eps), std unbiased (ddof=1) over the group's valid rows.

    This matches TRL's GRPOTrainer (``scale_rewards="group"``, torch's default unbiased std, eps 1e-4).
    DeepSeekMath, arXiv 2402.03300.
    """
    s = group_stats(reward_N, group_N, valid_N)
    return s.centered_N / (s.std_N + eps)


def grpo_batch_std(
    reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor, *, eps: float = 1e-4
) -> torch.Tensor:
    """A_i = (R_i − mean_g R) / (std_batch R + eps): group centring, but the unbiased std is taken over
    all valid rows of the whole batch, as TRL's ``scale_rewards="batch"``."""
    s = group_stats(reward_N, group_N, valid_N)
    r_N = torch.where(valid_N, reward_N, torch.zeros_like(s.mean_N))
    n = valid_N.sum().to(r_N.dtype)
    mean = r_N.sum() / n.clamp(min=1)
    var = torch.where(valid_N, r_N - mean, 0.0).square().sum() / (n - 1).clamp(min=1)
    return s.centered_N / (_safe_sqrt(var, var == 0) + eps)


def dr_grpo(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor, *, eps: float = 1e-4) -> torch.Tensor:
    """A_i = R_i − mean_g R, no std division (Dr.GRPO, arXiv 2503.20783). ``eps`` is unused; it is
    accepted so that every estimator shares one signature."""
    return group_stats(reward_N, group_N, valid_N).centered_N


def rloo(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor, *, eps: float = 1e-4) -> torch.Tensor:
    """A_i = R_i − mean of the other valid rows of the group = n/(n−1)·(R_i − mean_g R), n the group's
    valid count (REINFORCE leave-one-out, arXiv 2402.14740). ``eps`` is unused (shared signature)."""
    s = group_stats(reward_N, group_N, valid_N)
    return s.centered_N * s.count_N / (s.count_N - 1).clamp(min=1)


ADVANTAGES = {
    "grpo": grpo,
    "grpo_batch_std": grpo_batch_std,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
}


def get_advantage(name: str):
    """The advantage estimator registered as ``name``; ValueError listing the valid names otherwise."""
    return lookup(ADVANTAGES, name, "advantage")
