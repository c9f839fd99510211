"""How fast is ``forkrl diff`` on the demo's tiny model? Times its two model-heavy parts on CPU:

* the teacher-forced classification (``tokendiff.teacher_force``) of 200 trajectories × 100 completion
  tokens, both models, at several micro-batch sizes (target: ≤ 30 s on a 2-core CPU at the default 64);
* the causal decodes (``substitute.decode``): 200 rows × up to 100 new tokens, the base alone (no
  substitution; next to the default sampler on the same rows, which it reproduces) and with both models in
  lockstep (the oracle rule).

The pair: the demo's base architecture (qwen2, hidden 128, 4 layers, 4 heads, 2 KV heads, intermediate
384, vocabulary 320; built untrained with ``models.build_tiny``) and a "tuned" copy with Gaussian noise
(σ = 0.05) on every attention and MLP output projection. Timings do not depend on the weights' values.

    python benchmarks/diff_speed.py --threads 1 --json diff_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from forkrl import models  # noqa: E402
from forkrl.config import SamplingCfg  # noqa: E402
from forkrl.diagnostics.substitute import Oracle, decode  # noqa: E402
from forkrl.diagnostics.tokendiff import summarize, teacher_force  # noqa: E402
from forkrl.sampling import SamplingParams, make_sampler  # noqa: E402
from forkrl.tasks.arithmetic import ArithmeticTask  # noqa: E402
from forkrl.types import Role, Rollouts  # noqa: E402

SIZE = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384, max_positions=256)


def build_pair(root: Path):
    task = ArithmeticTask(digits=2, train_size=3000, heldout_size=200)
    texts = [p.prompt + c for p, c in task.demonstrations("train")]
    base_dir = models.build_tiny(root / "base", texts, arch="qwen2", vocab_size=320, seed=0, **SIZE)
    base, tok = models.load_model(str(base_dir)).eval(), models.load_tokenizer(str(base_dir))
    tuned = models.load_model(str(base_dir)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    prompts = [tok(p.prompt).input_ids for p in task.problems("heldout")]
    return base, tuned, tok, prompts


def synthetic_rollouts(prompts, rows: int, length: int, vocab: int, seed: int = 0) -> Rollouts:
    """``rows`` trajectories, each a held-out prompt and exactly ``length`` random completion tokens."""
    g = torch.Generator().manual_seed(seed)
    width = max(len(p) for p in prompts[:rows]) + length
    ids = torch.zeros(rows, width, dtype=torch.long)
    role = torch.zeros(rows, width, dtype=torch.int8)
    for r in range(rows):
        p = prompts[r % len(prompts)]
        ids[r, : len(p)] = torch.tensor(p)
        ids[r, len(p) : len(p) + length] = torch.randint(2, vocab, (length,), generator=g)
        role[r, : len(p)], role[r, len(p) : len(p) + length] = Role.PROMPT, Role.COMPLETION
    return Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=torch.zeros(rows, width),
                    group_N=torch.arange(rows), problem_N=torch.arange(rows),
                    truncated_N=torch.ones(rows, dtype=torch.bool))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="teacher-forced timings: median of this many")
    ap.add_argument("--micro-batch-sizes", default="16,64,200")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; on a CPU shared with "
                    "other jobs, 1 thread gives far steadier timings than oversubscribed OpenMP threads)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned, tok, prompts = build_pair(Path(tmp))
    results = {"device": "cpu", "threads": torch.get_num_threads(), "rows": args.rows, "tokens": args.tokens,
               "params": sum(p.numel() for p in base.parameters()), "teacher_force": {}, "decode": {}}
    traj = synthetic_rollouts(prompts, args.rows, args.tokens, len(tok))
    teacher_force(base, tuned, traj, 5, micro_batch_size=64)  # warm-up
    for mbs in (int(x) for x in args.micro_batch_sizes.split(",")):
        sec, stats = timed(lambda: teacher_force(base, tuned, traj, 5, micro_batch_size=mbs), args.repeats)
        agg = summarize(stats, 5)
        results["teacher_force"][str(mbs)] = {"seconds": sec, "positions": agg["num_positions"],
                                              "positions_per_s": agg["num_positions"] / sec,
                                              "agreement": agg["fractions"]["unshifted"]}
    if not args.skip_decode:
        params = SamplingParams(temperature=1.0, max_new_tokens=args.tokens)
        rows = [prompts[r % len(prompts)] for r in range(args.rows)]
        seeds = list(range(args.rows))
        sampling = SamplingCfg(batch_size=256)
        sampler = make_sampler(sampling, base, tok)
        runs = {"sampler (base)": lambda: (sampler.sample(rows, 1, params, seeds=seeds), None),
                "decode, no substitution": lambda: decode(base, None, tok, rows, 1, params, seeds, sampling=sampling),
                "decode, oracle (2 models)": lambda: decode(base, tuned, tok, rows, 1, params, seeds, Oracle(5),
                                                            sampling=sampling)}
        for name, fn in runs.items():
            sec, (rollouts, subs) = timed(fn, 1)
            tokens = int(rollouts.completion_len_N.sum())
            results["decode"][name] = {"seconds": sec, "tokens": tokens, "tokens_per_s": tokens / sec,
                                       "subs_per_traj": None if subs is None else float(subs.double().mean())}
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_table(r: dict) -> None:
    print(f"forkrl diff speed: {r['params'] / 1e6:.2f}M-param qwen2 pair, {r['rows']} x {r['tokens']} tokens, "
          f"{r['threads']} CPU threads")
    print(f"  {'teacher-forced classification':<34}{'seconds':>9}{'positions/s':>13}")
    for mbs, row in r["teacher_force"].items():
        print(f"  {'micro-batch ' + mbs + ' rows':<34}{row['seconds']:>9.2f}{row['positions_per_s']:>13.0f}")
    if r["decode"]:
        print(f"  {'causal decode':<34}{'seconds':>9}{'tokens/s':>13}")
        for name, row in r["decode"].items():
            print(f"  {name:<34}{row['seconds']:>9.2f}{row['tokens_per_s']:>13.0f}")


if __name__ == "__main__":
    main()
