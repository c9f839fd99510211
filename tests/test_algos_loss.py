"""The GRPO loss as one function (algos/loss.py): a hand-derived case, a float64 naive loop over rows and tokens,
and where the gradient flows."""

import math

import pytest
import torch

from forkrl.algos.loss import grpo_loss, zero_advantage_rows_vanish


def test_hand_derived_case():
    """One row, two tokens, on-policy (r = 1), A = 2 (the docstring's case): ℓ_obj = −A = [−2, −2]; k1 with
    log π − log π_ref = [.5, .1] and β = .1 adds [.05, .01]; H = [1, .5] with c = .2 subtracts [.2, .1]:
    ℓ = [−2.15, −2.09], token_mean over 2 tokens: −2.12."""
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64)
    ref = logp - torch.tensor([[0.5, 0.1]], dtype=torch.float64)
    out = grpo_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2, dtype=torch.bool), total_tokens=2,
                    total_seqs=1, ref_logp_NT=ref, kl_estimator="k1", kl_coef=0.1,
                    entropy_NT=torch.tensor([[1.0, 0.5]], dtype=torch.float64), entropy_coef=0.2)
    assert float(out.loss) == pytest.approx(-2.12, abs=1e-12)
    assert out.kl_NT[0].tolist() == pytest.approx([0.5, 0.1], abs=1e-12)
    assert not out.clip_low_NT.any() and not out.clip_high_NT.any()


def test_hand_derived_clip_and_reductions():
    """Row 1: r = 1.5 on both tokens, A = +1: PPO clips at 1 + 0.28, ℓ = −1.28 per token, both flagged high.
    Row 2: one token, r = 0.5 < 1 − 0.2, A = −1: ℓ = −min(r·A, clip(r)·A) = −min(−0.5, −0.8) = 0.8, flagged low
    (its second position is masked). token_mean over 3 tokens: (−2.56 + 0.8) / 3; seq_mean_token_mean over 2 rows:
    (−1.28 + 0.8) / 2; seq_mean_token_sum_norm with t_max 4: (−2.56 + 0.8) / (2·4); seq_mean_token_sum:
    (−2.56 + 0.8) / 2."""
    old = torch.log(torch.tensor([[0.2, 0.2], [0.2, 0.2]], dtype=torch.float64))
    logp = old + torch.log(torch.tensor([[1.5, 1.5], [0.5, 9.0]], dtype=torch.float64))
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    want = {"token_mean": (-2.56 + 0.8) / 3, "seq_mean_token_mean": (-1.28 + 0.8) / 2,
            "seq_mean_token_sum_norm": (-2.56 + 0.8) / 8, "seq_mean_token_sum": (-2.56 + 0.8) / 2}
    for reduction, value in want.items():
        out = grpo_loss(logp, old, adv, mask, total_tokens=3, total_seqs=2, reduction=reduction, t_max=4)
        assert float(out.loss) == pytest.approx(value, abs=1e-12), reduction
    assert out.clip_high_NT.tolist() == [[True, True], [False, False]]
    assert out.clip_low_NT.tolist() == [[False, False], [True, False]]  # the masked token is never flagged


def _naive(logp, old, adv, mask, ref, H, *, objective, eps_low, eps_high, kl, beta, c, reduction, tokens, seqs,
           t_max):
    """The same loss by Python loops over rows and tokens, in Python floats, from the papers' formulas."""
    N, T = logp.shape
    logp, old, adv, mask, ref, H = (t.tolist() for t in (logp, old, adv, mask, ref, H))
    total = 0.0
    for i in range(N):
        idx = [t for t in range(T) if mask[i][t]]
        seq_ratio = math.exp(sum(logp[i][t] - old[i][t] for t in idx) / max(len(idx), 1))
        for t in idx:
            r = seq_ratio if objective == "gspo" else math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            obj = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            d = ref[i][t] - logp[i][t]
            k = -d if kl == "k1" else math.exp(d) - d - 1
            loss = obj + beta * k - c * H[i][t]
            w = {"token_mean": 1 / tokens, "seq_mean_token_mean": 1 / (len(idx) * seqs),
                 "seq_mean_token_sum_norm": 1 / (seqs * t_max), "seq_mean_token_sum": 1 / seqs}[reduction]
            total += w * loss
    return total


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm",
                                       "seq_mean_token_sum"])
