"""The fork stage end to end: an SFT'd base with one 50/50 fork token, fork-gated training from its own
rollouts, the cache of base rollouts, the ablation switches, and export."""

import json
from dataclasses import dataclass

import pytest
import torch

from conftest import tiny_cfg_dict
from forkrl.config import ConfigError, parse_config
from forkrl.pipeline import run
from forkrl.tasks.base import Problem


@dataclass
class ForkTask:
    """``q17=`` → `` 1 ok`` (right) or `` 0 ok`` (wrong), half and half in the demonstrations: the SFT'd
    base takes a 50/50 fork at its first completion token (entropy ≈ log 2) and the rest is certain."""

    name: str = "fork-toy"

    def problems(self, split):
        lo = 0 if split == "train" else 80
        return [Problem(id=f"{split}-{i}", prompt=f"q{i}=", answer="1") for i in range(lo, lo + 40)]

    def demonstrations(self, split):
        return [(p, " 1 ok" if i % 2 else " 0 ok") for i, p in enumerate(self.problems(split))]

    def score(self, problem, completion):
        return float(completion.strip().split(" ", 1)[0] == problem.answer)

    def strategy(self, completion):
        return completion.strip().split(" ", 1)[0] or "other"


def fork_cfg(stages=("sft", "fork"), **over):
    cfg = tiny_cfg_dict(**{
        "stages": list(stages), "sampling.max_new_tokens": 6,
        "sft.steps": 60, "sft.batch_size": 16, "sft.micro_batch_size": 16, "sft.optim": {"lr": 1e-2},
        "fork.candidates": 12, "fork.samples_per_problem": 8, "fork.max_problems": 12, "fork.epochs": 3,
        "fork.batch_size": 32, "fork.micro_batch_size": 16, "fork.temperature": 1.0, "fork.top_p": 1.0,
        "fork.gate": {"tau": 0.3}, "fork.optim": {"lr": 5e-3}, "eval.num_problems": 40, "eval.samples_per_problem": 4, **over})
    return parse_config(cfg)


@pytest.fixture(scope="module")
def fork_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fork") / "run"
    return out, run(fork_cfg(), out, task=ForkTask())


def test_fork_stage_improves_heldout_pass_at_1(fork_run):
    out, summary = fork_run
    sft, fork = summary["stages"]["sft"], summary["stages"]["fork"]
    assert 0.2 < sft["pass_at_1"] < 0.8, sft  # the base really sits at the fork
    assert fork["pass_at_1"] > sft["pass_at_1"] + 0.1, (sft["pass_at_1"], fork["pass_at_1"])
    assert fork["strategies"]["1"][0] > sft["strategies"]["1"][0]
    # τ = 0.3 nats gates exactly one token of every row, its first (the fork): rows / completion tokens
    tokens = fork["tokens_trained"] / 3  # three epochs
    assert fork["tau"] == 0.3 and fork["gate_share"] == pytest.approx(fork["rows"] / tokens, abs=1e-12)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    fork_lines = [x for x in lines if x["stage"] == "fork"]
    assert len(fork_lines) == fork["steps"] and all(x["tau"] == fork["tau"] for x in fork_lines)
    assert all(x["decision_tokens"] > 0 and x["anchor_tokens"] > 0 for x in fork_lines)


def test_fork_export_is_an_adapter_and_merged_weights(fork_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, summary = fork_run
    final = out / "fork" / "final"
    adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("o_proj" in k and "lora_" in k for k in adapter)  # rank-8 LoRA on o_proj only
    assert summary["stages"]["fork"]["trainable_params"] == sum(v.numel() for v in adapter.values())
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(out / "sft" / "final")
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("o_proj" in n for n in changed)


def test_ablations_reuse_the_cached_base_rollouts(fork_run, tmp_path, monkeypatch):
    out, summary = fork_run
    base = out / "sft" / "final"
    from forkrl.sampling.decode import EngineSampler
    from forkrl.trainers.loop import StageLoop

    calls = []
    monkeypatch.setattr(EngineSampler, "decode", lambda *a, **k: calls.append(1) or pytest.fail("sampled again"))
    monkeypatch.setattr(StageLoop, "finish", lambda self: (self.log.close(), {"steps": self.total})[1])
    results = {}
    for name, over in {"random": {"fork.gate": {"kind": "random", "tau": 0.3}}, "all": {"fork.gate": {"kind": "all"}},
                       "positive": {"fork.positive_only": True}}.items():
        cfg = fork_cfg(stages=("fork",), **{"fork.rollouts_from": str(out), **over})
        results[name] = run(cfg, tmp_path / name, init_path=base, task=ForkTask())["stages"]["fork"]
        assert (tmp_path / name / "fork" / "base_rollouts.safetensors").exists()
    entropy = summary["stages"]["fork"]
    assert not calls
    # the random gate spends the entropy gate's token budget; the all-token gate gates everything
    assert results["random"]["gate_share"] == pytest.approx(entropy["gate_share"], abs=1e-12)
    assert results["all"]["gate_share"] == 1.0
    # positive-only trains exactly the rows with A > 0
    assert results["positive"]["rows"] == entropy["positive_rows"] == results["positive"]["positive_rows"]
    assert results["positive"]["negative_rows"] == 0


def test_rollouts_from_a_different_base_is_refused(fork_run, tmp_path):
    out, _ = fork_run
    cfg = fork_cfg(stages=("fork",), **{"fork.rollouts_from": str(out), "fork.temperature": 0.7})
    with pytest.raises(ConfigError, match="different base model or different sampling settings"):
        run(cfg, tmp_path / "x", init_path=out / "sft" / "final", task=ForkTask())


def test_full_fine_tuning_option(fork_run, tmp_path):
    out, _ = fork_run
    cfg = fork_cfg(stages=("fork",), **{"fork.rollouts_from": str(out), "fork.lora": {"enabled": False},
                                        "fork.epochs": 1})
    result = run(cfg, tmp_path / "full", init_path=out / "sft" / "final", task=ForkTask())["stages"]["fork"]
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "fork" / "final").parameters())
    assert result["trainable_params"] == n_params
    assert not (tmp_path / "full" / "fork" / "final" / "adapter").exists()


