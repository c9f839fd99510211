"""The DPO loss: the hand case of its docstring, a float64 loop over pairs, and where its gradient goes."""

import math

import pytest
import torch

from forkrl.algos.dpo import dpo_loss, dpo_margin


def test_hand_case():
    w, l = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss = dpo_loss(w, l, torch.tensor([-2.5]), torch.tensor([-2.5]), beta=0.5, total_pairs=1)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    loss.backward()
    assert float(w.grad) == pytest.approx(-0.188771, abs=1e-6) and float(l.grad) == pytest.approx(0.188771, abs=1e-6)


def test_float64_loop_reference():
    g = torch.Generator().manual_seed(0)
    w, l, rw, rl = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta, total = 0.2, 10  # pairs of other micro-batches and ranks count in the denominator
    want = 0.0
    for i in range(7):
        z = beta * ((float(w[i]) - float(rw[i])) - (float(l[i]) - float(rl[i])))
        want += math.log1p(math.exp(-z)) if z > -30 else -z
    assert float(dpo_loss(w, l, rw, rl, beta=beta, total_pairs=total)) == pytest.approx(want / total, rel=1e-12)
    assert dpo_margin(w, l, rw, rl, beta=beta).tolist() == pytest.approx(
        [beta * ((w[i] - rw[i]) - (l[i] - rl[i])).item() for i in range(7)], rel=1e-12)
    # split into two micro-batches with the step's denominator: the sum is the whole step's loss
    parts = dpo_loss(w[:3], l[:3], rw[:3], rl[:3], beta=beta, total_pairs=total) + \
        dpo_loss(w[3:], l[3:], rw[3:], rl[3:], beta=beta, total_pairs=total)
    assert float(parts) == pytest.approx(want / total, rel=1e-12)


def test_gradient_reaches_the_policy_only_and_pushes_the_pair_apart():
    w = torch.tensor([-4.0, -1.0], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([-3.0, -1.5], dtype=torch.float64, requires_grad=True)
    rw = torch.tensor([-4.0, -1.2], dtype=torch.float64, requires_grad=True)
    rl = torch.tensor([-3.1, -1.4], dtype=torch.float64, requires_grad=True)
    dpo_loss(w, l, rw, rl, beta=0.1, total_pairs=2).backward()
    assert rw.grad is None and rl.grad is None  # the reference is frozen
    assert (w.grad < 0).all() and (l.grad > 0).all()  # descent raises the chosen, lowers the rejected
    assert torch.allclose(w.grad, -l.grad)  # the loss depends on the difference only
    # a pair far on the right side (z ≫ 0) contributes almost nothing
    big = torch.tensor([100.0], dtype=torch.float64, requires_grad=True)
    dpo_loss(big, torch.tensor([0.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
             torch.zeros(1, dtype=torch.float64), beta=1.0, total_pairs=1).backward()
    assert abs(float(big.grad)) < 1e-40
