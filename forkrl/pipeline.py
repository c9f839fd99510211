"""Run a config's stages in order (e.g. ``[sft, grpo]``), each starting from the previous stage's model.

Run directory layout::

    RUN_DIR/config.yaml          resolved config
    RUN_DIR/metrics.jsonl        one line per optimizer step, every stage
    RUN_DIR/<stage>/checkpoints/ atomic checkpoints (see checkpoint.py)
    RUN_DIR/<stage>/final/       the stage's model + tokenizer (save_pretrained; loadable by from_pretrained)
    RUN_DIR/<stage>/final/adapter/  the LoRA adapter, when LoRA is on (final/ holds the merged weights)
    RUN_DIR/summary.json         per-stage wall time and held-out pass@1
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, models
from .distributed import Dist, setup
from .config import ConfigError, RunCfg, parse_config
from .tasks import build_task
from .tasks.formatting import format_prompt
from .trainers.accumulate import Plan


@dataclass(frozen=True)
class StageContext:
    """Everything a trainer needs for one stage, fixed for the stage; built here so trainers stay thin loops.
    (What changes during a stage, its step, guard streaks and evaluation time, is the loop's:
    ``trainers.loop.StageLoop``.) ``plan``: how micro-batches accumulate, ``debug.inject``'s plan from
    ``check.FAULTS`` (the correct one unless a fault is injected)."""

    cfg: RunCfg
    name: str
    stage_dir: Path
    run_dir: Path
    init_path: Path
    model: torch.nn.Module
    tokenizer: object
    task: object
    device: torch.device
    resume_from: Path | None
    dist: Dist
    plan: Plan

    def encode_prompt(self, prompt: str) -> list[int]:
        return encode_prompt(self.cfg, self.tokenizer, self.task, self.model, prompt)


def encode_prompt(cfg: RunCfg, tokenizer, task, model, prompt: str) -> list[int]:
    """A problem's prompt ids exactly as every stage and diagnostic sees them (format style, template,
    system prompt); a prompt that cannot fit with ``sampling.max_new_tokens`` is a user error."""
    fmt = cfg.task.format
    text = format_prompt(prompt, tokenizer, style=fmt.style, template=fmt.template,
                         system_prompt=fmt.system_prompt or getattr(task, "system_prompt", None))
    ids = tokenizer(text, add_special_tokens=fmt.style == "plain").input_ids
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(ids) + cfg.sampling.max_new_tokens > limit:
        raise ConfigError(f"a prompt of {len(ids)} tokens plus sampling.max_new_tokens="
                          f"{cfg.sampling.max_new_tokens} exceeds the model's context of {limit}; "
                          "lower sampling.max_new_tokens or shorten the prompts")
    return ids


def device_and_dtype(cfg: RunCfg) -> tuple[torch.device, torch.dtype]:
    cuda = torch.cuda.is_available()
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    return torch.device("cuda" if cuda else "cpu"), dtype


def base_model_path(cfg: RunCfg, task) -> Path:
    """``model.path``, or the tiny model built from ``model.tiny`` (cached by spec and task text)."""
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    spec = cfg.model.tiny.model_dump()
    try:
        texts = [p.prompt + c for p, c in task.demonstrations("train")]
    except Exception:  # noqa: BLE001 - tasks without demonstrations: train the tokenizer on prompts
        texts = [p.prompt + " " + p.answer for p in task.problems("train")]
    texts = texts[:4000]
    out = models.cache_dir() / f"tiny-{models.spec_hash(spec, texts)}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        size = {k: spec[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                     "intermediate_size", "max_positions")}
        models.build_tiny(out, texts, arch=spec["arch"], vocab_size=spec["vocab_size"], seed=spec["seed"], **size)
    return out


def load_stage_model(cfg: RunCfg, init_path: Path, resume_from: Path | None, stage: str):
    """The policy for a stage: ``init_path``'s weights, a fresh LoRA adapter if the stage's LoRA setting
    (``cfg.lora_for(stage)``) enables one, then the checkpoint's weights when resuming."""
    device, dtype = device_and_dtype(cfg)
    trc = cfg.model.trust_remote_code
    tok_path = cfg.model.tokenizer if (cfg.model.tokenizer and init_path == Path(cfg.model.path or "")) else init_path
    tokenizer = models.load_tokenizer(str(tok_path), trust_remote_code=trc)
    lora = cfg.lora_for(stage)
    if resume_from is not None and not lora.enabled:
        model = models.load_model(str(resume_from / "model"), dtype=dtype, trust_remote_code=trc)
    else:
        model = models.load_model(str(init_path), dtype=dtype, trust_remote_code=trc)
    if lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from is not None:
            model = PeftModel.from_pretrained(model, str(resume_from / "model"), is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    return model.to(device), tokenizer, device


def save_final(ctx: StageContext) -> Path:
    """Write the stage's model (merged when LoRA) + tokenizer to ``final/`` atomically, with a DONE mark.
    Rank 0 writes; every rank waits until it is there, since the next stage starts from it."""
    final = ctx.stage_dir / "final"
    if ctx.dist.is_main:
        tmp = ctx.stage_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = ctx.model
        if ctx.cfg.lora_for(ctx.name).enabled:
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
            model = model.merge_and_unload()
        model.save_pretrained(tmp, safe_serialization=True)
        ctx.tokenizer.save_pretrained(tmp)
        (tmp / "DONE").write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    ctx.dist.barrier()
    return final


def _saved_config(path: Path) -> RunCfg:
    """The config a run directory was started with, as this version reads it (older key names migrated)."""
    import yaml

    try:
        return parse_config(yaml.safe_load(path.read_text()), source=str(path))
    except (ConfigError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}, the config this run was started with, no longer reads ({e}); "
                          "start a new run with another --out") from None


