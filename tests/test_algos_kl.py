"""KL estimators: hand-derived values and gradients, naive loop, exact expectation, non-negativity."""

import math

import pytest
import torch

from forkrl.algos.kl import KL_ESTIMATORS, get_kl, k1, k3

F64 = torch.float64
LN2 = math.log(2)


def t(values):
    return torch.tensor(values, dtype=F64)


def test_hand_derived_values_and_gradients():
    # d = ref − logp = [ln 2, −ln 2, 0]
    # k1 = −d = [−ln 2, ln 2, 0];  ∂k1/∂logp = 1, ∂k1/∂ref = −1
    # k3 = e^d − d − 1 = [2 − ln 2 − 1, 1/2 + ln 2 − 1, 0]
    # ∂k3/∂logp = 1 − e^d = [−1, 1/2, 0] = −∂k3/∂ref
    logp = t([[0.0, LN2, -1.0]]).requires_grad_()
    ref = t([[LN2, 0.0, -1.0]]).requires_grad_()
    k1(logp, ref).sum().backward()
    torch.testing.assert_close(k1(logp, ref), t([[-0.6931471805599453, 0.6931471805599453, 0.0]]), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(logp.grad, t([[1.0, 1.0, 1.0]]), rtol=0, atol=0)
    torch.testing.assert_close(ref.grad, t([[-1.0, -1.0, -1.0]]), rtol=0, atol=0)
    logp.grad = ref.grad = None
    k3(logp, ref).sum().backward()
    torch.testing.assert_close(k3(logp, ref), t([[0.3068528194400547, 0.1931471805599453, 0.0]]), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(logp.grad, t([[-1.0, 0.5, 0.0]]), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ref.grad, t([[1.0, -0.5, 0.0]]), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_matches_naive_loop(name):
    gen = torch.Generator().manual_seed(0)
    logp = -4 * torch.rand(5, 7, generator=gen, dtype=F64)
    ref = -4 * torch.rand(5, 7, generator=gen, dtype=F64)
    expected = [
        [(a - b) if name == "k1" else (math.exp(b - a) - (b - a) - 1) for a, b in zip(ra, rb)]
        for ra, rb in zip(logp.tolist(), ref.tolist())
    ]
    torch.testing.assert_close(KL_ESTIMATORS[name](logp, ref), t(expected), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_expectation_under_policy_is_exact_kl(name):
    # Both estimators are unbiased: Σ_y π(y)·k(y) = KL(π ‖ π_ref) = Σ_y π(y) log(π(y)/π_ref(y)).
    gen = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(torch.randn(3, 6, generator=gen, dtype=F64), dim=-1)
    ref = torch.log_softmax(torch.randn(3, 6, generator=gen, dtype=F64), dim=-1)
    exact = [sum(math.exp(a) * (a - b) for a, b in zip(ra, rb)) for ra, rb in zip(logp.tolist(), ref.tolist())]
    estimate = (logp.exp() * KL_ESTIMATORS[name](logp, ref)).sum(dim=-1)
    torch.testing.assert_close(estimate, t(exact), rtol=1e-12, atol=1e-14)


def test_k3_nonnegative_and_precise_near_zero():
    gen = torch.Generator().manual_seed(2)
    assert (k3(10 * torch.randn(1000, generator=gen, dtype=F64), 10 * torch.randn(1000, generator=gen, dtype=F64)) >= 0).all()
    # e^d − d − 1 ≈ d²/2 = 5e-21 for d = 1e-10; the naive formula returns 0 or noise there
    assert k3(t([0.0]), t([1e-10])).item() == pytest.approx(5e-21, rel=1e-4, abs=0)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="k1.*k3"):
        get_kl("k2")
