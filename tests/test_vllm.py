"""The vLLM backend against the fake engine (``fake_vllm.py``, which generates with the weights it was pushed and
raises where the real engine would misbehave): the call order over samples and optimizer steps, sleep and wake,
weights pushed after a step and not before, LoRA adapters sent as adapter requests, log-probs that equal the
trainer's at the sampling temperature, truncation refused for RL, and a GRPO run end to end."""

import json
import os
import sys

import pytest
import torch

from forkrl.config import ConfigError, SamplingCfg, VllmCfg, parse_config
from forkrl.forward import ModelForward
from forkrl.models import load_model, load_tokenizer
from forkrl.sampling import SamplingParams, make_sampler
from forkrl.sampling import vllm as backend
from forkrl.types import Role

import fake_vllm
from conftest import tiny_cfg_dict

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def fake(monkeypatch):
    """vLLM, as the fake, in ``sys.modules``; no engine built yet; torchrun's variables as they were after."""
    for name, module in fake_vllm.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend, "_ENGINE", None)
    before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    for k in LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    yield fake_vllm
    for k, v in before.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def build(path, sleep_level=1, lora=False):
    model, tok = load_model(str(path)), load_tokenizer(str(path))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        bump(model)
    sampler = make_sampler(SamplingCfg(backend="vllm", vllm=VllmCfg(sleep_level=sleep_level)), model, tok)
    prompts = [tok(t).input_ids for t in ("12+34=", "7+5=")]
    return sampler, model, tok, prompts


def bump(model, seed=0):
    """An optimizer step's worth of change to every trainable parameter (a LoRA B too, so the adapter matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def names(llm, start=0):
    return [c[0] for c in llm.calls[start:]]


P = SamplingParams(temperature=1.0, max_new_tokens=6)


def test_weights_are_pushed_at_the_next_sample_after_a_step_and_only_then(tiny_model_dir, fake):
    sampler, model, _, prompts = build(tiny_model_dir)
    llm = sampler.engine.engine
    init = llm.calls[0][1]
    assert init["logprobs_mode"] == "processed_logprobs" and init["distributed_executor_backend"] == "external_launcher"
    assert init["enable_sleep_mode"] and init["model"] == str(tiny_model_dir) and "enable_lora" not in init
    assert names(llm) == ["init", "sleep"]  # the trainer has the GPU until the first sample

    sampler.sample(prompts, 2, P, seeds=list(range(4)))  # the first sample pushes: the engine came from disk
    assert names(llm, 2) == ["wake_up", "apply_model", "load_weights", "wake_up", "reset_prefix_cache", "generate",
                             "sleep"]
    assert llm.calls[2] == ("wake_up", ["weights"]) and llm.calls[5] == ("wake_up", None)
    pushed = llm.pushes[-1]
    assert set(pushed) == {n for n, _ in model.named_parameters()}

    n = len(llm.calls)
    sampler.sample(prompts, 2, P, seeds=list(range(4)))  # nothing changed: no push
    assert names(llm, n) == ["wake_up", "generate", "sleep"]

    bump(model)
    n = len(llm.calls)
    sampler.sync_weights()  # marks stale; sends nothing
    assert len(llm.calls) == n
    engine_w = dict(llm.hf.named_parameters())
    assert not any(torch.equal(engine_w[k], p) for k, p in model.named_parameters())  # still the old weights
    sampler.sample(prompts, 2, P, seeds=list(range(4)))
    assert names(llm, n) == ["wake_up", "apply_model", "load_weights", "wake_up", "reset_prefix_cache", "generate",
                             "sleep"]
    assert all(torch.equal(engine_w[k], p) for k, p in model.named_parameters())
    assert llm.asleep == {"weights", "kv_cache"}


def test_without_sleep_mode_the_engine_never_sleeps(tiny_model_dir, fake):
    sampler, model, _, prompts = build(tiny_model_dir, sleep_level=0)
    llm = sampler.engine.engine
    for _ in range(2):
        sampler.sample(prompts, 1, P, seeds=[1, 2])
        bump(model)
        sampler.sync_weights()
    assert not llm.calls[0][1]["enable_sleep_mode"]
    assert names(llm) == ["init"] + ["apply_model", "load_weights", "reset_prefix_cache", "generate"] * 2


def test_the_fake_refuses_what_the_engine_would_get_wrong(tiny_model_dir, fake):
    """The fake's order checks themselves, so that the tests above can fail."""
    sampler, _, _, prompts = build(tiny_model_dir)
    llm = sampler.engine.engine
    req = [{"prompt_token_ids": prompts[0]}]
    with pytest.raises(fake.OrderError, match="generate while"):
        llm.generate(req, fake.SamplingParams(logprobs=0))
    llm.wake_up()
    with pytest.raises(fake.OrderError, match="wake_up while awake"):
        llm.wake_up()
    llm.apply_model(lambda m: m.load_weights([]))
    with pytest.raises(fake.OrderError, match="without reset_prefix_cache"):
        llm.generate(req, fake.SamplingParams(logprobs=0))
    llm.sleep()
    with pytest.raises(fake.OrderError, match="while the weights sleep"):
        llm.apply_model(lambda m: m.load_weights([]))
    with pytest.raises(fake.OrderError, match="processed_logprobs"):
        fake.LLM(str(tiny_model_dir), logprobs_mode="raw_logprobs")
    with pytest.raises(TypeError, match="unexpected"):
        fake.LLM(str(tiny_model_dir), logprobs_mode="processed_logprobs", no_such_arg=1)


