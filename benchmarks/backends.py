"""Where is each sampler backend the faster one? ``sampling.backend: auto`` takes the fused CPU decoder wherever it
runs the model; this benchmark checks that choice against the Hugging Face forward's decode (``hf``) on a grid of
the shapes sampling meets: model size (the benchmark's default 4.8M-parameter model and its 31.6M one), rows per
call and new tokens per row, on the CPU in float32, with and without other processes on the cores (``--contend``).

Each cell times one ``sample`` call of each backend on the same prompts and seeds, alternating (hf, fused, auto,
hf, fused, auto, ... after one warm-up call each) in one process, and reports the medians, hf ÷ fused (> 1: the
fused decoder is faster), whether the two drew the same tokens, which of them ``auto`` decodes that call with (the
model's forward for the smallest calls: ``forkrl/cpu/sampler.py``; on the threads the fused path finds free, where
the ``hf`` backend always takes torch's), and auto's time over the faster of the other two.

    python benchmarks/backends.py --configs default short 30m --json backends.json
    python benchmarks/backends.py --contend 1 --json backends_busy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import grpo_step  # noqa: E402


def cell(samplers: dict, prompts: list[list[int]], group: int, new: int, repeats: int) -> dict:
    from forkrl.sampling import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=new)
    seeds = list(range(len(prompts) * group))
    times = {name: [] for name in samplers}
    drawn = {}
    for name, s in samplers.items():  # warm-up
        drawn[name] = s.sample(prompts, group, params, seeds=seeds).input_ids_NL
    for _ in range(repeats):
        for name, s in samplers.items():
            t0 = time.perf_counter()
            s.sample(prompts, group, params, seeds=seeds)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"rows": len(seeds), "new_tokens": new, "hf_s": med["hf"], "fused_s": med["fused"], "auto_s": med["auto"],
            "hf_over_fused": med["hf"] / med["fused"], "auto_over_best": med["auto"] / min(med["hf"], med["fused"]),
            "same_tokens": bool(torch.equal(drawn["hf"], drawn["fused"]))}


def run(config: str, grid: list[tuple[int, int, int]], repeats: int, work: Path) -> list[dict]:
    from forkrl import models
    from forkrl.config import SamplingCfg
    from forkrl.sampling import make_sampler
    from forkrl.tasks import build_task

    spec = {**grpo_step.SIZES[MODEL[config]], "lora": False}
    model_dir = grpo_step.build_model(spec, work / config)
    model, tok = models.load_model(str(model_dir)), models.load_tokenizer(str(model_dir))
    samplers = {name: make_sampler(SamplingCfg(backend=name), model, tok) for name in ("hf", "fused", "auto")}
    cfg = grpo_step.forkrl_config(spec, "unused", 1)
    problems = list(build_task(cfg.task).problems("train"))
    out = []
    for n_prompts, group, new in grid:
        prompts = [tok(p.prompt).input_ids for p in problems[:n_prompts]]
        row = cell(samplers, prompts, group, new, repeats)
        row["auto_takes"] = "hf" if samplers["auto"].small(row["rows"], new) else "fused"
        out.append({"model": MODEL[config], "params": sum(p.numel() for p in model.parameters()), **row})
        print(f"  {MODEL[config]:<8} {row['rows']:>5} {new:>6} {row['hf_s']:>9.3f} {row['fused_s']:>9.3f} "
              f"{row['auto_s']:>9.3f} {row['hf_over_fused']:>9.2f} {str(row['same_tokens']):>6} "
              f"{row['auto_takes']:>6} {row['auto_over_best']:>10.2f}", flush=True)
    return out


GRIDS = {  # (prompts, group, new tokens)
    "default": [(1, 1, 8), (1, 8, 8), (8, 8, 8), (1, 8, 64), (8, 8, 64), (32, 8, 64), (8, 8, 128)],
    "short": [(1, 1, 4), (1, 1, 16), (1, 1, 32), (1, 8, 4), (1, 8, 16), (1, 8, 32), (4, 8, 4), (4, 8, 8),
              (4, 8, 16), (8, 8, 4)],  # the default model, where the fused decoder's setup is a call's main cost
    "30m": [(1, 8, 16), (8, 8, 64)],
    "tiny": [(1, 2, 4)],
}
MODEL = {"default": "default", "short": "default", "30m": "30m", "tiny": "tiny"}  # the grid's model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", choices=tuple(GRIDS), default=["default", "30m"])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per backend and cell, after one warm-up")
    ap.add_argument("--contend", type=int, default=0, help="N busy processes (a Python spin loop each) beside it")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.repeats < 1:
        sys.exit("--repeats must be at least 1")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
    try:
        print(f"sampling backends, float32 on cpu, {torch.get_num_threads()} threads, median of {args.repeats} "
              f"alternating calls" + (f"; {args.contend} busy process(es) beside it" if args.contend else ""))
        print(f"  {'model':<8} {'rows':>5} {'tokens':>6} {'hf s':>9} {'fused s':>9} {'auto s':>9} {'hf÷fused':>9} "
              f"{'same':>6} {'auto':>6} {'auto÷best':>10}")
        with tempfile.TemporaryDirectory() as tmp:
            results = [r for c in args.configs for r in run(c, GRIDS[c], args.repeats, Path(tmp))]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "contend": args.contend,
                                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                                               "processor": platform.processor() or platform.machine()}, indent=1))


if __name__ == "__main__":
    main()
