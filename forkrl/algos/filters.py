"""Group statistics over valid rows, and the group filters: zero variance (DAPO dynamic sampling) and RAGEN-2's
reward-variance top-p (``snr``).

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


def group_reward_std(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor):
    """(std_g, idx_N): each group's unbiased std of its valid rewards (0 for a flat group or one with < 2 valid
    rows), groups in ascending id order, and each row's group index into it."""
    _, idx_N = torch.unique(group_N, return_inverse=True)
    std_N = group_stats(reward_N, group_N, valid_N).std_N
    std_g = std_N.new_zeros(int(idx_N.max()) + 1 if len(idx_N) else 0).scatter_(0, idx_N, std_N)
    return std_g, idx_N


def top_p_groups(score_g: torch.Tensor, *, top_p: float, mode: str = "linear") -> torch.Tensor:
    """keep_g: the highest-scoring groups whose cumulative weight first reaches ``top_p`` of the total.

    Sort the scores descending (stable: ties in group order); w = score (``linear``) or softmax over the
    positive scores (``softmax``); keep entry k while the cumulative weight *before* it is below
    top_p · Σw (less a relative 1e-6, so rounding in the sum cannot drop the last needed group): the shortest
    prefix that reaches the threshold. A zero score is never kept, in either mode, and all-zero scores keep
    nothing. Example (linear): scores [.5, .4, .1, 0], top_p .9 → threshold .9: .5 (before 0), .4 (before .5)
    kept, .1 (before .9) dropped."""
    if mode not in ("linear", "softmax"):
        raise ValueError(f"unknown top-p mode {mode!r}; valid modes: linear, softmax")
    score_s, order = torch.sort(score_g, descending=True, stable=True)
    positive = score_s > 0
    if mode == "linear":
        w = torch.where(positive, score_s, 0.0)
    else:
        w = torch.where(positive, torch.softmax(score_s.masked_fill(~positive, -float("inf")), 0), 0.0)
        w = torch.nan_to_num(w)  # no positive score: a softmax of all -inf
    before = torch.cumsum(w, 0) - w
    keep_s = positive & (before < top_p * w.sum() * (1 - 1e-6))
    return torch.zeros_like(keep_s).scatter_(0, order, keep_s)


def snr(reward_N: torch.Tensor, group_N: torch.Tensor, valid_N: torch.Tensor, *, top_p: float = 0.9,
        mode: str = "linear") -> torch.Tensor:
    """keep_N: RAGEN-2's reward-variance ("SNR") filter (arXiv 2604.06268, METHODS §6), as RAGEN implements it.

    Each group is scored by its reward standard deviation (unbiased, valid rows only; not the variance) and the
    groups ``top_p_groups`` keeps are kept whole. Why: a prompt's task gradient is bounded by √Var(R | x), while
    regulariser gradients (KL, entropy) are not, so low-variance prompts mostly push toward input-agnostic
    templates. ``top_p = 1`` keeps every group with a nonzero std: ``zero_variance_groups`` exactly. ``softmax``
    mode (the paper's main-table scripts) is a near no-op for 0/1 rewards: their stds are ≤ ~0.53, so the
    softmax is near-uniform and nearly every nonzero group is kept. Departure from RAGEN: a filtered batch is
    not padded by duplicating rows (forkrl's global denominators need no padding); an empty result skips the
    update (``guards.max_empty_steps`` in a row stop the run)."""
    std_g, idx_N = group_reward_std(reward_N, group_N, valid_N)
    return top_p_groups(std_g, top_p=top_p, mode=mode)[idx_N]


FILTERS = {
    "zero_variance_groups": zero_variance_groups,
    "snr": snr,
}


def get_filter(name: str):
    """The filter registered as ``name``; ValueError listing the valid names otherwise."""
    return lookup(FILTERS, name, "filter")
