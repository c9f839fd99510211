"""What skipping zero-advantage rows' backward saves (``grpo.skip_zero_advantage``), measured side by side.

One process, one model built locally as ``grpo_step.py`` builds it; each round samples the same batch (the
decode recorded, as the GRPO stage does) and runs ``policy_update`` once with the skip and once without,
alternating, on advantages where a given share of the groups is all zero (their rewards were all equal).
Timed: the update alone (forward replay, backward, statistics), the median over rounds after the first.

    python benchmarks/zero_advantage.py --json /tmp/zero_adv.json            # the demo's and the benchmark's model
    python benchmarks/zero_advantage.py --models demo --fractions 0.5 --rounds 3 --json /tmp/z.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import grpo_step  # noqa: E402

MODELS = {  # (model size, prompts per step, new tokens): examples/demo.yaml's and grpo_step.py's default
    "demo": (dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384), 16, 48),
    "default": (grpo_step.SIZES["default"]["size"], 8, 64),
    "tiny": (grpo_step.SIZES["tiny"]["size"], 2, 8),
}
GROUP = 8


def measure(name: str, fractions: list[float], rounds: int, work: Path) -> list[dict]:
    from forkrl.cpu import FusedSampler
    from forkrl.forward import make_forward
    from forkrl.sampling import sampling_params
    from forkrl.trainers.grpo import policy_update
    from forkrl.types import Role

    size, prompts, new = MODELS[name]
    spec = {**grpo_step.SIZES["default"], "size": size, "prompts": prompts, "group": GROUP, "max_new_tokens": new,
            "lora": False}
    model, tok, cfg, prompt_ids, seeds = grpo_step.local_setup(spec, work / name, "zero-advantage")
    sampler, rows = FusedSampler(model, tok, record=True), prompts * GROUP
    policy = make_forward(model, sampler)
    out = []
    for frac in fractions:
        adv_N = torch.randn(rows, generator=torch.Generator().manual_seed(0))
        zero_groups = round(frac * prompts)
        adv_N[: zero_groups * GROUP] = 0.0
        times = {True: [], False: []}
        for r in range(rounds + 1):
            for skip in (True, False):
                batch = sampler.sample(prompt_ids, GROUP, sampling_params(cfg), seeds=seeds)
                tokens = int((batch.role_NL == Role.COMPLETION).sum())
                grpo_cfg = cfg.grpo.model_copy(update={"skip_zero_advantage": skip})
                t0 = time.perf_counter()
                policy_update(policy, batch, adv_N, None, None, grpo_cfg, temperature=1.0, t_max=new,
                              totals=(tokens, rows))
                if r:  # the first round warms up
                    times[skip].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
                sampler.sync_weights()
        skip_s, full_s = statistics.median(times[True]), statistics.median(times[False])
        out.append({"model": name, "params": sum(p.numel() for p in model.parameters()), "rows": rows,
                    "zero_group_frac": zero_groups / prompts, "skip_s": skip_s, "full_s": full_s,
                    "ratio": full_s / skip_s, "rounds": rounds})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=["demo", "default"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.125, 0.5, 1.0],
                    help="shares of the groups whose advantages are all 0")
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds per setting, after one warm-up round")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.rounds < 1 or any(not 0.0 <= f <= 1.0 for f in args.fractions):
        sys.exit("--rounds must be at least 1 and every --fractions value in [0, 1]")
    with tempfile.TemporaryDirectory() as tmp:
        results = [row for m in args.models for row in measure(m, args.fractions, args.rounds, Path(tmp))]
    print(f"policy_update, zero-advantage rows skipped vs not, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds")
    head = ("model", "params", "rows", "zero groups", "skip s", "full s", "full ÷ skip")
    print(f"  {head[0]:<8} {head[1]:>9} {head[2]:>5} {head[3]:>12} {head[4]:>9} {head[5]:>9} {head[6]:>12}")
    for r in results:
        print(f"  {r['model']:<8} {r['params'] / 1e6:>8.2f}M {r['rows']:>5} {r['zero_group_frac']:>12.3f} "
              f"{r['skip_s']:>9.4f} {r['full_s']:>9.4f} {r['ratio']:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "torch_threads": torch.get_num_threads()},
                                              indent=1))


if __name__ == "__main__":
    main()
