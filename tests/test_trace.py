"""The update replayed from the decode (cpu/trace.py) is the update the model's own forward gives: the same
log-probs and entropies, and the same gradient for every trainable parameter, on the architectures and
adapters the fused decoder runs (Llama and Qwen2, GQA, biases, untied heads, LoRA with and without biases in
the base), for any subset and order of the sampled rows, across sampler chunks, under temperature, with an
entropy bonus; and a trace refuses to replay after the weights moved."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, Qwen2Config

from forkrl.config import SamplingCfg
from forkrl.cpu import FusedSampler, ReplayForward
from forkrl.cpu.trace import _fingerprint, trace_bytes
from forkrl.forward import ModelForward, make_forward
from forkrl.sampling import SamplingParams, make_sampler

from test_engine import build

EOS = 1


class _Tok:
    pad_token_id, eos_token_id = 0, EOS

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


MODELS = {
    "qwen2 gqa tied": lambda: build(Qwen2Config, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=True),
    "llama gqa biases untied": lambda: build(LlamaConfig, num_attention_heads=6, num_key_value_heads=2,
                                             attention_bias=True, tie_word_embeddings=False),
    "llama head_dim": lambda: build(LlamaConfig, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                    rope_theta=500.0),
}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20], [30, 31, 32, 33]]


def lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")):
    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets)))
    with torch.no_grad():  # peft starts B at zero; a nonzero B makes A's gradient and the delta visible
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    return m


def sample(model, *, batch_size=64, temperature=1.0, new=7):
    sampler = FusedSampler(model, _Tok(), batch_size=batch_size, record=True)
    seeds = list(range(100, 100 + 3 * len(PROMPTS)))
    rollouts = sampler.sample(PROMPTS, 3, SamplingParams(temperature=temperature, max_new_tokens=new), seeds=seeds)
    assert sampler.trace is not None, sampler.untraced_why
    return rollouts, sampler.trace


def grads_of(model, logp_NT, H_NT, mask_NT, weight_NT):
    model.zero_grad(set_to_none=True)
    ((logp_NT * weight_NT + 0.3 * H_NT) * mask_NT).sum().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def compare(model, rollouts, trace, rows, *, temperature=1.0):
    """max relative differences (log-probs, entropies, worst parameter gradient) of trace vs HF forward."""
    batch = rollouts.select(rows)
    model.train()
    ours = trace.completion_logprobs(batch, rows, temperature=temperature, entropy="grad")
    ref = ModelForward(model).logprobs(batch, temperature=temperature, entropy="grad")
    mask = ref[2]
    assert torch.equal(ours[2], mask)
    weight = torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))
    rel = lambda a, b: float((a - b).detach().abs().max() / b.abs().max().clamp(min=1e-12))  # noqa: E731
    d_logp = rel(ours[0][mask], ref[0][mask])
    d_H = rel(ours[1][mask], ref[1][mask])
    g_ours, g_ref = grads_of(model, *ours, weight), grads_of(model, *ref, weight)
    assert g_ours.keys() == g_ref.keys() and g_ref
    worst = max(rel(g_ours[n], g_ref[n]) for n in g_ref)
    return d_logp, d_H, worst


@pytest.mark.parametrize("name", MODELS)
def test_replayed_update_equals_the_forward(name, kernel_path):
    model = MODELS[name]()
    rollouts, trace = sample(model)
    for d in compare(model, rollouts, trace, torch.arange(rollouts.num_rows)):
        assert d < 1e-4


@pytest.mark.parametrize("name", ["qwen2 gqa tied", "llama gqa biases untied"])
def test_replayed_update_under_lora(name, kernel_path):
    model = lora(MODELS[name]())
    rollouts, trace = sample(model, temperature=0.7)
    d_logp, d_H, worst = compare(model, rollouts, trace, torch.arange(rollouts.num_rows), temperature=0.7)
    assert max(d_logp, d_H, worst) < 1e-4
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_rows_in_any_order_and_across_chunks():
    model = MODELS["qwen2 gqa tied"]()
    rollouts, trace = sample(model, batch_size=5)  # 12 rows in chunks of 5, 5, 2
    assert len(trace.chunks) == 3
    rows = torch.tensor([11, 0, 7, 3, 4, 9])
    for d in compare(model, rollouts, trace, rows):
        assert d < 1e-4
    rollouts, trace = sample(model)  # one chunk, every row of it in another order
    shuffled = torch.randperm(rollouts.num_rows, generator=torch.Generator().manual_seed(1))
    for d in compare(model, rollouts, trace, shuffled):
        assert d < 1e-4


def test_the_comparison_can_fail():
    """Weights moved after the decode (the staleness guard re-stamped to let it through): the replay's recorded
    products are the old weights', the forward's the new ones', and the comparison sees it."""
    model = MODELS["qwen2 gqa tied"]()
    rollouts, trace = sample(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.05)
    trace.stamp = _fingerprint(trace.params)
    d_logp, _, _ = compare(model, rollouts, trace, torch.arange(rollouts.num_rows))
    assert d_logp > 1e-4


