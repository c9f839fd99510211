"""The commands a user reaches for in the first hour, end to end on a tiny model: ``validate``, ``--set``,
``--version``, ``rewards check``, ``eval``, ``generate``; the Python API with callables and a model object; DAPO's
overlong shaping and truncated-row masking."""

import json
import subprocess
import sys

import pytest
import yaml

from forkrl.config import ConfigError, load_config
from forkrl.rewards.builtin import overlong

from conftest import tiny_cfg_dict

REWARDS_PY = """
def parts(completion):
    return {"score": len(completion) / 10, "digits": float(sum(ch.isdigit() for ch in completion))}

def flaky(completion):
    return None if len(completion) % 2 else 1.0
"""


def forkrl(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "forkrl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def config(tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS_PY)
    data = tiny_cfg_dict(**{"grpo.rewards": [{"name": "correct"}, {"fn": "rewards.py:parts", "weight": 0.1}]})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_set_overrides_validate_like_the_file(config):
    cfg = load_config(config, ["grpo.steps=7", "grpo.rewards.1.weight=0.5", "sampling.temperature=0.7"])
    assert (cfg.grpo.steps, cfg.grpo.rewards[1].weight, cfg.sampling.temperature) == (7, 0.5, 0.7)
    assert cfg.grpo.rewards[1].fn.endswith("rewards.py:parts")  # still anchored to the config's directory
    for bad, needle in (("grpo.steps=many", r"grpo.steps: .*integer.*\(from --set grpo.steps\)"),
                        ("grpo.stepz=3", r"grpo.stepz: unknown key.*steps, prompts_per_step"),
                        ("grpo.steps", "expected KEY=VALUE"),
                        ("grpo.rewards.9.weight=1", "grpo.rewards is a list of 2"),
                        ("seed.x=1", "seed is 0, not a section")):
        with pytest.raises(ConfigError, match=needle):
            load_config(config, [bad])


def test_validate_version_and_a_bad_reward(config, tmp_path):
    proc = forkrl("validate", config, "--set", "grpo.steps=3")
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout and "grpo.rewards: parts" in proc.stdout and "sha256" in proc.stdout
    proc = forkrl("validate", config, "--set", "grpo.rewards.1.fn=rewards.py:nothing")
    assert proc.returncode == 2 and "'nothing' is not defined" in proc.stderr and "(its functions: flaky, parts)" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = forkrl("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("forkrl ") and "torch" in proc.stdout


def test_rewards_check_prints_values_and_exits_1_on_a_failing_reward(config):
    proc = forkrl("rewards", "check", config, "--problems", "3")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("grpo.")}
    assert set(lines) == {"grpo.correct", "grpo.parts"} and "digits=" in lines["grpo.parts"]
    assert lines["grpo.correct"].split()[3] == "1.000"  # the gold completions are right
    proc = forkrl("rewards", "check", config, "--set", "grpo.rewards.1.fn=rewards.py:flaky")
    assert proc.returncode == 1 and "FAILED" in proc.stdout and "returned None" in proc.stdout


def test_eval_and_generate_on_a_run(config, tmp_path):
    out = tmp_path / "out"
    assert forkrl("train", config, "--out", out, "--set", "grpo.steps=1").returncode == 0
    proc = forkrl("eval", out, "--task", out, "--n", 4, "--num-problems", 5, "--out", tmp_path / "ev")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert list(result["pass_at_k"]) == ["1", "2", "4"] and result["problems"] == 5 and result["n"] == 4
    assert {"reward", "reward/correct", "reward/parts", "reward/parts/digits"} <= set(result["means"])
    p1 = result["pass_at_k"]["1"]["mean"]
    assert p1 == pytest.approx(sum(p["passed"] for p in result["per_problem"]) / 20)
    # the same seed gives the same completions, with or without --out
    a = forkrl("generate", out, "--task", config, "--n", 2, "--num-problems", 2)
    b = forkrl("generate", out, "--task", config, "--n", 2, "--num-problems", 2, "--out", tmp_path / "g.jsonl")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    rows = [json.loads(line) for line in a.stdout.splitlines()]
    assert len(rows) == 4 and {r["id"] for r in rows} == {"heldout-0", "heldout-1"}
    assert rows == [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    proc = forkrl("generate", out, "--prompt", "12+34=", "--max-new-tokens", 3)
    assert proc.returncode == 0 and json.loads(proc.stdout)["prompt"] == "12+34="
    assert forkrl("generate", out).returncode == 2


def test_python_api_takes_callables_and_a_model_object(tmp_path, tiny_model_dir):
    import forkrl
    from forkrl.models import load_model, load_tokenizer

    seen = []

    def brevity(completion, progress):
        seen.append(progress)
        return -len(completion) / 100

    data = tiny_cfg_dict(**{"model": {"path": "unused"}})
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    summary = forkrl.train(data, tmp_path / "run", rewards=[(brevity, 0.5), {"name": "correct"}], model=model,
                           tokenizer=tokenizer, overrides=["grpo.steps=2"])
    assert summary["stages"]["grpo"]["steps"] == 2 and sorted(set(seen)) == [0.5, 1.0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/brevity"] <= 0 for r in rows)
    assert (tmp_path / "run" / "input-model" / "DONE").exists()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["grpo"]["rewards"][0]["fn"].startswith("python:") and saved["grpo"]["rewards"][0]["weight"] == 0.5


def test_overlong_shaping_follows_dapo():
    values = [overlong(list(range(n)), max_new_tokens=20, buffer=8) for n in (0, 12, 16, 20)]
    assert values == [0.0, 0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="buffer=30"):
        overlong([1], max_new_tokens=20, buffer=30)


def test_mask_truncated_rows_get_no_loss(tmp_path):
    from forkrl.config import parse_config
    from forkrl.pipeline import run

    cfg = parse_config(tiny_cfg_dict(**{"grpo.mask_truncated": True, "grpo.skip_zero_advantage": False,
                                        "grpo.rewards": [{"name": "correct"},
                                                         {"name": "overlong", "kwargs": {"buffer": 4}}]}))
    run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        rows_per_step = 16
        assert r["rows_trained"] == round(rows_per_step * (1 - r["truncation_rate"]))
        assert r["reward/overlong"] <= 0
