"""Trainer plumbing on a real tiny model: the SFT/GRPO gradient does not depend on the micro-batch
split nor on skipping the backward of zero-advantage rows, unscorable rewards get advantage 0 and are
counted, LoRA's reference is the adapter-off base."""

import math

import pytest
import torch

from forkrl.algos.advantages import grpo as grpo_adv
from forkrl.algos.reductions import step_totals
from forkrl.config import GrpoCfg, SamplingCfg
from forkrl.forward import ModelForward
from forkrl.models import load_model, load_tokenizer
from forkrl.config import RewardCfg
from forkrl.rewards import load as load_rewards, score_rollouts
from forkrl.sampling import SamplingParams, make_sampler
from forkrl.tasks.arithmetic import ArithmeticTask
from forkrl.trainers.grpo import frozen_logprobs, policy_update
from forkrl.trainers.sft import pack, sft_step


def default_sampler(model, tok):  # the default backend, as the trainers get it
    return make_sampler(SamplingCfg(), model, tok)


def completion_logprobs(model, batch, **kw):
    return ModelForward(model).logprobs(batch, **kw)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture()
def model64(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float64), load_tokenizer(str(tiny_model_dir))


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm",
                                       "seq_mean_token_sum"])
def test_sft_gradient_independent_of_micro_batches(model64, reduction):
    model, tok = model64
    eos = tok.eos_token_id
    # completion lengths from 2 to 40 tokens: a 20x spread inside one batch
    examples = [(tok("12+3=").input_ids, tok(" " + "7" * n).input_ids + [eos]) for n in (1, 39, 3, 20, 2, 30)]
    batch = pack(examples, tok.pad_token_id)
    grads = []
    for mbs in (6, 2, 1):
        model.zero_grad()
        sft_step(model, batch, reduction=reduction, t_max=48, micro_batch_size=mbs,
                 totals=step_totals(batch.completion_mask_NL))
        grads.append(_grads(model))
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], rtol=1e-10, atol=1e-14)


def test_grpo_gradient_independent_of_micro_batches(model64):
    model, tok = model64
    sampler = default_sampler(model, tok)
    torch.manual_seed(0)
    r = sampler.sample([tok("12+34=").input_ids, tok("5+5=").input_ids], 4, SamplingParams(max_new_tokens=10))
    adv_N = torch.linspace(-1.5, 1.5, r.num_rows, dtype=torch.float64)
    old = frozen_logprobs(model, r, temperature=1.0, micro_batch_size=8, adapter_off=False).double() - 0.05
    grads = []
    for mbs in (8, 4, 1):
        cfg = GrpoCfg(prompts_per_step=2, group_size=4, micro_batch_size=mbs, entropy_coef=0.01, dual_clip=3.0)
        model.zero_grad()
        policy_update(ModelForward(model), r, adv_N, old, None, cfg, temperature=1.0, t_max=10,
                      totals=step_totals(r.completion_mask_NL))
        grads.append(_grads(model))
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo"])
def test_zero_advantage_rows_get_no_backward_and_the_same_gradient(model64, objective):
    model, tok = model64
    torch.manual_seed(0)
    r = default_sampler(model, tok).sample([tok("12+34=").input_ids, tok("5+5=").input_ids, tok("7+1=").input_ids], 4,
                                     SamplingParams(max_new_tokens=10))
    adv_N = torch.linspace(-1.5, 1.5, r.num_rows, dtype=torch.float64)
    adv_N[4:8] = 0.0  # a zero-variance group, interleaved with live ones in every micro-batch split
    adv_N[1] = 0.0
    # old log-probs off the current ones: ratios away from 1, so clipping and the clip flags are exercised
    old = frozen_logprobs(model, r, temperature=1.0, micro_batch_size=12, adapter_off=False).double()
    old = old + 0.3 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=old.dtype)
    eps = {"ppo_clip": (0.2, 0.28), "gspo": (3e-4, 4e-4)}[objective]  # GSPO's sequence ratios are near 1
    runs = {}
    for skip in (False, True):
        cfg = GrpoCfg(prompts_per_step=3, group_size=4, micro_batch_size=6, dual_clip=3.0, objective=objective,
                      eps_low=eps[0], eps_high=eps[1], skip_zero_advantage=skip)
        model.zero_grad()
        stats = policy_update(ModelForward(model), r, adv_N, old, None, cfg, temperature=1.0, t_max=10,
                              totals=step_totals(r.completion_mask_NL))
        runs[skip] = stats, _grads(model)
    (full, g_full), (skipped, g_skip) = runs[False], runs[True]
    assert int(full["rows_no_backward"]) == 0 and int(skipped["rows_no_backward"]) == 5
    assert torch.allclose(g_skip, g_full, rtol=1e-10, atol=1e-14)
    for key in ("loss", "entropy", "logp_mismatch", "clip_low", "clip_high"):
        assert torch.allclose(skipped[key], full[key], rtol=1e-10, atol=1e-14), key
    assert float(full["clip_low"] + full["clip_high"]) > 0  # the clip statistics are not trivially 0
    assert float(full["entropy"]) > 0


