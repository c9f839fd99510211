"""Plumbing checks of the benchmarks: a tiny run of grpo_step.py (both libraries), cpu_levers.py,
zero_advantage.py and replay_profile.py exits 0 and writes its JSON.

No timing is asserted (the machine is shared); the numbers themselves are checked for shape only."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_step.py"


def test_tiny_run_writes_both_libraries(tmp_path):
    out = tmp_path / "grpo_step.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FORKRL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--warmup", "1", "--steps", "2", "--threads", "1",
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for lib in ("forkrl", "trl"):
        assert r[lib]["steps_timed"] == 2
        for key in ("s_per_step", "sample_s", "train_s", "tokens_per_s", "peak_rss_mb"):
            assert math.isfinite(r[lib][key]) and r[lib][key] > 0, (lib, key, r[lib][key])
        assert r[lib]["gradient_checkpointing"] is False
        assert (r[lib]["param_dtype"], r[lib]["param_device"]) == ("float32", "cpu"), lib
        # the floor is the two phases' matmul FLOPs at the peak: below the measured step, in a 1:3 split
        assert 0 < r[lib]["floor_s"] < r[lib]["s_per_step"]
        assert r[lib]["floor_train_s"] == pytest.approx(3 * r[lib]["floor_sample_s"], rel=1e-12)
        # the floor at the step's own shapes is timed: only its parts' presence and sum are checked
        assert r[lib]["shape_floor_sample_s"] > 0 and r[lib]["shape_floor_train_s"] > 0
        assert r[lib]["shape_floor_s"] == pytest.approx(r[lib]["shape_floor_sample_s"] + r[lib]["shape_floor_train_s"])
    assert r["ratio"] > 0 and r["machine"]["matmul_gflops_peak"] > 0
    lc = r["first_step_losses_same_batch"]
    # same batch, same model, same advantages: the two gradients agree (the loss itself is ~0 on-policy)
    assert lc["grad_norm_rel_diff"] < 1e-4, lc
    assert "forkrl" in proc.stdout and "trl" in proc.stdout


def test_tiny_run_in_bf16_trains_both_libraries_in_bf16(tmp_path):
    """``--dtype bfloat16``, the GPU mode's precision, exercised on the CPU: both libraries' models are bf16."""
    out = tmp_path / "grpo_step_bf16.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FORKRL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--warmup", "0", "--steps", "1", "--threads", "1",
                           "--dtype", "bfloat16", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["setup"]["dtype"] == "bfloat16" and r["setup"]["device"] == "cpu" and r["machine"]["gpu"] is None
    for lib in ("forkrl", "trl"):
        assert (r[lib]["param_dtype"], r[lib]["param_device"]) == ("bfloat16", "cpu"), lib
        assert math.isfinite(r[lib]["s_per_step"]) and "peak_gpu_mb" not in r[lib]
    assert "bfloat16 on cpu" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_cuda_without_a_gpu_is_refused_clearly():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cuda"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0 and "sees no CUDA device" in proc.stderr and "--device cpu" in proc.stderr


def test_cpu_levers_smoke(tmp_path):
    out = tmp_path / "levers.json"
    script = SCRIPT.parent / "cpu_levers.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--tiny", "--skip-compile", "--repeats", "2", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    levers = json.loads(out.read_text())["levers"]
    assert "AdamW step: fused" in levers and not any("compile" in k for k in levers)
    for name, v in levers.items():
        assert len(v["baseline_s"]) >= 2 and len(v["lever_s"]) >= 2, name
        assert v["ratio"] == pytest.approx(v["baseline_median_s"] / v["lever_median_s"]), name
    assert "AdamW step: fused" in proc.stdout
    packed = levers.get("sampling: MKL packed weights (vs sgemm)")
    assert packed is None or packed["same_tokens"] is True  # present where MKL's packed products are


def test_zero_advantage_smoke(tmp_path):
    out = tmp_path / "zero_adv.json"
    script = SCRIPT.parent / "zero_advantage.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--models", "tiny", "--fractions", "0", "0.5", "--rounds", "1",
           "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["zero_group_frac"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert r["skip_s"] > 0 and r["full_s"] > 0 and r["ratio"] == pytest.approx(r["full_s"] / r["skip_s"])
    assert "full ÷ skip" in proc.stdout


def test_replay_profile_smoke(tmp_path):
    out = tmp_path / "replay.json"
    script = SCRIPT.parent / "replay_profile.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--model", "tiny", "--rounds", "1", "--top", "3", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["median_s"]) == {"sample_recorded", "sample_plain", "update_replayed", "update_forward"}
    assert all(v > 0 for v in r["median_s"].values())
    assert len(r["profile_top"]) == 3 and any(o["op"] == "aten::mm" for o in r["profile_top"])
    assert "forward ÷ replayed" in proc.stdout
