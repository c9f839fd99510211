"""Token log-probs and entropies: hand-derived values and gradients, naive loop, stability."""

import math

import pytest
import torch

from forkrl.algos.logprobs import entropy_from_logits, token_logprobs

F64 = torch.float64
LN3 = math.log(3)
# softmax([0, ln 3]) = [1/4, 3/4]: log p = [ln 1/4, ln 3/4] = [−1.3862943611198906, −0.2876820724517809]
# H = ¼·ln 4 + ¾·ln(4/3) = 0.5623351446188083
# ∂H/∂z_k = −p_k (log p_k + H) = [0.20598980412527057, −0.20598980412527057]
H_QUARTER = 0.5623351446188083


def t(values):
    return torch.tensor(values, dtype=F64)


@pytest.mark.parametrize("logits, temperature", [([0.0, LN3], 1.0), ([0.0, 2 * LN3], 2.0), ([1e4, 1e4 + LN3], 1.0)])
def test_token_logprobs_hand_derived(logits, temperature):
    z = t([[logits, logits]]).requires_grad_()  # [N=1, T=2, V=2], targets 1 then 0
    logp = token_logprobs(z, torch.tensor([[1, 0]]), temperature=temperature)
    torch.testing.assert_close(logp, t([[-0.2876820724517809, -1.3862943611198906]]), rtol=1e-9, atol=1e-9)
    logp[0, 0].backward()  # ∂ log p_1 / ∂z = (onehot(1) − p) / τ
    torch.testing.assert_close(z.grad, t([[[-0.25, 0.25], [0.0, 0.0]]]) / temperature, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("logits, temperature", [([0.0, LN3], 1.0), ([0.0, 2 * LN3], 2.0), ([1e4, 1e4 + LN3], 1.0)])
def test_entropy_hand_derived(logits, temperature):
    z = t([[logits]]).requires_grad_()
    H = entropy_from_logits(z, temperature=temperature)
    torch.testing.assert_close(H, t([[H_QUARTER]]), rtol=1e-9, atol=1e-9)
    H.sum().backward()
    torch.testing.assert_close(z.grad, t([[[0.20598980412527057, -0.20598980412527057]]]) / temperature, rtol=1e-9, atol=1e-9)
    assert entropy_from_logits(torch.zeros(1, 1, 4, dtype=F64)).item() == pytest.approx(math.log(4), rel=1e-14)


def test_masked_vocab_entries_give_no_nan():
    z = t([[[0.0, LN3, -math.inf]]]).requires_grad_()
    H = entropy_from_logits(z)
    H.sum().backward()
    torch.testing.assert_close(H, t([[H_QUARTER]]), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(z.grad).all() and z.grad[0, 0, 2] == 0
    assert token_logprobs(z, torch.tensor([[1]])).item() == pytest.approx(-0.2876820724517809, rel=1e-12)


def naive(logits, targets, temperature):
    logp, ent = [], []
    for row_z, row_y in zip(logits, targets):
        logp.append([])
        ent.append([])
        for z, y in zip(row_z, row_y):
            z = [v / temperature for v in z]
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            logp[-1].append(z[y] - lse)
            ent[-1].append(-sum(math.exp(v - lse) * (v - lse) for v in z))
    return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_naive_loop(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(3, 4, 11, generator=gen, dtype=F64)
    targets = torch.randint(11, (3, 4), generator=gen)
    exp_logp, exp_ent = naive(logits.tolist(), targets.tolist(), temperature)
    torch.testing.assert_close(token_logprobs(logits, targets, temperature=temperature), t(exp_logp), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy_from_logits(logits, temperature=temperature), t(exp_ent), rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, generator=gen, dtype=F64, requires_grad=True)
    y = torch.randint(5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, y, temperature=0.7), (z,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, temperature=0.7), (z,))


def test_bad_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)
