"""The reproductions in benchmarks/repro/ run their whole path in a smoke configuration and write their JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_curriculum_smoke(tmp_path):
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/repro/curriculum.py"), "--smoke", "--seeds", "0", "1",
                           "--out", str(tmp_path / "runs"), "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["table"]) == ["perplexity_desc", "perplexity_asc", "shuffle"]
    assert all(len(t["each"]) == 2 for t in result["table"].values()) and result["smoke"] is True
    assert "smoke run: no result" in proc.stdout
    assert result["verdict"] == "not measurable in miniature"  # a smoke run's 3 steps learn nothing
    ppl = [r["start_ppl"] for r in result["runs"] if r["order"] != "shuffle"]
    assert all(p and p["ppl_max"] >= p["ppl_min"] > 0 for p in ppl)


def test_tree_smoke(tmp_path):
    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/repro/tree.py"), "--smoke", "--seeds", "0",
                           "--out", str(tmp_path / "runs"), "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    flat, tree = result["table"]["flat"], result["table"]["tree"]
    assert tree["tokens_sampled"] > 0 and flat["tokens_sampled"] > 0
    # the tree's steps were set so its sampled tokens come near the flat stage's
    assert 0.5 < tree["tokens_sampled"] / flat["tokens_sampled"] < 2
    assert [r["kind"] for r in result["runs"]] == ["flat", "tree"] and result["runs"][1]["paths"] > 0
    assert result["verdict"] == "not measurable in miniature"


def test_grpo_lr_control_smoke(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/repro/grpo_lr.py"), "--smoke", "--seeds", "0",
                           "--out", str(tmp_path / "runs"), "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["lr"] for r in runs] == [1e-4, 1e-9] and all(0 <= r["pass_at_1"] <= 1 for r in runs)
