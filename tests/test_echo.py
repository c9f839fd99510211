"""ECHO's environment-token loss (arXiv 2605.24517, METHODS §8): the hand case, a float64 loop, and the masks: the
policy loss never reads an observation token, ECHO's term does, and its denominator is the step's."""

import pytest
import torch

from forkrl.algos.loss import echo_loss
from forkrl.check import synthetic_batch
from forkrl.config import parse_config
from forkrl.forward import ModelForward
from forkrl.models import load_model
from forkrl.trainers.grpo import Echo, policy_update
from forkrl.types import Role, Rollouts

from conftest import tiny_cfg_dict


def test_hand_case():
    logp = torch.tensor([[-1.0, -0.5, -3.0]])
    env = torch.tensor([[True, False, True]])
    assert float(echo_loss(logp, env, total_env_tokens=4)) == pytest.approx(1.0)  # (1 + 3) / 4


def test_against_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, 9, generator=g, dtype=torch.float64) * 4
    env = torch.rand(5, 9, generator=g) < 0.4
    want = 0.0
    for i in range(5):
        for t in range(9):
            if env[i, t]:
                want += -float(logp[i, t])
    want /= 37
    assert float(echo_loss(logp, env, total_env_tokens=37)) == pytest.approx(want, rel=1e-12)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float64)


def step(model, batch: Rollouts, coef: float):
    """(loss, gradient) of one GRPO step with ECHO at ``coef`` on ``batch``, split in micro-batches of 2."""
    cfg = parse_config(tiny_cfg_dict(**{"task": {"type": "env"}, "grpo.echo_coef": coef,
                                        "grpo.micro_batch_size": 2})).grpo
    n = batch.num_rows
    adv = torch.linspace(-1, 1, n, dtype=torch.float64)
    old = -2.0 + torch.zeros(n, batch.input_ids_NL.shape[1] - 1, dtype=torch.float64)
    echo = Echo(coef, int((batch.role_NL == Role.ENV).sum()), torch.ones(n, dtype=torch.bool))
    mask = batch.completion_mask_NL
    totals = (int(mask[:, 1:].sum()), n)
    model.zero_grad(set_to_none=True)
    sums = policy_update(ModelForward(model), batch, adv, old, None, cfg, temperature=1.0, t_max=40, totals=totals,
                         echo=echo)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return float(sums["loss"]), grad, sums


def with_final_observation_changed(batch: Rollouts) -> tuple[Rollouts, Rollouts]:
    """``batch`` with a final observation of 4 tokens after every row's last action, once as [5, 6, 7, 8] and once
    as [9, 10, 11, 12]: tokens no action of the row conditions on."""
    n = batch.num_rows
    ids = torch.cat([batch.input_ids_NL, torch.zeros(n, 4, dtype=torch.long)], 1)
    role = torch.cat([batch.role_NL, torch.zeros(n, 4, dtype=torch.int8)], 1)
    other = ids.clone()
    for r in range(n):
        end = int((role[r] != Role.PAD).sum())
        ids[r, end : end + 4] = torch.tensor([5, 6, 7, 8])
        other[r, end : end + 4] = torch.tensor([9, 10, 11, 12])
        role[r, end : end + 4] = int(Role.ENV)
    return tuple(Rollouts(x, role, torch.zeros(x.shape), batch.group_N, batch.problem_N, batch.truncated_N)
                 for x in (ids, other))


def test_an_observation_token_moves_the_loss_only_through_echo(model):
    batch = synthetic_batch(model.config.vocab_size, 6, turns=3, seed=2)
    base, perturbed = with_final_observation_changed(batch)
    l0, g0, s0 = step(model, base, 0.0)
    l1, g1, _ = step(model, perturbed, 0.0)
    assert l0 == pytest.approx(l1, abs=1e-12) and torch.allclose(g0, g1, atol=1e-12, rtol=0)  # λ = 0: untouched
    e0, h0, _ = step(model, base, 0.1)
    e1, h1, _ = step(model, perturbed, 0.1)
    assert abs(e0 - e1) > 1e-4 and (h0 - h1).abs().max() > 1e-6  # λ > 0: ECHO reads them
    # the term is λ × the step's ENV cross-entropy, logged as env_nll / env_tokens at any λ
    ce = float(s0["env_nll"] / s0["env_tokens"])
    assert e0 - l0 == pytest.approx(0.1 * ce, rel=1e-9)


def test_zero_advantage_rows_still_train_on_observations(model):
    batch = synthetic_batch(model.config.vocab_size, 4, turns=2, seed=3)
    cfg = parse_config(tiny_cfg_dict(**{"task": {"type": "env"}, "grpo.echo_coef": 0.05})).grpo
    zeros = torch.zeros(4, dtype=torch.float64)
    old = torch.zeros(4, batch.input_ids_NL.shape[1] - 1, dtype=torch.float64)
    echo = Echo(0.05, int((batch.role_NL == Role.ENV).sum()), torch.ones(4, dtype=torch.bool))
    model.zero_grad(set_to_none=True)
    sums = policy_update(ModelForward(model), batch, zeros, old, None, cfg, temperature=1.0, t_max=40,
                         totals=(int(batch.completion_mask_NL[:, 1:].sum()), 4), echo=echo)
    assert int(sums["rows_no_backward"]) == 0  # the skip is off: their observations carry a loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_echo_needs_an_env_task():
    from forkrl.config import ConfigError

    with pytest.raises(ConfigError, match="ECHO's loss is on the observation tokens"):
        parse_config(tiny_cfg_dict(**{"grpo.echo_coef": 0.05}))
