"""The reverse-perplexity curriculum (arXiv 2605.13301) in miniature: does taking SFT examples highest-perplexity
first, with no shuffle, beat the shuffled order and the lowest-first order?

The paper's setting is continued SFT of a pretrained model, so the miniature has a starting model that knows
something: per seed, a tiny model (its own init seed) SFT'd on two-digit addition (the base), then one pass of SFT on
three-digit addition from that base in each of the three orders (``sft.order``: perplexity_desc, the paper's;
perplexity_asc; shuffle), the same steps, learning rate and examples. Held-out pass@1 on three-digit problems is
the figure; the base's own is reported beside it. Decided before running: "reproduced" if perplexity_desc's mean
beats both ablations by more than the larger of their seed spreads (sample std), "not reproduced" if it does not.

    python benchmarks/repro/curriculum.py --out /tmp/cur --json /tmp/curriculum.json            # 3 seeds
    python benchmarks/repro/curriculum.py --smoke --out /tmp/cur_smoke --json /tmp/c.json        # the path only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ORDERS = ("perplexity_desc", "perplexity_asc", "shuffle")
TINY = {"arch": "qwen2", "hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 128, "max_positions": 256}


def config(seed: int, *, digits: int, steps: int, order: str, model: dict, smoke: bool, lr: float) -> dict:
    return {"seed": seed, "stages": ["sft"], "model": model,
            "task": {"type": "arithmetic", "digits": digits, "train_size": 80 if smoke else 2000,
                     "heldout_size": 8 if smoke else 200},
            "sampling": {"temperature": 1.0, "max_new_tokens": 48},
            "sft": {"steps": steps, "batch_size": 8 if smoke else 32, "micro_batch_size": 8 if smoke else 32,
                    "order": order, "optim": {"lr": lr, "warmup_steps": 0 if smoke else 5, "schedule": "linear"}},
            "eval": {"num_problems": 8 if smoke else 200, "samples_per_problem": 1 if smoke else 2},
            "checkpoint": {"every": 0, "keep_last": 1}, "log_every": 10}


def run_one(data: dict, run_dir: Path) -> dict:
    from forkrl.config import parse_config
    from forkrl.pipeline import run

    summary = run_dir / "summary.json"
    if (run_dir / "sft" / "final" / "DONE").exists() and summary.exists():
        return json.loads(summary.read_text())["stages"]["sft"]  # finished before: read back
    return run(parse_config(data, source="benchmarks/repro/curriculum.py"), run_dir,
               resume=(run_dir / "config.yaml").exists())["stages"]["sft"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=60, help="SFT steps on the harder task (60 x 32 < 2000: one pass)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.smoke:
        args.base_steps, args.steps = 3, 3
    t0, rows = time.time(), []
    for seed in args.seeds:
        base = run_one(config(seed, digits=2, steps=args.base_steps, order="shuffle",
                              model={"tiny": {**TINY, "seed": seed}}, smoke=args.smoke, lr=3e-3),
                       args.out / f"base-s{seed}")
        base_dir = args.out / f"base-s{seed}" / "sft" / "final"
        for order in ORDERS:
            r = run_one(config(seed, digits=3, steps=args.steps, order=order, model={"path": str(base_dir)},
                               smoke=args.smoke, lr=1e-3), args.out / f"{order}-s{seed}")
            rows.append({"seed": seed, "order": order, "pass_at_1": r["pass_at_1"], "wall_s": r["wall_s"],
                         "start_ppl": r.get("start_ppl"), "base_pass_at_1_two_digit": base["pass_at_1"]})
    table = []
    for order in ORDERS:
        xs = [r["pass_at_1"] for r in rows if r["order"] == order]
        table.append({"order": order, "each": xs, "mean": statistics.fmean(xs),
                      "std": statistics.stdev(xs) if len(xs) > 1 else 0.0})
    desc, asc, shuf = table
    margin = max(asc["std"], shuf["std"])
    verdict = ("reproduced" if desc["mean"] - max(asc["mean"], shuf["mean"]) > margin else "not reproduced")
    lines = [f"continued SFT on 3-digit addition from a 2-digit base, {args.steps} steps, {len(args.seeds)} seeds",
             "order | held-out pass@1 mean ± std | each seed | vs shuffle", "---|---|---|---"]
    for t in table:
        lines.append(f"{t['order']} | {t['mean']:.3f} ± {t['std']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in t['each'])} | {t['mean'] - shuf['mean']:+.3f}")
    lines.append(f"paper (arXiv 2605.13301): highest perplexity first beats the ablations; miniature: {verdict}"
                 + (" (smoke run: no result)" if args.smoke else ""))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"table": table, "runs": rows, "verdict": verdict, "smoke": args.smoke,
                                         "steps": args.steps, "base_steps": args.base_steps,
                                         "wall_s": round(time.time() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
