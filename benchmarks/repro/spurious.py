"""The Spurious Rewards control (arXiv 2506.10947) in miniature: a random reward, with the clipped objective and
without it, from the same base.

Per seed the shared base (``common.base``: the tiny model SFT'd on two-digit addition, which picks among four
strategies at its first token), then GRPO with ``{name: random}`` (a Bernoulli(½) coin per row) twice: with the clip
(ε_low = ε_high = 0.2, the paper's) and with ``grpo.clip: false``. Both take μ = 4 optimizer steps per batch: on the
first the ratio is 1 and the clip cannot bind (tests/test_spurious.py), so without inner iterations the two arms
would be one objective. The paper's claim: a random reward moves the model only through the clip's bias, toward the
base's high-prior behaviour (Qwen2.5-Math's code reasoning, 65% → over 90% of answers; MATH-500 +21.4 points).
Here the high-prior behaviour is the base's most frequent strategy on held-out samples; the figures are its share
and held-out pass@1 after training, each against the base's, and the share of tokens the clip bound.

Decided before running: "not measurable in miniature" if the clip bound on less than 0.1% of the clipped arm's
tokens (the two arms were then one objective); "reproduced" if the clipped arm raised the modal strategy's share on
every seed, by a mean that exceeds the unclipped arm's change by more than twice the standard error of that
difference and than the binomial standard error of the share, while the unclipped arm's mean change stays within
twice its own standard error of 0; else "not reproduced".

    python benchmarks/repro/spurious.py --bases /tmp/repro/bases --out /tmp/repro/spurious --json /tmp/spurious.json
    python benchmarks/repro/spurious.py --smoke --bases /tmp/s --out /tmp/s --json /tmp/sp.json    # the path only
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

ARMS = {"clip": True, "no_clip": False}


def grpo(steps: int, clip: bool, lr: float, smoke: bool) -> dict:
    return {"steps": steps, "prompts_per_step": 2 if smoke else 8, "group_size": 8, "micro_batch_size": 16,
            "inner_iterations": 4, "clip": clip, "eps_low": 0.2, "eps_high": 0.2, "optim": {"lr": lr},
            "rewards": [{"name": "random"}]}


def shares(summary: dict) -> dict:
    """{strategy: its share of the held-out samples} of a stage's summary."""
    return {k: v[0] for k, v in summary["strategies"].items()}


def mean_of(rows: list[dict], key: str) -> float | None:
    xs = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(xs) if xs else None


def cell(t: dict) -> str:
    return f"{t['mean']:+.3f} ± {t['std']:.3f} ({', '.join(f'{x:+.3f}' for x in t['each'])})"


def verdict(table: dict, n_samples: int, smoke: bool) -> str:
    if smoke:
        return "not measurable in miniature"
    if table["clip"]["clip_frac"] < 1e-3:
        return "not measurable in miniature"
    clip, free = table["clip"]["modal_change"], table["no_clip"]["modal_change"]
    k = len(clip["each"])
    se_diff = ((clip["std"] ** 2 + free["std"] ** 2) / k) ** 0.5
    margin = max(2 * se_diff, common.binomial_se(table["clip"]["modal_share_base"], n_samples))
    ok = (min(clip["each"]) > 0 and clip["mean"] - free["mean"] > margin
          and abs(free["mean"]) <= 2 * free["std"] / k ** 0.5)
    return "reproduced" if ok else "not reproduced"


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    steps = 2 if args.smoke else args.steps
    t0, runs = time.time(), []
    for seed in args.seeds:
        root = args.bases or args.out
        base_dir, base_pass = common.base(seed, root, args.smoke)
        base_shares = shares(json.loads((root / f"base-s{seed}" / "summary.json").read_text())["stages"]["sft"])
        modal = max(base_shares, key=base_shares.get)
        for arm, clip in ARMS.items():
            s, rows = common.run_one(common.stage_config(seed, "grpo", model={"path": str(base_dir)}, digits=2,
                                                         smoke=args.smoke, grpo=grpo(steps, clip, args.lr, args.smoke)),
                                     args.out / f"{arm}-s{seed}")
            after = shares(s)
            runs.append({"seed": seed, "arm": arm, "modal": modal, "modal_share_base": base_shares[modal],
                         "modal_share": after.get(modal, 0.0), "shares_base": base_shares, "shares": after,
                         "pass_base": base_pass, "pass_at_1": s["pass_at_1"],
                         "clip_frac": (mean_of(rows, "clip_frac_low") or 0.0) + (mean_of(rows, "clip_frac_high") or 0.0),
                         "entropy_first": rows[0]["entropy"], "entropy_last": rows[-1]["entropy"],
                         "train_wall_s": s["wall_s"] - s.get("eval_s", 0.0)})
    table = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        table[arm] = {"modal_change": common.spread([r["modal_share"] - r["modal_share_base"] for r in mine]),
                      "pass_change": common.spread([r["pass_at_1"] - r["pass_base"] for r in mine]),
                      "entropy_change": common.spread([r["entropy_last"] - r["entropy_first"] for r in mine]),
                      "modal_share_base": statistics.fmean(r["modal_share_base"] for r in mine),
                      "clip_frac": statistics.fmean(r["clip_frac"] for r in mine)}
    samples = len(args.seeds) * (8 if args.smoke else 400)  # held-out samples behind a share (common.stage_config)
    result = verdict(table, samples, args.smoke)
    modals = sorted({r["modal"] for r in runs})
    lines = [f"random reward (Bernoulli ½), GRPO {steps} steps × μ = 4, lr {args.lr:g}, from the 2-digit bases "
             f"(pass@1 {', '.join(f'{r:.3f}' for r in sorted({x['pass_base'] for x in runs}))}), {len(args.seeds)} "
             f"seeds; changes against the base, mean ± std (each seed)",
             f"arm | {'/'.join(modals)} share change (base's modal strategy) | held-out pass@1 change | "
             "entropy change, first → last step | tokens clipped", "---|---|---|---|---"]
    for arm, t in table.items():
        lines.append(f"{arm} | {cell(t['modal_change'])} | {cell(t['pass_change'])} | {cell(t['entropy_change'])} | "
                     f"{t['clip_frac']:.4f}")
    lines.append("paper (arXiv 2506.10947): with the clip, a random reward raises Qwen2.5-Math-7B's MATH-500 by 21.4 "
                 "points and its code reasoning from 65% to over 90%, through the clip's bias; miniature: "
                 f"{result}" + (" (smoke run: no result)" if args.smoke else ""))
    print("\n".join(lines))
    common.write_json(args.json, {"table": table, "runs": runs, "verdict": result, "smoke": args.smoke,
                                  "steps": steps, "lr": args.lr, "wall_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
