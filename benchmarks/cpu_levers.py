"""Which CPU levers pay off for a GRPO step? Each lever is timed against its baseline, alternating, in one process.

Issue 6 lists candidates for speeding up a step; this script measures the ones forkrl does not use, and the one it
adopted, on ``grpo_step.py``'s model and batch shape (8 prompts × 8 completions, 64 new tokens, fp32), so the
decision can be re-checked on another machine:

* **training, torch.compile**: the policy's forward + backward over a sampled batch, eager vs
  ``torch.compile(model, dynamic=True)`` (the seconds of the first, compiling call are reported separately);
* **optimizer**: one AdamW step over the model's parameters, ``foreach`` (torch's default) vs ``fused=True``
  (forkrl's ``make_optimizer`` uses the fused kernel);
* **sampling, threads**: the sampler with torch's intra-op threads vs one thread, and vs the rows split into two
  halves decoded by two Python threads with one intra-op thread each (rows are seeded one by one, so the split
  draws the same rows);
* **sampling, packed weights** (adopted): the fused decoder's products through MKL's packed weights, each packed
  once per sampling call (``kernels.packed``), vs ``sgemm``, which packs its weight again at every call; both
  recording the decode for the replay, as a GRPO step does, and both must draw the same tokens.

``--config 30m`` runs them on ``grpo_step.py``'s 30M-parameter model and 128 new tokens; ``--levers`` picks some.

Times are medians over ``--repeats`` alternating rounds; the ratio column is baseline ÷ lever (> 1: the lever is
faster).

    python benchmarks/cpu_levers.py --json /tmp/levers.json
    python benchmarks/cpu_levers.py --config 30m --levers packed --json /tmp/levers_30m.json
    python benchmarks/cpu_levers.py --tiny --skip-compile --json /tmp/t.json     # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpo_step  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(pairs: dict, repeats: int) -> dict:
    """{name: [seconds]} over ``repeats`` rounds, each round running every callable once in order."""
    out = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, fn in pairs.items():
            out[name].append(timed(fn))
    return out


LEVERS = ("compile", "adamw", "threads", "packed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="grpo_step.py's tiny model and batch (a smoke run)")
    ap.add_argument("--config", choices=("default", "30m"), default="default", help="grpo_step.py's configuration")
    ap.add_argument("--levers", nargs="+", choices=LEVERS, default=list(LEVERS), help="which levers to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-compile", action="store_true",
                    help="leave out torch.compile (its first call compiles for 20-90 s)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    from forkrl import models
    from forkrl.cpu import FusedSampler
    from forkrl.forward import ModelForward
    from forkrl.sampling import sampling_params
    from forkrl.tasks import build_task

    spec = {**grpo_step.SIZES["tiny" if args.tiny else args.config], "lora": False}
    rows = spec["prompts"] * spec["group"]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = grpo_step.build_model(spec, Path(tmp))
        model, tok = models.load_model(str(model_dir)), models.load_tokenizer(str(model_dir))
    cfg = grpo_step.forkrl_config(spec, "unused", 1)
    problems = list(build_task(cfg.task).problems("train"))[: spec["prompts"]]
    prompts = [tok(p.prompt).input_ids for p in problems]
    params_s = sampling_params(cfg)
    seeds = list(range(rows))
    batch = FusedSampler(model, tok).sample(prompts, spec["group"], params_s, seeds=seeds)
    results = {"setup": {"config": "tiny" if args.tiny else args.config, "rows": rows, "repeats": args.repeats,
                         "threads": torch.get_num_threads(), "batch_shape": list(batch.input_ids_NL.shape),
                         "completion_tokens": int(batch.completion_mask_NL.sum())}}
    levers = {}

    # -- training forward + backward: eager vs compiled
    def train_with(m):
        def run():
            logp, _, mask = ModelForward(m).logprobs(batch)
            ((logp * mask).sum() / mask.sum()).backward()
            model.zero_grad(set_to_none=True)
        return run

    model.train()
    if "compile" in args.levers and not args.skip_compile:
        compiled = torch.compile(model, dynamic=True)
        compile_s = timed(train_with(compiled))
        t = alternate({"eager": train_with(model), "compiled": train_with(compiled)}, args.repeats)
        levers["training fwd+bwd: torch.compile"] = {"baseline_s": t["eager"], "lever_s": t["compiled"],
                                                      "first_call_s": compile_s}

    # -- optimizer step: foreach vs fused
    if "adamw" in args.levers:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opts = {k: torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.99), weight_decay=0.0, **kw)
                for k, kw in (("foreach", {"foreach": True}), ("fused", {"fused": True}))}
        for o in opts.values():
            o.step()  # state allocated outside the timing
        t = alternate({k: o.step for k, o in opts.items()}, max(args.repeats, 20))
        levers["AdamW step: fused"] = {"baseline_s": t["foreach"], "lever_s": t["fused"]}
        model.zero_grad(set_to_none=True)

    # -- sampling: intra-op threads, and two Python threads over halves of the rows
    threads = torch.get_num_threads()
    sampler = FusedSampler(model, tok)

    def sample_threads(n: int):
        def run():
            torch.set_num_threads(n)
            try:
                sampler.sample(prompts, spec["group"], params_s, seeds=seeds)
            finally:
                torch.set_num_threads(threads)
        return run

    def sample_split():
        half = len(prompts) // 2 or 1
        parts = [(prompts[:half], seeds[: half * spec["group"]]), (prompts[half:], seeds[half * spec["group"]:])]
        workers = [threading.Thread(target=sampler.sample, args=(p, spec["group"], params_s), kwargs={"seeds": s})
                   for p, s in parts if p]
        torch.set_num_threads(1)
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            torch.set_num_threads(threads)

    if "threads" in args.levers:
        sample_threads(threads)()  # warm-up
        t = alternate({"default": sample_threads(threads), "one": sample_threads(1), "split": sample_split},
                      args.repeats)
        levers[f"sampling: 1 intra-op thread (vs {threads})"] = {"baseline_s": t["default"], "lever_s": t["one"]}
        levers[f"sampling: 2 Python threads × 1 (vs {threads})"] = {"baseline_s": t["default"],
                                                                     "lever_s": t["split"]}

    # -- sampling: the decoder's weights packed for MKL once per call, vs sgemm repacking them at every call
    from forkrl.cpu import kernels

    if "packed" in args.levers and kernels.get() is not None and kernels.packed:
        drawn = {}
        recording = FusedSampler(model, tok, record=True)  # as the GRPO stage samples: the decode recorded

        def sample_packed(on: bool):
            def run():
                kernels.packed = on
                try:
                    drawn[on] = recording.sample(prompts, spec["group"], params_s, seeds=seeds).input_ids_NL
                    recording.sync_weights()  # the record released, as after an optimizer step
                finally:
                    kernels.packed = True
            return run

        sample_packed(True)()  # warm-up: the record's memory
        t = alternate({"sgemm": sample_packed(False), "packed": sample_packed(True)}, args.repeats)
        levers["sampling: MKL packed weights (vs sgemm)"] = {"baseline_s": t["sgemm"], "lever_s": t["packed"],
                                                             "same_tokens": torch.equal(drawn[True], drawn[False])}
    elif "packed" in args.levers:
        print(f"sampling, packed weights: not timed here (kernels: {kernels.why or 'no MKL packed products'})")

    for v in levers.values():
        v["baseline_median_s"] = statistics.median(v["baseline_s"])
        v["lever_median_s"] = statistics.median(v["lever_s"])
        v["ratio"] = v["baseline_median_s"] / v["lever_median_s"]
    results["levers"] = levers
    s = results["setup"]
    print(f"CPU levers, {s['config']} model, batch {s['batch_shape'][0]}×{s['batch_shape'][1]} "
          f"({s['completion_tokens']} completion tokens), {s['threads']} threads, median of {args.repeats}")
    print(f"  {'lever':<42}{'baseline s':>12}{'lever s':>12}{'ratio':>8}{'first call s':>14}")
    for name, v in levers.items():
        first = f"{v['first_call_s']:>14.1f}" if "first_call_s" in v else \
            f"   same tokens: {v['same_tokens']}" if "same_tokens" in v else ""
        print(f"  {name:<42}{v['baseline_median_s']:>12.4f}{v['lever_median_s']:>12.4f}{v['ratio']:>8.2f}{first}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
