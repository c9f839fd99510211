"""scripts/gpu_check.sh runs end to end in its CPU smoke mode (the same parts at tiny sizes), so the one run a GPU
machine gets is not spent finding a typo: every part exits 0 and leaves its output, and the summary gathers them."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_in_smoke_mode(tmp_path):
    out = tmp_path / "gc"
    env = {**os.environ, "PYTHON": sys.executable, "FORKRL_WHEELS": str(tmp_path / "no-wheels")}
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--smoke", str(out)], capture_output=True,
                          text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = {p["part"]: p["rc"] for p in summary["parts"]}
    assert parts == {"env": 0, "gpu_tests": 0, "sampler": 0, "grpo_hf": 0, "grpo_static": 0, "grpo_step": 0}, parts
    assert summary["ok"] is True
    for name in ("env.json", "gpu_tests.xml", "gpu_sampler.json", "grpo_step.json"):
        assert (out / name).stat().st_size > 0, name
    for backend in ("hf", "static"):
        run = summary[f"grpo_{backend}"]
        assert run["steps"] == 2 and all(m < 1e-4 for m in run["logp_mismatch"])  # float32 on a CPU
        assert all(abs(w - 1.0) < 1e-3 for w in run["correction_weight_mean"])
        assert (out / f"grpo_{backend}" / "grpo" / "final" / "DONE").exists()
