"""The static-cache backend (``sampling/static.py``): with the same seeds it draws ``hf``'s tokens and sampler
log-probs (float32 rounding apart), over the data sampling meets (very uneven prompts, several chunks, rows that
stop at EOS beside rows that are truncated, temperatures other than 1); its cache and compiled step are reused
across calls without changing a result; on CUDA (``-m gpu``) its bf16 log-probs match the trainer's forward."""

import shutil

import pytest
import torch

from forkrl.config import ConfigError, SamplingCfg
from forkrl.forward import ModelForward
from forkrl.models import load_model, load_tokenizer
from forkrl.sampling import SamplingParams, make_sampler
from forkrl.sampling.hf import HFSampler
from forkrl.sampling.static import StaticSampler

TEXTS = ("1", "12+34=", "99-1=", "7+5=" * 9)  # 1 to ~30 tokens: the batch is mostly left padding for the short ones


def eos_prone(model, tok, scale: float = 1.0):
    """Make EOS likely, so that some rows stop early and others run to ``max_new_tokens``: EOS's output row is set
    along the model's mean final hidden state (the tiny model's embeddings are tied, so its input row moves too).
    How many rows it stops depends on the temperature and truncation: 0.3 to 1.5 gives both kinds here."""
    with torch.no_grad():
        ids = torch.tensor([tok("12+34=99-1=7+5=88").input_ids], device=model.device)
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float().mean(0)
        model.lm_head.weight[tok.eos_token_id] = (scale * h / h.norm()).to(model.lm_head.weight.dtype)
    return model


def tiny(path, scale: float = 1.0):
    model, tok = load_model(str(path)), load_tokenizer(str(path))
    return eos_prone(model, tok, scale), tok


def prompts(tok):
    return [tok(t).input_ids for t in TEXTS]


def teacher_forced_gap(model, rollouts, temperature: float) -> float:
    """Largest |sampler log-prob − the trainer's forward's log-prob at the sampling temperature| over completions."""
    with torch.no_grad():
        logp_NT, _, mask_NT = ModelForward(model).logprobs(rollouts, temperature=temperature)
    assert int(mask_NT.sum()) == int(rollouts.completion_mask_NL.sum())
    return float((logp_NT.float().cpu() - rollouts.sampler_logp_NL[:, 1:])[mask_NT.cpu()].abs().max())


@pytest.mark.parametrize("params, scale", [(SamplingParams(temperature=0.7, top_k=20, max_new_tokens=12), 0.3),
                                           (SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=12), 1.5),
                                           (SamplingParams(temperature=0.0, max_new_tokens=12), 1.0)],
                         ids=["T0.7", "T1.3", "greedy"])
def test_static_draws_hfs_tokens_and_logprobs(tiny_model_dir, params, scale):
    """``scale``: EOS's pull (``eos_prone``), chosen per setting so that both kinds of row occur."""
    model, tok = tiny(tiny_model_dir, scale)
    seeds = list(range(100, 112))
    # batch_size 5: chunks of 5, 5 and 2 rows, each padded to 8 rows inside the engine
    want = HFSampler(model, tok, batch_size=5).sample(prompts(tok), 3, params, seeds=seeds)
    got = StaticSampler(model, tok, batch_size=5).sample(prompts(tok), 3, params, seeds=seeds)
    assert torch.equal(got.input_ids_NL, want.input_ids_NL)
    assert torch.equal(got.role_NL, want.role_NL) and torch.equal(got.group_N, want.group_N)
    assert torch.equal(got.truncated_N, want.truncated_N)
    torch.testing.assert_close(got.sampler_logp_NL, want.sampler_logp_NL, rtol=1e-5, atol=1e-5)
    if not params.greedy:  # the data the test claims to cover: some rows stop at EOS, some are truncated
        assert 0 < int(got.truncated_N.sum()) < got.num_rows
        assert teacher_forced_gap(model, got, params.temperature) < 1e-5
        assert teacher_forced_gap(model, got, 1.0) > 1e-3  # the tempered log-probs, not temperature 1's


