"""The HF sampler: roles, stop at EOS, truncation, group ids, and sampler log-probs that equal the
trainer's recomputation under the sampling temperature."""

import torch

from forkrl.models import load_model, load_tokenizer
from forkrl.sampling import HFSampler, SamplingParams
from forkrl.trainers.common import completion_logprobs
from forkrl.types import Role


def _sampler(path, batch_size=64):
    model, tok = load_model(str(path)), load_tokenizer(str(path))
    return HFSampler(model, tok, batch_size=batch_size), model, tok


def test_rollouts_layout_groups_and_truncation(tiny_model_dir):
    sampler, model, tok = _sampler(tiny_model_dir, batch_size=5)  # batch smaller than rows: chunking
    prompts = [tok("12+34=").input_ids, tok("7+5=").input_ids, tok("99+1=").input_ids]
    torch.manual_seed(0)
    r = sampler.sample(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=6))
    assert r.num_rows == 12
    assert r.group_N.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for row in range(12):
        p = prompts[row // 4]
        roles = r.role_NL[row].tolist()
        assert r.input_ids_NL[row, : len(p)].tolist() == p  # prompt left-aligned, no left padding
        assert roles[: len(p)] == [Role.PROMPT] * len(p)
        n = int(r.completion_len_N[row])
        assert 1 <= n <= 6
        assert roles[len(p) : len(p) + n] == [Role.COMPLETION] * n
        assert all(x == Role.PAD for x in roles[len(p) + n :])
        completion = r.input_ids_NL[row, len(p) : len(p) + n].tolist()
        ends_with_eos = completion[-1] == tok.eos_token_id
        assert bool(r.truncated_N[row]) == (not ends_with_eos)
        assert tok.eos_token_id not in completion[:-1]  # stops at the first EOS
        if not ends_with_eos:
            assert n == 6


def test_sampler_logprobs_match_trainer_under_temperature(tiny_model_dir):
    sampler, model, tok = _sampler(tiny_model_dir)
    prompts = [tok("12+34=").input_ids, tok("5+5=").input_ids]
    for temperature in (0.7, 1.3):
        torch.manual_seed(1)
        r = sampler.sample(prompts, 3, SamplingParams(temperature=temperature, top_k=20, max_new_tokens=8))
        with torch.no_grad():
            logp_NT, _, mask_NT = completion_logprobs(model, r, temperature=temperature)
        sampler_NT = r.sampler_logp_NL[:, 1:]
        assert mask_NT.sum() == r.completion_mask_NL.sum()
        diff = (logp_NT - sampler_NT)[mask_NT].abs().max()
        assert diff < 1e-4, f"sampler and trainer log-probs differ by {diff} at T={temperature}"
        assert (sampler_NT[~mask_NT] == 0).all()
        # and they are the tempered ones, not T=1: at T=1 the values differ measurably
        with torch.no_grad():
            logp1, _, _ = completion_logprobs(model, r, temperature=1.0)
        assert (logp1 - sampler_NT)[mask_NT].abs().max() > 1e-3


def test_greedy_is_deterministic(tiny_model_dir):
    sampler, _, tok = _sampler(tiny_model_dir)
    prompts = [tok("12+34=").input_ids]
    a = sampler.sample(prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=5))
    b = sampler.sample(prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=5))
    assert torch.equal(a.input_ids_NL, b.input_ids_NL)
    assert torch.equal(a.input_ids_NL[0], a.input_ids_NL[1])
