"""What only a GPU can check (``-m gpu``; skipped without CUDA, run by scripts/gpu_check.sh): the step gradient on
CUDA equals the CPU's in float32, the trainer's bf16 forward agrees with the sampler's log-probs, and the mismatch
correction computes there. The static sampler's own CUDA test is in tests/test_static_sampler.py."""

import pytest
import torch

from forkrl.check import step_gradient, synthetic_batch
from forkrl.config import SamplingCfg, parse_config
from forkrl.forward import ModelForward
from forkrl.models import load_model, load_tokenizer
from forkrl.sampling import SamplingParams, make_sampler

from conftest import tiny_cfg_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_the_step_gradient_on_cuda_equals_the_cpus(tiny_model_dir, trainer):
    cfg = parse_config(tiny_cfg_dict(**{"grpo.sampler_correction": "tis"}))
    grads = []
    for device in ("cpu", "cuda"):
        model = load_model(str(tiny_model_dir), dtype=torch.float32).to(device)
        batch = synthetic_batch(model.config.vocab_size, 8, seed=3)
        g = torch.Generator().manual_seed(0)
        adv = torch.randn(8, generator=g)
        old = -2.0 + 0.1 * torch.randn(8, batch.input_ids_NL.shape[1] - 1, generator=g)
        grads.append(step_gradient(model, batch, trainer, cfg, micro=4, world=2, inject="none", adv_N=adv, old_NT=old,
                                   ref_NT=None).cpu())
    rel = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())
    assert rel < 1e-4, rel


@pytest.mark.parametrize("backend", ["hf", "static"])
def test_bf16_sampler_logprobs_match_the_trainers_forward(tiny_model_dir, backend):
    model = load_model(str(tiny_model_dir), dtype=torch.bfloat16).cuda()
    tok = load_tokenizer(str(tiny_model_dir))
    sampler = make_sampler(SamplingCfg(backend=backend), model, tok)
    prompts = [tok("12+34=").input_ids, tok("7+5=").input_ids]
    r = sampler.sample(prompts, 8, SamplingParams(temperature=0.9, max_new_tokens=16), seeds=list(range(16)))
    with torch.no_grad():
        logp, _, mask = ModelForward(model).logprobs(r, temperature=0.9)
    gap = (logp.float().cpu() - r.sampler_logp_NL[:, 1:])[mask.cpu()].abs()
    assert float(gap.mean()) < 0.05 and float(gap.max()) < 0.5, (float(gap.mean()), float(gap.max()))