def test_a_stale_trace_refuses_to_replay():
    model = MODELS["qwen2 gqa tied"]()
    rollouts, trace = sample(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = rollouts.select(torch.arange(rollouts.num_rows))
    logp, _, mask = trace.completion_logprobs(batch, torch.arange(rollouts.num_rows))
    (logp * mask).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="stale"):
        trace.completion_logprobs(batch, torch.arange(rollouts.num_rows))


def test_no_trace_where_it_does_not_apply():
    model = MODELS["qwen2 gqa tied"]()
    for cfg in (SamplingCfg(backend="hf"), SamplingCfg(replay=False)):  # another backend, or the replay off
        sampler = make_sampler(cfg, model, _Tok(), record=True)
        assert isinstance(make_forward(model, sampler), ModelForward)
    dropout = build(Qwen2Config, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1)
    sampler = make_sampler(SamplingCfg(), dropout, _Tok(), record=True)
    sampler.sample(PROMPTS, 3, SamplingParams(max_new_tokens=9), seeds=list(range(12)))
    assert sampler.trace is None and "dropout" in sampler.untraced_why
    sampler = make_sampler(SamplingCfg(), model, _Tok(), record=True)  # a call auto decodes through the forward
    sampler.sample(PROMPTS[:1], 1, SamplingParams(max_new_tokens=3), seeds=[0])
    assert sampler.trace is None and "faster" in sampler.untraced_why


def test_recording_leaves_the_samples_unchanged():
    model = MODELS["llama gqa biases untied"]()
    rollouts, _ = sample(model)
    plain = FusedSampler(model, _Tok()).sample(PROMPTS, 3, SamplingParams(max_new_tokens=7),
                                               seeds=list(range(100, 112)))
    assert torch.equal(rollouts.input_ids_NL, plain.input_ids_NL)
    assert torch.equal(rollouts.sampler_logp_NL, plain.sampler_logp_NL)


def test_trace_bytes_counts_the_buffers():
    model = MODELS["qwen2 gqa tied"]()
    _, trace = sample(model)
    record = trace.chunks[0].record
    held = sum(t.numel() * t.element_size() for part in (*record["layers"], record["final"]) for t in part.values())
    assert held == trace_bytes(model, 12, 6 + 7)


def test_the_record_memory_is_reused_only_when_no_trace_reads_it():
    model = MODELS["qwen2 gqa tied"]()
    sampler = FusedSampler(model, _Tok(), record=True)
    params = SamplingParams(max_new_tokens=7)

    def run(seed):
        return sampler.sample(PROMPTS, 3, params, seeds=list(range(seed, seed + 12))), sampler.trace

    def storage(trace):
        return trace.chunks[0].record["layers"][0]["qkv"].untyped_storage().data_ptr()

    first = run(100)
    rows = torch.arange(first[0].num_rows)
    batch = first[0].select(rows)
    with torch.no_grad():
        before = first[1].completion_logprobs(batch, rows)[0]
    second = run(200)  # the first trace is alive: its record must survive the second decode
    assert storage(second[1]) != storage(first[1])
    with torch.no_grad():
        assert torch.equal(first[1].completion_logprobs(batch, rows)[0], before)
    del first, second
    third = run(300)  # the arena has the size the last call wanted; no trace holds it now
    kept = storage(third[1])
    del third
    fourth = run(400)
    assert storage(fourth[1]) == kept
    for d in compare(model, fourth[0], fourth[1], torch.arange(fourth[0].num_rows)):
        assert d < 1e-4


