"""Group filters (zero variance; RAGEN-2's reward-std top-p) and group statistics: hand cases, naive loops,\ninvariances."""

import math

import pytest
import torch

from forkrl.algos.filters import FILTERS, get_filter, group_stats, snr, top_p_groups, zero_variance_groups

F64 = torch.float64
NAN = float("nan")


def test_hand_derived():
    # group 10: [1, 0]             -> informative, kept
    # group -4: [1, 1]             -> all equal, dropped
    # group 99: [0.5]              -> singleton, dropped
    # group 3:  [1, NaN*, 1]       -> valid rewards all equal, dropped (* invalid)
    # group 8:  [1, NaN*, 0]       -> kept, its invalid row included (the decision is per group)
    # group 5:  [NaN*, 1]          -> one valid row, dropped
    reward = torch.tensor([1, 0, 1, 1, 0.5, 1, NAN, 1, 1, NAN, 0, NAN, 1], dtype=F64)
    group = torch.tensor([10, 10, -4, -4, 99, 3, 3, 3, 8, 8, 8, 5, 5])
    valid = ~torch.isnan(reward)
    keep = zero_variance_groups(reward, group, valid)
    assert keep.tolist() == [True, True, False, False, False, False, False, False, True, True, True, False, False]
    # group 8 statistics over its valid rows [1, 0]: mean .5, unbiased std sqrt(.5) = 0.7071067811865476
    s = group_stats(reward, group, valid)
    assert s.count_N[8].item() == 2 and s.mean_N[8].item() == 0.5
    assert s.std_N[8].item() == pytest.approx(0.7071067811865476, rel=1e-14)
    assert s.centered_N.tolist()[8:11] == [0.5, 0.0, -0.5]
    assert torch.isfinite(s.mean_N).all() and torch.isfinite(s.std_N).all()


def naive(reward, group, valid):
    keep = []
    for i in range(len(reward)):
        vals = [reward[j] for j in range(len(reward)) if group[j] == group[i] and valid[j]]
        keep.append(len(vals) >= 2 and max(vals) != min(vals))
    return keep