@pytest.mark.parametrize("kl", ["k1", "k3"])
def test_equals_a_float64_naive_loop(objective, reduction, kl):
    g = torch.Generator().manual_seed(0)
    N, T = 6, 9
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(N, T, generator=g, dtype=torch.float64)  # ratios away from 1: clipping active
    ref = logp + 0.2 * torch.randn(N, T, generator=g, dtype=torch.float64)
    H = torch.rand(N, T, generator=g, dtype=torch.float64)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lens = torch.tensor([1, 9, 3, 5, 2, 7])
    mask = torch.arange(T)[None] < lens[:, None]
    eps = (0.2, 0.28) if objective == "ppo_clip" else (0.05, 0.08)
    kw = dict(objective=objective, eps_low=eps[0], eps_high=eps[1], kl=kl, beta=0.07, c=0.03, reduction=reduction,
              tokens=int(mask.sum()), seqs=N, t_max=T)
    out = grpo_loss(logp, old, adv, mask, total_tokens=kw["tokens"], total_seqs=N, objective=objective,
                    eps_low=eps[0], eps_high=eps[1], ref_logp_NT=ref, kl_estimator=kl, kl_coef=0.07, entropy_NT=H,
                    entropy_coef=0.03, reduction=reduction, t_max=T)
    assert float(out.loss) == pytest.approx(_naive(logp, old, adv, mask, ref, H, **kw), rel=1e-12, abs=1e-14)


def test_gradient_flows_to_the_policy_and_only_through_the_terms_in_the_loss():
    """∂L reaches log π at masked, unclipped positions only (masked positions get exactly 0 even where the other
    inputs are garbage: inf, NaN); H only under an entropy bonus; the reference only under a KL in the loss (a KL in
    the reward computes the estimate for the metrics and leaves the loss alone)."""
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    base = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    old = torch.where(mask, base - 0.05, torch.full_like(base, float("inf")))
    old[2, 1] = base[2, 1] - 1.0  # r = e ≈ 2.7 with A > 0: clipped high, no gradient
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def grads(kl_coef, entropy_coef):
        logp, H = base.clone().requires_grad_(), torch.rand(3, 4, generator=g, dtype=torch.float64).requires_grad_()
        ref = torch.where(mask, base + 0.1, torch.full_like(base, float("nan"))).requires_grad_()
        out = grpo_loss(logp, old, adv, mask, total_tokens=6, total_seqs=3, ref_logp_NT=ref, kl_coef=kl_coef,
                        entropy_NT=H, entropy_coef=entropy_coef)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(out.kl_NT[mask]).all()
        return logp.grad, H.grad, ref.grad

    d_logp, d_H, d_ref = grads(0.1, 0.01)
    assert (d_logp[~mask] == 0).all() and torch.isfinite(d_logp).all()
    assert (d_H[mask] != 0).all() and (d_H[~mask] == 0).all()
    assert (d_ref[mask] != 0).all() and (d_ref[~mask] == 0).all()
    d_logp, d_H, d_ref = grads(0.0, 0.0)
    assert d_H is None and d_ref is None  # neither term is in the loss
    live = mask.clone()
    live[2, 1] = False
    assert float(d_logp[2, 1]) == 0.0 and (d_logp[live] != 0).all()
    assert (d_logp[~mask] == 0).all()


def test_zero_advantage_rows_contribute_exactly_zero_unless_a_term_reaches_them():
    logp = torch.log(torch.tensor([[0.3, 0.6]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(1, 2, dtype=torch.bool)
    old = logp.detach() + 0.4
    out = grpo_loss(logp, old, torch.zeros(1, dtype=torch.float64), mask, total_tokens=2, total_seqs=1,
                    dual_clip=3.0)
    out.loss.backward()
    assert float(out.loss) == 0.0 and (logp.grad == 0).all()
    assert zero_advantage_rows_vanish(objective="ppo_clip", kl_coef=0.0, entropy_coef=0.0)
    assert not zero_advantage_rows_vanish(objective="ppo_clip", kl_coef=0.1, entropy_coef=0.0)
    assert not zero_advantage_rows_vanish(objective="gspo", kl_coef=0.0, entropy_coef=0.01)
