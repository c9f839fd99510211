"""benchmarks/agent_filters.py runs its whole path (a base, then every filter over two seeds) in a smoke
configuration and writes its table as JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_compares_the_three_filters(tmp_path):
    out = tmp_path / "af.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/agent_filters.py"), "--smoke", "--seeds", "0", "1",
                           "--out", str(tmp_path / "runs"), "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["filter"] for r in result["table"]] == ["none", "zero_var", "snr"]
    assert all(r["seeds"] == [0, 1] and len(r["success_each"]) == 2 for r in result["table"])
    assert len(result["runs"]) == 6 and all(r["curves"]["mi_seq"] for r in result["runs"])
    assert "held-out success" in proc.stdout and "snr" in proc.stdout
    # finished runs are read back, not run again
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks/agent_filters.py"), "--smoke", "--seeds", "0", "1",
                            "--out", str(tmp_path / "runs"), "--json", str(out)], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and json.loads(out.read_text())["table"] == result["table"]