def test_buffers_are_reused_and_results_equal_a_fresh_samplers(tiny_model_dir):
    """Calls of several shapes through one sampler give what a fresh sampler gives each (a reused cache carries
    nothing over); a call within a kept bucket reuses its cache, a new bucket evicts the least recent one."""
    model, tok = tiny(tiny_model_dir)
    p = prompts(tok)
    # buckets (8, 64), (8, 64), (16, 128), (8, 64); the second call's prompts are narrower than the first's
    calls = [(p[2:], 2, 6), (p[:2], 2, 6), (p, 4, 40), (p[2:], 2, 6)]
    s = StaticSampler(model, tok, pool_capacity=2)
    slots = []
    for i, (ps, group, new) in enumerate(calls):
        params = SamplingParams(temperature=0.9, max_new_tokens=new)
        seeds = list(range(10 * i, 10 * i + len(ps) * group))
        got = s.sample(ps, group, params, seeds=seeds)
        fresh = StaticSampler(model, tok).sample(ps, group, params, seeds=seeds)
        assert torch.equal(got.input_ids_NL, fresh.input_ids_NL) and torch.equal(got.truncated_N, fresh.truncated_N)
        assert torch.equal(got.sampler_logp_NL, fresh.sampler_logp_NL)  # same shapes, same arithmetic: bit for bit
        slots.append(dict(s.pool.by_model[model]))
    assert [sorted(k[:2] for k in d) for d in slots] == [[(8, 64)], [(8, 64)], [(8, 64), (16, 128)],
                                                         [(8, 64), (16, 128)]]
    key = next(iter(slots[0]))
    assert slots[3][key].cache is slots[0][key].cache  # the first bucket's cache, kept and reused
    one = StaticSampler(model, tok, pool_capacity=1)
    for ps, group, new in calls[1:3]:
        one.sample(ps, group, SamplingParams(max_new_tokens=new), seeds=list(range(len(ps) * group)))
    assert [k[:2] for k in one.pool.by_model[model]] == [(16, 128)]


def test_factory_entropy_lockstep_and_lora(tiny_model_dir):
    """``sampling.backend: static`` through ``make_sampler``; the entropy and lockstep capabilities come from the
    shared loop and agree with ``hf``'s (lockstep with an EntropyGate substituting a second model's argmax);
    a peft LoRA model with a trained-looking adapter samples as it does through ``hf``."""
    from peft import LoraConfig, get_peft_model

    from forkrl.diagnostics.substitute import EntropyGate

    model, tok = tiny(tiny_model_dir)
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=9)
    seeds = list(range(12))
    static, hf = (make_sampler(SamplingCfg(backend=b, batch_size=5), model, tok) for b in ("static", "hf"))
    assert isinstance(static, StaticSampler)
    (r_s, H_s), (r_h, H_h) = (x.sample_with_entropy(prompts(tok), 3, params, seeds=seeds) for x in (static, hf))
    assert torch.equal(r_s.input_ids_NL, r_h.input_ids_NL)
    torch.testing.assert_close(H_s, H_h, rtol=1e-5, atol=1e-5)
    other, _ = tiny(tiny_model_dir)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)  # a second model that differs
    gate = EntropyGate(tau=2.0)
    (r_s, subs_s), (r_h, subs_h) = (x.lockstep(other, prompts(tok), 3, params, seeds=seeds, rule=gate)
                                    for x in (static, hf))
    assert torch.equal(r_s.input_ids_NL, r_h.input_ids_NL) and torch.equal(subs_s, subs_h)
    assert int(subs_s.sum()) > 0  # the rule did substitute
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    want = HFSampler(lora, tok, batch_size=5).sample(prompts(tok), 3, params, seeds=seeds)
    got = StaticSampler(lora, tok, batch_size=5).sample(prompts(tok), 3, params, seeds=seeds)
    assert not torch.equal(got.input_ids_NL, r_h.input_ids_NL)  # the adapter changed the draws
    assert torch.equal(got.input_ids_NL, want.input_ids_NL)
    torch.testing.assert_close(got.sampler_logp_NL, want.sampler_logp_NL, rtol=1e-5, atol=1e-5)


