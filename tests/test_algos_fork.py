"""Fork-gated contrastive loss (METHODS §4): hand-derived cases, a float64 loop reference, gradient flow,
micro-batch invariance, and the gates' claims."""

import math

import pytest
import torch

from forkrl.algos.fork import (all_gate, entropy_gate, entropy_tau, fork_advantages, fork_loss, full_kl, get_gate,
                               random_gate, reweighted_advantages)

F64 = torch.float64


def test_advantages_hand_derived():
    # group 0: [1, 0, 0, 0]: mean .25, population var = .25·.75 = .1875, std .4330127
    # group 5: [1, 1] flat -> 0; group 9: a singleton -> 0
    reward = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=F64)
    group = torch.tensor([0, 0, 5, 0, 5, 0, 9])
    valid = torch.ones(7, dtype=torch.bool)
    adv = fork_advantages(reward, group, valid, clip=10.0)
    s = math.sqrt(0.1875)
    expected = torch.tensor([0.75 / s, -0.25 / s, 0, -0.25 / s, 0, -0.25 / s, 0], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=1e-14, atol=1e-14)
    clipped = fork_advantages(reward, group, valid, clip=1.5)
    assert clipped[0].item() == 1.5 and clipped[1].item() == pytest.approx(-0.25 / s, rel=1e-14)


def test_advantages_leave_out_unscorable_rows():
    # the NaN row is invalid: group 0's valid rewards are [1, 0] -> mean .5, population std .5 -> ±1
    reward = torch.tensor([1.0, float("nan"), 0.0], dtype=F64)
    adv = fork_advantages(reward, torch.zeros(3, dtype=torch.long), torch.tensor([True, False, True]))
    assert adv.tolist() == pytest.approx([1.0, 0.0, -1.0], rel=1e-14, abs=0)


def test_reweighted_advantages_hand_derived():
    # group 0: rewards [1, 0, 0, 0], weights ∝ [3, 1, 1, 1] (log-weights ln 3, 0, 0, 0 plus a shared 7):
    # mean 3/6 = .5, population var .5·.5 = .25 -> A = [1, -1, -1, -1]; ESS = 6² / (9 + 1 + 1 + 1) = 3
    # group 1: [1, 1] flat -> 0 whatever the weights; row 6 is unscorable: 0, and outside the statistics
    reward = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, float("nan")], dtype=F64)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 0])
    valid = torch.tensor([True] * 6 + [False])
    logw = torch.tensor([math.log(3) + 7, 7, 7, 7, -50.0, 3.0, 99.0], dtype=F64)
    adv, ess = reweighted_advantages(reward, group, valid, logw, clip=10.0)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1, -1, -1, 0, 0, 0], dtype=F64), rtol=1e-12, atol=1e-12)
    assert ess[:4].tolist() == pytest.approx([3.0] * 4, rel=1e-6)
    clipped, _ = reweighted_advantages(reward, group, valid, logw, clip=0.5)
    assert clipped[:4].tolist() == [0.5, -0.5, -0.5, -0.5]


def test_reweighted_advantages_with_equal_weights_are_the_base_advantages():
    g = torch.Generator().manual_seed(3)
    reward = (torch.rand(40, generator=g, dtype=F64) < 0.4).to(F64)
    group = torch.arange(40) // 8
    valid = torch.rand(40, generator=g) < 0.9
    shift = torch.randn(5, generator=g, dtype=F64)[group]  # a constant per group cancels in self-normalising
    adv, ess = reweighted_advantages(reward, group, valid, shift, clip=2.5)
    torch.testing.assert_close(adv, fork_advantages(reward, group, valid, clip=2.5), rtol=1e-12, atol=1e-12)
    count = torch.zeros(5).index_add_(0, group, valid.float())[group]
    torch.testing.assert_close(ess, count, rtol=1e-6, atol=1e-6)


