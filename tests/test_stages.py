"""Per-stage configuration: a stage is a kind (its section as given) or {kind: {name, its own keys}} merged over the
kind's section. Two GRPO stages with different rewards run, resume exactly and are each checked; old configs read
as before; a wrong stage entry is a config error naming it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from forkrl.config import ConfigError, load_config, parse_config
from forkrl.pipeline import run

from conftest import tiny_cfg_dict

ROOT = Path(__file__).resolve().parents[1]
TWO_RL = ["sft",
          {"grpo": {"name": "coarse", "rewards": [{"name": "correct"}]}},
          {"grpo": {"name": "refined", "steps": 3, "optim": {"lr": 3e-4},
                    "rewards": [{"name": "correct"}, {"name": "format", "weight": 0.5}]}}]


def strip_times(rows):
    drop = ("time", "sample_s", "train_s", "sample_tokens_per_s", "train_tokens_per_s", "eval_s", "wall_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_each_stage_gets_its_section_with_its_own_keys_over_it():
    cfg = parse_config(tiny_cfg_dict(**{"stages": TWO_RL, "grpo.optim": {"lr": 1e-4, "warmup_steps": 1}}))
    plan = cfg.stage_plan
    assert [(s.name, s.kind) for s in plan] == [("sft", "sft"), ("coarse", "grpo"), ("refined", "grpo")]
    assert [s.cfg.grpo.steps for s in plan] == [2, 2, 3]  # refined's own, the others the section's
    assert [r.name for r in plan[2].cfg.grpo.rewards] == ["correct", "format"]  # a list is replaced, not merged
    assert plan[2].cfg.grpo.optim.lr == 3e-4 and plan[2].cfg.grpo.optim.warmup_steps == 1  # a mapping merges
    assert plan[0].cfg is cfg and plan[1].cfg.grpo.group_size == cfg.grpo.group_size
    assert cfg.stage_kinds == ["sft", "grpo", "grpo"]
    assert parse_config(yaml.safe_load(cfg.to_yaml())) == cfg  # the saved config reads back the same
    # the old form is unchanged: names are the kinds, repeated kinds numbered by position
    assert [s.name for s in parse_config(tiny_cfg_dict(stages=["sft", "grpo"])).stage_plan] == ["sft", "grpo"]
    assert [s.name for s in parse_config(tiny_cfg_dict(stages=["grpo", "grpo"])).stage_plan] == ["0-grpo", "1-grpo"]


@pytest.mark.parametrize("entry, needle", [
    ({"grpo": {"stepz": 3}}, "stages.1.grpo.stepz: unknown key; allowed keys here: steps"),
    ({"grpo": {"steps": 0}}, "stages.1.grpo.steps: Input should be greater than or equal to 1"),
    ({"grpo": {"rewards": [{"name": "nope"}]}}, "stages.1.grpo.rewards.0.name: unknown reward 'nope'"),
    ({"grpo": {"name": "rewards"}}, "stages.1.grpo.name: 'rewards' names the stage's directory"),
    ({"grpo": {"name": "a/b"}}, "stages.1.grpo.name: 'a/b' names the stage's directory"),
    ({"grpo": {}, "sft": {}}, "stages.1: a stage is a kind (sft, grpo, fork, dpo) or one mapping"),
    ({"grpx": {}}, "unknown stage 'grpx'; valid: 'sft', 'grpo', 'fork'"),
    ({"grpo": {"name": "sft"}}, "stages.1: two stages are named 'sft'"),
    ({"grpo": {"echo_coef": 0.1}}, "stage 'refined'"),
])
def test_a_wrong_stage_entry_names_itself(tmp_path, entry, needle):
    if "echo_coef" in entry.get("grpo", {}):
        entry = {"grpo": {"name": "refined", "echo_coef": 0.1}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict(stages=["sft", entry])))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value), str(e.value)
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "validate", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_a_stage_reward_file_is_relative_to_the_config(tmp_path):
    (tmp_path / "mine.py").write_text("def short(completion):\n    return float(len(completion) < 8)\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg_dict(stages=[{"grpo": {"rewards": [{"fn": "mine.py:short"}]}}])))
    (stage,) = load_config(path).stage_plan
    assert stage.cfg.grpo.rewards[0].fn == f"{(tmp_path / 'mine.py').resolve()}:short"


def test_two_grpo_stages_with_their_own_rewards_run_resume_and_check(tmp_path, monkeypatch):
    data = tiny_cfg_dict(**{"stages": TWO_RL, "checkpoint": {"every": 1, "keep_last": 2}})
    cfg = parse_config(data)
    whole = run(cfg, tmp_path / "whole")
    assert list(whole["stages"]) == ["sft", "coarse", "refined"]
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    by_stage = {s: [r for r in rows if r["stage"] == s] for s in ("sft", "coarse", "refined")}
    assert [len(v) for v in by_stage.values()] == [3, 2, 3]
    assert all("reward/format" not in r for r in by_stage["coarse"])  # each stage scored by its own rewards
    assert all(r["reward/format"] is not None for r in by_stage["refined"])
    record = json.loads((tmp_path / "whole" / "rewards.json").read_text())
    assert [(r["stage"], r["label"]) for r in record] == [("coarse", "correct"), ("refined", "correct"),
                                                          ("refined", "format")]
    assert json.loads((tmp_path / "whole" / "refined" / "final" / "stage.json").read_text())["steps"] == 3

    import forkrl.trainers.loop as loop

    real = loop.maybe_checkpoint

    def crash_in_refined(ctx, step, *args, **kw):
        real(ctx, step, *args, **kw)
        if ctx.stage_dir.name == "refined" and step == 2:
            raise KeyboardInterrupt  # a kill in the second RL stage, after its step 2 was checkpointed

    monkeypatch.setattr(loop, "maybe_checkpoint", crash_in_refined)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "killed")
    monkeypatch.setattr(loop, "maybe_checkpoint", real)
    assert (tmp_path / "killed" / "coarse" / "final" / "DONE").exists()
    resumed = run(cfg, tmp_path / "killed", resume=True)
    again = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert strip_times(again) == strip_times(rows)
    assert {k: v["pass_at_1"] for k, v in resumed["stages"].items()} == \
        {k: v["pass_at_1"] for k, v in whole["stages"].items()}
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "refined" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "refined" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    from forkrl.check import check_config

    checked, text = check_config(cfg, world=2, inject="none")
    assert {r.stage for r in checked} == {"sft", "coarse", "refined"} and all(r.passed for r in checked), text
    assert "grpo (refined)" in text


def test_eval_scores_with_a_named_stage_rewards():
    from forkrl.inference import stage_rewards

    cfg = parse_config(tiny_cfg_dict(stages=TWO_RL))
    name, part = stage_rewards(cfg, None)
    assert name == "coarse" and [r.name for r in part.rewards] == ["correct"]
    name, part = stage_rewards(cfg, "refined")
    assert [r.name for r in part.rewards] == ["correct", "format"]
    with pytest.raises(ConfigError, match="its stages with rewards are coarse, refined"):
        stage_rewards(cfg, "nope")


def test_the_two_stage_example_validates_and_runs_short(tmp_path):
    example = ROOT / "examples" / "two_stage_rl.yaml"
    cfg = load_config(example)
    assert [s.name for s in cfg.stage_plan] == ["sft", "verifiable", "judged"]
    short = ["--set", "sft.steps=2", "--set", "grpo.steps=1", "--set", "stages.2.grpo.steps=1",
             "--set", "task.train_size=40", "--set", "eval.num_problems=4"]
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "train", str(example), "--out", str(tmp_path / "r"),
                           *short], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert list(summary["stages"]) == ["sft", "verifiable", "judged"]
