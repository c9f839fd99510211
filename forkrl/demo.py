"""``forkrl demo``: build a tiny base, SFT it, then from the same base run GRPO and the RL-free fork stage,
measure what each changed (``forkrl diff``, ``forkrl passk``), print tables and write ``report.html``.

The SFT'd base is cached (by config and code) under the forkrl cache directory, so a second run skips SFT.
"""

from __future__ import annotations

import argparse
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

# What Sparse Policy Selection (arXiv 2605.06241) reports for RL-tuned vs base models (METHODS §3).
PAPER = {"agreement": "96–99%", "reranked": "1–4%", "shifted": "0%", "entropy_ratio": "5–12×",
         "promoted_rank_mean": "2.1–2.4", "oracle_recovery": "most of the gain", "random_recovery": "≈ 0",
         "entropy_gate_recovery": "close to the oracle"}
DIFF_KEYS = tuple(PAPER)
PASSK_N, PASSK_PROBLEMS = 32, 100


def demo_config(*, fast: bool = False, stages=("sft", "grpo"), tiny: dict | None = None):
    """The demo's config; ``tiny`` overrides keys of its ``model.tiny`` spec (a larger base, for studies)."""
    text = resources.files("forkrl").joinpath("configs/demo.yaml").read_text()
    data = yaml.safe_load(text)
    data["stages"] = list(stages)
    data["model"]["tiny"].update(tiny or {})
    if fast:  # a smoke test of the whole path, not a result
        data["sft"]["steps"], data["grpo"]["steps"] = 20, 3
        data["task"]["train_size"], data["eval"] = 300, {"num_problems": 20, "samples_per_problem": 2}
        data["grpo"]["eval_every"] = 0
        data["fork"].update(candidates=8, samples_per_problem=4, epochs=1, pass_rate_min=0.0, pass_rate_max=1.0)
    return parse_config(data, source="forkrl/configs/demo.yaml")


def cached_base(fast: bool, tiny: dict | None = None) -> tuple[Path, float, bool]:
    """The SFT'd demo base: (path, SFT wall seconds when it was built, whether it came from the cache)."""
    cfg = demo_config(fast=fast, stages=("sft",), tiny=tiny)
    # The key covers the config and the code that makes the base, so an upgrade never reuses a stale one.
    sources = ("tasks/arithmetic.py", "trainers/sft.py", "trainers/accumulate.py", "trainers/loop.py",
               "trainers/optim.py", "forward.py", "sampling/decode.py", "sampling/hf.py", "cpu/engine.py")
    code = [resources.files("forkrl").joinpath(f).read_text() for f in sources]
    # Only the sections SFT and its evaluation read: tuning the grpo or fork sections keeps the base.
    spec = {k: getattr(cfg, k).model_dump(mode="json") for k in ("model", "task", "sft", "sampling", "eval")}
    key = models.spec_hash({**spec, "seed": cfg.seed}, code)
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


def train_from_base(out: Path, base_path: Path, stage: str, fast: bool) -> dict:
    run_dir = out / f"{stage}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = run(demo_config(fast=fast, stages=(stage,)), run_dir, init_path=base_path)["stages"][stage]
    return {**result, "path": str(run_dir / stage / "final")}


def diagnose(out: Path, base_path: Path, tuned: dict[str, str], fast: bool) -> tuple[dict, dict]:
    """``forkrl diff`` of each tuned model against the base (GRPO's into diff.json, the report's), then
    ``forkrl passk`` of all three; returns (diff summaries by model, pass@k summary)."""
    from .diagnostics import passk
    from .diagnostics.tokendiff import run_diff

    task = out / "grpo-run"  # its config.yaml holds the demo's task, sampling and eval sections
    diffs = {}
    for name, path in tuned.items():
        where = out if name == "grpo" else out / f"diff-{name}"
        diffs[name] = run_diff(str(base_path), path, str(task), out=where)["summary"]
    parser = argparse.ArgumentParser()
    passk.add_arguments(parser)
    n, problems = (4, 10) if fast else (PASSK_N, PASSK_PROBLEMS)
    args = parser.parse_args(["--task", str(task), "--out", str(out), "--n", str(n), "--num-problems", str(problems),
                              "--model", f"base={base_path}", *(f"--model={k}={v}" for k, v in tuned.items())])
    passk.main(args)
    result = json.loads((out / "passk.json").read_text())
    return diffs, {name: {"pass_at_1": m["pass_at_k"]["1"]["mean"], f"pass_at_{n}": m["pass_at_k"][str(n)]["mean"],
                          "boundary": m["boundary"], "diversity_mean": m["diversity_mean"]}
                   for name, m in result["models"].items()}


