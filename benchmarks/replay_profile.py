"""Where the replayed update's time goes, and what recording the decode costs (``sampling.replay``).

One process, the model ``grpo_step.py`` builds (its default configuration's, or ``--model tiny``), the same
64-row batch every round. Alternating, after one warm-up round:

* sampling with the decode recorded (``FusedSampler(record=True)``) against sampling without;
* the update (``policy_update``) replayed from the record against the same update through the model's forward;

then a ``torch.profiler`` trace of one replayed update: its total, and the operators that took the most.

    python benchmarks/replay_profile.py --json /tmp/replay_profile.json
    python benchmarks/replay_profile.py --model tiny --rounds 1 --json /tmp/r.json     # a smoke run (tests)
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


def run(model_name: str, rounds: int, top: int, work: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from forkrl.cpu import FusedSampler
    from forkrl.forward import make_forward
    from forkrl.sampling import sampling_params
    from forkrl.trainers.grpo import policy_update
    from forkrl.types import Role

    spec = {**grpo_step.SIZES[model_name], "lora": False}
    model, tok, cfg, prompt_ids, seeds = grpo_step.local_setup(spec, work, "replay-profile")
    G = spec["group"]
    rows = spec["prompts"] * G
    samplers = {True: FusedSampler(model, tok, record=True), False: FusedSampler(model, tok)}
    forwards = {k: make_forward(model, s) for k, s in samplers.items()}  # the replay, and the model's forward
    adv_N = torch.randn(rows, generator=torch.Generator().manual_seed(0))  # every row live

    def sample(recorded: bool):
        t0 = time.perf_counter()
        out = samplers[recorded].sample(prompt_ids, G, sampling_params(cfg), seeds=seeds)
        return out, time.perf_counter() - t0

    def update(batch, recorded: bool) -> float:
        tokens = int((batch.role_NL == Role.COMPLETION).sum())
        t0 = time.perf_counter()
        policy_update(forwards[recorded], batch, adv_N, None, None, cfg.grpo, temperature=1.0,
                      t_max=spec["max_new_tokens"], totals=(tokens, rows))
        took = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        samplers[recorded].sync_weights()  # as the optimizer step does: the record is released
        return took

    times = {k: [] for k in ("sample_recorded", "sample_plain", "update_replayed", "update_forward")}
    for r in range(rounds + 1):
        batch, t_rec = sample(True)
        t_replay = update(batch, True)
        batch, t_plain = sample(False)
        t_forward = update(batch, False)
        if r:  # the first round warms up
            for k, v in zip(times, (t_rec, t_plain, t_replay, t_forward)):
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}

    batch, _ = sample(True)
    tokens = int((batch.role_NL == Role.COMPLETION).sum())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        policy_update(forwards[True], batch, adv_N, None, None, cfg.grpo, temperature=1.0,
                      t_max=spec["max_new_tokens"], totals=(tokens, rows))
    model.zero_grad(set_to_none=True)
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()
                  if e.key.startswith("aten::")), key=lambda o: -o[1])
    return {"model": model_name, "params": sum(p.numel() for p in model.parameters()), "rows": rows,
            "rounds": rounds, "median_s": med, "times_s": times,
            "record_overhead_s": med["sample_recorded"] - med["sample_plain"],
            "update_forward_over_replayed": med["update_forward"] / med["update_replayed"],
            "profile_total_ms": sum(o[1] for o in ops),
            "profile_top": [{"op": k, "self_ms": ms, "calls": n} for k, ms, n in ops[:top]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("default", "tiny"), default="default")
    ap.add_argument("--rounds", type=int, default=5, help="timed alternating rounds, after one warm-up round")
    ap.add_argument("--top", type=int, default=8, help="operators listed from the profile")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        r = run(args.model, args.rounds, args.top, Path(tmp))
    m = r["median_s"]
    print(f"replayed update, {r['model']} model ({r['params'] / 1e6:.2f}M params), {r['rows']} rows, "
          f"{torch.get_num_threads()} threads, median of {r['rounds']} alternating rounds")
    print(f"  sampling: recorded {m['sample_recorded']:.4f} s, plain {m['sample_plain']:.4f} s "
          f"(recording costs {r['record_overhead_s']:+.4f} s)")
    print(f"  update: replayed {m['update_replayed']:.4f} s, model forward {m['update_forward']:.4f} s "
          f"(forward ÷ replayed {r['update_forward_over_replayed']:.2f})")
    print(f"  profile of one replayed update: {r['profile_total_ms']:.0f} ms in aten operators; the largest:")
    for o in r["profile_top"]:
        print(f"    {o['op']:<58} {o['self_ms']:>9.1f} ms {o['calls']:>6} calls")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