def test_logprobs_are_the_trainers_at_the_sampling_temperature(tiny_model_dir, fake):
    sampler, model, tok, prompts = build(tiny_model_dir)
    for temperature in (0.7, 1.3):
        r = sampler.sample(prompts, 3, SamplingParams(temperature=temperature, max_new_tokens=8), seeds=list(range(6)))
        with torch.no_grad():
            logp_NT, _, mask_NT = ModelForward(model).logprobs(r, temperature=temperature)
            logp1, _, _ = ModelForward(model).logprobs(r, temperature=1.0)
        sampler_NT = r.sampler_logp_NL[:, 1:]
        assert mask_NT.sum() == r.completion_mask_NL.sum() > 0
        assert (logp_NT - sampler_NT)[mask_NT].abs().max() < 1e-5
        assert (sampler_NT[~mask_NT] == 0).all()
        assert (logp1 - sampler_NT)[mask_NT].abs().max() > 1e-3  # the tempered ones, not temperature 1's


def test_rows_are_laid_out_as_every_backends(tiny_model_dir, fake):
    sampler, _, tok, prompts = build(tiny_model_dir)
    seeds = list(range(10, 16))
    r = sampler.sample(prompts, 3, SamplingParams(temperature=1.3, max_new_tokens=5), seeds=seeds)
    assert r.group_N.tolist() == r.problem_N.tolist() == [0, 0, 0, 1, 1, 1]
    for row in range(6):
        p, roles = prompts[row // 3], r.role_NL[row].tolist()
        n = int(r.completion_len_N[row])
        assert r.input_ids_NL[row, : len(p)].tolist() == p and roles[: len(p)] == [Role.PROMPT] * len(p)
        assert roles[len(p) : len(p) + n] == [Role.COMPLETION] * n and set(roles[len(p) + n :]) <= {Role.PAD}
        completion = r.input_ids_NL[row, len(p) : len(p) + n].tolist()
        assert tok.eos_token_id not in completion[:-1]
        assert bool(r.truncated_N[row]) == (completion[-1] != tok.eos_token_id) and (n == 5 or not r.truncated_N[row])
    again = sampler.sample(prompts[1:], 3, SamplingParams(temperature=1.3, max_new_tokens=5), seeds=seeds[3:])
    assert torch.equal(again.input_ids_NL, r.input_ids_NL[3:, : again.input_ids_NL.shape[1]])  # a row is its seed's


def test_a_lora_policy_is_sent_as_an_adapter_and_its_base_never(tiny_model_dir, fake):
    from peft import get_peft_model_state_dict

    sampler, model, _, prompts = build(tiny_model_dir, lora=True)
    llm = sampler.engine.engine
    assert llm.calls[0][1]["enable_lora"] and llm.calls[0][1]["max_lora_rank"] == 8
    base = {k: v.clone() for k, v in llm.hf.state_dict().items()}
    params = SamplingParams(temperature=0.9, max_new_tokens=6)
    for step in range(2):
        r = sampler.sample(prompts, 2, params, seeds=list(range(4)))
        assert llm.calls[-2] == ("generate", {"rows": 4, "lora": step + 1})  # a new id for each new adapter
        sent = llm.adapters[step + 1]
        trained = get_peft_model_state_dict(model)
        assert set(sent) == set(trained) and all(torch.equal(sent[k], trained[k]) for k in trained)
        with torch.no_grad():
            logp_NT, _, mask_NT = ModelForward(model).logprobs(r, temperature=0.9)
        assert (logp_NT - r.sampler_logp_NL[:, 1:])[mask_NT].abs().max() < 1e-5
        bump(model, seed=step + 1)
        sampler.sync_weights()
    assert "load_weights" not in names(llm)  # the base is never pushed, and never merged
    assert all(torch.equal(v, base[k]) for k, v in llm.hf.state_dict().items())
    assert not any(type(m).__name__ == "LoraLayer" and m.merged for m in model.modules())
    dirs = sampler.engine.adapter_dirs
    assert len(dirs) == 1 and dirs[0].name == "adapter-2" and not (dirs[0].parent / "adapter-1").exists()

    with model.disable_adapter():  # the fork stage's base: no adapter request
        r = sampler.sample(prompts, 1, params, seeds=[7, 8])
        with torch.no_grad():
            logp_NT, _, mask_NT = ModelForward(model).logprobs(r, temperature=0.9)
    assert llm.calls[-2] == ("generate", {"rows": 2, "lora": None})
    assert (logp_NT - r.sampler_logp_NL[:, 1:])[mask_NT].abs().max() < 1e-5
    llm.wake_up()
    with pytest.raises(fake.OrderError, match="LoRA id 1 reused"):  # the fake would see an id sent twice
        llm.generate([{"prompt_token_ids": prompts[0]}], fake.SamplingParams(logprobs=0),
                     lora_request=fake.LoRARequest("other", 1, "/elsewhere"))


def test_sharded_parameters_are_gathered_whole_before_the_push(tiny_model_dir, fake, monkeypatch):
    """FSDP2 parameters are DTensors: each is pushed as its ``full_tensor()``, gathered on every rank."""
    sampler, model, _, prompts = build(tiny_model_dir)
    gathered = []

    class Shard:
        def __init__(self, p):
            self.p = p

        def detach(self):
            return self

        def full_tensor(self):
            gathered.append(self.p)
            return self.p.detach() + 1.0  # what the other ranks hold, as far as this test is concerned

    real = list(model.named_parameters())
    monkeypatch.setattr(model, "named_parameters", lambda: ((n, Shard(p)) for n, p in real))
    sampler.sample(prompts, 1, P, seeds=[0, 1])
    pushed = sampler.engine.engine.pushes[-1]
    assert len(gathered) == len(real) and all(torch.equal(pushed[n], p.detach() + 1.0) for n, p in real)


def test_the_samplers_of_a_process_share_one_engine(tiny_model_dir, fake):
    sampler, model, tok, prompts = build(tiny_model_dir)
    other = make_sampler(SamplingCfg(backend="vllm"), model, tok)
    assert other.engine is sampler.engine and names(sampler.engine.engine).count("init") == 1
    sampler.sample(prompts, 1, P, seeds=[0, 1])
    bump(model)
    other.sync_weights()  # either sampler's sync marks the model's weights stale
    n = len(sampler.engine.engine.calls)
    sampler.sample(prompts, 1, P, seeds=[0, 1])
    assert "load_weights" in names(sampler.engine.engine, n)
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="sampling.backend: .*built for .*without LoRA"):
        make_sampler(SamplingCfg(backend="vllm"), peft, tok)


