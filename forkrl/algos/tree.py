"""Tree rollouts' advantage and loss (Tree-GRPO, arXiv 2509.21240; TreeRL, arXiv 2506.11902; METHODS §8).

A prompt's rollouts are M trees: a chain sampled whole, and N continuations forked from it, each sharing the chain's
first f tokens and sampling the rest. Every root-to-leaf path is a complete completion (a *path*): the chain itself,
and each continuation's shared prefix plus its own suffix. Paths are rewarded as completions are.

**Advantage** of path i (``tree_advantages``): its reward's z-score within its tree plus its z-score across all the
prompt's paths, A_i = (r_i − μ_tree)/(σ_tree + ε) + (r_i − μ_prompt)/(σ_prompt + ε), σ the unbiased std, a group of
equal rewards giving exactly 0 (GRPO's estimator, ``advantages.grpo``, applied twice). Siblings that share a prefix
and differ in reward turn the outcome into a step-level preference at the fork.

**Loss, shared prefixes trained once** (``tree_coefficients``, ``tree_loss``). Expanded, every path would be its own
row and the step's loss Σ_i Σ_{t∈i} ω_i·(−A_i·r_t + β·kl_t − c·H_t), ω_i the reduction's weight of path i's tokens
(1/total_tokens for ``token_mean``, 1/(len_i·total_paths) for ``seq_mean_token_mean``, 1/total_paths for
``seq_mean_token_sum``, 1/(total_paths·t_max) for ``seq_mean_token_sum_norm``; totals over the step's paths, every
rank's). A token shared by several paths is the same token with the same log-prob in each, so it is trained once with
the sum of their coefficients: a_t = Σ_{i∋t} ω_i·A_i on the ratio and b_t = Σ_{i∋t} ω_i on the KL and entropy terms,

    L = Σ_t −a_t·r_t + b_t·(β·kl_t − c·H_t),        r_t = π(y_t)/π_old(y_t).

This equals the expanded loss exactly when the objective is linear in A at every token, which holds on-policy
(μ = 1: r_t = exp(log π − log π.detach()) = 1 in value, PPO's clip inactive, gradient A·∇log π) for PPO's clipped
surrogate; the config refuses trees with μ > 1 or GSPO's sequence ratio (tests/test_tree.py checks the gradient
against the expanded rows for every reduction, with KL and entropy terms).
"""

from __future__ import annotations

import torch

from .advantages import get_advantage
from .kl import get_kl


def tree_advantages(reward_L: torch.Tensor, tree_L: torch.Tensor, prompt_L: torch.Tensor, valid_L: torch.Tensor,
                    *, eps: float) -> torch.Tensor:
    """A per path: z-score within its tree plus z-score across its prompt's paths (module docstring). Hand case
    (tests/test_tree.py): one prompt, trees with rewards [1, 0, 0] and [1, 1, 1]: within [1.155, −.577, −.577] and
    [0, 0, 0]; across (mean 2/3, σ = √(4/15)) +.645 for a 1 and −1.291 for a 0."""
    grpo = get_advantage("grpo")
    return grpo(reward_L, tree_L, valid_L, eps=eps) + grpo(reward_L, prompt_L, valid_L, eps=eps)


def path_weights(len_L: torch.Tensor, reduction: str, *, total_tokens: int, total_paths: int,
                 t_max: int | None) -> torch.Tensor:
    """ω per path: the weight the reduction gives each of its tokens when every path is its own row."""
    tokens, paths = max(total_tokens, 1), max(total_paths, 1)
    len_L = len_L.double()
    if reduction == "token_mean":
        return torch.full_like(len_L, 1.0 / tokens)
    if reduction == "seq_mean_token_mean":
        return 1.0 / (len_L.clamp(min=1) * paths)
    if reduction == "seq_mean_token_sum":
        return torch.full_like(len_L, 1.0 / paths)
    if reduction == "seq_mean_token_sum_norm":
        if not t_max:
            raise ValueError("reduction 'seq_mean_token_sum_norm' needs t_max > 0")
        return torch.full_like(len_L, 1.0 / (paths * t_max))
    raise ValueError(f"unknown loss reduction {reduction!r} for tree rollouts")


def tree_coefficients(spans: list[list[tuple[int, int, int]]], adv_L: torch.Tensor, weight_L: torch.Tensor,
                      shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_NT, b_NT) on the compact rows: ``spans[i]`` lists path i's pieces as (row, first target index, end), its
    tokens at those target positions of those rows; each adds ω_i·A_i to a and ω_i to b."""
    a_NT = torch.zeros(shape, dtype=torch.float64)
    b_NT = torch.zeros(shape, dtype=torch.float64)
    for pieces, adv, w in zip(spans, adv_L.tolist(), weight_L.tolist()):
        for row, start, end in pieces:
            a_NT[row, start:end] += w * adv
            b_NT[row, start:end] += w
    return a_NT, b_NT


def tree_loss(logp_NT: torch.Tensor, a_NT: torch.Tensor, b_NT: torch.Tensor, *,
              ref_logp_NT: torch.Tensor | None = None, kl_estimator: str = "k3", kl_coef: float = 0.0,
              entropy_NT: torch.Tensor | None = None, entropy_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(L over these rows, kl_NT) with the on-policy ratio r = exp(log π − log π.detach()); a and b already carry
    the step's denominators, so summing over micro-batches gives the step's loss. Positions where b is 0 (prompts,
    inherited prefixes, padding) contribute nothing and their inputs are never read."""
    live_NT = b_NT > 0
    a_NT, b_NT = a_NT.to(logp_NT), b_NT.to(logp_NT)
    safe_NT = torch.where(live_NT, logp_NT, logp_NT.detach())
    ratio_NT = torch.exp(safe_NT - safe_NT.detach())
    loss_NT = -a_NT * ratio_NT
    kl_NT = torch.zeros_like(logp_NT)
    if ref_logp_NT is not None:
        kl_NT = get_kl(kl_estimator)(safe_NT, torch.where(live_NT, ref_logp_NT.to(logp_NT), safe_NT.detach()))
        if kl_coef:
            loss_NT = loss_NT + kl_coef * b_NT * kl_NT
    if entropy_coef > 0:
        loss_NT = loss_NT - entropy_coef * b_NT * torch.where(live_NT, entropy_NT, torch.zeros_like(entropy_NT))
    return torch.where(live_NT, loss_NT, torch.zeros_like(loss_NT)).sum(), kl_NT
