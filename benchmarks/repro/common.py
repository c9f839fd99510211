"""What the reproductions share: the miniature's base model (the demo's: a tiny Qwen2-style model SFT'd on two-digit
addition that mixes four strategies, its init seed the run's) and how a stage is run or read back.

A base is trained once per seed under ``ROOT/base-s<seed>`` and reused by every script given the same root
(``--bases``), so ``tree.py`` and ``curriculum.py`` start from the same models. A run already finished is read back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TINY = {"arch": "qwen2", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
        "intermediate_size": 384, "max_positions": 256}
SMOKE_TINY = {"arch": "qwen2", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "max_positions": 256}
BASE_STEPS = 400  # half the demo's 800: held-out pass@1 well above 0 and well below 1, in a few minutes


def parser(doc: str) -> argparse.ArgumentParser:
    """Every reproduction's command line: where its runs go (``--out``), where the seeds' bases are (``--bases``), the
    seeds, a smoke run, the JSON; a script adds its own knobs."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bases", type=Path, help="where the seeds' bases are (or are trained); default OUT")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    return ap


def task(digits: int, smoke: bool) -> dict:
    return {"type": "arithmetic", "digits": digits, "train_size": 80 if smoke else 3000,
            "heldout_size": 8 if smoke else 200}


def stage_config(seed: int, stage: str, *, model: dict, digits: int, smoke: bool, sft: dict | None = None,
                 grpo: dict | None = None) -> dict:
    return {"seed": seed, "stages": [stage], "model": model, "task": task(digits, smoke),
            "sampling": {"temperature": 1.0, "max_new_tokens": 48},
            **({"sft": sft} if sft else {}), **({"grpo": grpo} if grpo else {}),
            "eval": {"num_problems": 8 if smoke else 200, "samples_per_problem": 1 if smoke else 2},
            "checkpoint": {"every": 0, "keep_last": 1}, "log_every": 20}


def run_one(data: dict, run_dir: Path) -> tuple[dict, list[dict]]:
    """(the stage's summary entry, its metrics rows) of ``data``'s one stage, run into ``run_dir`` or read back."""
    from forkrl.config import parse_config
    from forkrl.pipeline import run

    (stage,) = data["stages"]
    if not ((run_dir / stage / "final" / "DONE").exists() and (run_dir / "summary.json").exists()):
        run(parse_config(data, source="benchmarks/repro"), run_dir, resume=(run_dir / "config.yaml").exists())
    summary = json.loads((run_dir / "summary.json").read_text())["stages"][stage]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if r["stage"] == stage]


def base(seed: int, root: Path, smoke: bool) -> tuple[Path, float]:
    """(the seed's base model directory, its held-out pass@1 on two-digit addition)."""
    sft = {"steps": 3 if smoke else BASE_STEPS, "batch_size": 8 if smoke else 64,
           "micro_batch_size": 8 if smoke else 64, "optim": {"lr": 3e-3, "warmup_steps": 0 if smoke else 30,
                                                             "schedule": "linear"}}
    model = {"tiny": {**(SMOKE_TINY if smoke else TINY), "seed": seed}}
    summary, _ = run_one(stage_config(seed, "sft", model=model, digits=2, smoke=smoke, sft=sft),
                         root / f"base-s{seed}")
    return root / f"base-s{seed}" / "sft" / "final", summary["pass_at_1"]


def spread(xs: list[float]) -> dict:
    import statistics

    return {"each": xs, "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def cells(t: dict) -> str:
    """A table's "mean ± std | each seed" cells of a ``spread``."""
    return f"{t['mean']:.3f} ± {t['std']:.3f} | {', '.join(f'{x:.3f}' for x in t['each'])}"


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2))


def binomial_se(p: float, n: int) -> float:
    """The standard error of a pass rate p measured on n episodes: a difference under it is not a finding."""
    return (max(p * (1 - p), 1 / n) / n) ** 0.5
