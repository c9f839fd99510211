"""benchmarks/backends.py runs end to end on a tiny model and writes its table's rows as JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_times_both_backends(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/backends.py"), "--configs", "tiny", "--repeats", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 1 and rows[0]["rows"] == 2 and rows[0]["hf_s"] > 0 and rows[0]["fused_s"] > 0
    assert rows[0]["same_tokens"] is True  # the tiny model's logits agree far inside any draw's margin
    assert "hf÷fused" in proc.stdout and rows[0]["auto_takes"] in ("hf", "fused") and rows[0]["auto_s"] > 0