def test_attention_by_hand_equals_sdpa_and_its_backward():
    """replay._attention_probs/_attention_backward against torch's SDPA under autograd: grouped-query heads, a causal
    mask with left padding (a padding query sees itself only), float64 so the comparison is tight."""
    from forkrl.cpu.engine import causal_mask
    from forkrl.cpu.replay import Scratch, _attention_backward, _attention_probs

    g = torch.Generator().manual_seed(0)
    R, K, G, L, d = 3, 2, 3, 7, 8
    q, k, v, do = (torch.randn(*s, generator=g, dtype=torch.float64)
                   for s in ((R, K, G, L, d), (R, K, L, d), (R, K, L, d), (R, K, G, L, d)))
    real = torch.ones(R, L, dtype=torch.bool)
    real[0, :3] = real[2, :1] = False  # left padding
    mask = causal_mask(real).double()
    ws = Scratch(torch.float64)
    p = _attention_probs(q, k, mask, ws)
    o = torch.bmm(p, v.view(R * K, L, d)).view(R, K, G, L, d)
    rowsum = (do * o).sum(-1).view(R * K, G * L, 1)
    dq, dk, dv = _attention_backward(q, k, v, p, rowsum, do, ws)
    qh, kh, vh = (t.clone().requires_grad_() for t in (q.view(R, K * G, L, d), k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, (qh, kh, vh), do.view(R, K * G, L, d))
    for ours, theirs in ((o, ref), (dq, ref_dq), (dk, ref_dk), (dv, ref_dv)):
        torch.testing.assert_close(ours.reshape(theirs.shape), theirs.detach(), rtol=1e-10, atol=1e-12)


def test_replayed_update_with_some_weights_of_a_fused_group_frozen():
    """q_proj and up_proj frozen, k/v and gate training: each weight of the q|k|v and gate|up groups gets its own
    product (the fused one applies only when all train); the frozen ones get no gradient at all."""
    model = MODELS["llama gqa biases untied"]()
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.requires_grad_(False)
        layer.mlp.up_proj.weight.requires_grad_(False)
    rollouts, trace = sample(model)
    for d in compare(model, rollouts, trace, torch.arange(rollouts.num_rows)):
        assert d < 1e-4
    batch = rollouts.select(torch.arange(rollouts.num_rows))
    logp, _, mask = trace.completion_logprobs(batch, torch.arange(rollouts.num_rows))
    (logp * mask).sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None
    assert model.model.layers[0].self_attn.k_proj.weight.grad is not None


def test_rows_that_end_early_and_rows_that_share_a_prompt(kernel_path):
    """The backward keeps one copy of each prompt's positions and drops positions past each row's EOS
    (replay.Packing); with a frequent EOS many rows end early, and the gradient is still the forward's."""
    model = MODELS["llama gqa biases untied"]()
    with torch.no_grad():
        model.lm_head.weight[7].mul_(6.0)  # token 7 frequent: the EOS of this test
    sampler = FusedSampler(model, type("Tok", (_Tok,), {"eos_token_id": 7})(), batch_size=64, record=True)
    rollouts = sampler.sample(PROMPTS, 4, SamplingParams(max_new_tokens=9), seeds=list(range(16)))
    trace = sampler.trace
    lens = rollouts.completion_len_N
    assert (lens < 9).sum() >= 4 and (lens == 9).any()  # rows end early, and some run to the end
    for d in compare(model, rollouts, trace, torch.arange(rollouts.num_rows)):
        assert d < 1e-4
    for d in compare(model, rollouts, trace, torch.tensor([13, 2, 5, 9])):  # a subset: its own representatives
        assert d < 1e-4


def test_packing_keeps_each_prompt_once_and_no_position_past_eos():
    from forkrl.cpu.replay import packing

    # rows 0 and 2 share a prompt of width 3 (row 2's first position is left padding in both), row 1 has its own
    real = torch.tensor([[False, True, True, True, True, True], [True, True, True, True, True, True],
                         [False, True, True, True, True, True]])
    pk = packing(real, 3, torch.tensor([2, 4, 1]), [(5, 6), (7, 8, 9), (5, 6)], torch.tensor([4, 0, 2]), 5)
    kept = {(int(m) // 3, int(m) % 3) for m in pk.idx_P}  # (position, row)
    assert kept == {(1, 0), (2, 0), (3, 0),  # row 0: its prompt, then the one completion token fed before EOS
                    (0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1),  # row 1: prompt and 3 completion tokens fed
                    }  # row 2: its prompt is row 0's, and its first token is its EOS: nothing of its own
    src = pk.src_M.view(6, 3)
    own = pk.own_M.view(6, 3)
    assert torch.equal(src[1:3, 2], own[1:3, 0])  # row 2's prompt positions take row 0's kept rows
    assert int(src[0, 0]) == int(src[0, 2]) == pk.size  # left padding: nothing reaches it
    assert int(src[3, 2]) == pk.size  # row 2 past its EOS
    # in the record (5 rows, of which these are rows 4, 0 and 2): position l of replayed row r is l·5 + rows[r]
    assert {(int(m) // 5, int(m) % 5) for m in pk.rec_idx_P} == {(l, (4, 0, 2)[r]) for l, r in kept}


@pytest.mark.parametrize("entropy", ["none", "value", "grad"])
def test_a_replayed_update_frees_the_record_without_the_garbage_collector(entropy):
    """Nothing the replay's autograd node keeps may point back at its outputs: such a cycle holds the decode's
    record (the step's largest allocation) until Python's collector happens to run, and the next sampling call
    then allocates a second record (it did: 5.4 against 3.6 GB peak on the 30M-parameter model)."""
    import gc
    import weakref

    model = MODELS["qwen2 gqa tied"]()
    rollouts, trace = sample(model)
    rows = torch.arange(rollouts.num_rows)
    record = weakref.ref(trace.chunks[0].record["layers"][0]["gu"])
    model.train()
    gc.collect()
    gc.disable()
    try:
        logp, H, mask = trace.completion_logprobs(rollouts.select(rows), rows, entropy=entropy)
        ((logp + H) * mask).sum().backward()
        del logp, H, mask, trace
        assert record() is None
    finally:
        gc.enable()


def test_a_trace_keeps_the_record_but_not_the_decodes_caches(monkeypatch):
    """When the decode ends, the engine a trace keeps (for the record, rotary tables and sizes) drops its key/value
    caches, fused and packed weights and scratch (``FastEngine.end_decode``), which would otherwise stay allocated
    through the update (about 400 MB on the 30M-parameter benchmark model); the replay still matches the forward."""
    import weakref

    from forkrl.cpu.engine import FastEngine

    seen = []
    real = FastEngine.end_decode

    def spy(self):
        packs = getattr(self, "packs", None)  # where the weights were packed (kernels.packed)
        seen.extend(weakref.ref(t) for t in (*self.k, *self.v, *([packs] if packs is not None else [])))
        real(self)

    monkeypatch.setattr(FastEngine, "end_decode", spy)
    model = MODELS["qwen2 gqa tied"]()
    rollouts, trace = sample(model)
    assert seen and all(ref() is None for ref in seen)
    for d in compare(model, rollouts, trace, torch.arange(rollouts.num_rows)):
        assert d < 1e-4


def test_the_replaying_forward_replays_only_the_rollouts_it_recorded():
    """``make_forward`` over a recording fused sampler replays the very Rollouts object the last call returned (the
    same values as the model's forward), runs the model's forward for any other batch, and after the optimizer
    step's ``sync_weights`` (the record released) for the recorded batch too."""
    model = MODELS["qwen2 gqa tied"]()
    sampler = make_sampler(SamplingCfg(), model, _Tok(), record=True)
    policy = make_forward(model, sampler)
    assert isinstance(sampler, FusedSampler) and isinstance(policy, ReplayForward)
    rollouts = sampler.sample(PROMPTS, 3, SamplingParams(max_new_tokens=7), seeds=list(range(12)))
    rows = torch.tensor([3, 0, 7])
    replayed = policy.logprobs(rollouts, rows, entropy="metric")
    assert policy.replayed == 1
    ref = ModelForward(model).logprobs(rollouts, rows, entropy="metric")
    mask = ref[2]
    assert torch.equal(replayed[2], mask)
    torch.testing.assert_close(replayed[0][mask], ref[0][mask], rtol=1e-4, atol=1e-5)
    copy = rollouts.select(torch.arange(rollouts.num_rows))  # equal values, another object: not this decode's
    policy.logprobs(copy, rows)
    sampler.sync_weights()
    policy.logprobs(rollouts, rows)
    assert policy.replayed == 1
