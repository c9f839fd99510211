"""benchmarks/gpu_sampler.py runs end to end on the CPU with a tiny model and writes its table's rows as JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_cpu_run_times_every_backend(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_sampler.py"), "--device", "cpu", "--size", "tiny",
                           "--rows", "4", "--group", "2", "--new-tokens", "6", "--prompt-min", "2", "--prompt-max",
                           "12", "--temperature", "0.7", "--repeats", "1", "--threads", "1", "--cb-blocks", "4",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["backend"]: r for r in doc["results"]}
    assert {"hf", "static", "static_eager"} <= set(rows) and doc["rows"] == 4 and doc["device"] == "cpu"
    for name in ("hf", "static", "static_eager"):
        r = rows[name]
        assert r["seconds"] > 0 and r["tokens"] > 0 and r["same_tokens_as_hf"] is True
        assert r["trainer_gap"] < 1e-5  # float32: the tempered log-probs the trainer recomputes
    if "cb" in rows:  # transformers' continuous batching, where this version has it: its log-probs too
        assert rows["cb"]["same_tokens_as_hf"] is None and rows["cb"]["trainer_gap"] < 1e-5
    assert rows["hf"]["over_hf"] == 1.0 and "÷ hf" in proc.stdout
