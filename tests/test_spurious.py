"""The Spurious Rewards control (arXiv 2506.10947): the random reward (``{name: random}``) and the clip switch
(``grpo.clip``). A hand-derived expected gradient with and without the clip, a float64 enumeration of every reward
draw of a group, and the reward's behaviour on constructed completions."""

import itertools
import math
import random

import pytest
import torch

from forkrl.algos.advantages import get_advantage
from forkrl.algos.loss import grpo_loss
from forkrl.config import RewardCfg, parse_config
from forkrl.rewards import load, score_rollouts
from forkrl.tasks.arithmetic import ArithmeticTask
from forkrl.trainers.grpo import loss_terms
from forkrl.types import Role, Rollouts

from conftest import tiny_cfg_dict

F64 = torch.float64
TASK = ArithmeticTask(digits=2, train_size=50, heldout_size=10)


def terms(clip: bool) -> dict:
    """grpo_loss's arguments as ``grpo.clip`` sets them (symmetric ε = 0.2, the paper's)."""
    cfg = parse_config(tiny_cfg_dict(**{"grpo.clip": clip, "grpo.eps_high": 0.2, "grpo.eps_low": 0.2})).grpo
    return loss_terms(cfg)


def token_grads(ratios, adv, clip: bool):
    """∂L/∂logp of one-token rows with ratio ``ratios`` (old log-prob 0) and advantages ``adv``, L summed over rows."""
    logp = torch.tensor([math.log(r) for r in ratios], dtype=F64)[:, None].requires_grad_()
    out = grpo_loss(logp, torch.zeros_like(logp), torch.tensor(adv, dtype=F64), torch.ones_like(logp, dtype=torch.bool),
                    total_tokens=1, total_seqs=1, **{**terms(clip), "reduction": "seq_mean_token_sum"})
    out.loss.backward()
    return logp.grad[:, 0]


# ---- hand-derived: one token, A = +1 or −1 with probability ½ each (a random reward's advantage, in sign), ε = 0.2.
# ℓ = −min(r·A, clip(r, .8, 1.2)·A); ∂ℓ/∂logp = −A·r where unclipped, 0 where clipped.
#   r     A = +1            A = −1              E over A, clip on    clip off (−A·r, E = 0)
#   1.5   clipped: 0        −min(−1.5,−1.2): 1.5   0.75              0
#   0.5   −0.5              clipped: 0          −0.25                0
#   1.1   −1.1              1.1                  0                    0
RATIOS = [1.5, 0.5, 1.1]


@pytest.mark.parametrize("clip, expected", [(True, [0.75, -0.25, 0.0]), (False, [0.0, 0.0, 0.0])])
def test_expected_gradient_under_a_coin_flip_advantage(clip, expected):
    up, down = token_grads(RATIOS, [1.0] * 3, clip), token_grads(RATIOS, [-1.0] * 3, clip)
    torch.testing.assert_close((up + down) / 2, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
    if not clip:  # the unclipped gradient is −A·r itself, at every ratio
        torch.testing.assert_close(up, -torch.tensor(RATIOS, dtype=F64), rtol=0, atol=1e-12)


def test_config_clip_false_is_infinite_epsilon():
    assert terms(False)["eps_low"] == terms(False)["eps_high"] == math.inf
    assert terms(True)["eps_low"] == terms(True)["eps_high"] == 0.2


# ---- float64, every draw: a group's 2^G Bernoulli(½) reward vectors are equally likely
@pytest.mark.parametrize("G", [2, 4, 5])
def test_every_rows_advantage_has_mean_zero_over_all_reward_draws(G):
    group, valid = torch.zeros(G, dtype=torch.long), torch.ones(G, dtype=torch.bool)
    total = torch.zeros(G, dtype=F64)
    for bits in itertools.product([0.0, 1.0], repeat=G):
        total += get_advantage("grpo")(torch.tensor(bits, dtype=F64), group, valid, eps=1e-4)
    torch.testing.assert_close(total / 2**G, torch.zeros(G, dtype=F64), rtol=0, atol=1e-12)


def test_on_policy_the_expected_gradient_is_zero_and_the_clip_cannot_bind():
    # one group of 4 rows of 3 tokens from a linear "policy"; on-policy (old = logp.detach(), r = 1) the gradient of
    # every draw is the same with the clip on or off, and its mean over all 16 draws is 0 (naive loop over draws)
    torch.manual_seed(0)
    W = torch.randn(5, 3, dtype=F64, requires_grad=True)
    x = torch.randn(4, 3, 5, dtype=F64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    group, valid = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    mean = {True: torch.zeros_like(W), False: torch.zeros_like(W)}
    for bits in itertools.product([0.0, 1.0], repeat=4):
        adv = get_advantage("grpo")(torch.tensor(bits, dtype=F64), group, valid, eps=1e-4)
        grads = {}
        for clip in (True, False):
            logp = torch.log_softmax(x @ W, -1)[..., 0]
            out = grpo_loss(logp, logp.detach(), adv, mask, total_tokens=12, total_seqs=4, **terms(clip))
            (grads[clip],) = torch.autograd.grad(out.loss, W)
            mean[clip] += grads[clip] / 16
        torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=1e-15)
    torch.testing.assert_close(mean[True], torch.zeros_like(W), rtol=0, atol=1e-12)


# ---- the reward on constructed completions
def score(texts, seeds):
    N = len(texts)
    group = torch.arange(N) // 2
    role = torch.full((N, 4), int(Role.COMPLETION), dtype=torch.int8)
    r = Rollouts(input_ids_NL=torch.zeros(N, 4, dtype=torch.long), role_NL=role, sampler_logp_NL=torch.zeros(N, 4),
                 group_N=group, problem_N=group % 20, truncated_N=torch.zeros(N, dtype=torch.bool))
    loaded = load([RewardCfg(name="random")], TASK, where="grpo.rewards", timeout_s=5.0)
    scored, failures = score_rollouts(r, texts, TASK.problems("train"), TASK, loaded, seeds=seeds)
    assert failures.count == 0
    return scored.reward_N.tolist()


def test_the_random_reward_is_the_rows_coin_and_ignores_the_completion():
    seeds = list(range(40))
    right = [f"direct ans {p.answer}" for p in TASK.problems("train")[:20] for _ in range(2)]
    wrong = ["guess ans 0", "no answer at all"] * 20
    got = score(right, seeds)
    assert got == score(wrong, seeds)  # the same rows' coins whatever they say
    assert got == [float(random.Random(s).random() < 0.5) for s in seeds]  # naive: the row generator's first draw
    draws = score(["x"] * 4000, list(range(10_000, 14_000)))
    share = sum(draws) / len(draws)
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / 4000), share  # Bernoulli(½) within 4 standard errors
