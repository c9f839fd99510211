"""Loss reductions: turn a per-token loss into the scalar one optimizer step minimises (METHODS §1).

The reduction is separate from the objective and its denominator has a name. The denominator is fixed
for the whole optimizer step (every micro-batch, every rank) *before* the accumulation loop: each
micro-batch contributes its weighted masked sum divided by the global totals, so summing the
micro-batch contributions gives exactly the full-batch value (arXiv 2604.23747). Dividing each
micro-batch by its own count instead ("mean of means") makes tokens in short-response micro-batches
weigh more. With data parallelism, all-reduce (sum) ``total_tokens`` and ``total_seqs`` across ranks
first, and multiply the loss by the world size when the backend averages gradients over ranks.

Against TRL's GRPOTrainer (trl 1.16; tests/test_trl_crosscheck.py checks loss and gradient on identical
inputs): ``token_mean`` = TRL ``dapo``; ``seq_mean_token_mean`` = TRL ``grpo`` (and, with the ``gspo``
objective, TRL's sequence-level importance sampling); ``seq_mean_token_sum_norm`` = TRL ``dr_grpo`` with
t_max = max_completion_length; ``seq_mean_token_sum`` = TRL ``luspo``. The intentional differences are
in how a step is split: TRL ``bnpo`` is ``token_mean`` inside one micro-batch but divides each micro-batch
by its own token count under gradient accumulation (the mean of means); TRL ``grpo`` and ``dr_grpo``
divide by the micro-batch's row count and the accumulation steps, which equals forkrl's global count only
while every micro-batch holds the same number of rows (after zero-variance filtering they need not).

Totals are python ints or 0-d tensors (e.g. the result of an all-reduce); a total of 0 is treated as 1
(the masked sum is then 0 anyway), so an empty step gives 0, never NaN.
"""

from __future__ import annotations

import torch

from . import lookup

Total = int | torch.Tensor


def _at_least_one(total: Total, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(total, dtype=dtype).clamp(min=1)


def _token_mean(mask_NT, *, total_tokens: Total, total_seqs: Total, t_max: int | None) -> torch.Tensor:
    """w = m / total_tokens: Σ m·ℓ over the step's masked tokens (DAPO, arXiv 2503.14476).
    Equals TRL ``dapo``; TRL ``bnpo`` only within a single micro-batch (see the module docstring)."""
    return mask_NT / _at_least_one(total_tokens, mask_NT.dtype)


def _seq_mean_token_mean(mask_NT, *, total_tokens: Total, total_seqs: Total, t_max: int | None) -> torch.Tensor:
    """w_it = m_it / (Σ_t m_it · total_seqs): mean over rows of each row's token mean (GRPO,
    arXiv 2402.03300). A row with no masked token contributes 0. Equals TRL ``grpo`` while micro-batches
    hold equal row counts."""
    len_N1 = mask_NT.sum(dim=1, keepdim=True).clamp(min=1)
    return mask_NT / (len_N1 * _at_least_one(total_seqs, mask_NT.dtype))


def _seq_mean_token_sum_norm(mask_NT, *, total_tokens: Total, total_seqs: Total, t_max: int | None) -> torch.Tensor:
    """w = m / (total_seqs · t_max), t_max a fixed constant such as max_new_tokens (Dr.GRPO,
    arXiv 2503.20783): no length normalisation that would favour long wrong answers. Equals TRL ``dr_grpo``
    with t_max = max_completion_length while micro-batches hold equal row counts."""
    if t_max is None or not t_max > 0:
        raise ValueError(f"reduction 'seq_mean_token_sum_norm' needs t_max > 0 (e.g. max_new_tokens), got {t_max!r}")
    return mask_NT / (_at_least_one(total_seqs, mask_NT.dtype) * t_max)


def _seq_mean_token_sum(mask_NT, *, total_tokens: Total, total_seqs: Total, t_max: int | None) -> torch.Tensor:
    """w = m / total_seqs: mean over rows of each row's token sum. Equals TRL ``luspo``."""
    return mask_NT / _at_least_one(total_seqs, mask_NT.dtype)


def check_reduction(mode: str) -> str:
    """``mode`` if it names a reduction; ValueError listing the valid names otherwise."""
    lookup(REDUCTIONS, mode, "loss reduction")
    return mode


def token_weights(
    mask_NT: torch.Tensor,
    mode: str,
    *,
    total_tokens: Total,
    total_seqs: Total,
    t_max: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """w_NT such that the step's loss is Σ w·ℓ; 0 where the mask is False (formulas in ``REDUCTIONS``).

    ``total_tokens`` (masked tokens) and ``total_seqs`` (rows) count the whole optimizer step, all
    micro-batches and ranks, not this micro-batch: a local denominator is the mean-of-means bug.
    ``dtype`` defaults to the mask's dtype if floating, else float32.
    """
    fn = REDUCTIONS[check_reduction(mode)]
    dtype = dtype or (mask_NT.dtype if mask_NT.is_floating_point() else torch.float32)
    return fn(mask_NT.to(dtype), total_tokens=total_tokens, total_seqs=total_seqs, t_max=t_max)


def reduce_loss(
    loss_NT: torch.Tensor,
    mask_NT: torch.Tensor,
    mode: str,
    *,
    total_tokens: Total,
    total_seqs: Total,
    t_max: int | None = None,
) -> torch.Tensor:
    """Σ_it w_it·ℓ_it with w from ``token_weights``: this micro-batch's share of the step's loss.

    Summing it over the step's micro-batches (with the same global totals) gives the full-batch value
    exactly, which per-micro-batch division would not. Masked positions are selected out with
    ``torch.where``, so they get zero gradient even if ℓ is NaN or inf there.
    """
    w_NT = token_weights(
        mask_NT, mode, total_tokens=total_tokens, total_seqs=total_seqs, t_max=t_max, dtype=loss_NT.dtype
    )
    return torch.where(mask_NT.bool(), w_NT * loss_NT, 0.0).sum()


def step_totals(mask_NT: torch.Tensor) -> tuple[int, int]:
    """(total_tokens, total_seqs) of one process's whole optimizer step, as python ints: masked tokens
    and rows of the concatenated step mask. All-reduce them across ranks before use."""
    return int(mask_NT.sum()), int(mask_NT.shape[0])


REDUCTIONS = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
    "seq_mean_token_sum": _seq_mean_token_sum,
}
