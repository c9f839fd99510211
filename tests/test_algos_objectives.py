"""Per-token objectives: hand-derived values and gradients, naive-loop references, invariances."""

import math

import pytest
import torch

from forkrl.algos.objectives import OBJECTIVES, get_objective, gspo, ppo_clip

F64 = torch.float64
INF = float("inf")
CLIP = dict(eps_low=0.2, eps_high=0.28)


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# ---- ppo_clip, hand-derived. old_logp = 0 and logp = log r, so the ratio is r.
# Each row has one real token and one padded token whose garbage would overflow exp() if it leaked.
#  row  A   r    r·A   clip(r,.8,1.28)·A  loss = −min        clipped?   ∂loss/∂logp = −A·r if unclipped
#   0  +1  1.5   1.5   1.28               −1.28              high       0
#   1  +1  0.5   0.5   0.8                −0.5               —          −0.5
#   2  −1  0.5  −0.5  −0.8                 0.8               low        0
#   3  −1  1.5  −1.5  −1.28                1.5               —          1.5
#   4  −1  5    −5    −1.28                5 (dual c=3: 3)   —          5 (dual: 0, capped)
#   5  −2  2    −4    −2.56                4 (dual: min(4,6)) —         4
#   6   0  1.5   0     0                   0                 —          0
ADV = [1.0, 1.0, -1.0, -1.0, -1.0, -2.0, 0.0]
RATIO = [1.5, 0.5, 0.5, 1.5, 5.0, 2.0, 1.5]


def hand_inputs():
    logp = torch.stack([t([math.log(r) for r in RATIO]), torch.full((7,), 1e4, dtype=F64)], dim=1).requires_grad_()
    old = torch.stack([torch.zeros(7, dtype=F64), torch.full((7,), -1e4, dtype=F64)], dim=1)
    mask = torch.zeros(7, 2, dtype=torch.bool)
    mask[:, 0] = True
    return logp, old, t(ADV), mask


