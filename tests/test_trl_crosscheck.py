"""Cross-check against a peer: on identical inputs (log-probs, old log-probs, advantages, masks) forkrl's
policy loss and its gradient equal TRL GRPOTrainer's for every loss type the two share.

TRL's `_compute_loss` is called on a trainer object whose model forward is replaced by the fixed
log-probs, so the comparison is of the loss arithmetic alone. TRL is pinned in pyproject's dev extra.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from forkrl.algos.kl import k3  # noqa: E402
from forkrl.algos.objectives import get_objective  # noqa: E402
from forkrl.algos.reductions import reduce_loss, step_totals  # noqa: E402

B, T, T_MAX = 6, 9, 12
# (TRL loss_type, TRL importance_sampling_level, forkrl objective, forkrl reduction)
PAIRS = [
    ("dapo", "token", "ppo_clip", "token_mean"),
    ("bnpo", "token", "ppo_clip", "token_mean"),
    ("grpo", "token", "ppo_clip", "seq_mean_token_mean"),
    ("dr_grpo", "token", "ppo_clip", "seq_mean_token_sum_norm"),
    ("luspo", "token", "ppo_clip", "seq_mean_token_sum"),
    ("grpo", "sequence", "gspo", "seq_mean_token_mean"),  # GSPO = TRL's sequence-level importance sampling
]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([1, 9, 3, 7, 2, 5])  # uneven completion lengths
    mask = (torch.arange(T)[None] < lens[:, None]).double()
    logp = (-3 + torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios reach both clips
    ref = logp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    return logp, old, ref, adv, mask


def _trl_loss(loss_type, level, logp, old, ref, adv, mask, beta):
    t = object.__new__(GRPOTrainer)
    accel = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
                            reduce=lambda x, reduction="sum": x)
    t.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        accelerator=accel, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        max_completion_length=T_MAX)
    n = logp.shape[0]
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return t._compute_loss(None, inputs)


def _forkrl_loss(objective, reduction, logp, old, ref, adv, mask, beta):
    m = mask.bool()
    loss_NT, _, _ = get_objective(objective)(logp, old, adv, m, eps_low=0.2, eps_high=0.28, dual_clip=None)
    if beta:
        loss_NT = loss_NT + beta * k3(logp, ref)
    tokens, seqs = step_totals(m)
    return reduce_loss(loss_NT, m, reduction, total_tokens=tokens, total_seqs=seqs, t_max=T_MAX)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("trl_type, level, objective, reduction", PAIRS)
def test_policy_loss_and_gradient_equal_trl(trl_type, level, objective, reduction, beta):
    logp, old, ref, adv, mask = _inputs()
    ours = _forkrl_loss(objective, reduction, logp, old, ref, adv, mask, beta)
    (g_ours,) = torch.autograd.grad(ours, logp)
    theirs = _trl_loss(trl_type, level, logp, old, ref, adv, mask, beta)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-10, atol=1e-15)
    assert ours.item() != 0.0


def test_bnpo_under_accumulation_is_the_mean_of_means_forkrl_avoids():
    """TRL's `bnpo` divides each micro-batch by its own token count: with two micro-batches of very
    different lengths its accumulated loss differs from the step's token mean, which forkrl computes."""
    logp, old, ref, adv, mask = _inputs()
    halves = [slice(0, 3), slice(3, 6)]
    mask = mask.clone()
    mask[3:, 1:] = 0  # the second micro-batch has 1-token completions, the first up to 9
    trl = sum(_trl_loss("bnpo", "token", logp[h], old[h], ref[h], adv[h], mask[h], 0.0) for h in halves) / 2
    ours = _forkrl_loss("ppo_clip", "token_mean", logp, old, ref, adv, mask, 0.0)
    assert abs(float(trl) - float(ours)) > 1e-3