def test_no_mid_pass_rate_problem_is_a_clear_error(fork_run, tmp_path):
    out, _ = fork_run
    cfg = fork_cfg(stages=("fork",), **{"fork.rollouts_from": str(out), "fork.pass_rate_min": 0.99,
                                        "fork.pass_rate_max": 0.995})  # rates are multiples of 1/8
    with pytest.raises(ConfigError, match="none of the 12 candidate problems"):
        run(cfg, tmp_path / "y", init_path=out / "sft" / "final", task=ForkTask())


def test_fork_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="fork.micro_batch_size"):
        fork_cfg(**{"fork.micro_batch_size": 5})
    with pytest.raises(ConfigError, match="fork.pass_rate_min"):
        fork_cfg(**{"fork.pass_rate_min": 0.8, "fork.pass_rate_max": 0.3})
    with pytest.raises(ConfigError, match="fork.gate.kind"):
        fork_cfg(**{"fork.gate": {"kind": "oracle"}})


def test_reweight_resumed_inside_an_epoch_equals_uninterrupted(fork_run, tmp_path, monkeypatch):
    """fork.reweight re-estimates each problem's pass rate under π_θ at every epoch start; a run killed inside
    epoch 2 reads that epoch's weights back on resume instead of taking them from a later model."""
    out, _ = fork_run
    cfg = fork_cfg(stages=("fork",), **{"fork.rollouts_from": str(out), "fork.reweight": True,
                                        "checkpoint.every": 2})
    base = out / "sft" / "final"
    a = run(cfg, tmp_path / "a", init_path=base, task=ForkTask())["stages"]["fork"]
    import forkrl.trainers.loop as common

    real = common.maybe_checkpoint

    def crash_after_step_5(ctx, step, *args, **kw):
        real(ctx, step, *args, **kw)
        if step == 5:
            raise KeyboardInterrupt  # epoch 2 is steps 4-6: killed inside it, last checkpoint at step 4

    monkeypatch.setattr(common, "maybe_checkpoint", crash_after_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b", init_path=base, task=ForkTask())
    monkeypatch.setattr(common, "maybe_checkpoint", real)
    run(cfg, tmp_path / "b", init_path=base, task=ForkTask(), resume=True)

    drop = {"time", "train_s", "train_tokens_per_s"}
    rows = [[{k: v for k, v in json.loads(x).items() if k not in drop}
             for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in rows[1]] == list(range(1, 10)) and rows[0] == rows[1]
    ess = [r["ess"] for r in rows[0]]
    assert ess[:3] == [None] * 3 and all(0 < e <= 8 for e in ess[3:])  # 8 rollouts per problem
    assert ess[3] == ess[5] != ess[6]  # one estimate per epoch
    assert a["reweight_adv_shift"] > 0 and a["reweight_ess"] == ess[-1]
    for d in "ab":
        assert sorted(p.name for p in (tmp_path / d / "fork").glob("reweight-*")) == [
            "reweight-epoch2.safetensors", "reweight-epoch3.safetensors"]  # epochs 2 and 3 of 3


def test_cached_base_logits_give_the_per_step_gradient(fork_run):
    """The base's logits computed once for the stage (``base_logits``) give the gradient that computing them in
    every micro-batch gives, under a LoRA policy whose frozen base is itself with the adapter off."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from forkrl.algos.fork import fork_advantages
    from forkrl.models import load_model
    from forkrl.trainers.fork import base_logits, fork_update, step_counts
    from forkrl.trainers.fork_data import _ROLLOUT_FIELDS, FrozenBase
    from forkrl.types import Rollouts

    out, _ = fork_run
    t = load_file(str(out / "fork" / "base_rollouts.safetensors"))
    rollouts = Rollouts(**{f: t[f] for f in _ROLLOUT_FIELDS})
    model = get_peft_model(load_model(str(out / "sft" / "final")), LoraConfig(r=4, target_modules=["o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))  # π_θ ≠ π_b, so the anchor's KL has a gradient
    base = FrozenBase(model, lora=True)
    adv = fork_advantages(t["reward_N"], rollouts.group_N, t["valid_N"])
    mask = rollouts.completion_mask_NL[:, 1:]
    gate = (t["H_NT"] > 0.3) & mask
    rows = torch.arange(0, rollouts.num_rows, 3)  # a step's rows, not all of them
    cache = base_logits(base, rollouts, micro_batch_size=16)
    assert cache is not None and cache.shape[:2] == mask.shape
    grads = []
    for ref in (None, cache[rows]):
        model.zero_grad()
        fork_update(model, base, rollouts.select(rows), adv[rows], gate[rows], kl_coef=5.0, micro_batch_size=8,
                    totals=step_counts(gate[rows], mask[rows]), neg_floor=0.5, ref_logits_NTV=ref)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
