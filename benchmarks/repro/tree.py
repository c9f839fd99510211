"""Tree rollouts (Tree-GRPO arXiv 2509.21240, TreeRL arXiv 2506.11902) against flat GRPO at the same sampled-token
budget, in miniature.

Per seed the shared base (``common.base``: the demo's tiny model SFT'd on two-digit addition), then from it flat
GRPO (8 samples a prompt) and tree GRPO (2 chains a prompt, 3 continuations forked from each at random: 8 paths a
prompt), each trained until it has sampled about the same number of tokens: the tree stage's steps are the flat
stage's sampled tokens over a one-step probe's. Held-out pass@1 is the figure; the tokens each actually sampled are
reported beside it. The papers' claim: trees match or beat flat sampling at a smaller sample budget. Decided before
running: "reproduced" if the tree's mean pass@1 is at least the flat's minus the larger of the seed spreads and the
binomial standard error, at no more than 5% more tokens; "not measurable in miniature" if both stay under 5%;
"not reproduced" otherwise.

    python benchmarks/repro/tree.py --bases /tmp/repro/bases --out /tmp/repro/tree --json /tmp/tree.json
    python benchmarks/repro/tree.py --smoke --bases /tmp/s --out /tmp/s --json /tmp/t.json    # the path only
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

TREE = {"chains": 2, "forks": 3, "at": "random"}


def grpo(steps: int, smoke: bool, tree: dict | None = None) -> dict:
    return {"steps": steps, "prompts_per_step": 2 if smoke else 8, "group_size": 8, "micro_batch_size": 16,
            "optim": {"lr": 1e-4}, **({"tree": tree} if tree else {})}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--steps", type=int, default=30, help="flat GRPO steps; the tree's follow from the budget")
    args = ap.parse_args()
    steps = 2 if args.smoke else args.steps
    t0, runs = time.time(), []
    for seed in args.seeds:
        base_dir, base_pass = common.base(seed, args.bases or args.out, args.smoke)
        model = {"path": str(base_dir)}
        config = lambda g: common.stage_config(seed, "grpo", model=model, digits=2, smoke=args.smoke, grpo=g)  # noqa
        flat, flat_rows = common.run_one(config(grpo(steps, args.smoke)), args.out / f"flat-s{seed}")
        flat_tokens = sum(r["tokens_sampled"] for r in flat_rows)
        _, probe = common.run_one(config(grpo(1, args.smoke, TREE)), args.out / f"probe-s{seed}")
        tree_steps = max(1, round(flat_tokens / max(probe[0]["tokens_sampled"], 1)))
        tree, tree_rows = common.run_one(config(grpo(tree_steps, args.smoke, TREE)), args.out / f"tree-s{seed}")
        for name, s, rows in (("flat", flat, flat_rows), ("tree", tree, tree_rows)):
            runs.append({"seed": seed, "kind": name, "pass_at_1": s["pass_at_1"], "base_pass_at_1": base_pass,
                         "steps": len(rows), "tokens_sampled": sum(r["tokens_sampled"] for r in rows),
                         "paths": sum(r.get("tree_paths") or 0 for r in rows) or None,
                         "train_wall_s": s["wall_s"] - s.get("eval_s", 0.0)})
    table = {}
    for kind in ("flat", "tree"):
        mine = [r for r in runs if r["kind"] == kind]
        table[kind] = {**common.spread([r["pass_at_1"] for r in mine]),
                       "tokens_sampled": statistics.fmean(r["tokens_sampled"] for r in mine),
                       "steps": statistics.fmean(r["steps"] for r in mine)}
    episodes = len(args.seeds) * (8 if args.smoke else 400)
    margin = max(table["flat"]["std"], table["tree"]["std"], common.binomial_se(table["flat"]["mean"], episodes))
    verdict = ("reproduced" if table["tree"]["mean"] >= table["flat"]["mean"] - margin
               and table["tree"]["tokens_sampled"] <= 1.05 * table["flat"]["tokens_sampled"] else "not reproduced")
    if max(table["flat"]["mean"], table["tree"]["mean"]) < 0.05:
        verdict = "not measurable in miniature"
    bases = sorted({r["base_pass_at_1"] for r in runs})
    lines = [f"GRPO from the 2-digit base (pass@1 {', '.join(f'{b:.3f}' for b in bases)}), same sampled-token budget, "
             f"{len(args.seeds)} seeds", "rollouts | held-out pass@1 mean ± std | each seed | steps | tokens sampled",
             "---|---|---|---|---"]
    for kind, t in table.items():
        lines.append(f"{kind} | {common.cells(t)} | {t['steps']:.0f} | {t['tokens_sampled']:.0f}")
    lines.append(f"papers: trees match or beat flat sampling at a smaller budget; miniature: {verdict}"
                 + (" (smoke run: no result)" if args.smoke else ""))
    print("\n".join(lines))
    common.write_json(args.json, {"table": table, "runs": runs, "verdict": verdict, "margin": margin,
                                  "smoke": args.smoke, "tree": TREE, "wall_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
