"""Advantage estimators: hand-derived cases, a naive-loop reference, gradients and invariances."""

import math

import pytest
import torch

from forkrl.algos.advantages import ADVANTAGES, get_advantage

F64 = torch.float64
NAN = float("nan")


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def naive(reward, group, valid, kind, eps):
    """Loop reference written from the papers' definitions, not from the implementation."""
    n = len(reward)
    out = [0.0] * n
    all_valid = [reward[i] for i in range(n) if valid[i]]
    if len(all_valid) > 1:
        bmean = sum(all_valid) / len(all_valid)
        bstd = math.sqrt(sum((x - bmean) ** 2 for x in all_valid) / (len(all_valid) - 1))
    for g in set(group):
        rows = [i for i in range(n) if group[i] == g and valid[i]]
        vals = [reward[i] for i in rows]
        if len(vals) < 2 or max(vals) == min(vals):
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (len(vals) - 1))
        for i in rows:
            if kind == "grpo":
                out[i] = (reward[i] - mean) / (std + eps)
            elif kind == "grpo_batch_std":
                out[i] = (reward[i] - mean) / (bstd + eps)
            elif kind == "dr_grpo":
                out[i] = reward[i] - mean
            elif kind == "rloo":
                others = [reward[j] for j in rows if j != i]
                out[i] = reward[i] - sum(others) / len(others)
    return out


# Group id 7 holds rewards [1, 0, 0, 0] (rows deliberately interleaved with group -3 = [2, 0, 1]).
REWARD = [1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0]
GROUP = [7, -3, 7, -3, 7, -3, 7]


def test_grpo_hand_derived():
    # group 7: mean 0.25, deviations [.75, -.25, -.25, -.25], Σdev² = .75, var = .75/3 = .25, std .5
    #   -> A = [1.5, -0.5, -0.5, -0.5]
    # group -3: [2, 0, 1], mean 1, var (1+1+0)/2 = 1 -> A = [1, -1, 0]
    adv = get_advantage("grpo")(t(REWARD), torch.tensor(GROUP), torch.ones(7, dtype=torch.bool), eps=0.0)
    torch.testing.assert_close(adv, t([1.5, 1.0, -0.5, -1.0, -0.5, 0.0, -0.5]), rtol=1e-14, atol=1e-14)
    # with eps 1e-4 the group-7 winner gets .75 / .5001
    adv = get_advantage("grpo")(t(REWARD), torch.tensor(GROUP), torch.ones(7, dtype=torch.bool))
    assert adv[0].item() == pytest.approx(1.4997000599880024, rel=1e-12)


def test_dr_grpo_and_rloo_hand_derived():
    valid = torch.ones(7, dtype=torch.bool)
    # Dr.GRPO: R - mean. group 7: [.75, -.25, -.25, -.25]; group -3: [1, -1, 0]
    adv = get_advantage("dr_grpo")(t(REWARD), torch.tensor(GROUP), valid)
    torch.testing.assert_close(adv, t([0.75, 1.0, -0.25, -1.0, -0.25, 0.0, -0.25]), rtol=1e-14, atol=1e-14)
    # RLOO: R_i - mean(others). group 7: 1 - 0 = 1, 0 - 1/3; group -3: 2 - .5 = 1.5, 0 - 1.5, 1 - 1 = 0
    adv = get_advantage("rloo")(t(REWARD), torch.tensor(GROUP), valid)
    torch.testing.assert_close(adv, t([1.0, 1.5, -1 / 3, -1.5, -1 / 3, 0.0, -1 / 3]), rtol=1e-14, atol=1e-14)


def test_grpo_batch_std_hand_derived():
    # group 0 = [4, 0], group 1 = [0, 0] (flat). Batch [4, 0, 0, 0]: mean 1, Σdev² = 9+1+1+1 = 12,
    # var 12/3 = 4, std 2. Group 0 centred: [2, -2] -> [1, -1]; group 1 -> 0. A NaN invalid row changes nothing.
    reward, group = t([4.0, 0.0, 0.0, 0.0, NAN]), torch.tensor([0, 0, 1, 1, 0])
    valid = torch.tensor([True, True, True, True, False])
    adv = get_advantage("grpo_batch_std")(reward, group, valid, eps=0.0)
    torch.testing.assert_close(adv, t([1.0, -1.0, 0.0, 0.0, 0.0]), rtol=1e-14, atol=1e-14)
    # per-group std would differ (std of [4, 0] is 2·sqrt(2)): the batch option is really different
    adv_group = get_advantage("grpo")(reward, group, valid, eps=0.0)
    assert adv_group[0].item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@pytest.mark.parametrize("binary", [True, False])