def test_all_zero_advantages_leave_zero_gradients_and_terms_in_the_loss_disable_the_skip(model64):
    model, tok = model64
    torch.manual_seed(0)
    r = default_sampler(model, tok).sample([tok("12+34=").input_ids], 4, SamplingParams(max_new_tokens=8))
    zero_N = torch.zeros(r.num_rows, dtype=torch.float64)
    cfg = GrpoCfg(prompts_per_step=1, group_size=4, micro_batch_size=4)
    model.zero_grad(set_to_none=True)
    stats = policy_update(ModelForward(model), r, zero_N, None, None, cfg, temperature=1.0, t_max=8,
                          totals=step_totals(r.completion_mask_NL))
    assert int(stats["rows_no_backward"]) == 4
    # as the full batch's backward leaves them: zeros, not None (AdamW still applies momentum and decay)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    # an entropy bonus reaches rows whose advantage is 0: every row gets its backward
    cfg = GrpoCfg(prompts_per_step=1, group_size=4, micro_batch_size=4, entropy_coef=0.01)
    model.zero_grad(set_to_none=True)
    stats = policy_update(ModelForward(model), r, zero_N, None, None, cfg, temperature=1.0, t_max=8,
                          totals=step_totals(r.completion_mask_NL))
    assert int(stats["rows_no_backward"]) == 0 and _grads(model).abs().max() > 0


class FlakyTask(ArithmeticTask):
    def score(self, problem, completion):
        i = int(problem.id.split("-")[1])
        if i == 0:
            raise RuntimeError("verifier crashed")
        if i == 1:
            return None
        if i == 2:
            return float("nan")
        return 1.0 if len(completion) % 2 else 0.0


def test_unscorable_rows_are_excluded_and_counted(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    task = FlakyTask(digits=2, train_size=50, heldout_size=10)
    problems = task.problems("train")[:4]
    torch.manual_seed(0)
    r = default_sampler(model, tok).sample([tok(p.prompt).input_ids for p in problems], 3,
                                           SamplingParams(max_new_tokens=6))
    texts = ["ab", "abc", "a"] * 4  # rows of problem 3: rewards 0, 1, 1
    correct = load_rewards([RewardCfg(name="correct")], task, where="grpo.rewards", timeout_s=10.0)
    scored, failures = score_rollouts(r, texts, problems, task, correct, seeds=list(range(12)))
    assert scored.valid_N.tolist() == [False] * 9 + [True] * 3
    assert failures.count == 9 and "verifier crashed" in failures.first_message
    assert torch.isnan(scored.components["correct"][:9]).all()
    adv = grpo_adv(scored.reward_N, r.group_N, scored.valid_N)
    assert (adv[:9] == 0).all()
    # problem 3's rewards (0, 1, 1): mean 2/3, unbiased std sqrt(1/3)
    expected = torch.tensor([-2 / 3, 1 / 3, 1 / 3]) / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv[9:], expected, rtol=1e-5)


def test_lora_reference_is_adapter_disabled_base(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir))
    tok = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    r = default_sampler(base, tok).sample([tok("12+34=").input_ids], 4, SamplingParams(max_new_tokens=6))
    with torch.no_grad():
        base_logp, _, mask = completion_logprobs(base, r)
    model = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():  # move the adapter away from its zero init so the policy differs from the base
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    ref = frozen_logprobs(model, r, temperature=1.0, micro_batch_size=4, adapter_off=True)
    pol = frozen_logprobs(model, r, temperature=1.0, micro_batch_size=4, adapter_off=False)
    assert torch.allclose(ref[mask], base_logp[mask], atol=1e-5)
    assert (pol[mask] - base_logp[mask]).abs().max() > 1e-3


class HangingTask(ArithmeticTask):
    def score(self, problem, completion):
        if problem.id.endswith("-0"):
            import time

            while True:  # a verifier stuck in a loop
                time.sleep(0.01)
        if problem.id.endswith("-1"):
            return float("inf")
        return 1.0


def test_a_hanging_or_infinite_reward_makes_its_row_unscorable(tiny_model_dir):
    import time

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    task = HangingTask(digits=2, train_size=50, heldout_size=10)
    problems = task.problems("train")[:3]
    r = default_sampler(model, tok).sample([tok(p.prompt).input_ids for p in problems], 2,
                                           SamplingParams(max_new_tokens=4))
    t0 = time.time()
    correct = load_rewards([RewardCfg(name="correct")], task, where="grpo.rewards", timeout_s=0.2)
    scored, failures = score_rollouts(r, ["x"] * 6, problems, task, correct, seeds=list(range(6)))
    assert time.time() - t0 < 5
    assert scored.valid_N.tolist() == [False, False, False, False, True, True]
    assert failures.count == 4 and "RewardTimeout" in failures.first_message and "0.2s" in failures.first_message
