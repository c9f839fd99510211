"""Decode engines: the fused FastEngine computes the logits the Hugging Face forward computes (Llama and Qwen2,
GQA, biases, untied heads, an active or disabled LoRA adapter, left padding), and the sampler's two engines
draw the same rows."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from forkrl.config import ConfigError, SamplingCfg
from forkrl.cpu import FusedSampler
from forkrl.cpu.engine import FastEngine, fast_unsupported
from forkrl.sampling import SamplingParams, make_sampler
from forkrl.sampling.decode import left_pad
from forkrl.sampling.hf import HFEngine, HFSampler

SIZE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=64,
            rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=1)


def build(cls, seed=0, **over):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cls(**{**SIZE, **over})).eval()
    with torch.no_grad():  # random norms and biases too, so a dropped term cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


MODELS = {
    "qwen2 gqa tied": lambda: build(Qwen2Config, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=True),
    "qwen2 mha untied": lambda: build(Qwen2Config, num_attention_heads=4, num_key_value_heads=4,
                                      tie_word_embeddings=False),
    "llama gqa biases": lambda: build(LlamaConfig, num_attention_heads=6, num_key_value_heads=2, attention_bias=True,
                                      tie_word_embeddings=False),
    "llama head_dim": lambda: build(LlamaConfig, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                    rope_theta=500.0),
}


def lockstep(model, steps=6):
    """(max |Δ logits|, max |logits|) between the two engines over a prefill and ``steps`` one-token steps."""
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20], [30, 31, 32, 33]]
    ids, attn = left_pad(prompts, pad_id=0)
    engines = [HFEngine(model), FastEngine(model)]
    with torch.no_grad():
        outs = [e.prefill(ids, attn, steps) for e in engines]
        worst, scale = (outs[0] - outs[1]).abs().max(), outs[0].abs().max()
        pos = attn.sum(-1) - 1
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            token, pos = torch.randint(2, 97, (len(prompts),), generator=g), pos + 1
            outs = [e.step(token, pos) for e in engines]
            worst = max(worst, (outs[0] - outs[1]).abs().max())
    return float(worst), float(scale)


@pytest.mark.parametrize("name", MODELS)
def test_fast_engine_logits_equal_the_hf_forward(name, kernel_path):
    model = MODELS[name]()
    assert fast_unsupported(model) is None
    worst, scale = lockstep(model)
    assert scale > 0.1 and worst < 2e-5 * max(scale, 1.0), (name, worst, scale)


def test_fast_engine_reads_an_active_lora_adapter_and_the_base_when_disabled():
    from peft import LoraConfig, get_peft_model

    base = MODELS["qwen2 gqa tied"]()
    ref = [e for e in (HFEngine(base),)]
    ids, attn = left_pad([[5, 6, 7], [8, 9]], pad_id=0)
    with torch.no_grad():
        base_logits = ref[0].prefill(ids, attn, 2)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                "gate_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn_like(p))  # a trained adapter, not the zero init
    model.eval()
    assert fast_unsupported(model) is None
    worst, scale = lockstep(model)
    assert worst < 2e-5 * max(scale, 1.0)
    with torch.no_grad():
        adapted = FastEngine(model).prefill(ids, attn, 2)
        with model.disable_adapter():
            disabled = FastEngine(model).prefill(ids, attn, 2)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter matters, and the engine saw it
    torch.testing.assert_close(disabled, base_logits, rtol=0, atol=2e-5)


def test_the_auto_backend_falls_back_to_hf_and_says_why():
    model = MODELS["qwen2 gqa tied"]()

    def backend(name, m):
        return make_sampler(SamplingCfg(backend=name), m, tokenizer=None)

    assert isinstance(backend("auto", model), FusedSampler) and isinstance(backend("hf", model), HFSampler)
    for over, why in (({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
                      ({"hidden_act": "gelu"}, "hidden_act")):
        other = build(Qwen2Config, num_attention_heads=4, num_key_value_heads=2, **over)
        assert why in fast_unsupported(other) and isinstance(backend("auto", other), HFSampler)
        with pytest.raises(ConfigError, match=f"sampling.backend: 'fused'.*{why}"):
            backend("fused", other)
    assert "float32" in fast_unsupported(model.to(torch.bfloat16))
    with pytest.raises(ValueError, match="unknown sampler backend 'sglang'; valid: 'auto', 'hf', 'fused', 'static', 'vllm'"):
        SamplingCfg(backend="sglang")


def test_sampler_engines_draw_the_same_rows(tiny_model_dir):
    from forkrl.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    prompts = [tok(t).input_ids for t in ("12+34=", "7*8=", "99-1=")]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10)
    seeds = list(range(100, 112))
    fast = FusedSampler(model, tok).sample(prompts, 4, params, seeds=seeds)
    slow = HFSampler(model, tok).sample(prompts, 4, params, seeds=seeds)
    assert torch.equal(fast.input_ids_NL, slow.input_ids_NL) and torch.equal(fast.role_NL, slow.role_NL)
    torch.testing.assert_close(fast.sampler_logp_NL, slow.sampler_logp_NL, rtol=0, atol=1e-5)


def test_fast_engine_with_one_token_prompts(kernel_path):
    """A prefill of width 1 takes the one-query attention path; it must give the forward's logits too."""
    model = MODELS["llama gqa biases"]()
    ids, attn = left_pad([[5], [9]], pad_id=0)
    with torch.no_grad():
        a, b = HFEngine(model).prefill(ids, attn, 3), FastEngine(model).prefill(ids, attn, 3)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "sgemm"])
