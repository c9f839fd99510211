"""The samplers (``make_sampler``, the default backend): roles, stop at EOS, truncation, group ids, and sampler
log-probs that equal the trainer's recomputation under the sampling temperature."""

import torch

from forkrl.config import SamplingCfg
from forkrl.forward import ModelForward
from forkrl.models import load_model, load_tokenizer
from forkrl.sampling import SamplingParams, make_sampler
from forkrl.types import Role


def S(model, tok, batch_size=256, backend="auto"):
    return make_sampler(SamplingCfg(batch_size=batch_size, backend=backend), model, tok)


def completion_logprobs(model, batch, **kw):
    return ModelForward(model).logprobs(batch, **kw)


def _sampler(path, batch_size=64):
    model, tok = load_model(str(path)), load_tokenizer(str(path))
    return S(model, tok, batch_size=batch_size), model, tok


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


def test_row_samples_depend_only_on_their_seed(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [tok("12+34=").input_ids, tok("56+78=").input_ids, tok("90+12=").input_ids]
    seeds = list(range(100, 109))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)
    whole = S(model, tok, batch_size=64).sample(prompts, 3, params, seeds=seeds)
    chunked = S(model, tok, batch_size=2).sample(prompts, 3, params, seeds=seeds)
    assert torch.equal(whole.input_ids_NL, chunked.input_ids_NL)
    # the last prompt alone, with its rows' seeds, gives the same rows as inside the full batch
    alone = S(model, tok).sample(prompts[2:], 3, params, seeds=seeds[6:])
    assert torch.equal(alone.input_ids_NL, whole.input_ids_NL[6:, : alone.input_ids_NL.shape[1]])
    other = S(model, tok).sample(prompts, 3, params, seeds=[s + 1 for s in seeds])
    assert not torch.equal(other.input_ids_NL, whole.input_ids_NL)


def test_truncation_hand_derived():
    from forkrl.sampling.decode import truncate as _truncate

    p = torch.tensor([[0.0625, 0.5, 0.1875, 0.25]])  # exact in binary floating point
    # top-p 0.75: sorted 0.5, 0.25 | 0.1875, 0.0625 -> mass before 0.1875 is 0.75, not < 0.75: keep two
    assert _truncate(p, 0, 0.75).tolist() == [[0.0, 0.5, 0.0, 0.25]]
    assert _truncate(p, 0, 0.76).tolist() == [[0.0, 0.5, 0.1875, 0.25]]
    assert _truncate(p, 3, 1.0).tolist() == [[0.0, 0.5, 0.1875, 0.25]]
    assert _truncate(p, 1, 1.0).tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert _truncate(p, 0, 0.1).tolist() == [[0.0, 0.5, 0.0, 0.0]]  # always at least one token


def test_sampling_frequencies_follow_the_tempered_policy(tiny_model_dir):
    """First-token frequencies over many rows match softmax(logits / T) within sampling error."""
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompt = tok("12+34=").input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    T = 0.5
    probs = torch.softmax(logits / T, -1)
    r = S(model, tok, batch_size=512).sample([prompt], 2000, SamplingParams(temperature=T, max_new_tokens=1),
                                             seeds=list(range(2000)))
    first = r.input_ids_NL[:, len(prompt)]
    top = probs.topk(3).indices
    for t in top:
        freq = (first == t).float().mean()
        se = (probs[t] * (1 - probs[t]) / 2000).sqrt()
        assert abs(freq - probs[t]) < 5 * se + 1e-3, (int(t), float(freq), float(probs[t]))


def test_counter_rng_is_splitmix64():
    """The vectorised int64 generator equals SplitMix64 written with Python's unbounded ints."""
    from forkrl.sampling.decode import uniform as _uniform

    def reference(seed, step):
        x = (seed + step * 0x9E3779B97F4A7C15) % 2**64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        return ((x ^ (x >> 31)) >> 11) * 2.0**-53

    seeds = [0, 1, 123456789, 2**62, 2**63 - 1]
    for step in (1, 2, 1000):
        got = _uniform(torch.tensor(seeds, dtype=torch.int64), step).tolist()
        assert got == [reference(s, step) for s in seeds]


def test_sampler_entropy_equals_teacher_forced_entropy(tiny_model_dir):
    """``sample_with_entropy`` reads H_t off the decode's logits; teacher forcing the same rows through
    the model (what METHODS §4 step 3 describes) gives the same numbers at every completion target."""
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [tok(t).input_ids for t in ("12+34=", "7*8=", "99-1=")]
    for backend in ("auto", "hf"):
        rollouts, H_NT = S(model, tok, batch_size=5, backend=backend).sample_with_entropy(
            prompts, 3, SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=9), seeds=list(range(9)))
        with torch.no_grad():
            _, H_ref, mask = completion_logprobs(model, rollouts, entropy="metric")
        assert H_NT.shape == mask.shape and (H_NT[~mask] == 0).all() and (H_NT[mask] > 0).all()
        torch.testing.assert_close(H_NT, (H_ref * mask).float(), rtol=1e-4, atol=1e-5)