@pytest.mark.parametrize(
    "dual_clip, loss0, grad0",
    [
        (None, [-1.28, -0.5, 0.8, 1.5, 5.0, 4.0, 0.0], [0.0, -0.5, 0.0, 1.5, 5.0, 4.0, 0.0]),
        (3.0, [-1.28, -0.5, 0.8, 1.5, 3.0, 4.0, 0.0], [0.0, -0.5, 0.0, 1.5, 0.0, 4.0, 0.0]),
    ],
)
def test_ppo_clip_hand_derived(dual_clip, loss0, grad0):
    logp, old, adv, mask = hand_inputs()
    loss, low, high = ppo_clip(logp, old, adv, mask, **CLIP, dual_clip=dual_clip)
    loss.sum().backward()
    torch.testing.assert_close(loss[:, 0], t(loss0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad[:, 0], t(grad0), rtol=1e-12, atol=1e-12)
    assert (loss[:, 1] == 0).all() and (logp.grad[:, 1] == 0).all()
    assert low[:, 0].tolist() == [False, False, True, False, False, False, False]
    assert high[:, 0].tolist() == [True, False, False, False, False, False, False]
    assert not low[:, 1].any() and not high[:, 1].any()


def test_ppo_infinite_eps_is_vanilla_policy_gradient():
    # loss = −r·A: [−1.5, −0.5, 0.5, 1.5, 5, 4, 0]; gradient −A·r takes the same values.
    logp, old, adv, mask = hand_inputs()
    loss, low, high = ppo_clip(logp, old, adv, mask, eps_low=INF, eps_high=INF, dual_clip=None)
    loss.sum().backward()
    expected = t([-1.5, -0.5, 0.5, 1.5, 5.0, 4.0, 0.0])
    torch.testing.assert_close(loss[:, 0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad[:, 0], expected, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert not low.any() and not high.any()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_on_policy_gradient_is_policy_gradient(name):
    # At μ = 1 (old_logp = logp.detach()) r = 1, no clip is active and ∇ℓ_t = −A·∇logp_t for ppo_clip;
    # for GSPO ∇ℓ_i = −A·∇(mean_t logp_t), which with per-row weights 1/L_i is the same sum.
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 6, 5, generator=gen, dtype=F64, requires_grad=True)
    targets = torch.randint(5, (4, 6), generator=gen)
    mask = torch.arange(6)[None, :] < t([1, 6, 3, 0]).long()[:, None]
    adv = t([1.5, -0.5, -2.0, 0.7])
    row_w = t([1.0, 1 / 6, 1 / 3, 0.0])[:, None]  # seq_mean_token_mean weights (times N)

    def logp_of(th):
        return torch.log_softmax(th, dim=-1).gather(-1, targets[..., None]).squeeze(-1)

    logp = logp_of(theta)
    loss, low, high = OBJECTIVES[name](logp, logp.detach(), adv, mask, **CLIP, dual_clip=3.0)
    (grad,) = torch.autograd.grad((loss * row_w).sum(), theta, retain_graph=True)
    (expected,) = torch.autograd.grad((-adv[:, None] * logp * mask * row_w).sum(), theta)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert not low.any() and not high.any()


def naive_ppo(logp, old, adv, mask, eps_low, eps_high, dual):
    """Loop reference: loss, flags and the hand-derived ∂loss/∂logp of each token."""
    n, T = len(logp), len(logp[0])
    loss = [[0.0] * T for _ in range(n)]
    grad = [[0.0] * T for _ in range(n)]
    low = [[False] * T for _ in range(n)]
    high = [[False] * T for _ in range(n)]
    for i in range(n):
        for j in range(T):
            if not mask[i][j]:
                continue
            r, a = math.exp(logp[i][j] - old[i][j]), adv[i]
            loss[i][j], grad[i][j], low[i][j], high[i][j] = naive_token(r, a, eps_low, eps_high, dual)
    return loss, grad, low, high


def naive_token(r, a, eps_low, eps_high, dual):
    """(loss, ∂loss/∂log r, clipped_low, clipped_high) for one ratio r and advantage a."""
    if a > 0 and r > 1 + eps_high:
        return -(1 + eps_high) * a, 0.0, False, True
    if a < 0 and r < 1 - eps_low:
        return -(1 - eps_low) * a, 0.0, True, False
    if a < 0 and dual is not None and -r * a > -dual * a:
        return -dual * a, 0.0, False, False
    return -r * a, -r * a, False, False


def random_batch(seed, n=12, T=50):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.cat([t([1, 50]).long(), torch.randint(1, T + 1, (n - 2,), generator=gen)])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -3 * torch.rand(n, T, generator=gen, dtype=F64)
    logp = old + 3 * (torch.rand(n, T, generator=gen, dtype=F64) - 0.5)  # ratios in [0.22, 4.5]
    logp = torch.where(mask, logp, 1e4)  # padding garbage
    adv = torch.randn(n, generator=gen, dtype=F64)
    return logp.requires_grad_(), old, adv, mask


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("eps", [(0.2, 0.28), (INF, INF)])
def test_ppo_clip_matches_naive_loop(dual_clip, eps):
    logp, old, adv, mask = random_batch(1)
    loss, low, high = ppo_clip(logp, old, adv, mask, eps_low=eps[0], eps_high=eps[1], dual_clip=dual_clip)
    loss.sum().backward()
    ref = naive_ppo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), *eps, dual_clip)
    torch.testing.assert_close(loss, t(ref[0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad, t(ref[1]), rtol=1e-12, atol=1e-12)
    assert low.tolist() == ref[2] and high.tolist() == ref[3]
    if eps[0] != INF:
        assert low.any() and high.any()  # the random ratios really exercise both clips


# ---- gspo, hand-derived. Gradients of Σ_i mean_t ℓ_it, so each token's gradient is ∂ℓ_i/∂logp_t.
#  row  log r_t (masked)      A   s_i                 ℓ_i                         ∂ℓ_i/∂logp_t = −A·s/L
#   0   [ln 4, 0]  (+garbage) +1  exp(ln4/2) = 2      −1.28 (clipped high)        0
#   1   [.3, −.3, 0]          −2  1                   2                           2/3
#   2   [ln 1.21, 0] (+garb.) +1  1.1                 −1.1                        −0.55
#   3   none                  +5  1                   0                           0
def test_gspo_hand_derived():
    logp = t([[math.log(4), 0.0, 1e4], [0.3, -0.3, 0.0], [math.log(1.21), 0.0, 1e4], [1e4, 1e4, 1e4]]).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    loss, low, high = gspo(logp, torch.zeros(4, 3, dtype=F64), t([1.0, -2.0, 1.0, 5.0]), mask, **CLIP, dual_clip=3.0)
    (loss.sum(dim=1) / t([2, 3, 2, 1])).sum().backward()
    exp_loss = t([[-1.28, -1.28, 0.0], [2.0, 2.0, 2.0], [-1.1, -1.1, 0.0], [0.0, 0.0, 0.0]])
    exp_grad = t([[0.0, 0.0, 0.0], [2 / 3, 2 / 3, 2 / 3], [-0.55, -0.55, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(loss, exp_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad, exp_grad, rtol=1e-12, atol=1e-12)
    assert high.tolist() == [[True, True, False], [False] * 3, [False] * 3, [False] * 3]
    assert not low.any()


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("eps", [(0.2, 0.28), (INF, INF)])
def test_gspo_matches_naive_loop(dual_clip, eps):
    logp, old, adv, mask = random_batch(2, n=40)
    loss, low, high = gspo(logp, old, adv, mask, eps_low=eps[0], eps_high=eps[1], dual_clip=dual_clip)
    lengths = mask.sum(dim=1)
    (loss.sum(dim=1) / lengths).sum().backward()
    exp_loss, exp_grad = torch.zeros_like(loss), torch.zeros_like(loss)
    exp_low, exp_high = torch.zeros_like(mask), torch.zeros_like(mask)
    for i in range(len(adv)):
        L = int(lengths[i])
        log_s = sum(logp[i, j].item() - old[i, j].item() for j in range(L)) / L
        value, d_log_s, lo, hi = naive_token(math.exp(log_s), adv[i].item(), *eps, dual_clip)
        exp_loss[i, :L], exp_grad[i, :L] = value, d_log_s / L  # ∂ log s / ∂ logp_t = 1/L
        exp_low[i, :L], exp_high[i, :L] = lo, hi
    torch.testing.assert_close(loss, exp_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logp.grad, exp_grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(low, exp_low) and torch.equal(high, exp_high)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_masked_positions_zero_loss_zero_grad_no_nan(name):
    logp, old, adv, mask = random_batch(3)
    for eps in [0.2, INF]:
        logp.grad = None
        loss, low, high = OBJECTIVES[name](logp, old, adv, mask, eps_low=eps, eps_high=eps, dual_clip=3.0)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
        assert (loss[~mask] == 0).all() and (logp.grad[~mask] == 0).all()
        assert not (low | high)[~mask].any()
        assert (logp.grad[mask] != 0).any()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_permuted_rows_give_permuted_outputs(name):
    logp, old, adv, mask = random_batch(4)
    perm = torch.randperm(len(adv), generator=torch.Generator().manual_seed(0))
    out = OBJECTIVES[name](logp, old, adv, mask, **CLIP, dual_clip=3.0)
    out_perm = OBJECTIVES[name](logp[perm], old[perm], adv[perm], mask[perm], **CLIP, dual_clip=3.0)
    for a, b in zip(out, out_perm):
        torch.testing.assert_close(b, a[perm], rtol=1e-12, atol=1e-12)


def test_bad_dual_clip_and_unknown_name_raise():
    logp, old, adv, mask = hand_inputs()
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip(logp, old, adv, mask, **CLIP, dual_clip=0.5)
    with pytest.raises(ValueError, match="gspo.*ppo_clip"):
        get_objective("reinforce")