def test_refuses_a_model_it_cannot_run():
    with pytest.raises(ConfigError, match="sampling.backend: 'static' cannot run this model"):
        make_sampler(SamplingCfg(backend="static"), torch.nn.Linear(2, 2), None)


def test_compiled_step_is_one_graph_reused_across_calls(tiny_model_dir):
    """The one-token step under ``torch.compile``: a single graph (no graph break) for a shape bucket, compiled once
    and reused by the next call with other prompt widths, drawing what the uncompiled step draws. A counting
    backend (it runs the captured graph as is) checks the capture in a second; inductor is the next test."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model, tok = tiny(tiny_model_dir)
    p = prompts(tok)
    params = SamplingParams(temperature=0.8, max_new_tokens=10)
    compiled = StaticSampler(model, tok, compile=True, backend=counting)
    for ps, seeds in ((p[:2], list(range(4))), (p[1:], list(range(4, 10)))):  # widths differ, bucket (8, 64) each
        got = compiled.sample(ps, 2, params, seeds=seeds)
        want = StaticSampler(model, tok).sample(ps, 2, params, seeds=seeds)
        assert torch.equal(got.input_ids_NL, want.input_ids_NL)
        torch.testing.assert_close(got.sampler_logp_NL, want.sampler_logp_NL, rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_inductor_compiled_step_draws_hfs_tokens(tiny_model_dir):
    """Inductor's code for the step (C++ on a CPU: about 5 s with its cache warm, about a minute cold)."""
    torch._dynamo.reset()
    model, tok = tiny(tiny_model_dir)
    params = SamplingParams(temperature=0.8, max_new_tokens=8)
    seeds = list(range(8))
    want = HFSampler(model, tok).sample(prompts(tok), 2, params, seeds=seeds)
    got = StaticSampler(model, tok, compile=True, mode="default").sample(prompts(tok), 2, params, seeds=seeds)
    assert torch.equal(got.input_ids_NL, want.input_ids_NL)
    torch.testing.assert_close(got.sampler_logp_NL, want.sampler_logp_NL, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_static_matches_hf_and_the_trainer(tiny_model_dir):
    """On CUDA, compiled with CUDA graphs (the default there). float32: ``hf``'s tokens. bf16: tokens may part
    from ``hf``'s, so each backend's sampler log-probs are checked against the trainer's forward on its own rows,
    and static's gap may not exceed hf's by more than bf16 rounding; a second call (graphs replayed) repeats the
    first."""
    torch._dynamo.reset()
    params = SamplingParams(temperature=0.8, max_new_tokens=16)
    seeds = list(range(16))
    model, tok = tiny(tiny_model_dir)
    model = model.cuda()
    want = HFSampler(model, tok).sample(prompts(tok), 4, params, seeds=seeds)
    s = StaticSampler(model, tok)
    got = s.sample(prompts(tok), 4, params, seeds=seeds)
    assert torch.equal(got.input_ids_NL, want.input_ids_NL)
    torch.testing.assert_close(got.sampler_logp_NL, want.sampler_logp_NL, rtol=1e-4, atol=1e-4)
    model = model.to(torch.bfloat16)
    gaps = {}
    for name, sampler in (("hf", HFSampler(model, tok)), ("static", StaticSampler(model, tok))):
        first = sampler.sample(prompts(tok), 4, params, seeds=seeds)
        again = sampler.sample(prompts(tok), 4, params, seeds=seeds)
        assert torch.equal(first.input_ids_NL, again.input_ids_NL)
        gaps[name] = teacher_forced_gap(model, first, params.temperature)
    assert gaps["static"] < max(2 * gaps["hf"], 0.05), gaps
