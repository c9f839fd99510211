"""``distributed.strategy: fsdp2`` on two real processes (torchrun, gloo, CPU): the sharded step gradient equals one
process's in float64 with ranks running different numbers of micro-batches; SFT then GRPO (full fine-tuning) and the
fork stage (LoRA) end where one process ends; a run killed mid-stage resumes to the uninterrupted run's weights and
metrics; bf16 mixed precision with gradient checkpointing trains; what FSDP2 does not run is refused at load."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from forkrl.check import step_gradient, synthetic_batch
from forkrl.config import ConfigError, parse_config
from forkrl.models import load_model
from forkrl.pipeline import run

from conftest import tiny_cfg_dict
from test_distributed import torchrun, worker_gradient_error


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_the_sharded_step_gradient_equals_one_process_with_uneven_micro_batches(tiny_model_dir, tmp_path, trainer):
    """Rank 0 holds 8 rows and rank 1 holds 4, in micro-batches of 2: 4 backward passes against 2, which FSDP2's
    collectives cannot run unequal; the lockstep plan pads rank 1 with zero-weight ones."""
    rel = worker_gradient_error(tiny_model_dir, tmp_path, trainer, "seq_mean_token_mean", "fsdp2", "1")
    assert rel < 1e-10, rel


KILL_AT_3 = """
import os


def coin(rng, step):
    # the built-in 'random' reward; the first time a rank reaches step 3 it dies there, as a killed job does
    mark = os.path.join(os.path.dirname(__file__), f"killed-{os.environ.get('RANK', '0')}")
    if step == 3 and os.environ.get("KILL") and not os.path.exists(mark):
        open(mark, "w").close()
        os._exit(3)
    return float(rng.random() < 0.5)
