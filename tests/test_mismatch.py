"""The sampler/trainer mismatch in a run: the jump guard (``guards.mismatch_jump``) on constructed sequences, and on a
sampler that holds its own copy of the weights and stops receiving pushes (stale weights); the correction's metrics."""

import copy
import json

import pytest

from forkrl.config import GuardsCfg, parse_config
from forkrl.pipeline import run
from forkrl.sampling import SAMPLERS
from forkrl.sampling.hf import HFSampler
from forkrl.trainers.loop import Guards, TrainingError

from conftest import tiny_cfg_dict


def _stops(values, **cfg):
    guards = Guards(GuardsCfg(**cfg), "grpo")
    for step, v in enumerate(values, 1):
        message = guards.check(step, {"logp_mismatch": v})
        if message:
            return step, message
    return None


def test_the_guard_stops_at_a_jump_over_the_floor_and_the_median():
    step, message = _stops([1e-6, 3e-6, 2e-6, 1e-6, 0.4, 1e-6])
    assert step == 5
    assert "jumped to 0.4 nats a token" in message and "stale weights" in message
    assert "guards.mismatch_jump: 0 turns the guard off" in message
    assert _stops([1e-6, 3e-6, 2e-6, 1e-6, 0.4], mismatch_jump=0) is None  # off
    assert _stops([1e-6, 3e-6, 2e-6, 1e-6, 0.015]) is None  # under the floor (0.02)
    assert _stops([0.03, 0.05, 0.04, 0.035, 0.3, 0.39]) is None  # a steady bf16 gap: under 10× its median
    assert _stops([0.03, 0.05, 0.04, 0.035, 0.3, 0.41])[0] == 6
    assert _stops([1e-6, 1e-6, 0.5]) is None  # fewer than 3 earlier steps: no median to judge by yet
    assert _stops([None, None, None, None, 0.5]) is None  # stages that log no mismatch


class OwnWeights(HFSampler):
    """A sampler that decodes from its own copy of the policy, as an inference engine does, and takes a push of the
    trainer's weights at each ``sync_weights``; after ``pushes`` of them it silently stops taking them."""

    def __init__(self, model, tokenizer, pushes):
        super().__init__(copy.deepcopy(model), tokenizer, batch_size=64)
        self.policy, self.pushes = model, pushes

    def sync_weights(self):
        if self.pushes:
            self.pushes -= 1
            self.model.load_state_dict(self.policy.state_dict())


def _run(tmp_path, monkeypatch, pushes, **over):
    def factory(cfg, model, tokenizer, device, record):
        return OwnWeights(model, tokenizer, pushes if record else 10**9)

    monkeypatch.setitem(SAMPLERS, "own", factory)
    cfg = parse_config(tiny_cfg_dict(**{"sampling.backend": "own", "grpo.steps": 6, "grpo.optim": {"lr": 0.03},
                                        "grpo.rewards": [{"name": "random"}], "guards.mismatch_floor": 1e-3,
                                        **over}))
    out = tmp_path / "r"
    try:
        run(cfg, out)
    finally:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "grpo" and "logp_mismatch" in r]


def test_a_sampler_that_misses_pushes_stops_the_run(tmp_path, monkeypatch):
    with pytest.raises(TrainingError, match=r"grpo step 5: the sampler/trainer log-prob mismatch jumped"):
        _run(tmp_path, monkeypatch, pushes=3)  # steps 1-4 sampled from current weights, step 5 from step 3's


def test_a_synced_sampler_runs_through_with_tis_weights_of_one(tmp_path, monkeypatch):
    rows = _run(tmp_path, monkeypatch, pushes=10**9, **{"grpo.sampler_correction": "tis"})
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["logp_mismatch"] < 1e-5 for r in rows)
    assert all(r["correction_weight_mean"] == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert all(r["correction_zero_frac"] == 0.0 for r in rows)
