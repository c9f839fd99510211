"""Two real processes (torchrun, gloo, CPU): the step gradient equals one process's to float64 precision
for every reduction, and `forkrl train` under torchrun ends with the parameters of a one-process run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from forkrl.check import step_gradient, synthetic_batch
from forkrl.config import parse_config
from forkrl.models import load_model
from forkrl.pipeline import run

from conftest import tiny_cfg_dict

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:  # each test gets its own rendezvous port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("trainer, reduction", [("sft", "token_mean"), ("sft", "seq_mean_token_mean"),
                                                ("grpo", "token_mean"), ("grpo", "seq_mean_token_mean"),
                                                ("grpo", "seq_mean_token_sum_norm"), ("grpo", "seq_mean_token_sum")])
def test_two_processes_times_k_micro_batches_equal_one_batch(tiny_model_dir, tmp_path, trainer, reduction):
    assert worker_gradient_error(tiny_model_dir, tmp_path, trainer, reduction) < 1e-10


def worker_gradient_error(model_dir, tmp_path, trainer: str, reduction: str, *extra: str) -> float:
    """The step gradient of ``dist_grad_worker.py`` on 2 ranks (micro-batches of 2; ``extra``: its strategy and
    unevenness) against one process's whole batch in float64: the largest difference over the largest entry."""
    out = tmp_path / "grad.pt"
    proc = torchrun(str(HERE / "dist_grad_worker.py"), str(model_dir), str(out), trainer, reduction, "2", "none", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    model = load_model(str(model_dir), dtype=torch.float64)
    cfg = parse_config(tiny_cfg_dict(**{"sft.reduction": reduction, "grpo.reduction": reduction}))
    batch = synthetic_batch(model.config.vocab_size, 12, seed=5)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(12, generator=g, dtype=torch.float64)
    old = -2.0 + 0.1 * torch.randn(12, batch.input_ids_NL.shape[1] - 1, generator=g, dtype=torch.float64)
    ref = step_gradient(model, batch, trainer, cfg, micro=12, world=1, inject="none", adv_N=adv, old_NT=old, ref_NT=None)
    return float((got - ref).abs().max() / ref.abs().max())


def test_mean_of_means_across_real_ranks_is_caught(tiny_model_dir, tmp_path):
    out = tmp_path / "grad.pt"
    proc = torchrun(str(HERE / "dist_grad_worker.py"), str(tiny_model_dir), str(out), "sft", "token_mean", "2",
                    "mean_of_means")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    model = load_model(str(tiny_model_dir), dtype=torch.float64)
    cfg = parse_config(tiny_cfg_dict())
    batch = synthetic_batch(model.config.vocab_size, 12, seed=5)
    zeros = torch.zeros(12, dtype=torch.float64)
    ref = step_gradient(model, batch, "sft", cfg, micro=12, world=1, inject="none", adv_N=zeros,
                        old_NT=torch.zeros(12, batch.input_ids_NL.shape[1] - 1, dtype=torch.float64), ref_NT=None)
    assert float((got - ref).abs().max() / ref.abs().max()) > 1e-3


def train_one_and_two_processes(tmp_path, data: dict) -> None:
    """``forkrl train`` of ``data`` into tmp_path/one (in-process) and tmp_path/two (torchrun, 2 ranks)."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    run(parse_config(data), tmp_path / "one")
    proc = torchrun("-m", "forkrl.cli", "train", str(cfg_path), "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]


RANKED_COIN = """
import os


def coin(rng):
    # the built-in 'random' reward, plus a component only this rank's rows have: every rank must still gather
    # the same components (Dist.union), or the step's all_gather would wait forever
    return {"score": float(rng.random() < 0.5), f"rank{os.environ.get('RANK', '0')}": 1.0}
"""


def test_train_under_torchrun_matches_one_process(tmp_path):
    (tmp_path / "coin.py").write_text(RANKED_COIN)
    data = tiny_cfg_dict(**{"stages": ["sft", "grpo"], "sft.steps": 3, "grpo.steps": 3,
                            "grpo.rewards": [{"fn": f"{tmp_path / 'coin.py'}:coin"}], "grpo.optim": {"lr": 1e-2},
                            # the snr filter ranks the step's groups against each other: across ranks, not per rank
                            "grpo.filter": "snr", "grpo.snr_top_p": 0.6})
    train_one_and_two_processes(tmp_path, data)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "grpo" / "final").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "grpo" / "final").state_dict()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k
    moved = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "sft" / "final").state_dict()
    assert any(not torch.equal(one[k], moved[k]) for k in one)  # GRPO did update the weights
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [(r["stage"], r["step"]) for r in rows[0]] == [(r["stage"], r["step"]) for r in rows[1]]  # rank 0 only
    for a, b in zip(rows[0], rows[1]):
        for key in ("reward_mean", "rows_trained", "groups_kept_frac", "group_reward_std", "completion_len_mean",
                    "truncation_rate"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a, b)
        assert b["world_size"] == 2 and a["world_size"] == 1
        if a["stage"] == "grpo":
            assert "reward/coin/rank1" not in a and b["reward/coin/rank0"] == b["reward/coin/rank1"] == 1.0


def test_fork_stage_under_torchrun_matches_one_process(tmp_path):
    data = tiny_cfg_dict(**{"stages": ["sft", "fork"], "sft.steps": 3,
                            "fork": {"candidates": 4, "samples_per_problem": 4, "pass_rate_min": 0.0,
                                     "pass_rate_max": 1.0, "rewards": [{"name": "random"}], "epochs": 2,
                                     "batch_size": 8, "micro_batch_size": 2, "gate": {"quantile": 0.5},
                                     "reweight": True, "optim": {"lr": 1e-2}}})
    train_one_and_two_processes(tmp_path, data)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "fork" / "final").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "fork" / "final").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "sft" / "final").state_dict()
    assert any(not torch.equal(one[k], base[k]) for k in one)  # the fork stage did update the weights
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    fork = [[r for r in rs if r["stage"] == "fork"] for rs in rows]
    assert len(fork[0]) == len(fork[1]) == 4  # 16 rows, 8 per step, 2 epochs; rank 0 writes once
    for a, b in zip(*fork):
        assert (a["decision_tokens"], a["anchor_tokens"]) == (b["decision_tokens"], b["anchor_tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert (a["ess"] is None) == (b["ess"] is None) == (a["epoch"] == 1)  # fork.reweight from epoch 2
        assert a["ess"] == (None if b["ess"] is None else pytest.approx(b["ess"], rel=1e-5))


def test_sizes_that_do_not_split_across_ranks_name_the_key():
    from forkrl.config import ConfigError
    from forkrl.distributed import Dist

    with pytest.raises(ConfigError, match=r"grpo.prompts_per_step = 4 is not divisible by the world size 3"):
        Dist(rank=0, world_size=3).shard(4, "grpo.prompts_per_step")
    assert Dist(rank=1, world_size=2).shard(8, "x") == slice(4, 8)


def test_multi_turn_grpo_under_torchrun_matches_one_process(tmp_path):
    # episodes on FrozenLake, each rank playing its shard of the maps turn by turn; ECHO on, so the observation
    # tokens' denominator is the step's across ranks too
    data = tiny_cfg_dict(**{"stages": ["sft", "grpo"], "sft.steps": 3, "grpo.steps": 2, "grpo.optim": {"lr": 1e-2},
                            "task": {"type": "env", "env": "frozenlake", "max_turns": 3, "max_episode_tokens": 200,
                                     "train_size": 40, "heldout_size": 4, "demos": {"optimal": 1, "wander": 1}},
                            "model.tiny.max_positions": 256, "sampling.max_new_tokens": 10,
                            "grpo.echo_coef": 0.05, "grpo.filter": "snr", "eval.num_problems": 4})
    train_one_and_two_processes(tmp_path, data)
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "grpo" / "final").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "grpo" / "final").state_dict()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    for a, b in zip(rows[0], rows[1]):
        if a["stage"] == "grpo":
            for key in ("episode_success", "episode_turns", "env_ce", "rows_trained", "completion_len_mean"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), (key, a, b)
