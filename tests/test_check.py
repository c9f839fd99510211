"""The invariance harness (`forkrl check`): every reduction passes for SFT and GRPO, and each injected
historical bug is caught."""

import subprocess
import sys

import pytest
import torch
import yaml

from forkrl.check import check_config, run_checks, step_gradient, synthetic_batch
from forkrl.config import parse_config
from forkrl.models import load_model
from forkrl.types import Role

from conftest import tiny_cfg_dict

REDUCTIONS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_mean_token_sum"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_reduction_is_split_invariant(model, reduction):
    cfg = parse_config(tiny_cfg_dict(**{"sft.reduction": reduction, "grpo.reduction": reduction,
                                        "grpo.kl": {"beta": 0.1}, "grpo.entropy_coef": 0.01, "grpo.dual_clip": 3.0}))
    rows = run_checks(model, cfg, trainers=["sft", "grpo"], micro=2, accum=3, world=2, inject="none")
    assert len(rows) == 8
    for r in rows:
        assert r.rel_error < 1e-10, r


def test_gspo_is_split_invariant(model):
    cfg = parse_config(tiny_cfg_dict(**{"grpo.objective": "gspo", "grpo.reduction": "seq_mean_token_mean"}))
    for r in run_checks(model, cfg, trainers=["grpo"], micro=2, accum=2, world=2, inject="none"):
        assert r.rel_error < 1e-10, r


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mean_of_means_is_caught_when_lengths_vary(model, reduction):
    cfg = parse_config(tiny_cfg_dict(**{"sft.reduction": reduction, "grpo.reduction": reduction}))
    rows = run_checks(model, cfg, trainers=["sft", "grpo"], micro=2, accum=3, world=2, inject="mean_of_means")
    split_rows = [r for r in rows if "micro-batches" in r.split]
    # Only a token-count denominator varies between equal-sized micro-batches: the sequence-count
    # reductions are immune to this bug as long as every micro-batch holds the same number of rows.
    if reduction == "token_mean":
        assert all(r.rel_error > 1e-3 for r in split_rows)
    else:
        assert all(r.passed for r in split_rows)


def test_first_microbatch_only_logs_one_kth_of_the_grad_norm(model):
    """With K identical micro-batches the bug's gradient is exactly 1/K of the true one."""
    cfg = parse_config(tiny_cfg_dict())
    one = synthetic_batch(model.config.vocab_size, 2, seed=3)
    K = 4
    batch = one.select(torch.arange(2).repeat(K))
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64).repeat(K)
    T = batch.input_ids_NL.shape[1] - 1
    old = torch.full((2 * K, T), -3.0, dtype=torch.float64)
    for trainer in ("sft", "grpo"):
        kw = dict(adv_N=adv, old_NT=old, ref_NT=None)
        true = step_gradient(model, batch, trainer, cfg, micro=2 * K, world=1, inject="none", **kw)
        bug = step_gradient(model, batch, trainer, cfg, micro=2, world=1, inject="first_microbatch_only", **kw)
        assert torch.allclose(bug * K, true, rtol=1e-10, atol=1e-14)
        assert abs(float(bug.norm() / true.norm()) - 1 / K) < 1e-10


