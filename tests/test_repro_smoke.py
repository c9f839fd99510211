"""The reproductions in benchmarks/repro/ run their whole path in a smoke configuration and write their JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke(tmp_path, name: str, *seeds: str):
    """Run ``benchmarks/repro/<name>.py --smoke`` over ``seeds``; (the process, its JSON)."""
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(ROOT / f"benchmarks/repro/{name}.py"), "--smoke", "--seeds", *seeds,
                           "--out", str(tmp_path / "runs"), "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_curriculum_smoke(tmp_path):
    proc, result = smoke(tmp_path, "curriculum", "0", "1")
    assert list(result["table"]) == ["perplexity_desc", "perplexity_asc", "shuffle"]
    assert all(len(t["each"]) == 2 for t in result["table"].values()) and result["smoke"] is True
    assert "smoke run: no result" in proc.stdout
    assert result["verdict"] == "not measurable in miniature"  # a smoke run's 3 steps learn nothing
    ppl = [r["start_ppl"] for r in result["runs"] if r["order"] != "shuffle"]
    assert all(p and p["ppl_max"] >= p["ppl_min"] > 0 for p in ppl)


def test_tree_smoke(tmp_path):
    _, result = smoke(tmp_path, "tree", "0")
    flat, tree = result["table"]["flat"], result["table"]["tree"]
    assert tree["tokens_sampled"] > 0 and flat["tokens_sampled"] > 0
    # the tree's steps were set so its sampled tokens come near the flat stage's
    assert 0.5 < tree["tokens_sampled"] / flat["tokens_sampled"] < 2
    assert [r["kind"] for r in result["runs"]] == ["flat", "tree"] and result["runs"][1]["paths"] > 0
    assert result["verdict"] == "not measurable in miniature"


def test_grpo_lr_control_smoke(tmp_path):
    _, result = smoke(tmp_path, "grpo_lr", "0")
    runs = result["runs"]
    assert [r["lr"] for r in runs] == [1e-4, 1e-9] and all(0 <= r["pass_at_1"] <= 1 for r in runs)


def test_ttrl_smoke(tmp_path):
    proc, result = smoke(tmp_path, "ttrl", "0")
    assert [(r["split"], r["seed"]) for r in result["runs"]] == [("agree", 0), ("disagree", 0)]
    assert [(r["split"], r["seed"]) for r in result["controls"]] == [("agree", 0), ("disagree", 0)]
    assert all(0 <= r["pass_base"] <= 1 and 0 <= r["pass_tuned"] <= 1 for r in result["runs"])
    assert all("ttrl_label_accuracy_last" in r for r in result["runs"])  # the trainer's label health came back
    votes = (tmp_path / "runs" / "agree-s0" / "majority.jsonl").read_text().splitlines()
    assert len(votes) == 2 * 2  # 2 steps × 2 questions a step
    assert result["verdict"] == {"sharpening": "not measurable in miniature", "erasure": "not measurable in miniature"}
    assert "smoke run: no result" in proc.stdout


def test_spurious_smoke(tmp_path):
    proc, result = smoke(tmp_path, "spurious", "0")
    assert [r["arm"] for r in result["runs"]] == ["clip", "no_clip"] and list(result["table"]) == ["clip", "no_clip"]
    assert result["table"]["no_clip"]["clip_frac"] == 0.0  # no clip: no token is ever clipped
    assert all(0 <= r["modal_share"] <= 1 for r in result["runs"])
    assert result["verdict"] == "not measurable in miniature" and "smoke run: no result" in proc.stdout
