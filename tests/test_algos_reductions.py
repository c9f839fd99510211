"""Loss reductions: hand-derived values, naive loop, gradients, and micro-batch / rank equivalence."""

import pytest
import torch

from forkrl.algos.objectives import ppo_clip
from forkrl.algos.reductions import REDUCTIONS, check_reduction, reduce_loss, step_totals, token_weights

F64 = torch.float64
MODES = sorted(REDUCTIONS)
T_MAX = 64


def t(values):
    return torch.tensor(values, dtype=F64)


# Row 0 has 1 masked token (loss 4), row 1 has 3 (losses 1, 2, 3), row 2 has none. Padding holds
# garbage (NaN, inf) that must not leak. total_tokens = 4, total_seqs = 3, t_max = 4.
#   token_mean               (4 + 1 + 2 + 3) / 4          = 2.5    weights 1/4 each
#   seq_mean_token_mean      (4/1 + 6/3 + 0) / 3          = 2      weights row0 1/3, row1 1/9
#   seq_mean_token_sum_norm  10 / (3 · 4)                 = 5/6    weights 1/12
#   seq_mean_token_sum       10 / 3                       = 10/3   weights 1/3
HAND = {
    "token_mean": (2.5, [0.25, 0.25]),
    "seq_mean_token_mean": (2.0, [1 / 3, 1 / 9]),
    "seq_mean_token_sum_norm": (5 / 6, [1 / 12, 1 / 12]),
    "seq_mean_token_sum": (10 / 3, [1 / 3, 1 / 3]),
}