@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_loop_on_binary_rewards(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 48
    reward = (torch.rand(n, generator=gen) < 0.5).to(F64)
    group = torch.randint(-3, 9, (n,), generator=gen) * 1000
    valid = torch.rand(n, generator=gen) > 0.25
    reward = torch.where(valid, reward, NAN)
    keep = zero_variance_groups(reward, group, valid)
    expected = naive(reward.tolist(), group.tolist(), valid.tolist())
    assert keep.tolist() == expected
    assert 0 < sum(expected) < n  # the data exercises both outcomes


def test_group_stats_match_naive_loop():
    gen = torch.Generator().manual_seed(7)
    reward = torch.randn(30, generator=gen, dtype=F64)
    group = torch.randint(5, (30,), generator=gen)
    valid = torch.rand(30, generator=gen) > 0.2
    s = group_stats(torch.where(valid, reward, NAN), group, valid)
    for i in range(30):
        vals = [reward[j].item() for j in range(30) if group[j] == group[i] and valid[j]]
        mean = sum(vals) / len(vals) if vals else 0.0
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        assert s.count_N[i].item() == len(vals)
        assert s.mean_N[i].item() == pytest.approx(mean, rel=1e-12, abs=1e-14)
        assert s.std_N[i].item() == pytest.approx(std, rel=1e-12, abs=1e-14)


def test_permuted_rows_give_permuted_keep():
    gen = torch.Generator().manual_seed(1)
    reward = (torch.rand(40, generator=gen) < 0.5).to(F64)
    group = torch.arange(40) // 5
    valid = torch.ones(40, dtype=torch.bool)
    perm = torch.randperm(40, generator=gen)
    keep = zero_variance_groups(reward, group, valid)
    assert torch.equal(zero_variance_groups(reward[perm], group[perm], valid[perm]), keep[perm])
    assert keep.any() and not keep.all()


def test_registry_lookup():
    assert FILTERS["zero_variance_groups"] is zero_variance_groups
    assert FILTERS["snr"] is snr
    with pytest.raises(ValueError, match="snr, zero_variance_groups"):
        get_filter("no_such_filter")


# RAGEN-2's reward-variance top-p filter ("snr")


def test_top_p_linear_hand_cases():
    # sorted descending: .5, .4, .1, 0; total 1. A group is kept while the cumulative score before it (0, .5, .9)
    # is below top_p (less 1e-6 relative); the zero group never is.
    score = torch.tensor([0.1, 0.5, 0.0, 0.4], dtype=F64)
    assert top_p_groups(score, top_p=1.0).tolist() == [True, True, False, True]  # every nonzero group
    assert top_p_groups(score, top_p=0.9).tolist() == [False, True, False, True]  # .1's .9 before it reaches .9
    assert top_p_groups(score, top_p=0.5).tolist() == [False, True, False, False]  # .5 reaches .5 alone
    assert top_p_groups(score, top_p=0.56).tolist() == [False, True, False, True]  # .5 < .56: .4 needed too
    assert not top_p_groups(torch.zeros(3, dtype=F64), top_p=0.9).any()  # nothing informative: empty


def test_top_p_softmax_hand_case():
    # softmax over the positive scores .5, .4, .1: e^.5, e^.4, e^.1 over their sum = .3883, .3514, .2603
    score = torch.tensor([0.5, 0.4, 0.1, 0.0], dtype=F64)
    assert top_p_groups(score, top_p=0.45, mode="softmax").tolist() == [True, True, False, False]  # .3883 < .45
    assert top_p_groups(score, top_p=0.45).tolist() == [True, False, False, False]  # linear: .5 >= .45 * 1.0
    assert top_p_groups(score, top_p=0.9, mode="softmax").tolist() == [True, True, True, False]  # .7397 < .9
    assert top_p_groups(score, top_p=0.73, mode="softmax").tolist() == [True, True, False, False]
    assert not top_p_groups(torch.zeros(2, dtype=F64), top_p=0.9, mode="softmax").any()
    with pytest.raises(ValueError, match="linear, softmax"):
        top_p_groups(score, top_p=0.9, mode="cubic")


def test_snr_hand_case():
    # group 7: [1, 0, 1, 0] std sqrt(1/3) = .577; group 2: [1, 0, 0, 0] std .5; group 4: [1, 1, 1, 1] std 0;
    # group 9: [0, 0, 0, 1, NaN*] std .5 (the invalid row left out, kept with its group). Total 1.577; at top_p .5
    # the threshold .789 needs groups 7 and then 2 (the tie with 9 goes to the lower id); at .9, all three.
    reward = torch.tensor([1, 0, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, NAN], dtype=F64)
    group = torch.tensor([7] * 4 + [2] * 4 + [4] * 4 + [9] * 5)
    valid = ~torch.isnan(reward)
    keep = snr(reward, group, valid, top_p=0.5)
    assert keep.tolist() == [True] * 8 + [False] * 9
    keep = snr(reward, group, valid, top_p=0.9)
    assert keep.tolist() == [True] * 8 + [False] * 4 + [True] * 5


def naive_snr(reward, group, valid, top_p):
    """float64 loop: groups by descending std (ties by id), kept until the running sum reaches top_p of the total."""
    stds = {}
    for g in sorted(set(group.tolist())):
        vals = [reward[i].item() for i in range(len(group)) if group[i] == g and valid[i]]
        m = sum(vals) / len(vals) if vals else 0.0
        stds[g] = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    total, run, kept = sum(stds.values()), 0.0, set()
    for g in sorted(stds, key=lambda g: -stds[g]):  # sorted() is stable: ties stay in id order
        if stds[g] == 0 or run >= top_p * total * (1 - 1e-6):
            break
        kept.add(g)
        run += stds[g]
    return [g in kept for g in group.tolist()]


@pytest.mark.parametrize("seed", range(5))
def test_snr_matches_naive_loop_and_top_p_1_is_zero_variance(seed):
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(0, 9, (48,), generator=gen) * 3 - 5  # arbitrary, unsorted ids
    binary = (torch.rand(48, generator=gen) < 0.4).to(F64)
    graded = torch.rand(48, generator=gen, dtype=F64).round(decimals=1)
    valid = torch.rand(48, generator=gen) > 0.1
    for reward in (binary, graded):
        reward = torch.where(valid, reward, NAN)
        for top_p in (0.3, 0.6, 0.9):
            assert snr(reward, group, valid, top_p=top_p).tolist() == naive_snr(reward, group, valid, top_p)
        assert torch.equal(snr(reward, group, valid, top_p=1.0), zero_variance_groups(reward, group, valid))
        perm = torch.randperm(48, generator=gen)
        assert torch.equal(snr(reward[perm], group[perm], valid[perm], top_p=0.6),
                           snr(reward, group, valid, top_p=0.6)[perm])