def test_matches_naive_loop(name, binary):
    gen = torch.Generator().manual_seed(hash((name, binary)) % 2**31)
    n = 60
    reward = (torch.rand(n, generator=gen, dtype=F64) < 0.4).to(F64) if binary else torch.randn(n, generator=gen, dtype=F64)
    ids = torch.tensor([-5, 3, 10, 100, 2**40, 0, 8])
    group = ids[torch.randint(len(ids), (n,), generator=gen)]
    valid = torch.rand(n, generator=gen) > 0.2
    reward = torch.where(valid, reward, NAN)
    adv = ADVANTAGES[name](reward, group, valid, eps=1e-4)
    expected = naive(reward.tolist(), group.tolist(), valid.tolist(), name, 1e-4)
    torch.testing.assert_close(adv, t(expected), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_degenerate_groups_are_exactly_zero(name):
    # 0.1 * 3 / 3 != 0.1 in float64: the mean differs from the rewards, so only an exact max == min test
    # gives 0. Group 1 is a singleton; group 2 has one valid row left; group 3 is all invalid.
    reward = t([0.1, 0.1, 0.1, 0.7, 5.0, NAN, NAN, NAN, 1.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 4, 4])
    valid = torch.tensor([True, True, True, True, True, False, False, False, True, True])
    adv = ADVANTAGES[name](reward, group, valid)
    assert (adv[:8] == 0).all()
    assert (adv[8:] != 0).all()  # the one informative group still gets a signal


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_invalid_row_nan_does_not_leak(name):
    group = torch.tensor([0, 0, 0, 0])
    valid = torch.tensor([True, False, True, True])
    with_nan = ADVANTAGES[name](t([1.0, NAN, 0.0, 1.0]), group, valid)
    with_big = ADVANTAGES[name](t([1.0, 1e9, 0.0, 1.0]), group, valid)
    assert with_nan[1] == 0 and torch.isfinite(with_nan).all()
    torch.testing.assert_close(with_nan, with_big, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_permuted_rows_give_permuted_advantages(name):
    gen = torch.Generator().manual_seed(3)
    reward = (torch.rand(32, generator=gen, dtype=F64) < 0.5).to(F64)
    group = torch.arange(32) // 4 * 11
    valid = torch.rand(32, generator=gen) > 0.1
    perm = torch.randperm(32, generator=gen)
    adv = ADVANTAGES[name](reward, group, valid)
    adv_perm = ADVANTAGES[name](reward[perm], group[perm], valid[perm])
    torch.testing.assert_close(adv_perm, adv[perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_gradient_never_reaches_invalid_or_flat_rows(name):
    reward = t([1.0, NAN, 0.0, 0.5, 2.0, 2.0]).requires_grad_()
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    valid = torch.tensor([True, False, True, True, True, True])
    weight = t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (ADVANTAGES[name](reward, group, valid) * weight).sum().backward()
    assert torch.isfinite(reward.grad).all()
    assert reward.grad[1] == 0
    assert (reward.grad[[0, 2, 3]] != 0).any()
    if name != "grpo_batch_std":  # with the batch std, the flat group's rows rightly enter the scale
        assert (reward.grad[4:] == 0).all()


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@pytest.mark.parametrize("values", [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
def test_all_flat_batch_has_finite_zero_gradient(name, values):
    reward = t(values).requires_grad_()
    adv = ADVANTAGES[name](reward, torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.bool))
    (adv * t([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert (adv == 0).all() and torch.isfinite(reward.grad).all()


def test_dr_grpo_gradient_hand_derived():
    # L = Σ_i c_i (R_i − mean R) -> ∂L/∂R_j = c_j − mean(c) over the group's valid rows.
    # valid rows 0, 2, 3 with c = [1, 3, 5]: mean 3 -> grads [-2, 0, 2]; invalid row 1 gets 0.
    reward = t([1.0, NAN, 0.0, 0.5]).requires_grad_()
    valid = torch.tensor([True, False, True, True])
    (get_advantage("dr_grpo")(reward, torch.zeros(4, dtype=torch.long), valid) * t([1.0, 7.0, 3.0, 5.0])).sum().backward()
    torch.testing.assert_close(reward.grad, t([-2.0, 0.0, 0.0, 2.0]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["grpo", "grpo_batch_std", "rloo"])
def test_gradient_matches_finite_differences(name):
    group = torch.tensor([4, 4, 4, 9, 9, 9])
    valid = torch.ones(6, dtype=torch.bool)
    reward = t([0.3, -1.2, 2.0, 0.5, 0.9, -0.4]).requires_grad_()
    assert torch.autograd.gradcheck(lambda r: ADVANTAGES[name](r, group, valid), (reward,), eps=1e-6, atol=1e-7)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="dr_grpo.*grpo.*grpo_batch_std.*rloo"):
        get_advantage("ppo")