def test_check_cli_exit_codes(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_cfg_dict(**{"stages": ["sft", "grpo"], "grpo.micro_batch_size": 4})))
    run = lambda *extra: subprocess.run([sys.executable, "-m", "forkrl.cli", "check", str(cfg_path), *extra],  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
    ok = run()
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "PASS" in ok.stdout and "FAIL" not in ok.stdout
    for bug in ("first_microbatch_only", "mean_of_means"):
        bad = run("--inject", bug)
        assert bad.returncode == 1 and "FAIL" in bad.stdout, bad.stdout
    (tmp_path / "bad.yaml").write_text("stages: [sft]\nmodel: {tiny: {}}\ntask: {type: nope}\n")
    assert subprocess.run([sys.executable, "-m", "forkrl.cli", "check", str(tmp_path / "bad.yaml")],
                          capture_output=True, timeout=120).returncode == 2


def test_check_config_uses_the_configs_split(model):
    cfg = parse_config(tiny_cfg_dict(**{"stages": ["grpo"], "grpo.micro_batch_size": 4}))  # 16 rows: K=2 per rank
    rows, text = check_config(cfg, world=2, inject="none")
    assert "2 ranks x 2 micro-batches" in text and all(r.passed for r in rows)


def test_check_loads_a_small_local_model_by_path(tiny_model_dir):
    cfg = parse_config(tiny_cfg_dict(**{"model": {"path": str(tiny_model_dir)}, "stages": ["sft"]}))
    rows, _ = check_config(cfg, world=2, inject="none")
    assert rows and all(r.passed for r in rows)


def test_logged_grad_norm_under_injections(tmp_path):
    """At the level of a real `train` run: the logged grad norm does not depend on the micro-batch size,
    is about 1/K of it under `first_microbatch_only`, and moves under `mean_of_means`."""
    import json

    from forkrl.pipeline import run

    def first_grad_norm(name, **over):
        cfg = parse_config(tiny_cfg_dict(**{"stages": ["sft"], "sft.steps": 1, "sft.batch_size": 8, **over}))
        run(cfg, tmp_path / name)
        return json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]

    whole = first_grad_norm("whole", **{"sft.micro_batch_size": 8})
    split = first_grad_norm("split", **{"sft.micro_batch_size": 2})
    first_only = first_grad_norm("first", **{"sft.micro_batch_size": 2, "debug.inject": "first_microbatch_only"})
    means = first_grad_norm("means", **{"sft.micro_batch_size": 2, "debug.inject": "mean_of_means"})
    assert split == pytest.approx(whole, rel=1e-5)
    assert 0.1 < first_only / whole < 0.45  # K = 4: about a quarter
    assert abs(means / whole - 1) > 1e-3


@pytest.mark.parametrize("lora", [True, False])
def test_fork_stage_is_split_invariant_and_both_bugs_are_caught(tmp_path, lora):
    data = tiny_cfg_dict(**{"stages": ["fork"], "fork": {"batch_size": 8, "micro_batch_size": 4, "neg_floor": 0.5,
                                                         "lora": {"enabled": lora}}})
    cfg = parse_config(data)
    rows, text = check_config(cfg, world=2, inject="none")
    assert len(rows) == 4 and all(r.trainer == "fork" and r.rel_error < 1e-10 for r in rows), text
    for inject in ("mean_of_means", "first_microbatch_only"):
        bad, text = check_config(cfg, world=2, inject=inject)
        assert any(r.rel_error > 1e-3 for r in bad if "micro-batches" in r.split), text


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean_token_sum_norm"])
def test_multi_turn_rows_are_split_invariant_and_mean_of_means_is_caught(model, reduction):
    cfg = parse_config(tiny_cfg_dict(**{"task": {"type": "env", "env": "frozenlake", "max_turns": 3},
                                        "stages": ["sft", "grpo"], "sft.reduction": reduction,
                                        "grpo.reduction": reduction, "grpo.echo_coef": 0.05}))
    batch = synthetic_batch(model.config.vocab_size, 6, turns=3)
    for row in batch.role_NL:  # actions with observations between them, as episodes are laid out
        spans = torch.unique_consecutive(row[row != Role.PAD]).tolist()
        assert spans[:2] == [Role.PROMPT, Role.COMPLETION] and Role.ENV in spans
    for r in run_checks(model, cfg, trainers=["sft", "grpo"], micro=2, accum=2, world=2, inject="none"):
        assert r.rel_error < 1e-10, r
    if reduction == "token_mean":
        bad = run_checks(model, cfg, trainers=["sft", "grpo"], micro=2, accum=2, world=2, inject="mean_of_means")
        assert any(not r.passed for r in bad)