@pytest.mark.parametrize("name", MODELS)
def test_a_whole_step_in_c_equals_the_step_layer_by_layer(name, packed, monkeypatch):
    """With BLAS reachable from C (kernels.blas), a one-token step runs every layer in one C call; layer by layer
    from Python it runs the same kernels and products: the logits and the record agree to float rounding. Both
    with the weights packed once for MKL's packed products (kernels.packed) and through sgemm."""
    from forkrl.cpu import kernels

    if kernels.get() is None or not kernels.blas:
        pytest.skip(f"no whole-step path here: {kernels.why or 'no sgemm_ in libtorch_cpu'}")
    if packed and not kernels.packed:
        pytest.skip("MKL's packed products are not exported by this torch's libtorch_cpu")
    monkeypatch.setattr(kernels, "packed", packed)
    model = MODELS[name]()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20], [30, 31, 32, 33]]
    ids, attn = left_pad(prompts, pad_id=0)
    engines = [FastEngine(model, record=True), FastEngine(model, record=True)]
    assert engines[0].whole_step == (name != "llama gqa biases")  # an o-projection bias: layer by layer
    engines[1].whole_step = False
    with torch.no_grad():
        outs = [e.prefill(ids, attn, 5) for e in engines]
        want = 4 * len(model.model.layers) if packed and engines[0].whole_step else 0
        assert len(getattr(engines[0], "c_packs", None) or []) == want
        pos, g = attn.sum(-1) - 1, torch.Generator().manual_seed(1)
        for _ in range(5):
            token, pos = torch.randint(2, 97, (len(prompts),), generator=g), pos + 1
            outs = [e.step(token, pos) for e in engines]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(engines[0].record["layers"], engines[1].record["layers"]):
        for key in a:
            torch.testing.assert_close(a[key][:9], b[key][:9], rtol=1e-5, atol=1e-5)


def test_auto_decodes_the_smallest_calls_through_the_forward(monkeypatch):
    """``sampling.backend: auto`` takes the model's forward for the smallest calls (``SMALL_ROWS`` rows × ``SMALL_TOKENS``
    new tokens: the fused weights' setup costs more than it saves there, ``cpu.sampler``), the fused decoder for the
    rest, and ``fused`` always; the rows are the same either way."""
    from forkrl.cpu.sampler import SMALL_ROWS, SMALL_TOKENS

    model = MODELS["qwen2 gqa tied"]()
    built = []
    real = FastEngine.__init__
    monkeypatch.setattr(FastEngine, "__init__", lambda self, *a, **k: built.append(1) or real(self, *a, **k))

    class Tok:
        pad_token_id, eos_token_id = 0, 1

    auto, fused = (make_sampler(SamplingCfg(backend=b), model, Tok()) for b in ("auto", "fused"))
    prompts, small = [[5, 6, 7]], SamplingParams(max_new_tokens=SMALL_TOKENS)
    seeds = list(range(SMALL_ROWS))
    a = auto.sample(prompts, SMALL_ROWS, small, seeds=seeds)
    assert not built
    b = fused.sample(prompts, SMALL_ROWS, small, seeds=seeds)
    assert built and torch.equal(a.input_ids_NL, b.input_ids_NL)
    for group, new in ((SMALL_ROWS, SMALL_TOKENS + 1), (SMALL_ROWS + 1, SMALL_TOKENS)):
        built.clear()
        auto.sample(prompts, group, SamplingParams(max_new_tokens=new), seeds=list(range(group)))
        assert built
