"""Zero-variance group filter and group statistics: hand case, naive loop, invariances."""

import math

import pytest
import torch

from forkrl.algos.filters import FILTERS, get_filter, group_stats, zero_variance_groups

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
    with pytest.raises(ValueError, match="zero_variance_groups"):
        get_filter("snr")
