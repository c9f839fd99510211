"""RAGEN-2's claim in miniature: group filters for trajectory GRPO on FrozenLake, at the same step budget.

One SFT base (``forkrl/configs/agent.yaml``'s SFT stage: the tiny model on mixed optimal / greedy / wandering
demonstrations), then, from that same base, its GRPO stage once per (filter, seed): no filter, zero-variance
filtering (DAPO's dynamic sampling) and RAGEN-2's SNR filter (linear top-p 0.9 over the groups' reward std). The
seed changes which maps each step draws and every sampled episode; the base is the same for all, so the spread is
GRPO's own, not the base's. Reported per filter, mean ± sample std over seeds: held-out success (played episodes on
unseen maps), the compute spent (rows and tokens that got a backward, training and sampling seconds), the kept
share of groups, and the MI (RAGEN-2's input-reasoning estimate, first turn) and entropy curves.

    python benchmarks/agent_filters.py --out /tmp/af --json /tmp/agent_filters.json        # 3 seeds, 40 steps
    python benchmarks/agent_filters.py --out /tmp/af --base /tmp/af/base/sft/final ...       # reuse a trained base
    python benchmarks/agent_filters.py --smoke --out /tmp/af_smoke --json /tmp/s.json        # the path, no result

Runs already finished under ``--out`` are read back, not run again (an interrupted benchmark continues).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

FILTERS = {"none": {"filter": "none"}, "zero_var": {"filter": "zero_variance_groups"},
           "snr": {"filter": "snr", "snr_top_p": 0.9, "snr_mode": "linear"}}


def agent_dict(smoke: bool) -> dict:
    data = yaml.safe_load(resources.files("forkrl").joinpath("configs/agent.yaml").read_text())
    if smoke:  # the whole path in seconds; its figures mean nothing
        data["sft"]["steps"], data["grpo"]["steps"], data["grpo"]["mi_every"] = 4, 2, 1
        data["grpo"].update(prompts_per_step=2, group_size=4, micro_batch_size=8, eval_every=0)
        data["task"].update(train_size=32, heldout_size=8)
        data["eval"] = {"num_problems": 4, "samples_per_problem": 1}
    return data


def run_stage(data: dict, run_dir: Path, init_path: Path | None = None) -> dict:
    from forkrl.config import parse_config
    from forkrl.pipeline import run

    cfg = parse_config(data, source="benchmarks/agent_filters.py")
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and all((run_dir / s / "final" / "DONE").exists() for s in cfg.stages):
        return json.loads(summary_path.read_text())  # finished before: read back
    return run(cfg, run_dir, resume=(run_dir / "config.yaml").exists(), init_path=init_path)


def stage_rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "grpo"]


def one_run(data: dict, base: Path, name: str, seed: int, out: Path) -> dict:
    d = copy.deepcopy(data)
    d.update(seed=seed, stages=["grpo"])
    d["grpo"].update(FILTERS[name])
    run_dir = out / f"{name}-seed{seed}"
    summary = run_stage(d, run_dir, init_path=base)
    rows, stage = stage_rows(run_dir), summary["stages"]["grpo"]
    total = lambda k: sum(r.get(k) or 0 for r in rows)  # noqa: E731
    return {
        "filter": name, "seed": seed, "success": stage["pass_at_1"], "wall_s": stage["wall_s"],
        "rows_backward": total("rows_trained") - total("rows_no_backward"), "tokens_trained": total("tokens_trained"),
        "tokens_sampled": total("tokens_sampled"), "train_s": round(total("train_s"), 2),
        "sample_s": round(total("sample_s"), 2), "empty_steps": sum(bool(r.get("empty_batch")) for r in rows),
        "groups_kept_frac": statistics.fmean(r["groups_kept_frac"] for r in rows),
        "curves": {k: [[r["step"], r[k]] for r in rows if r.get(k) is not None]
                   for k in ("episode_success", "entropy", "mi_seq", "mi_token", "mi_retrieval_acc", "group_reward_std",
                             "groups_kept_frac")},
    }


def spread(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def first_last(run: dict, key: str) -> tuple[float | None, float | None]:
    c = run["curves"][key]
    return (c[0][1], c[-1][1]) if c else (None, None)


def aggregate(runs: list[dict], base_success: float) -> list[dict]:
    table = []
    for name in FILTERS:
        mine = [r for r in runs if r["filter"] == name]
        if not mine:
            continue
        row = {"filter": name, "seeds": [r["seed"] for r in mine], "success_each": [r["success"] for r in mine]}
        row["success_mean"], row["success_std"] = spread(row["success_each"])
        row["gain_mean"] = row["success_mean"] - base_success
        for k in ("rows_backward", "tokens_trained", "tokens_sampled", "train_s", "sample_s", "wall_s",
                  "groups_kept_frac", "empty_steps"):
            row[k] = statistics.fmean(r[k] for r in mine)
        for k in ("mi_seq", "entropy", "episode_success"):
            pairs = [first_last(r, k) for r in mine]
            firsts, lasts = [p[0] for p in pairs if p[0] is not None], [p[1] for p in pairs if p[1] is not None]
            row[f"{k}_first"] = statistics.fmean(firsts) if firsts else None
            row[f"{k}_last"] = statistics.fmean(lasts) if lasts else None
        table.append(row)
    ref = next((r for r in table if r["filter"] == "none"), None)
    for row in table:  # compute against no filter, in the same run
        row["tokens_vs_none"] = row["tokens_trained"] / ref["tokens_trained"] if ref and ref["tokens_trained"] else None
        row["train_s_vs_none"] = row["train_s"] / ref["train_s"] if ref and ref["train_s"] else None
    return table


def render(table: list[dict], base_success: float, steps: int) -> str:
    num = lambda x, f="{:.3f}": "n/a" if x is None else f.format(x)  # noqa: E731
    head = ("filter", "held-out success", "gain", "backward rows", "tokens trained (÷none)", "train s (÷none)",
            "groups kept", "MI seq first→last", "entropy first→last")
    lines = [f"base (SFT) held-out success {base_success:.1%}; {steps} GRPO steps each", " | ".join(head),
             "|".join("---" for _ in head)]
    for r in table:
        lines.append(" | ".join([
            r["filter"], f"{r['success_mean']:.1%} ± {r['success_std']:.1%} "
                         f"({', '.join(f'{s:.1%}' for s in r['success_each'])})",
            f"{r['gain_mean']:+.1%}", f"{r['rows_backward']:.0f}",
            f"{r['tokens_trained']:.0f} ({num(r['tokens_vs_none'], '{:.2f}')})",
            f"{r['train_s']:.1f} ({num(r['train_s_vs_none'], '{:.2f}')})", f"{r['groups_kept_frac']:.2f}",
            f"{num(r['mi_seq_first'])} → {num(r['mi_seq_last'])}", f"{num(r['entropy_first'])} → {num(r['entropy_last'])}"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="run directories: base/ and one per (filter, seed)")
    ap.add_argument("--base", type=Path, help="a trained SFT base's final/ directory (default: train one in OUT/base)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--filters", nargs="+", choices=tuple(FILTERS), default=list(FILTERS))
    ap.add_argument("--steps", type=int, help="GRPO steps per run (default: the agent config's)")
    ap.add_argument("--smoke", action="store_true", help="a tiny configuration that checks the path, not the claim")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    t0 = time.time()
    data = agent_dict(args.smoke)
    if args.steps:
        data["grpo"]["steps"] = args.steps
    base = args.base
    if base is None:
        base_data = copy.deepcopy(data)
        base_data["stages"] = ["sft"]
        run_stage(base_data, args.out / "base")
        base = args.out / "base" / "sft" / "final"
    base_success = json.loads((base / "stage.json").read_text())["pass_at_1"]
    data["model"] = {"path": str(base)}  # every GRPO run starts from the same weights
    runs = [one_run(data, base, name, seed, args.out) for seed in args.seeds for name in args.filters]
    table = aggregate(runs, base_success)
    print(render(table, base_success, data["grpo"]["steps"]))
    result = {"base": str(base), "base_success": base_success, "steps": data["grpo"]["steps"],
              "smoke": args.smoke, "table": table, "runs": runs, "machine": os.uname().machine,
              "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None,
              "wall_s": round(time.time() - t0, 1)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