def test_building_the_engine_keeps_the_trainers_random_streams(tiny_model_dir, fake):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    build(tiny_model_dir)
    assert torch.equal(torch.rand(3), want)
    assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"  # a world of one for external_launcher


def test_expandable_segments_are_refused_with_sleep_mode(tiny_model_dir, fake, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64, expandable_segments:True")
    with pytest.raises(ConfigError, match="sampling.vllm.sleep_level.*expandable_segments.*PYTORCH_CUDA_ALLOC_CONF"):
        build(tiny_model_dir)
    build(tiny_model_dir, sleep_level=0)  # no sleep mode, no conflict
    monkeypatch.setattr(backend, "_ENGINE", None)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    build(tiny_model_dir)


def test_without_vllm_the_error_says_how_to_install_it(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"pip install 'forkrl\[vllm\]' -c constraints-vllm.txt"):
        make_sampler(SamplingCfg(backend="vllm"), model, tok)


def test_engine_arguments_and_lora_ranks():
    assert [backend.lora_rank(r) for r in (1, 2, 8, 9, 320, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(backend.SamplerError, match="model.lora.r"):
        backend.lora_rank(600)
    assert backend.expandable_segments({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}) == "PYTORCH_ALLOC_CONF"
    assert backend.expandable_segments({}) is None


def test_truncated_sampling_is_refused_for_rl_with_vllm():
    vllm = {"sampling.backend": "vllm"}
    with pytest.raises(ConfigError, match=r"sampling.top_p is 0.9 .*grpo stage.*biases"):
        parse_config(tiny_cfg_dict(**vllm, **{"sampling.top_p": 0.9}))
    with pytest.raises(ConfigError, match=r"sampling.top_k is 20 .*dpo stage"):
        parse_config(tiny_cfg_dict(**vllm, **{"sampling.top_k": 20}, stages=["sft", "dpo"]))
    with pytest.raises(ConfigError, match=r"fork.top_p is 0.95 with fork.reweight"):
        parse_config(tiny_cfg_dict(**vllm, stages=["fork"], **{"fork.reweight": True}))
    parse_config(tiny_cfg_dict(**vllm, **{"sampling.top_p": 0.9}, stages=["sft"]))  # SFT / evaluation only
    parse_config(tiny_cfg_dict(**vllm, stages=["fork"]))  # fork without reweight reads no sampler log-probs
    parse_config(tiny_cfg_dict(**{"sampling.top_p": 0.9, "sampling.backend": "hf"}))  # hf gives untruncated ones


def test_sleep_level_2_is_refused():
    with pytest.raises(ConfigError, match=r"sampling.vllm.sleep_level.*corrupt"):
        parse_config(tiny_cfg_dict(**{"sampling.backend": "vllm", "sampling.vllm": {"sleep_level": 2}}))
    cfg = parse_config(tiny_cfg_dict(**{"sampling.backend": "vllm"}))
    assert cfg.sampling.vllm == VllmCfg(gpu_memory_utilization=0.3, sleep_level=1, enable_prefix_caching=True)


@pytest.mark.parametrize("lora", [False, True])
def test_a_grpo_stage_runs_through_the_vllm_backend(tmp_path, fake, lora):
    from forkrl.pipeline import run

    cfg = parse_config(tiny_cfg_dict(**{"sampling.backend": "vllm", "grpo.steps": 2, "grpo.optim": {"lr": 3e-3},
                                        "model.lora": {"enabled": lora}}))
    summary = run(cfg, tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["logp_mismatch"] < 1e-4 for r in rows), [r["logp_mismatch"] for r in rows]
    llm = backend._ENGINE.engine
    gens = [i for i, c in enumerate(llm.calls) if c[0] == "generate"]
    assert len(gens) == 3  # one a step, then the final evaluation
    if lora:  # a new adapter for each sample: the first, and one after each step
        assert [llm.calls[i][1]["lora"] for i in gens] == [1, 2, 3] and "load_weights" not in names(llm)
    else:
        assert names(llm).count("load_weights") == 3
    assert 0.0 <= summary["stages"]["grpo"]["pass_at_1"] <= 1.0
