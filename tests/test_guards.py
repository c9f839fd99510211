"""Numerical guards: a NaN/inf loss or gradient skips the update, is logged with its step, and stops
the run after N consecutive occurrences with a message saying what to try."""

import json
import zlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from forkrl.config import parse_config
from forkrl.forward import ModelForward
from forkrl.pipeline import run
from forkrl.trainers.loop import TrainingError

from conftest import tiny_cfg_dict


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    real = ModelForward.logprobs
    calls = {"n": 0}

    def poisoned(self, batch, rows_N=None, **kw):  # from the second optimizer step on, the loss is NaN
        calls["n"] += 1
        logp, H, mask = real(self, batch, rows_N, **kw)
        return (logp * float("nan") if calls["n"] > 2 else logp), H, mask

    monkeypatch.setattr(ModelForward, "logprobs", poisoned)
    cfg = parse_config(tiny_cfg_dict(**{"stages": ["sft"], "sft.steps": 8, "sft.batch_size": 8,
                                        "sft.micro_batch_size": 4, "checkpoint": {"every": 1, "keep_last": 10},
                                        "guards": {"max_consecutive_nonfinite": 3}}))
    with pytest.raises(TrainingError, match=r"sft step 4: .*3 consecutive steps.*sft.optim.lr"):
        run(cfg, tmp_path / "r")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["update_skipped"] for r in rows] == [False, True, True, True]
    assert rows[0]["grad_norm"] > 0 and all(r["grad_norm"] is None and r["loss"] is None for r in rows[1:])
    ckpt = tmp_path / "r" / "sft" / "checkpoints"
    w1 = AutoModelForCausalLM.from_pretrained(ckpt / "step-000001" / "model").state_dict()
    w4 = AutoModelForCausalLM.from_pretrained(ckpt / "step-000004" / "model").state_dict()
    assert all(torch.equal(w1[k], w4[k]) for k in w1)  # skipped updates left the weights as they were
    assert all(torch.isfinite(v).all() for v in w4.values())


def test_mostly_unscorable_batches_stop_the_run_with_the_first_error(tmp_path):
    from forkrl.tasks.arithmetic import ArithmeticTask

    class BrokenVerifier(ArithmeticTask):
        def score(self, problem, completion):
            raise KeyError("gold answer field 'solution' is missing")

    cfg = parse_config(tiny_cfg_dict(**{"grpo.steps": 10, "guards": {"max_unscorable_steps": 2}}))
    with pytest.raises(TrainingError, match=r"grpo step 2: more than half of the rows were unscorable.*'solution'"):
        run(cfg, tmp_path / "r", task=BrokenVerifier(digits=2, train_size=50, heldout_size=10))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["unscorable_frac"] for r in rows] == [1.0, 1.0]
    assert all(r["reward_mean"] is None and r["adv_abs_max"] == 0.0 for r in rows)  # never a silent zero reward


def test_prompt_longer_than_the_context_is_a_config_error(tmp_path):
    from forkrl.config import ConfigError

    cfg = parse_config(tiny_cfg_dict(**{"sampling.max_new_tokens": 125}))  # the tiny model's context is 128
    with pytest.raises(ConfigError, match=r"exceeds the model's context of 128.*sampling.max_new_tokens"):
        run(cfg, tmp_path / "r")


def test_tokenizer_without_eos_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    from forkrl.models import ModelLoadError, load_tokenizer

    broken = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, broken)
    cfg_file = broken / "tokenizer_config.json"
    data = json.loads(cfg_file.read_text())
    data["eos_token"] = None
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="no EOS token"):
        load_tokenizer(str(broken))


def test_filters_that_empty_every_batch_stop_the_run(tmp_path):
    from forkrl.tasks.arithmetic import ArithmeticTask

    class Constant(ArithmeticTask):
        def score(self, problem, completion):
            return 1.0

    cfg = parse_config(tiny_cfg_dict(**{"grpo.steps": 10, "grpo.filter": "snr", "guards": {"max_empty_steps": 3}}))
    with pytest.raises(TrainingError, match=r"grpo step 3: the filters .*no row to train for 3 consecutive steps"):
        run(cfg, tmp_path / "r", task=Constant(digits=2, train_size=50, heldout_size=10))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["empty_batch"], r["rows_trained"], r["groups_kept_frac"], r["group_reward_std"]) for r in rows] == \
        [(True, 0, 0.0, 0.0)] * 3
    assert all(r["group_reward_std_kept"] is None and r["loss"] is None for r in rows)


def test_reward_std_collapse_stop(tmp_path, monkeypatch):
    """The ratio is a step's mean in-group std over the first 10 steps' mean; below 0.1 for 2 steps stops."""
    from forkrl.tasks.arithmetic import ArithmeticTask
    from forkrl.trainers import grpo

    class Spread(ArithmeticTask):  # rewards alternate within a group for 11 steps, then all equal
        step = 0

        def score(self, problem, completion):
            return float(zlib.crc32(completion.encode()) % 2) if Spread.step <= 11 else 1.0

    real = grpo.grpo_step

    def counted(*args, **kw):
        Spread.step = args[-1]
        return real(*args, **kw)

    monkeypatch.setattr(grpo, "grpo_step", counted)
    cfg = parse_config(tiny_cfg_dict(**{"grpo.steps": 20, "guards": {"max_std_collapse_steps": 2}}))
    with pytest.raises(TrainingError, match=r"grpo step 13: the mean in-group reward std stayed below 0.1"):
        run(cfg, tmp_path / "r", task=Spread(digits=2, train_size=50, heldout_size=10))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    ratios = [r["reward_std_collapse_ratio"] for r in rows]
    assert ratios[:9] == [None] * 9 and ratios[12] == 0.0 and ratios[11] == 0.0
    first = [r["group_reward_std"] for r in rows[:10]]
    assert ratios[9] == pytest.approx(first[9] / (sum(first) / 10), rel=1e-9) and ratios[10] > 0.1
