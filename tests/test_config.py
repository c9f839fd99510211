"""Config validation: every mistake names its key path and YAML line; examples load; nothing mutates."""

from pathlib import Path

import pytest
import yaml

from forkrl.config import ConfigError, load_config, parse_config

from conftest import tiny_cfg_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")) + [ROOT / "forkrl/configs/demo.yaml"])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.stages


def test_errors_name_key_path_line_and_allowed_values(tmp_path):
    text = "stages: [sft]\nmodel:\n  tiny: {}\ntask:\n  type: arithmetic\n  digts: 3\ngrpo:\n  reduction: mean\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml")
    msg = str(e.value)
    assert "task.digts (line 6): unknown key; allowed keys here: type, digits," in msg
    assert "grpo.reduction (line 8)" in msg and "'seq_mean_token_sum_norm'" in msg and "got 'mean'" in msg


@pytest.mark.parametrize("over, needle", [
    ({"task.type": "arithmetc"}, "'arithmetic', 'reasoning_gym', 'jsonl'"),
    ({"stages": ["sft", "ppo"]}, "stages.1"),
    ({"grpo.kl": {"beta": -1}}, "grpo.kl.beta"),
    ({"grpo.dual_clip": 0.5}, "grpo.dual_clip"),
    ({"sft.micro_batch_size": 3}, "sft.micro_batch_size (3) must divide sft.batch_size (8)"),
    ({"model.path": "/some/where"}, "set exactly one of model.path"),
    ({"stages": []}, "stages"),
])
def test_invalid_values(over, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(tiny_cfg_dict(**over))
    assert needle in str(e.value)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("stages: [sft\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen_and_round_trips():
    cfg = parse_config(tiny_cfg_dict())
    with pytest.raises(Exception):
        cfg.seed = 3
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert cfg.grpo.rows_per_step == 16


def test_snr_filter_keys():
    cfg = parse_config(tiny_cfg_dict(**{"grpo.filter": "snr"}))
    assert cfg.grpo.filter_kwargs == {"top_p": 0.9, "mode": "linear"}
    cfg = parse_config(tiny_cfg_dict(**{"grpo.filter": "snr", "grpo.snr_top_p": 0.5, "grpo.snr_mode": "softmax"}))
    assert cfg.grpo.filter_kwargs == {"top_p": 0.5, "mode": "softmax"}
    assert parse_config(tiny_cfg_dict(**{"grpo.filter": "zero_variance_groups"})).grpo.filter_kwargs == {}
    with pytest.raises(ConfigError, match="grpo.snr_top_p and grpo.snr_mode set the snr filter.*'none'"):
        parse_config(tiny_cfg_dict(**{"grpo.snr_top_p": 0.5}))
    with pytest.raises(ConfigError, match="snr_top_p"):
        parse_config(tiny_cfg_dict(**{"grpo.filter": "snr", "grpo.snr_top_p": 1.5}))
