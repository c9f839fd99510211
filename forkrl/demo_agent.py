"""``forkrl demo agent``: the multi-turn miniature (AGENTS.md). A tiny base plays RAGEN's FrozenLake token in, token
out: SFT on mixed-quality demonstrations (optimal, greedy-ignoring-holes, goal-biased wandering), then trajectory
GRPO over episodes grouped by map with RAGEN-2's reward-variance filter and the MI estimate. Writes
``DIR/summary.json`` (``base.success``, ``grpo.success``, ``stages.<name>.wall_s``, the SNR and MI figures) and
prints a table. The config is ``forkrl/configs/agent.yaml``; ``forkrl train`` runs it as well.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import yaml

from .checkpoint import atomic_write_text
from .config import parse_config
from .demo import grid
from .pipeline import run


def agent_config(*, fast: bool = False):
    data = yaml.safe_load(resources.files("forkrl").joinpath("configs/agent.yaml").read_text())
    if fast:  # a smoke test of the whole path, not a result
        data["sft"]["steps"], data["grpo"]["steps"], data["grpo"]["eval_every"] = 10, 2, 0
        data["task"].update(train_size=64, heldout_size=16)
        data["eval"] = {"num_problems": 8, "samples_per_problem": 1}
    return parse_config(data, source="forkrl/configs/agent.yaml")


def stage_figures(metrics_path: Path, stage: str) -> dict:
    """The GRPO stage's SNR-filter and MI figures over its steps: the kept share of groups, the in-group reward
    std (all and kept), and the MI estimate at its first and last measurement."""
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()]
    rows = [r for r in rows if r.get("stage") == stage]
    mean = lambda k: (sum(r[k] for r in rows if r.get(k) is not None) /  # noqa: E731
                      max(sum(r.get(k) is not None for r in rows), 1)) if rows else None
    mi = [r for r in rows if r.get("mi_seq") is not None]
    return {"groups_kept_frac": mean("groups_kept_frac"), "group_reward_std": mean("group_reward_std"),
            "group_reward_std_kept": mean("group_reward_std_kept"), "empty_steps": sum(bool(r.get("empty_batch"))
                                                                                     for r in rows),
            "mi_seq_first": mi[0]["mi_seq"] if mi else None, "mi_seq_last": mi[-1]["mi_seq"] if mi else None,
            "mi_retrieval_acc_last": mi[-1]["mi_retrieval_acc"] if mi else None,
            "mi_upper_bound": mi[-1]["mi_upper_bound"] if mi else None,
            "train_success_first": rows[0].get("episode_success") if rows else None,
            "train_success_last": rows[-1].get("episode_success") if rows else None,
            "env_ce_heldout": [r["env_ce_heldout"] for r in rows if r.get("env_ce_heldout") is not None]}


def run_agent_demo(out: Path, *, fast: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = agent_config(fast=fast)
    run_dir = out / "run"
    result = run(cfg, run_dir, resume=(run_dir / "config.yaml").exists())
    stages = result["stages"]
    summary = {
        "env": cfg.task.env, "env_kwargs": cfg.task.kwargs,
        "base": {"success": stages["sft"]["pass_at_1"], "path": str(run_dir / "sft" / "final")},
        "grpo": {"success": stages["grpo"]["pass_at_1"], "path": str(run_dir / "grpo" / "final")},
        "heldout_episodes": cfg.eval.num_problems * cfg.eval.samples_per_problem,
        "stages": {k: {"wall_s": v["wall_s"], "train_wall_s": round(v["wall_s"] - v.get("eval_s", 0.0), 2)}
                   for k, v in stages.items()},
        "grpo_figures": stage_figures(run_dir / "metrics.jsonl", "grpo"),
        "total_wall_s": round(time.time() - t0, 1), "fast": fast,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    print(table(summary))
    return summary


def table(s: dict) -> str:
    f = s["grpo_figures"]
    pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    num = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    rows = [("", "held-out success", "wall s"),
            ("base (SFT)", pct(s["base"]["success"]), f"{s['stages']['sft']['wall_s']:.0f}"),
            ("GRPO + SNR filter", pct(s["grpo"]["success"]), f"{s['stages']['grpo']['wall_s']:.0f}")]
    lines = [f"{s['env']} {s['env_kwargs']}: {s['heldout_episodes']} held-out episodes per figure", *grid(rows), "",
             f"SNR filter: groups kept {pct(f['groups_kept_frac'])}, in-group reward std {num(f['group_reward_std'])} "
             f"(kept {num(f['group_reward_std_kept'])}), empty steps {f['empty_steps']}",
             f"MI (first turn): {num(f['mi_seq_first'])} -> {num(f['mi_seq_last'])} nats of at most "
             f"{num(f['mi_upper_bound'])}; retrieval accuracy {pct(f['mi_retrieval_acc_last'])}"]
    return "\n".join(lines)
