"""``forkrl demo``: build a tiny base, SFT it, evaluate, GRPO, evaluate again, print a table.

The SFT'd base is cached (by config) under the forkrl cache directory, so a second run skips SFT.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path

import yaml

from . import models
from .checkpoint import atomic_write_text
from .config import parse_config
from .pipeline import run


def demo_config(*, fast: bool = False, stages=("sft", "grpo")):
    text = resources.files("forkrl").joinpath("configs/demo.yaml").read_text()
    data = yaml.safe_load(text)
    data["stages"] = list(stages)
    if fast:  # a smoke test of the whole path, not a result
        data["sft"]["steps"], data["grpo"]["steps"] = 20, 3
        data["task"]["train_size"], data["eval"] = 300, {"num_problems": 20, "samples_per_problem": 2}
        data["grpo"]["eval_every"] = 0
    return parse_config(data, source="forkrl/configs/demo.yaml")


def cached_base(fast: bool) -> tuple[Path, float, bool]:
    """The SFT'd demo base: (path, SFT wall seconds when it was built, whether it came from the cache)."""
    cfg = demo_config(fast=fast, stages=("sft",))
    # The key covers the config and the code that makes the base, so an upgrade never reuses a stale one.
    sources = ("tasks/arithmetic.py", "trainers/sft.py", "trainers/common.py", "sampling/hf.py")
    code = [resources.files("forkrl").joinpath(f).read_text() for f in sources]
    key = models.spec_hash(cfg.model_dump(mode="json"), code)
    cached = models.cache_dir() / f"demo-base-{key}"
    final = cached / "sft" / "final"
    if (final / "DONE").exists():
        return final, json.loads((cached / "summary.json").read_text())["stages"]["sft"]["wall_s"], True
    tmp = cached.with_name(cached.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    summary = run(cfg, tmp)
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    return final, summary["stages"]["sft"]["wall_s"], False


def run_demo(out: Path, *, fast: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base_path, sft_wall, from_cache = cached_base(fast)
    base_summary = json.loads((base_path.parents[1] / "summary.json").read_text())["stages"]["sft"]
    grpo_dir = out / "grpo-run"
    shutil.rmtree(grpo_dir, ignore_errors=True)
    grpo = run(demo_config(fast=fast, stages=("grpo",)), grpo_dir, init_path=base_path)["stages"]["grpo"]
    summary = {
        "base": {"pass_at_1": base_summary["pass_at_1"], "strategies": base_summary["strategies"],
                 "path": str(base_path)},
        "grpo": {"pass_at_1": grpo["pass_at_1"], "strategies": grpo["strategies"],
                 "path": str(grpo_dir / "grpo" / "final")},
        "stages": {"sft": {"wall_s": sft_wall, "cached": from_cache}, "grpo": {"wall_s": grpo["wall_s"]}},
        "total_wall_s": round(time.time() - t0, 1),
        "fast": fast,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(table(summary))
    return summary


def table(s: dict) -> str:
    rows = [("model", "held-out pass@1", "strategy mix (share: accuracy)", "stage wall s")]
    for name, stage in (("base (SFT)", "sft"), ("GRPO", "grpo")):
        key = "base" if stage == "sft" else "grpo"
        mix = ", ".join(f"{k} {v[0]:.0%}: {v[1]:.0%}" for k, v in s[key]["strategies"].items())
        wall = f"{s['stages'][stage]['wall_s']:.0f}" + (" (cached)" if s["stages"][stage].get("cached") else "")
        rows.append((name, f"{s[key]['pass_at_1']:.3f}", mix, wall))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    gain = s["grpo"]["pass_at_1"] - s["base"]["pass_at_1"]
    lines.append(f"GRPO gain: {gain * 100:+.1f} points; demo wall time {s['total_wall_s']:.0f}s")
    return "\n".join(lines)
