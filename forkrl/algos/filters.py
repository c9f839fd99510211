"""Group statistics over valid rows, and the zero-variance group filter (DAPO dynamic sampling).

Rows with the same ``group_N`` id were sampled from the same prompt. Ids are arbitrary integers (not
contiguous, not sorted); rows are grouped with ``torch.unique`` + ``index_add_``, never a Python loop.
Invalid rows (``valid_N`` False: unscorable) are left out of every statistic, and their reward is
replaced by 0 with ``torch.where`` before any arithmetic, so a NaN there cannot leak.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import lookup


class GroupStats(NamedTuple):
    """Per-row view of the row's group statistics (each tensor has shape [N])."""

    count_N: torch.Tensor  # number of valid rows in the row's group (float, reward dtype)
    mean_N: torch.Tensor  # mean of the group's valid rewards (0 for a group with none)
    std_N: torch.Tensor  # unbiased (ddof=1) std of the group's valid rewards (0 below 2 valid rows)
    centered_N: torch.Tensor  # R - mean_g R; exactly 0 where zero_N
    zero_N: torch.Tensor  # bool: invalid row, or its group is flat (max == min) or has < 2 valid rows
    flat_N: torch.Tensor  # bool: the row's group is flat or has < 2 valid rows (invalid rows included)


def _safe_sqrt(var: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """sqrt(var), 0 where ``zero``; the inner where keeps sqrt away from 0, whose infinite derivative
    would turn a zero upstream gradient into NaN."""
    return torch.where(zero, 0.0, torch.where(zero, 1.0, var).sqrt())


def group_stats(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor) -> GroupStats:
    """Mean, unbiased std and flatness of each group's valid rewards, broadcast back to rows.

    mean_g = Σ_{i∈g, valid} R_i / n_g,  var_g = Σ_{i∈g, valid} (R_i − mean_g)² / (n_g − 1).
    A group is *flat* when n_g < 2 or max_g R == min_g R, compared exactly (not via a variance that
    rounding could leave at 1e-17), so that flat groups get an advantage of exactly 0.
    """
    if not reward_N.is_floating_point():
        reward_N = reward_N.to(torch.get_default_dtype())
    groups, idx_N = torch.unique(group_N, return_inverse=True)
    n_groups = groups.shape[0]
    r_N = torch.where(valid_N, reward_N, torch.zeros_like(reward_N))  # NaN in invalid rows stops here

    def group_sum(x_N: torch.Tensor) -> torch.Tensor:
        return x_N.new_zeros(n_groups).index_add_(0, idx_N, x_N)

    count_g = group_sum(valid_N.to(r_N.dtype))
    mean_g = group_sum(r_N) / count_g.clamp(min=1)
    dev_N = torch.where(valid_N, r_N - mean_g[idx_N], 0.0)
    var_g = group_sum(dev_N.square()) / (count_g - 1).clamp(min=1)
    inf = float("inf")
    max_g = r_N.new_full((n_groups,), -inf).scatter_reduce_(0, idx_N, torch.where(valid_N, r_N, -inf), "amax")
    min_g = r_N.new_full((n_groups,), inf).scatter_reduce_(0, idx_N, torch.where(valid_N, r_N, inf), "amin")
    flat_g = (count_g < 2) | (max_g == min_g)
    flat_N = flat_g[idx_N]
    zero_N = flat_N | ~valid_N
    return GroupStats(
        count_N=count_g[idx_N],
        mean_N=mean_g[idx_N],
        std_N=_safe_sqrt(var_g, flat_g)[idx_N],
        centered_N=torch.where(zero_N, 0.0, dev_N),
        zero_N=zero_N,
        flat_N=flat_N,
    )


def zero_variance_groups(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor) -> torch.Tensor:
    """keep_N: False for every row of a group whose valid rewards are all equal or that has fewer than
    2 valid rows (DAPO dynamic sampling, arXiv 2503.14476): such a group has zero advantage everywhere
    and only dilutes the batch.

    The decision is per group: an invalid row of a kept group stays True (it carries advantage 0);
    AND the result with ``valid_N`` to drop those rows as well.
    """
    return ~group_stats(reward_N, group_N, valid_N).flat_N


FILTERS = {
    "zero_variance_groups": zero_variance_groups,
}


def get_filter(name: str):
    """The filter registered as ``name``; ValueError listing the valid names otherwise."""
    return lookup(FILTERS, name, "filter")