def test_full_kl_hand_derived_and_nonnegative():
    # π_ref = [.5, .5], π = [.25, .75]: KL = .5 log(.5/.25) + .5 log(.5/.75) = .5 log(4/3)
    ref = torch.log(torch.tensor([[[0.5, 0.5]]], dtype=F64))
    cur = torch.log(torch.tensor([[[0.25, 0.75]]], dtype=F64))
    assert full_kl(ref, cur).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-14)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 7, generator=g, dtype=F64), torch.randn(3, 4, 7, generator=g, dtype=F64)
    assert (full_kl(a, b) >= 0).all() and full_kl(a, a).abs().max() < 1e-14


def test_loss_hand_derived():
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=F64))
    kl = torch.tensor([[9.0, 0.3]], dtype=F64)  # the 9 sits on a decision token: the anchor never reads it
    loss, con, anc = fork_loss(logp, kl, torch.tensor([2.0], dtype=F64), torch.tensor([[True, False]]),
                               torch.ones(1, 2, dtype=torch.bool), kl_coef=0.1, total_decision=1, total_anchor=1)
    assert con.item() == pytest.approx(2 * math.log(2), rel=1e-14)
    assert anc.item() == pytest.approx(0.3, rel=1e-14)
    assert loss.item() == pytest.approx(2 * math.log(2) + 0.03, rel=1e-14)


def naive_loss(logp, kl, adv, gate, mask, kl_coef):
    """Loop reference written from METHODS §4 step 6."""
    N, T = len(logp), len(logp[0])
    D = [(i, t) for i in range(N) for t in range(T) if mask[i][t] and gate[i][t]]
    notD = [(i, t) for i in range(N) for t in range(T) if mask[i][t] and not gate[i][t]]
    con = sum(adv[i] * -logp[i][t] for i, t in D) / max(len(D), 1)
    anc = sum(kl[i][t] for i, t in notD) / max(len(notD), 1)
    return con + kl_coef * anc


def random_case(seed=0, N=6, T=9, V=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g, dtype=F64)
    ref = torch.randn(N, T, V, generator=g, dtype=F64)
    targets = torch.randint(0, V, (N, T), generator=g)
    lens = torch.tensor([1, 9, 2, 7, 3, 9])[:N]  # very uneven lengths
    mask = torch.arange(T)[None, :] < lens[:, None]
    gate = (torch.rand(N, T, generator=g) < 0.3) & mask
    adv = torch.randn(N, generator=g, dtype=F64)
    return logits, ref, targets, mask, gate, adv


def per_token(logits, ref, targets):
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return logp, full_kl(ref, logits)


def test_loss_matches_loop_reference():
    logits, ref, targets, mask, gate, adv = random_case()
    logp, kl = per_token(logits, ref, targets)
    loss, _, _ = fork_loss(logp, kl, adv, gate, mask, kl_coef=0.1, total_decision=int(gate.sum()),
                           total_anchor=int((mask & ~gate).sum()))
    ref_value = naive_loss(logp.tolist(), kl.tolist(), adv.tolist(), gate.tolist(), mask.tolist(), 0.1)
    assert loss.item() == pytest.approx(ref_value, rel=1e-12)


def test_tokens_outside_the_gate_get_only_the_kl_gradient():
    logits, ref, targets, mask, gate, adv = random_case(seed=1)
    logits.requires_grad_(True)
    logp, kl = per_token(logits, ref, targets)
    totals = dict(total_decision=int(gate.sum()), total_anchor=int((mask & ~gate).sum()))
    loss, _, _ = fork_loss(logp, kl, adv, gate, mask, kl_coef=0.1, **totals)
    (grad,) = torch.autograd.grad(loss, logits)
    # at an anchor position the gradient of λ·KL/|¬D| w.r.t. the logits is λ/|¬D| · (π − π_ref)
    expect_anchor = 0.1 / totals["total_anchor"] * (torch.softmax(logits, -1) - torch.softmax(ref, -1))
    anchor = mask & ~gate
    torch.testing.assert_close(grad[anchor], expect_anchor.detach()[anchor], rtol=1e-12, atol=1e-15)
    # at a decision position it is A/|D| · (π − onehot(y)): the cross-entropy only, no KL
    onehot = torch.nn.functional.one_hot(targets, logits.shape[-1]).to(F64)
    expect_dec = adv[:, None, None] / totals["total_decision"] * (torch.softmax(logits, -1) - onehot)
    torch.testing.assert_close(grad[gate], expect_dec.detach()[gate], rtol=1e-12, atol=1e-15)
    assert grad[~mask].abs().max() == 0  # padding gets nothing
    # the reference (base) model gets no gradient
    ref2 = ref.clone().requires_grad_(True)
    loss2, _, _ = fork_loss(logp.detach(), full_kl(ref2.detach(), logits), adv, gate, mask, kl_coef=0.1, **totals)
    loss2.backward()
    assert ref2.grad is None


