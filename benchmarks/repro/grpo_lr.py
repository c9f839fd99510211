"""A control for the tree reproduction: is the fall of GRPO from the weak bases GRPO's, or the evaluation's noise?

From each seed's shared base (``common.base``), flat GRPO (8 prompts × 8 samples a step, 12 steps) at the
reproduction's learning rate and at one too small to move the weights; held-out pass@1 of both beside the base's,
and the training reward of the first and last three steps.

    python benchmarks/repro/grpo_lr.py --bases /tmp/repro/bases --out /tmp/repro/lr --json /tmp/grpo_lr.json
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-9])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    steps, runs = (2 if args.smoke else args.steps), []
    for seed in args.seeds:
        base_dir, base_pass = common.base(seed, args.bases or args.out, args.smoke)
        for lr in args.lrs:
            grpo = {"steps": steps, "prompts_per_step": 2 if args.smoke else 8, "group_size": 8,
                    "micro_batch_size": 16, "optim": {"lr": lr}}
            s, rows = common.run_one(common.stage_config(seed, "grpo", model={"path": str(base_dir)}, digits=2,
                                                         smoke=args.smoke, grpo=grpo), args.out / f"lr{lr:g}-s{seed}")
            reward = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
            runs.append({"seed": seed, "lr": lr, "base_pass_at_1": base_pass, "pass_at_1": s["pass_at_1"],
                         "reward_first3": statistics.fmean(reward[:3]), "reward_last3": statistics.fmean(reward[-3:])})
    lines = ["seed | lr | base pass@1 | after GRPO | training reward, first 3 → last 3 steps", "---|---|---|---|---"]
    lines += [f"{r['seed']} | {r['lr']:g} | {r['base_pass_at_1']:.3f} | {r['pass_at_1']:.3f} | "
              f"{r['reward_first3']:.3f} → {r['reward_last3']:.3f}" for r in runs]
    print("\n".join(lines))
    common.write_json(args.json, {"runs": runs, "steps": steps, "smoke": args.smoke})


if __name__ == "__main__":
    main()
