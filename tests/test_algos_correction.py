"""The sampler/trainer mismatch corrections (algos/correction.py) and their place in the GRPO loss: the docstrings'
worked cases, a float64 loop over tokens, the exact expectation they correct (rows drawn from π_sampler, weighted,
give π_old's policy gradient), and where the gradient flows."""

import math

import pytest
import torch

from forkrl.algos.correction import CORRECTIONS, get_correction
from forkrl.algos.loss import grpo_loss


def close(t, want, rel=0.0, abs=1e-12):
    return torch.allclose(t.detach(), torch.tensor(want, dtype=t.dtype), rtol=rel, atol=abs)


def test_worked_cases():
    """TIS: ρ = [0.5, 3], C = 2 → w = [0.5, 2]. MIS: ρ = [0.25, 0.5, 3], C = 2 → w = [0, 0.5, 0]."""
    sampler = torch.log(torch.tensor([[0.2, 0.1]], dtype=torch.float64))
    old = sampler + torch.log(torch.tensor([[0.5, 3.0]], dtype=torch.float64))
    w = get_correction("tis")(old, sampler, torch.ones(1, 2, dtype=torch.bool), cap=2.0)
    assert close(w, [[0.5, 2.0]])
    sampler = torch.log(torch.tensor([[0.4, 0.2, 0.1]], dtype=torch.float64))
    old = sampler + torch.log(torch.tensor([[0.25, 0.5, 3.0]], dtype=torch.float64))
    w = get_correction("mis")(old, sampler, torch.ones(1, 3, dtype=torch.bool), cap=2.0)
    assert close(w, [[0.0, 0.5, 0.0]])
    with pytest.raises(ValueError, match="valid names: mis, none, tis"):
        get_correction("ratio")


def _naive(old, sampler, mask, kind, cap):
    """The weights by Python loops, from the formulas (ρ = exp(old − sampler))."""
    out = []
    for o_row, s_row, m_row in zip(old.tolist(), sampler.tolist(), mask.tolist()):
        row = []
        for o, s, m in zip(o_row, s_row, m_row):
            rho = math.exp(o - s)
            if not m:
                row.append(0.0)
            elif kind == "none":
                row.append(1.0)
            elif kind == "tis":
                row.append(min(rho, cap))
            else:
                row.append(rho if 1 / cap <= rho <= cap else 0.0)
        out.append(row)
    return out


@pytest.mark.parametrize("kind", sorted(CORRECTIONS))
def test_against_a_float64_loop_with_garbage_off_the_mask(kind):
    g = torch.Generator().manual_seed(3)
    sampler = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    old = sampler + torch.randn(5, 7, generator=g, dtype=torch.float64)  # ratios from ~0.05 to ~20
    mask = torch.rand(5, 7, generator=g) < 0.7
    want = _naive(old, sampler, mask, kind, 2.5)
    old_g = torch.where(mask, old, torch.full_like(old, float("inf")))  # padding's garbage never reaches w
    w = get_correction(kind)(old_g, torch.where(mask, sampler, float("nan")), mask, cap=2.5)
    assert torch.isfinite(w).all()
    assert close(w, want, rel=1e-12, abs=1e-15)


def test_weighted_rows_from_the_sampler_give_the_policy_gradient_of_pi_old():
    """The exact expectation, by enumerating one token's vocabulary: rows y ~ π_sampler, weighted by ρ(y) (TIS with a
    cap above every ratio; MIS with a band around them all), give Σ_y π_old(y)·A(y)·∇log π(y), the on-policy gradient;
    uncorrected they give Σ_y π_sampler(y)·A(y)·∇log π(y), which differs. Each row carries its probability under the
    sampler as a multiplicity (its advantage is scaled by it), so the loss is the expectation itself."""
    g = torch.Generator().manual_seed(0)
    V = 6
    theta = torch.randn(V, generator=g, dtype=torch.float64)
    p_old = torch.softmax(theta, 0)
    p_sampler = torch.softmax(theta + 0.4 * torch.randn(V, generator=g, dtype=torch.float64), 0)
    A = torch.randn(V, generator=g, dtype=torch.float64)
    mask = torch.ones(V, 1, dtype=torch.bool)

    def gradient(kind, cap, mass):
        t = theta.clone().requires_grad_()
        logp = torch.log_softmax(t, 0)[:, None]  # row y: the log-prob of token y
        out = grpo_loss(logp, logp.detach(), A * mass, mask, total_tokens=V, total_seqs=V,
                        sampler_logp_NT=torch.log(p_sampler)[:, None], correction=kind, correction_cap=cap)
        out.loss.backward()
        return t.grad

    rho = p_old / p_sampler
    assert float(rho.max()) < 50 and float(rho.min()) > 1 / 50
    on_policy = gradient("none", 2.0, p_old)
    assert gradient("tis", 50.0, p_sampler) == pytest.approx(on_policy, rel=1e-12, abs=1e-15)
    assert gradient("mis", 50.0, p_sampler) == pytest.approx(on_policy, rel=1e-12, abs=1e-15)
    biased = gradient("none", 2.0, p_sampler)
    assert float((biased - on_policy).abs().max()) > 1e-3


def test_the_weight_scales_the_objective_only_and_carries_no_gradient():
    """∂L/∂log π_t = w_t·∂ℓ_obj/∂log π_t + the KL and entropy terms' (unweighted); w is a constant: the sampler's
    log-probs get no gradient, and a token MIS drops gets the KL term's gradient alone."""
    logp0 = torch.log(torch.tensor([[0.5, 0.25, 0.2]], dtype=torch.float64))
    sampler = (logp0 - torch.log(torch.tensor([[0.5, 1.0, 4.0]], dtype=torch.float64))).requires_grad_()  # ρ = .5, 1, 4
    ref = logp0 - 0.1
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv = torch.tensor([2.0], dtype=torch.float64)

    def grads(kind, kl_coef):
        logp = logp0.clone().requires_grad_()
        out = grpo_loss(logp, logp.detach(), adv, mask, total_tokens=3, total_seqs=1, ref_logp_NT=ref,
                        kl_estimator="k1", kl_coef=kl_coef, sampler_logp_NT=sampler, correction=kind,
                        correction_cap=2.0)
        out.loss.backward()
        return logp.grad, out.weight_NT

    plain, w1 = grads("none", 0.0)
    assert w1.tolist() == [[1.0, 1.0, 1.0]] and close(plain, [[-2 / 3] * 3])
    tis, w = grads("tis", 0.0)
    assert close(tis, [[-1 / 3, -2 / 3, -4 / 3]])  # w = .5, 1, 2 (capped)
    mis, w = grads("mis", 0.1)
    assert close(w, [[0.5, 1.0, 0.0]])
    assert close(mis, [[-1 / 3 + 0.1 / 3, -2 / 3 + 0.1 / 3, 0.1 / 3]])
    assert sampler.grad is None


def test_no_correction_leaves_the_loss_bit_identical():
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(4, 6, generator=g)
    old = logp + 0.1 * torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.8
    adv = torch.randn(4, generator=g)
    a = grpo_loss(logp, old, adv, mask, total_tokens=int(mask.sum()), total_seqs=4)
    b = grpo_loss(logp, old, adv, mask, total_tokens=int(mask.sum()), total_seqs=4,
                  sampler_logp_NT=logp - 1.0, correction="none")
    assert torch.equal(a.loss, b.loss)