@pytest.mark.parametrize("splits", [[6], [1, 5], [2, 2, 2], [3, 1, 1, 1]])
def test_gradient_does_not_depend_on_micro_batches(splits):
    logits, ref, targets, mask, gate, adv = random_case(seed=2)
    totals = dict(total_decision=int(gate.sum()), total_anchor=int((mask & ~gate).sum()))

    def grad_of(parts):
        x = logits.clone().requires_grad_(True)
        start = 0
        for n in parts:
            sl = slice(start, start + n)
            logp, kl = per_token(x[sl], ref[sl], targets[sl])
            fork_loss(logp, kl, adv[sl], gate[sl], mask[sl], kl_coef=0.1, **totals)[0].backward()
            start += n
        return x.grad

    torch.testing.assert_close(grad_of(splits), grad_of([6]), rtol=1e-10, atol=1e-14)


def test_entropy_tau_absolute_and_quantile():
    H = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 0.6, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)  # the 9.0 is padding
    assert entropy_tau(H, mask, tau=1.4, quantile=0.5) == 1.4
    assert entropy_tau(H, mask, tau=None, quantile=0.5) == pytest.approx(0.35, rel=1e-12)
    gate = entropy_gate(H, mask, tau=0.35)
    assert gate.tolist() == [[False, False, False, False], [True, True, True, False]]


def test_random_gate_has_the_same_budget_on_masked_positions_only():
    g = torch.Generator().manual_seed(3)
    H = torch.rand(20, 30, generator=g, dtype=F64)
    mask = torch.arange(30)[None, :] < torch.randint(1, 30, (20, 1), generator=g)
    tau = entropy_tau(H, mask, tau=None, quantile=0.8)
    ent, rnd = entropy_gate(H, mask, tau=tau), random_gate(H, mask, tau=tau, seed=7)
    assert int(rnd.sum()) == int(ent.sum()) > 0
    assert not (rnd & ~mask).any()
    assert not torch.equal(rnd, ent)
    assert torch.equal(rnd, random_gate(H, mask, tau=tau, seed=7))  # seeded
    assert torch.equal(all_gate(H, mask, tau=tau), mask)


def test_gate_registry_lists_valid_names():
    with pytest.raises(ValueError, match="all, entropy, random"):
        get_gate("oracle")


def test_neg_floor_stops_only_negative_rows_already_below_it():
    # rows: A = -1 with π/π_b = .25 (below a .5 floor), A = -1 with ratio .8, A = +1 with ratio .25
    logp = torch.log(torch.tensor([[0.1], [0.4], [0.1]], dtype=F64)).requires_grad_(True)
    base = torch.log(torch.tensor([[0.4], [0.5], [0.4]], dtype=F64))
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=F64)
    gate = torch.ones(3, 1, dtype=torch.bool)
    kw = dict(kl_coef=0.1, total_decision=3, total_anchor=0)
    loss, con, _ = fork_loss(logp, torch.zeros(3, 1, dtype=F64), adv, gate, gate, base_logp_NT=base, neg_floor=0.5, **kw)
    loss.backward()
    # d/dlogp of A·(−logp)/|D| = −A/3, except the floored row: 0; |D| stays 3
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [1 / 3], [-1 / 3]], dtype=F64), rtol=1e-14, atol=0)
    assert con.item() == pytest.approx((math.log(0.4) - math.log(0.1)) / 3, rel=1e-14)
    unfloored, _, _ = fork_loss(logp, torch.zeros(3, 1, dtype=F64), adv, gate, gate, **kw)
    assert unfloored.item() == pytest.approx((math.log(0.1) + math.log(0.4) - math.log(0.1)) / 3, rel=1e-14)