def stage_dirs(cfg: RunCfg, run_dir: Path) -> list[tuple[str, Path]]:
    names = list(cfg.stages)
    return [(s, run_dir / (s if names.count(s) == 1 else f"{i}-{s}")) for i, s in enumerate(names)]


def run(cfg: RunCfg, run_dir: Path, *, resume: bool = False, init_path: Path | None = None, task=None) -> dict:
    """Run every stage of ``cfg`` into ``run_dir``; returns the summary written to summary.json.

    ``init_path`` overrides the starting model; ``task`` (any object following the Task protocol)
    overrides the config's task section, for tasks written in Python."""
    from .check import FAULTS
    from .trainers import STAGES

    run_dir = Path(run_dir)
    dist = setup()
    saved = run_dir / "config.yaml"
    if saved.exists() and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if saved.exists() and _saved_config(saved) != cfg:
        raise ConfigError(f"{saved} differs from the config given; resume with the same config")
    task = task if task is not None else build_task(cfg.task)  # task and model errors before anything is written
    if init_path is None and dist.is_main:
        base_model_path(cfg, task)  # a tiny base is built once, by rank 0 ...
    dist.barrier()
    init = init_path or base_model_path(cfg, task)  # ... and every rank then finds it in the cache
    models.check_source(str(init))
    dist.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(saved, cfg.to_yaml())
    torch.manual_seed(cfg.seed)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"stages": {}}
    for name, stage_dir in stage_dirs(cfg, run_dir):
        if (stage_dir / "final" / "DONE").exists():
            init = stage_dir / "final"
            continue
        resume_from = checkpoint.latest(stage_dir / "checkpoints") if resume else None
        model, tokenizer, device = load_stage_model(cfg, init, resume_from, name)
        ctx = StageContext(cfg, name, stage_dir, run_dir, init, model, tokenizer, task, device, resume_from, dist,
                           FAULTS[cfg.debug.inject])
        t0 = time.time()
        result = STAGES[name](ctx)
        init = save_final(ctx)
        summary["stages"][stage_dir.name] = {"wall_s": round(time.time() - t0, 2), **result}
        if dist.is_main:
            checkpoint.atomic_write_text(summary_path, json.dumps(summary, indent=2))
    summary["final_model"] = str(init)
    if dist.is_main:
        checkpoint.atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary
