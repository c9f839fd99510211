"""End to end: GRPO raises reward on a tiny task; `forkrl train` runs a two-stage config whose final
model reloads through from_pretrained; resume equals an uninterrupted run; bad configs exit 2."""

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.config import parse_config
from forkrl.pipeline import run
from forkrl.tasks.arithmetic import ArithmeticTask

from conftest import tiny_cfg_dict


class SplitStrategyTask(ArithmeticTask):
    """Reward 1 when the completion opens with the `split` strategy: a fork-token choice the SFT'd
    model makes ~20% of the time, which GRPO must learn to make more often."""

    def score(self, problem, completion):
        return float(self.strategy(completion) == "split")


def test_grpo_raises_reward_on_a_tiny_task(tmp_path):
    data = tiny_cfg_dict(**{"stages": ["sft", "grpo"], "sft.steps": 60, "sft.batch_size": 32,
                            "sft.micro_batch_size": 32, "sft.optim": {"lr": 1e-2, "warmup_steps": 5},
                            "sampling.max_new_tokens": 3, "grpo.steps": 14, "grpo.prompts_per_step": 8,
                            "grpo.group_size": 8, "grpo.micro_batch_size": 64, "grpo.optim": {"lr": 3e-3}})
    cfg = parse_config(data)
    task = SplitStrategyTask(digits=2, train_size=200, heldout_size=20)
    run(cfg, tmp_path / "run", task=task)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward_mean"] for r in rows if r["stage"] == "grpo"]
    assert len(rewards) == 14
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert 0.02 < first < 0.6, f"the SFT'd model should pick `split` sometimes, not never/always: {first}"
    assert last > first + 0.2, f"reward did not rise: first steps {rewards[:3]}, last steps {rewards[-3:]}"


def test_two_stage_train_cli_and_reload(tmp_path):
    cfg_path = tmp_path / "run.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(tiny_cfg_dict(stages=["sft", "grpo"])))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "train", str(cfg_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.yaml").exists() and (out / "summary.json").exists()
    final = out / "grpo" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == "qwen2" and tok.eos_token_id is not None
    assert any(p.suffix == ".safetensors" for p in final.iterdir())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 1), ("sft", 2), ("sft", 3), ("grpo", 1), ("grpo", 2)]
    grpo_row = rows[-1]
    for key in ("reward_mean", "reward_std", "reward/correct", "zero_variance_group_frac", "adv_std", "entropy",
                "clip_frac_low", "clip_frac_high", "grad_norm", "completion_len_mean", "truncation_rate",
                "sample_s", "train_s", "sample_tokens_per_s", "train_tokens_per_s", "unscorable_rows"):
        assert key in grpo_row, key
    # GRPO started from the SFT stage's weights: where every advantage was 0 it did not move them at all
    sft_final = AutoModelForCausalLM.from_pretrained(out / "sft" / "final")
    moved = not torch.equal(sft_final.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert moved == any(r["adv_abs_max"] > 0 for r in rows if r["stage"] == "grpo")


@pytest.mark.parametrize("bad, needle", [
    ({"grpo.eps_hgh": 0.3}, "grpo.eps_hgh"),
    ({"grpo.group_size": -2}, "grpo.group_size"),
    ({"grpo.reduction": "mean"}, "token_mean"),
    ({"sampling.temperature": "hot"}, "sampling.temperature"),
    ({"grpo.micro_batch_size": 5}, "grpo.micro_batch_size"),
    ({"model": {"path": "/no/such/model"}}, "model.path '/no/such/model' does not exist"),
    ({"model": {"path": "someorg/some-model"}}, "HF_HUB_OFFLINE=1 forbids the hub"),
    ({"task": {"type": "jsonl", "train_path": "/no/train.jsonl", "heldout_path": "/no/h.jsonl"}}, "/no/train.jsonl"),
])
def test_bad_config_exits_2_with_key_path_and_no_traceback(tmp_path, bad, needle):
    import yaml

    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg_dict(**bad)))
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "train", str(cfg_path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def _strip_times(rows):
    drop = {"time", "sample_s", "train_s", "sample_tokens_per_s", "train_tokens_per_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = parse_config(tiny_cfg_dict(**{"grpo.steps": 4, "checkpoint.every": 2}))
    run(cfg, tmp_path / "a")

    import forkrl.trainers.loop as common

    real = common.maybe_checkpoint

    def crash_after_step_3(ctx, step, *args, **kw):
        real(ctx, step, *args, **kw)
        if step == 3:
            raise KeyboardInterrupt  # a kill after step 3 ran but before it was checkpointed

    monkeypatch.setattr(common, "maybe_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b")
    monkeypatch.setattr(common, "maybe_checkpoint", real)
    run(cfg, tmp_path / "b", resume=True)

    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]  # step 3 redone once, not duplicated
    assert _strip_times(rows[0]) == _strip_times(rows[1])
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "grpo" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "grpo" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("over", [
    {"grpo.objective": "gspo", "grpo.advantage": "dr_grpo", "grpo.reduction": "seq_mean_token_mean"},
    {"grpo.advantage": "rloo", "grpo.inner_iterations": 2, "grpo.dual_clip": 3.0,
     "grpo.reduction": "seq_mean_token_sum_norm"},
    {"grpo.kl": {"estimator": "k1", "beta": 0.1, "where": "reward"}, "grpo.entropy_coef": 0.01,
     "grpo.reduction": "seq_mean_token_sum"},
    {"grpo.kl": {"estimator": "k3", "beta": 0.1}, "grpo.clip": False, "grpo.filter": "zero_variance_groups",
     "grpo.rewards": [{"name": "correct"}, {"name": "format", "weight": 0.5}, {"name": "random", "weight": 0.1}]},
    {"stages": ["sft", "grpo"], "model.lora": {"enabled": True, "r": 4}, "grpo.kl": {"beta": 0.05}},
    {"stages": ["sft", "grpo"], "model.tiny.arch": "llama", "sft.reduction": "seq_mean_token_sum_norm"},
])
def test_grpo_options_run_and_log_finite_metrics(tmp_path, over):
    cfg = parse_config(tiny_cfg_dict(**over))
    summary = run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grpo_rows = [r for r in rows if r["stage"] == "grpo"]
    assert len(grpo_rows) == cfg.grpo.steps
    for r in grpo_rows:
        assert all(v is None or isinstance(v, str) or v == v for v in r.values())  # no NaN
        if cfg.grpo.kl.beta > 0 and r["rows_trained"]:
            assert r["kl"] is not None
            if cfg.grpo.kl.estimator == "k3":  # k3 is non-negative per token; k1 only in expectation
                assert r["kl"] > -1e-6
    final = Path(summary["final_model"])
    AutoModelForCausalLM.from_pretrained(final)  # merged weights load without peft
    assert (final / "adapter").is_dir() == cfg.model.lora.enabled


def test_reasoning_gym_and_jsonl_tasks_train(tmp_path):
    rg = tiny_cfg_dict(**{"task": {"type": "reasoning_gym", "name": "chain_sum", "size": 40, "heldout_size": 8},
                          "model.tiny.max_positions": 1024, "grpo.steps": 1})
    run(parse_config(rg), tmp_path / "rg")
    lines = [json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a), "completion": f" ans {2 * a}"}) for a in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(lines[24:]) + "\n")
    js = tiny_cfg_dict(**{"task": {"type": "jsonl", "train_path": str(tmp_path / "train.jsonl"),
                                   "heldout_path": str(tmp_path / "held.jsonl"), "verifier": "numeric"},
                          "stages": ["sft", "grpo"], "grpo.steps": 1})
    summary = run(parse_config(js), tmp_path / "js")
    assert set(summary["stages"]) == {"sft", "grpo"}


def test_demo_fast_writes_summary(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "demo", "--out", str(tmp_path), "--fast"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    for model in ("base", "grpo", "fork"):
        assert 0.0 <= s[model]["pass_at_1"] <= 1.0
    assert all(s["stages"][k]["wall_s"] > 0 for k in ("sft", "grpo", "fork"))
    for key in ("agreement", "reranked", "shifted", "entropy_ratio", "oracle_recovery", "random_recovery"):
        assert key in s["diff"] and key in s["diff_fork"]
    assert abs(s["diff"]["agreement"] + s["diff"]["reranked"] + s["diff"]["shifted"] - 1) < 1e-6
    assert (tmp_path / "diff.json").exists() and (tmp_path / "passk.json").exists()
    assert "id=\"heatmap\"" in (tmp_path / "report.html").read_text()
    assert "GRPO gain" in proc.stdout and "paper (RL vs base)" in proc.stdout
    # the second run takes the SFT'd base from the cache
    again = subprocess.run([sys.executable, "-m", "forkrl.cli", "demo", "--out", str(tmp_path / "2"), "--fast"],
                           capture_output=True, text=True, timeout=300)
    assert json.loads((tmp_path / "2" / "summary.json").read_text())["stages"]["sft"]["cached"] is True


@pytest.mark.parametrize("kl, loads", [({"beta": 0.0}, 1), ({"estimator": "none"}, 1), ({"beta": 0.1}, 2),
                                       ({"beta": 0.1, "estimator": "k1", "where": "reward"}, 2)])
def test_reference_model_loaded_only_when_beta_positive(tmp_path, monkeypatch, kl, loads):
    import forkrl.models as models

    calls = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    import forkrl.pipeline as pipeline
    import forkrl.trainers.grpo as grpo

    monkeypatch.setattr(pipeline.models, "load_model", models.load_model)
    monkeypatch.setattr(grpo, "load_model", models.load_model)
    run(parse_config(tiny_cfg_dict(**{"grpo.kl": kl, "grpo.steps": 1})), tmp_path / "r")
    assert len(calls) == loads  # the policy, plus the reference only when β > 0


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    import os
    import signal
    import time

    import yaml

    data = tiny_cfg_dict(**{"grpo.steps": 8, "checkpoint": {"every": 1, "keep_last": 2},
                            "grpo.rewards": [{"name": "random"}], "grpo.optim": {"lr": 1e-2}})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    run(parse_config(data), tmp_path / "whole")
    cmd = [sys.executable, "-m", "forkrl.cli", "train", str(cfg_path), "--out", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # wherever it is: mid-step, mid-checkpoint or mid-write
    proc.wait()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("whole", "killed")]
    assert [r["step"] for r in rows[1]] == list(range(1, 9))  # no step lost or done twice, no torn line
    assert _strip_times(rows[0]) == _strip_times(rows[1])
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "grpo" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "grpo" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