"""


def _train(tmp_path, data, out, *, ranks=2, resume=False, env=None):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    if ranks == 1:
        return run(parse_config(data), tmp_path / out)
    extra = ["--resume"] if resume else []
    return torchrun("-m", "forkrl.cli", "train", str(cfg_path), "--out", str(tmp_path / out), *extra, env=env)


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_grpo_match_one_process_and_a_killed_run_resumes_exactly(tmp_path):
    (tmp_path / "coin.py").write_text(KILL_AT_3)
    data = tiny_cfg_dict(**{"stages": ["sft", "grpo"], "sft.steps": 3, "grpo.steps": 4,
                            "grpo.rewards": [{"fn": f"{tmp_path / 'coin.py'}:coin"}], "grpo.optim": {"lr": 1e-3},
                            "grpo.filter": "snr", "grpo.snr_top_p": 0.6, "checkpoint": {"every": 1, "keep_last": 5},
                            "distributed": {"strategy": "fsdp2"}})
    _train(tmp_path, data, "one", ranks=1)  # one process: nothing to shard, the plain trainer
    assert _train(tmp_path, data, "two").returncode == 0
    one, two = _weights(tmp_path / "one" / "grpo" / "final"), _weights(tmp_path / "two" / "grpo" / "final")
    sft = _weights(tmp_path / "one" / "sft" / "final")
    assert any(not torch.equal(one[k], sft[k]) for k in one)  # GRPO moved the weights
    for k in one:  # float32 sums in another order, through 4 Adam steps
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=2e-5), k
    rows = [_metrics(tmp_path / d) for d in ("one", "two")]
    assert [(r["stage"], r["step"]) for r in rows[0]] == [(r["stage"], r["step"]) for r in rows[1]]
    for a, b in zip(*rows):
        assert b["world_size"] == 2
        for key in ("loss", "grad_norm", "reward_mean", "rows_trained", "completion_len_mean"):
            if a.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (key, a, b)

    killed = _train(tmp_path, data, "killed", env={"KILL": "1"})
    assert killed.returncode != 0
    assert not (tmp_path / "killed" / "grpo" / "final").exists()
    assert (tmp_path / "killed" / "grpo" / "checkpoints" / "step-000002").exists()
    resumed = _train(tmp_path, data, "killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = _weights(tmp_path / "killed" / "grpo" / "final")
    for k in two:  # the sharded optimizer state, the weights and the RNG came back: the same run
        assert torch.allclose(two[k], again[k], rtol=0, atol=1e-7), k
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s") and "per_s" not in k and k != "time"}  # noqa: E731
                        for r in rs]
    a, b = strip(_metrics(tmp_path / "killed")), strip(rows[1])
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "reward_mean", "logp_mismatch"):
            if ra.get(key) is not None:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (key, ra, rb)


def test_the_fork_stage_with_lora_matches_one_process(tmp_path):
    data = tiny_cfg_dict(**{"stages": ["sft", "fork"], "sft.steps": 3, "distributed": {"strategy": "fsdp2"},
                            "fork": {"candidates": 4, "samples_per_problem": 4, "pass_rate_min": 0.0,
                                     "pass_rate_max": 1.0, "rewards": [{"name": "random"}], "epochs": 2,
                                     "batch_size": 8, "micro_batch_size": 2, "gate": {"quantile": 0.5},
                                     "reweight": True, "optim": {"lr": 1e-2}}})
    _train(tmp_path, data, "one", ranks=1)
    assert _train(tmp_path, data, "two").returncode == 0
    one, two = _weights(tmp_path / "one" / "fork" / "final"), _weights(tmp_path / "two" / "fork" / "final")
    base = _weights(tmp_path / "one" / "sft" / "final")
    assert any(not torch.equal(one[k], base[k]) for k in one)
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k


def test_bf16_mixed_precision_with_gradient_checkpointing_trains_and_keeps_float32_weights(tmp_path):
    data = tiny_cfg_dict(**{"stages": ["sft", "grpo"], "sft.steps": 4, "grpo.steps": 2,
                            "grpo.rewards": [{"name": "random"}], "model.gradient_checkpointing": True,
                            "model.dtype": "float32",
                            "distributed": {"strategy": "fsdp2", "mixed_precision": "bf16"}})
    proc = _train(tmp_path, data, "mp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(tmp_path / "mp")
    assert len(rows) == 6 and all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "mp" / "sft" / "final")
    assert next(sft.parameters()).dtype == torch.float32


def test_gradient_checkpointing_leaves_the_gradient_unchanged(tiny_model_dir):
    cfg = parse_config(tiny_cfg_dict())
    grads = []
    for checkpointing in (False, True):
        model = load_model(str(tiny_model_dir), dtype=torch.float64).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        batch = synthetic_batch(model.config.vocab_size, 6, seed=2)
        grads.append(step_gradient(model, batch, "sft", cfg, micro=3, world=1, inject="none",
                                   adv_N=torch.zeros(6), old_NT=torch.zeros(6, batch.input_ids_NL.shape[1] - 1),
                                   ref_NT=None))
    assert float((grads[0] - grads[1]).abs().max()) < 1e-12 * float(grads[0].abs().max())


@pytest.mark.parametrize("over, message", [
    ({"stages": ["sft", "dpo"], "dpo": {"data": "online", "rewards": [{"name": "correct"}]}},
     "fsdp2 does not run the dpo stage yet"),
    ({"grpo.tree": {"chains": 2, "forks": 2}}, "fsdp2 does not run stage 'grpo': grpo.tree yet"),
    ({"debug.inject": "mean_of_means"}, "debug.inject runs the accumulation bugs"),
])
def test_what_fsdp2_does_not_run_is_refused_at_load(over, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(tiny_cfg_dict(**{"distributed": {"strategy": "fsdp2"}, **over}))


def test_mixed_precision_needs_fsdp2_and_float32_weights():
    with pytest.raises(ConfigError, match="distributed.mixed_precision is FSDP2's policy"):
        parse_config(tiny_cfg_dict(**{"distributed": {"mixed_precision": "bf16"}}))
    with pytest.raises(ConfigError, match="model.dtype is 'auto': set model.dtype: float32"):
        parse_config(tiny_cfg_dict(**{"distributed": {"strategy": "fsdp2", "mixed_precision": "bf16"}}))