def run_demo(out: Path, *, fast: bool = False) -> dict:
    from .report import write_report

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base_path, sft_wall, from_cache = cached_base(fast)
    base_summary = json.loads((base_path.parents[1] / "summary.json").read_text())["stages"]["sft"]
    trained = {stage: train_from_base(out, base_path, stage, fast) for stage in ("grpo", "fork")}
    diffs, passk = diagnose(out, base_path, {k: v["path"] for k, v in trained.items()}, fast)
    summary = {
        "base": {"pass_at_1": base_summary["pass_at_1"], "strategies": base_summary["strategies"],
                 "path": str(base_path), "trainable_params": base_summary.get("trainable_params")},
        **{k: {f: v.get(f) for f in ("pass_at_1", "strategies", "path", "trainable_params")} for k, v in trained.items()},
        "stages": {"sft": {"wall_s": sft_wall, "cached": from_cache},
                   **{k: stage_cost(v) for k, v in trained.items()}},
        "diff": diffs["grpo"], "diff_fork": diffs["fork"], "passk": passk,
        "report": str(write_report(out)),
        "total_wall_s": round(time.time() - t0, 1),
        "fast": fast,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(tables(summary))
    return summary


def stage_cost(result: dict) -> dict:
    """Wall time, its part outside held-out evaluation (the training cost), and tokens processed (generated
    + trained on)."""
    return {"wall_s": result["wall_s"], "train_wall_s": round(result["wall_s"] - result.get("eval_s", 0.0), 2),
            "tokens": result.get("tokens_sampled", 0) + result.get("tokens_trained", 0)}


def grid(rows: list[tuple[str, ...]]) -> list[str]:
    """A plain-text table: the first row is the header, underlined; columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def tables(s: dict) -> str:
    st = s["stages"]
    rows = [("model", "held-out pass@1", "stage wall s", "train s (no eval)", "tokens processed", "trainable params")]
    rows.append(("base (SFT)", f"{s['base']['pass_at_1']:.3f}",
                 f"{st['sft']['wall_s']:.0f}" + (" (cached)" if st["sft"].get("cached") else ""), "", "", ""))
    for name, key in (("GRPO", "grpo"), ("fork (RL-free)", "fork")):
        rows.append((name, f"{s[key]['pass_at_1']:.3f}", f"{st[key]['wall_s']:.1f}", f"{st[key]['train_wall_s']:.1f}",
                     f"{st[key]['tokens']:,}", f"{s[key]['trainable_params']:,}"))
    lines = grid(rows)
    gain = s["grpo"]["pass_at_1"] - s["base"]["pass_at_1"]
    fork_gain = s["fork"]["pass_at_1"] - s["base"]["pass_at_1"]
    share = f"{fork_gain / gain:.0%}" if abs(gain) > 1e-9 else "n/a"
    lines.append(f"GRPO gain {gain * 100:+.1f} points; fork gain {fork_gain * 100:+.1f} points = {share} of GRPO's, "
                 f"in {st['fork']['train_wall_s'] / max(st['grpo']['train_wall_s'], 1e-9):.2f}× its training time")
    lines += ["", "strategy mix (share: accuracy)"]
    for name, key in (("base", "base"), ("GRPO", "grpo"), ("fork", "fork")):
        lines.append(f"  {name:5s} " + ", ".join(f"{k} {v[0]:.0%}: {v[1]:.0%}" for k, v in s[key]["strategies"].items()))
    rows = [("what changed vs base", "GRPO", "fork", "paper (RL vs base)")]
    for k in DIFF_KEYS:
        fmt = (lambda x: "n/a" if x is None else f"{x:.2f}") if k in ("entropy_ratio", "promoted_rank_mean") else _pct
        rows.append((k, fmt(s["diff"][k]), fmt(s["diff_fork"][k]), PAPER[k]))
    lines += [""] + grid(rows)
    n_key = next(k for k in s["passk"]["base"] if k.startswith("pass_at_") and k != "pass_at_1")
    lines += ["", f"pass@k over {PASSK_PROBLEMS if not s['fast'] else 10} held-out problems: "
              + "; ".join(f"{m} pass@1 {v['pass_at_1']:.3f}, {n_key.replace('_at_', '@')} {v[n_key]:.3f}, "
                          f"boundary {v['boundary']}" for m, v in s["passk"].items())]
    lines.append(f"report: {s['report']}; demo wall time {s['total_wall_s']:.0f}s")
    return "\n".join(lines)
