"""The fork stage's ablations and recipe departures on the demo's SFT'd base, side by side in one run.

Each row runs the RL-free fork stage (METHODS §4) from the same cached demo base with one change to the
demo's ``fork`` section, reusing the first row's base rollouts (``fork.rollouts_from``) unless the row changes how they are
sampled, and reports
held-out pass@1, the share of GRPO's gain it recovers (GRPO's pass@1 from ``--grpo-pass``, e.g. the
demo's ``summary.json``), the strategy mix and the training wall time (without held-out evaluation).

    python benchmarks/fork_ablations.py --out /tmp/fork-ablations --json /tmp/fork-ablations.json

``--tiny`` builds a larger base (same task, same SFT) to ask whether the miniature's size is what limits
the fork stage; ``--grpo`` runs GRPO from that base for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

PAPER = {"kl_coef": 0.1, "neg_floor": None, "gate.quantile": 0.9, "reweight": False}
ROWS = {  # name -> overrides of the demo's fork section (dotted keys)
    "demo fork": {},
    "random gate (same budget)": {"gate.kind": "random"},
    "all-token gate": {"gate.kind": "all"},
    "positive-only rows": {"positive_only": True},
    "no reweight (paper)": {"reweight": False},
    "no reweight, kl_coef 5": {"reweight": False, "kl_coef": 5.0},
    "kl_coef 5": {"kl_coef": 5.0},
    "kl_coef 40": {"kl_coef": 40.0},
    "kl_coef 0.1 (paper)": {"kl_coef": 0.1},
    "no neg_floor (paper)": {"neg_floor": None},
    "kl_coef 0.1, no neg_floor": {"kl_coef": 0.1, "neg_floor": None},
    "tau at quantile 0.9": {"gate.quantile": 0.9},
    "tau at quantile 0.97": {"gate.quantile": 0.97},
    "4 epochs": {"epochs": 4},
    "12 rollouts per problem": {"samples_per_problem": 12, "batch_size": 96, "micro_batch_size": 96},
    "64 candidates, 48 problems": {"candidates": 64, "max_problems": 48},
    "rollouts at T 1.0, top-p 1.0": {"temperature": 1.0, "top_p": 1.0},
    "paper recipe (λ .1, q .9, no floor, lr 2e-4)": {**PAPER, "optim.lr": 2e-4},
    "paper recipe at lr 5e-3": PAPER,
    "paper recipe at lr 1e-2": {**PAPER, "optim.lr": 1e-2},
}
SAMPLING_KEYS = ("candidates", "samples_per_problem", "temperature", "top_p")  # rows that need new rollouts


def fork_config(overrides: dict, rollouts_from: str | None):
    from importlib import resources

    from forkrl.config import parse_config

    data = yaml.safe_load(resources.files("forkrl").joinpath("configs/demo.yaml").read_text())
    data["stages"] = ["fork"]
    for key, value in {**overrides, "rollouts_from": rollouts_from}.items():
        node = data["fork"]
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return parse_config(data, source="benchmarks/fork_ablations.py")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the runs (replaced)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--grpo-pass", type=float, help="GRPO's held-out pass@1 on the same base (for 'of GRPO gain')")
    ap.add_argument("--grpo", action="store_true", help="run the demo's GRPO stage from the same base first "
                    "(its pass@1 and training time then head the table)")
    ap.add_argument("--tiny", type=json.loads, default={},
                    help='overrides of the demo base\'s model.tiny spec, e.g. \'{"hidden_size": 192, '
                         '"intermediate_size": 576}\' (a larger base: built and SFT\'d once, then cached)')
    ap.add_argument("--rows", help="semicolon-separated row names to run (default: all)")
    ap.add_argument("--custom", type=json.loads, default={},
                    help='extra rows, run after --rows: {"name": {"dotted.fork.key": value}}, e.g. '
                         '\'{"λ 10": {"kl_coef": 10}}\'')
    args = ap.parse_args(argv)
    from forkrl.cli import quiet_libraries, torch_threads
    from forkrl.demo import cached_base
    from forkrl.pipeline import run

    torch_threads()
    quiet_libraries()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    base, _, _ = cached_base(False, args.tiny)
    base_pass = json.loads((base.parents[1] / "summary.json").read_text())["stages"]["sft"]["pass_at_1"]
    results, first, grpo_pass = {}, None, args.grpo_pass
    if args.grpo:
        from forkrl.demo import demo_config

        g = run(demo_config(stages=("grpo",), tiny=args.tiny), out / "grpo", init_path=base)["stages"]["grpo"]
        grpo_pass = g["pass_at_1"]
        results["GRPO (for reference)"] = {"overrides": {}, "pass_at_1": g["pass_at_1"], "gate_share": None,
                                           "train_wall_s": g["wall_s"] - g["eval_s"], "tau": None,
                                           "rows": None, "strategies": g["strategies"]}
    chosen = [r.strip() for r in args.rows.split(";")] if args.rows else ([] if args.custom else list(ROWS))
    unknown = [r for r in chosen if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; valid: {'; '.join(ROWS)}")
    if not isinstance(args.custom, dict) or not all(isinstance(v, dict) for v in args.custom.values()):
        ap.error("--custom: give a JSON object of row name -> {dotted fork key: value}")
    todo = [(k, v) for k, v in ROWS.items() if k in chosen] + list(args.custom.items())
    for i, (name, over) in enumerate(todo):
        run_dir = out / f"{i}"
        reuse = None if any(k in SAMPLING_KEYS for k in over) else first
        s = run(fork_config(over, reuse), run_dir, init_path=base)["stages"]["fork"]
        first = first or str(run_dir)
        results[name] = {"overrides": over, "pass_at_1": s["pass_at_1"], "train_wall_s": s["wall_s"] - s["eval_s"],
                         "gate_share": s["gate_share"], "tau": s["tau"], "rows": s["rows"],
                         "strategies": s["strategies"]}
        print(f"[{i + 1}/{len(todo)}] {name}: pass@1 {s['pass_at_1']:.3f}", file=sys.stderr)
    print(table(results, base_pass, grpo_pass))
    if args.json:
        Path(args.json).write_text(json.dumps({"base_pass_at_1": base_pass, "grpo_pass_at_1": grpo_pass,
                                               "tiny": args.tiny, "rows": results}, indent=2))
    return 0


def table(results: dict, base_pass: float, grpo_pass: float | None) -> str:
    head = ("fork stage", "pass@1", "of GRPO gain", "train s", "gate", "strategy mix (share: accuracy)")
    rows = [head]
    for name, r in results.items():
        share = f"{(r['pass_at_1'] - base_pass) / (grpo_pass - base_pass):.0%}" if grpo_pass else "-"
        mix = ", ".join(f"{k} {v[0]:.0%}:{v[1]:.0%}" for k, v in r["strategies"].items() if v[0] >= 0.01)
        gate = "-" if r["gate_share"] is None else f"{r['gate_share']:.1%}"
        rows.append((name, f"{r['pass_at_1']:.3f}", share, f"{r['train_wall_s']:.1f}", gate, mix))
    from forkrl.demo import grid

    lines = grid(rows)
    lines.append(f"base (SFT) pass@1 {base_pass:.3f}" + (f"; GRPO {grpo_pass:.3f}" if grpo_pass else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
