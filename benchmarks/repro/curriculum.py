"""The reverse-perplexity curriculum (arXiv 2605.13301) in miniature: does taking SFT examples highest-perplexity
first, with no shuffle, beat the shuffled order and the lowest-first order?

The paper's setting is continued SFT of a pretrained model, so the miniature's starting model knows something: per
seed the shared base (``common.base``: the demo's tiny model SFT'd on two-digit addition), then one pass of SFT on
three-digit addition from it in each of the three orders (``sft.order``: perplexity_desc, the paper's;
perplexity_asc; shuffle), the same steps, learning rate and examples. Held-out pass@1 on three-digit problems is
the figure. Decided before running: "reproduced" if perplexity_desc's mean beats both ablations by more than the
larger of their seed spreads and of the pass rate's binomial standard error; "not measurable in miniature" if every
order stays under 5%; else "not reproduced".

    python benchmarks/repro/curriculum.py --bases /tmp/repro/bases --out /tmp/repro/cur --json /tmp/curriculum.json
    python benchmarks/repro/curriculum.py --smoke --bases /tmp/s --out /tmp/s --json /tmp/c.json     # the path only
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

ORDERS = ("perplexity_desc", "perplexity_asc", "shuffle")


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--steps", type=int, default=60, help="SFT steps on the harder task (60 x 32 < 3000: one pass)")
    args = ap.parse_args()
    steps = 3 if args.smoke else args.steps
    t0, rows = time.time(), []
    for seed in args.seeds:
        base_dir, base_pass = common.base(seed, args.bases or args.out, args.smoke)
        for order in ORDERS:
            sft = {"steps": steps, "batch_size": 8 if args.smoke else 32, "micro_batch_size": 8 if args.smoke else 32,
                   "order": order, "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "linear"}}
            s, _ = common.run_one(common.stage_config(seed, "sft", model={"path": str(base_dir)}, digits=3,
                                                      smoke=args.smoke, sft=sft), args.out / f"{order}-s{seed}")
            rows.append({"seed": seed, "order": order, "pass_at_1": s["pass_at_1"], "wall_s": s["wall_s"],
                         "start_ppl": s.get("start_ppl"), "base_pass_at_1_two_digit": base_pass})
    table = {o: common.spread([r["pass_at_1"] for r in rows if r["order"] == o]) for o in ORDERS}
    desc, asc, shuf = (table[o] for o in ORDERS)
    episodes = len(args.seeds) * (8 if args.smoke else 400)
    margin = max(asc["std"], shuf["std"], common.binomial_se(desc["mean"], episodes))
    if max(t["mean"] for t in table.values()) < 0.05:
        verdict = "not measurable in miniature"
    else:
        verdict = "reproduced" if desc["mean"] - max(asc["mean"], shuf["mean"]) > margin else "not reproduced"
    lines = [f"continued SFT on 3-digit addition from a 2-digit base, {steps} steps, {len(args.seeds)} seeds "
             f"(base 2-digit pass@1: {', '.join(f'{r:.3f}' for r in sorted({x['base_pass_at_1_two_digit'] for x in rows}))})",
             "order | held-out pass@1 mean ± std | each seed | vs shuffle", "---|---|---|---"]
    for o, t in table.items():
        lines.append(f"{o} | {common.cells(t)} | {t['mean'] - shuf['mean']:+.3f}")
    lines.append(f"paper (arXiv 2605.13301): highest perplexity first beats the ablations; miniature: {verdict}"
                 + (" (smoke run: no result)" if args.smoke else ""))
    print("\n".join(lines))
    common.write_json(args.json, {"table": table, "runs": rows, "verdict": verdict, "margin": margin,
                                  "smoke": args.smoke, "steps": steps, "wall_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