@pytest.mark.parametrize("mode", MODES)
def test_hand_derived_value_and_gradient(mode):
    nan, inf = float("nan"), float("inf")
    loss = t([[4.0, nan, inf, 1e6], [1.0, 2.0, 3.0, nan], [nan, inf, 7.0, 7.0]]).requires_grad_()
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert step_totals(mask) == (4, 3)
    value = reduce_loss(loss, mask, mode, total_tokens=4, total_seqs=3, t_max=4)
    value.backward()
    expected, (w0, w1) = HAND[mode]
    assert value.item() == pytest.approx(expected, rel=1e-14)
    grad = t([[w0, 0, 0, 0], [w1, w1, w1, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(loss.grad, grad, rtol=1e-14, atol=0)  # exactly 0 at masked positions
    weights = token_weights(mask, mode, total_tokens=4, total_seqs=3, t_max=4, dtype=F64)
    torch.testing.assert_close(weights, grad, rtol=1e-14, atol=0)


def naive(loss, mask, mode, t_max):
    """Loop reference from the formulas in METHODS §1."""
    n = len(loss)
    sums = [sum(v for v, m in zip(row, mrow) if m) for row, mrow in zip(loss, mask)]
    counts = [sum(mrow) for mrow in mask]
    if mode == "token_mean":
        return sum(sums) / sum(counts)
    if mode == "seq_mean_token_mean":
        return sum(s / c for s, c in zip(sums, counts) if c) / n
    if mode == "seq_mean_token_sum_norm":
        return sum(sums) / (n * t_max)
    return sum(sums) / n


def uneven_batch(seed, n=16):
    """Rows whose lengths vary from 1 to T_MAX (≥ 10×), with a zero-length row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.tensor([1, T_MAX, 0, 2]), torch.randint(1, T_MAX + 1, (n - 4,), generator=gen)])
    mask = torch.arange(T_MAX)[None, :] < lengths[:, None]
    loss = torch.randn(n, T_MAX, generator=gen, dtype=F64) + 1.0
    return loss, mask


@pytest.mark.parametrize("mode", MODES)
def test_matches_naive_loop(mode):
    loss, mask = uneven_batch(0)
    tokens, seqs = step_totals(mask)
    value = reduce_loss(loss, mask, mode, total_tokens=tokens, total_seqs=seqs, t_max=T_MAX)
    assert value.item() == pytest.approx(naive(loss.tolist(), mask.tolist(), mode, T_MAX), rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunks", [[16], [4, 4, 4, 4], [1, 2, 13], [5, 11]])
def test_micro_batches_with_global_totals_sum_to_full_batch(mode, chunks):
    loss, mask = uneven_batch(1)
    tokens, seqs = step_totals(mask)
    full = reduce_loss(loss, mask, mode, total_tokens=tokens, total_seqs=seqs, t_max=T_MAX)
    parts = [
        reduce_loss(lo, ma, mode, total_tokens=tokens, total_seqs=seqs, t_max=T_MAX)
        for lo, ma in zip(loss.split(chunks), mask.split(chunks))
    ]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_mean_of_means_differs(mode):
    # The bug this module exists to avoid: each micro-batch divides by its own totals, then the K results
    # are averaged. One micro-batch of short rows and one of long rows (unequal row counts) make it visible.
    loss, mask = uneven_batch(2)
    lengths = mask.sum(dim=1)
    order = lengths.argsort()
    loss, mask = loss[order], mask[order]
    chunks = [5, 11]
    tokens, seqs = step_totals(mask)
    full = reduce_loss(loss, mask, mode, total_tokens=tokens, total_seqs=seqs, t_max=T_MAX).item()
    local = []
    for lo, ma in zip(loss.split(chunks), mask.split(chunks)):
        lt, ls = step_totals(ma)
        local.append(reduce_loss(lo, ma, mode, total_tokens=lt, total_seqs=ls, t_max=T_MAX).item())
    mean_of_means = sum(local) / len(local)
    assert abs(mean_of_means - full) > 1e-3 * abs(full)


def grads_of(theta, x, targets, mask, adv, mode, ranks, tokens, seqs):
    """The parameter gradient of one step run as ``ranks`` (each a list of micro-batches, each a list of
    rows), DDP-style: each rank accumulates world · Σ_k reduce_loss(micro-batch k) with the step's global
    totals, then the backend averages the ranks' gradients."""
    world = len(ranks)
    # a fixed, row-and-position-specific old policy so that clipping is active on some tokens
    shift_NT = 0.3 * torch.sin(torch.arange(mask.numel(), dtype=F64)).reshape(mask.shape)
    per_rank = []
    for micro_batches in ranks:
        theta.grad = None
        for rows in micro_batches:
            logits = x[rows] @ theta  # [n, T, V]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[rows][..., None]).squeeze(-1)
            old = logp.detach() + shift_NT[rows]
            loss_NT, _, _ = ppo_clip(logp, old, adv[rows], mask[rows], eps_low=0.2, eps_high=0.28, dual_clip=3.0)
            (world * reduce_loss(loss_NT, mask[rows], mode, total_tokens=tokens, total_seqs=seqs, t_max=T_MAX)).backward()
        per_rank.append(theta.grad.clone())
    return sum(per_rank) / world


@pytest.mark.parametrize("mode", MODES)
def test_parameter_gradient_identical_for_batch_microbatches_and_ranks(mode):
    gen = torch.Generator().manual_seed(3)
    _, mask = uneven_batch(3, n=12)
    n, T, H, V = 12, T_MAX, 4, 6
    x = torch.randn(n, T, H, generator=gen, dtype=F64)
    targets = torch.randint(V, (n, T), generator=gen)
    adv = torch.randn(n, generator=gen, dtype=F64)
    theta = torch.randn(H, V, generator=gen, dtype=F64, requires_grad=True)
    tokens, seqs = step_totals(mask)  # in DDP: all-reduced over ranks before the accumulation loop
    args = (theta, x, targets, mask, adv, mode)
    full = grads_of(*args, [[list(range(n))]], tokens, seqs)
    micro = grads_of(*args, [[[0, 1, 2], [3], [4, 5, 6, 7, 8, 9, 10, 11]]], tokens, seqs)
    ranks = grads_of(*args, [[[0, 5], [1, 7, 9]], [[2], [3, 4, 6, 8, 10, 11]]], tokens, seqs)
    assert full.abs().max() > 1e-3
    torch.testing.assert_close(micro, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ranks, full, rtol=1e-10, atol=1e-12)


def test_empty_step_is_zero_not_nan():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for mode in MODES:
        value = reduce_loss(torch.ones(2, 3, dtype=F64), mask, mode, total_tokens=0, total_seqs=2, t_max=3)
        assert value.item() == 0.0


def test_tensor_totals_match_int_totals():
    loss, mask = uneven_batch(4)
    tokens, seqs = step_totals(mask)
    for mode in MODES:
        a = reduce_loss(loss, mask, mode, total_tokens=tokens, total_seqs=seqs, t_max=T_MAX)
        b = reduce_loss(loss, mask, mode, total_tokens=mask.sum(), total_seqs=torch.tensor(seqs), t_max=T_MAX)
        assert a.item() == pytest.approx(b.item(), rel=1e-14)


def test_unknown_mode_and_missing_t_max_raise():
    one, mask = torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm, token_mean"):
        check_reduction("mean")
    with pytest.raises(ValueError, match="t_max"):
        reduce_loss(one, mask, "seq_mean_token_sum_norm", total_tokens=1, total_seqs=1)
    assert reduce_loss(one, mask, "token_mean", total_tokens=1, total_seqs=1).item() == 1.0
