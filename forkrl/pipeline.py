"""Run a config's stages in order (e.g. ``[sft, grpo]``), each starting from the previous stage's model.

Run directory layout::

    RUN_DIR/config.yaml          resolved config
    RUN_DIR/rewards.json         each stage's rewards: label, spec, the user's file and its sha256 (checked on resume)
    RUN_DIR/rewards/             a copy of each reward file as the run started with it (STEM-SHA256[:12].py)
    RUN_DIR/metrics.jsonl        one line per optimizer step, every stage
    RUN_DIR/<stage>/checkpoints/ atomic checkpoints (see checkpoint.py)
    RUN_DIR/<stage>/final/       the stage's model + tokenizer (save_pretrained; loadable by from_pretrained)
    RUN_DIR/<stage>/final/adapter/  the LoRA adapter, when LoRA is on (final/ holds the merged weights)
    RUN_DIR/<stage>/final/stage.json  the stage's entry of summary.json, written before final/'s DONE mark
    RUN_DIR/summary.json         per-stage wall time and held-out pass@1 (rebuilt from the stages' stage.json)

What a resume relies on is written before the mark that says it is done, or derived: a finished stage is one
whose final/DONE exists, and its summary entry is inside it; a run killed anywhere leaves at worst temporary
files (``.NAME.tmp-PID``), which the next start removes when no live process owns them. A run directory that
holds only its config.yaml and rewards.json (an earlier start stopped at an error before any work) may be started again as new.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, models, tracking
from .distributed import Dist, setup
from .config import ConfigError, RunCfg, StagePlan, parse_config
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
    sharded: object | None = None  # under distributed.strategy fsdp2: the ``sharding.Sharded`` trained model

    @property
    def train_model(self) -> torch.nn.Module:
        """The model the stage's forward/backward passes and optimizer run on: ``model`` itself, or under FSDP2 its
        sharded twin (``model`` then being the full copy everything else reads, refreshed after each step)."""
        return self.model if self.sharded is None else self.sharded.module

    def encode_prompt(self, prompt: str, *, where: str = "a prompt") -> list[int]:
        return encode_prompt(self.cfg, self.tokenizer, self.task, self.model, prompt, where=where)


MAX_PAIR_FIELD_BYTES = 1 << 20  # a preference pair's field: what a line of a pairs file may hold, 8 of these
MAX_CHARS_PER_TOKEN = 128  # no tokenizer forkrl knows of has longer tokens: a prompt longer than this many
# characters per context position cannot fit, and only that much of it is ever tokenized


def context_of(model) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), from a model or its config; None if unset."""
    config = getattr(model, "config", model)
    return getattr(config, "max_position_embeddings", None)


def encode_prompt(cfg: RunCfg, tokenizer, task, model, prompt: str, *, where: str = "a prompt") -> list[int]:
    """A problem's prompt ids exactly as every stage and diagnostic sees them (format style, template,
    system prompt); a prompt that cannot fit with ``sampling.max_new_tokens`` is a user error naming ``where``.
    ``model``: the model or its config (for its context). A prompt far longer than the context is refused from a
    prefix, without tokenizing all of it."""
    fmt = cfg.task.format
    text = format_prompt(prompt, tokenizer, style=fmt.style, template=fmt.template,
                         system_prompt=fmt.system_prompt or getattr(task, "system_prompt", None))
    limit = context_of(model)
    cap = (limit + 1) * MAX_CHARS_PER_TOKEN if limit else None
    plain = fmt.style == "plain"
    ids = tokenizer(text[:cap] if cap and len(text) > cap else text, add_special_tokens=plain).input_ids
    if cap and len(text) > cap and len(ids) + cfg.sampling.max_new_tokens <= limit:
        ids = tokenizer(text, add_special_tokens=plain).input_ids  # a tokenizer with very long tokens
    if limit and len(ids) + cfg.sampling.max_new_tokens > limit:
        size = f"at least {len(ids):,}" if cap and len(text) > cap else f"{len(ids):,}"
        raise ConfigError(f"{where}: {size} tokens, plus sampling.max_new_tokens={cfg.sampling.max_new_tokens}, "
                          f"exceeds the model's context of {limit}; lower sampling.max_new_tokens or shorten the "
                          "prompts")
    return ids


def check_inputs(cfg: RunCfg, task, model_dir: Path) -> None:
    """Every prompt of the task (and every SFT demonstration, for an ``sft`` stage) fits the model's context: an
    error naming the first that does not, before anything is written into the run directory."""
    from transformers import AutoConfig

    from .tasks.base import describe

    tokenizer = models.load_tokenizer(str(_tokenizer_path(cfg, model_dir)), trust_remote_code=cfg.model.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged config.json
        raise models.load_error("the model's config", str(model_dir), e) from None
    limit = context_of(config)
    if getattr(task, "multi_turn", False):
        check_episodes(cfg, task, tokenizer, limit)
        return
    for split in ("train", "heldout"):
        for problem in task.problems(split):
            encode_prompt(cfg, tokenizer, task, config, problem.prompt, where=describe(problem))
    for stage in cfg.stage_plan:
        if stage.kind == "dpo" and stage.cfg.dpo.data == "offline":
            check_pairs(stage.cfg, tokenizer, task, config, limit)
    if "sft" in cfg.stage_kinds and limit:
        for problem, completion in task.demonstrations("train"):
            ids = encode_prompt(cfg, tokenizer, task, config, problem.prompt, where=describe(problem))
            n = len(ids) + len(tokenizer(completion[: (limit + 1) * MAX_CHARS_PER_TOKEN],
                                         add_special_tokens=False).input_ids) + 1
            if n > limit:
                raise ConfigError(f"{describe(problem)}: its demonstration, with its prompt and EOS, is {n:,} tokens "
                                  f"or more, over the model's context of {limit}; shorten it or leave it out")


def check_pairs(cfg: RunCfg, tokenizer, task, config, limit: int | None) -> None:
    """Offline DPO's preference file reads (``trainers.dpo.read_pairs``) and every pair fits the model's context."""
    from .trainers.dpo import read_pairs

    cut = (limit + 1) * MAX_CHARS_PER_TOKEN if limit else None  # never tokenize a huge text whole
    for where, prompt, chosen, rejected in read_pairs(cfg.dpo.pairs_path, MAX_PAIR_FIELD_BYTES):
        ids = encode_prompt(cfg, tokenizer, task, config, prompt, where=where)
        longest = max(len(tokenizer(t[:cut], add_special_tokens=False).input_ids) for t in (chosen, rejected))
        if limit and len(ids) + longest + 1 > limit:
            raise ConfigError(f"{where}: the pair's prompt and its longer completion, with EOS, are "
                              f"{len(ids) + longest + 1:,} tokens, over the model's context of {limit}")


def check_episodes(cfg: RunCfg, task, tokenizer, limit: int | None) -> None:
    """An env task's episodes can be carried token in, token out (the codec's template check), its episode budget
    fits the model's context, and every SFT demonstration fits the episode budget."""
    from .envs.episodes import CodecError, make_codec, replay

    try:
        codec = make_codec(task, tokenizer)
    except CodecError as e:
        raise ConfigError(f"task.format: {e}") from None
    if limit and task.max_episode_tokens > limit:
        raise ConfigError(f"task.max_episode_tokens={task.max_episode_tokens} is over the model's context of {limit}; "
                          "lower it (or max_turns)")
    if "sft" in cfg.stage_kinds:
        for demo in task.episode_demos("train"):
            n = len(replay(task, codec, demo).ids)
            if n > task.max_episode_tokens:
                raise ConfigError(f"task: the demonstration of env seed {demo.seed} ({demo.kind}) is {n} tokens, over "
                                  f"task.max_episode_tokens={task.max_episode_tokens}; raise it or shorten the turns")


def _tokenizer_path(cfg: RunCfg, init_path: Path) -> Path:
    """Where the tokenizer of a stage starting from ``init_path`` is: ``model.tokenizer`` for the configured base
    model, else the model directory itself."""
    return Path(cfg.model.tokenizer) if (cfg.model.tokenizer and init_path == Path(cfg.model.path or "")) else init_path


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
        checkpoint.remove_stale_temps(out.parent)  # a build that a kill interrupted
        size = {k: spec[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                     "intermediate_size", "max_positions")}
        models.build_tiny(out, texts, arch=spec["arch"], vocab_size=spec["vocab_size"], seed=spec["seed"], **size)
    return out


def load_stage_model(cfg: RunCfg, init_path: Path, resume_from: Path | None, stage: str):
    """The policy for a stage: ``init_path``'s weights, a fresh LoRA adapter if the stage's LoRA setting
    (``cfg.lora_for(stage)``) enables one, then the checkpoint's weights when resuming."""
    device, dtype = device_and_dtype(cfg)
    trc = cfg.model.trust_remote_code
    tokenizer = models.load_tokenizer(str(_tokenizer_path(cfg, init_path)), trust_remote_code=trc)
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
    if cfg.model.gradient_checkpointing:  # non-reentrant: the reentrant kind needs inputs that require grad (LoRA)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), tokenizer, device


STAGE_RECORD = "stage.json"  # in final/: the stage's summary entry, so a resume never loses it


def _read_summary(path: Path) -> dict:
    """summary.json as far as it is kept: its finished stages' entries are rebuilt from their final/stage.json, so
    a damaged or missing file starts empty."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"stages": {}}
    return summary if isinstance(summary, dict) and isinstance(summary.get("stages"), dict) else {"stages": {}}


def holds_run(run_dir: Path) -> bool:
    """Whether a run directory holds work to keep: a summary, a metrics line, a checkpoint or a finished stage."""
    metrics = run_dir / "metrics.jsonl"
    return ((run_dir / "summary.json").exists() or (metrics.exists() and metrics.stat().st_size > 0)
            or any(run_dir.glob("*/checkpoints/step-*")) or any(run_dir.glob("*/final")))


def save_final(ctx: StageContext, result: dict) -> Path:
    """Write the stage's model (merged when LoRA) + tokenizer and its summary entry ``result`` (``STAGE_RECORD``) to
    ``final/`` atomically, with a DONE mark. Rank 0 writes; every rank waits until it is there, since the next stage
    starts from it."""
    final = ctx.stage_dir / "final"
    if ctx.dist.is_main:
        tmp = ctx.stage_dir / f".final.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model = ctx.model
        with checkpoint.guarded_write(f"{ctx.stage_dir.name}'s final model", final,
                                      checkpoint.tensor_bytes(model.state_dict()), cleanup=(tmp,)):
            if ctx.cfg.lora_for(ctx.name).enabled:
                model.save_pretrained(tmp / "adapter", safe_serialization=True)
                model = model.merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
            (tmp / STAGE_RECORD).write_text(json.dumps(result, indent=2))
            checkpoint.fsync_tree(tmp)
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


@contextmanager
def _on_full_disk(stage_dir: Path):
    """A ``DiskFullError`` inside a stage, completed with the stage's newest intact checkpoint and how to go on."""
    try:
        yield
    except checkpoint.DiskFullError as e:
        if "newest intact checkpoint" in str(e):
            raise
        newest = checkpoint.latest(stage_dir / "checkpoints")
        kept = f"the newest intact checkpoint is {newest}" if newest else f"{stage_dir.name} has no checkpoint yet"
        raise checkpoint.DiskFullError(f"{e}; {kept}. Free disk space and resume with --resume", what=e.what,
                                       path=e.path, need=e.need, free=e.free) from None


REWARDS_RECORD = "rewards.json"  # in the run directory: each stage's rewards, their files and content hashes


def load_rewards(cfg: RunCfg, task) -> list[dict]:
    """Every stage's rewards loaded and checked against ``task`` (files imported, signatures checked), so a bad
    reward is a config error before anything is written; returns what the run records of them (``REWARDS_RECORD``)."""
    from .config import REWARD_SECTIONS
    from .rewards import RewardError, load

    record = []
    for stage in cfg.stage_plan:
        if stage.kind not in REWARD_SECTIONS:
            continue
        part = getattr(stage.cfg, stage.kind)
        try:
            loaded = load(part.rewards, task, where=rewards_key(cfg, stage), timeout_s=part.reward_timeout_s)
        except RewardError as e:
            raise ConfigError(str(e)) from None
        record += [{"stage": stage.name, "label": r.label, "spec": r.spec, "file": str(r.file) if r.file else None,
                    "sha256": r.sha256, "copy": f"{r.file.stem}-{r.sha256[:12]}.py" if r.file else None}
                   for r in loaded]
    return record


def _check_reward_files(run_dir: Path, record: list[dict], allow_changed: bool) -> None:
    """A resumed run refuses a reward whose file (or given source) changed since the run started: its rewards
    would no longer be the ones its steps so far were trained on."""
    path = run_dir / REWARDS_RECORD
    if allow_changed or not path.exists():
        return
    from .userfiles import read_json

    before = {(r["stage"], r["label"]): r for r in read_json(path, "the run's record of its rewards", ConfigError)}
    for r in record:
        old = before.get((r["stage"], r["label"]))
        if old is not None and old.get("sha256") != r["sha256"]:
            what = r["file"] or r["spec"]
            raise ConfigError(f"{r['stage']}.rewards {r['label']!r}: {what} changed since this run started "
                              f"(sha256 {str(old.get('sha256'))[:12]} -> {str(r['sha256'])[:12]}); restore it, "
                              "or pass --allow-changed-rewards to resume with the new code")


def rewards_key(cfg: RunCfg, stage) -> str:
    """Where a stage's rewards are written in the config: ``grpo.rewards``, or ``stages.2.grpo.rewards`` for a
    stage that gives its own."""
    i = [s.name for s in cfg.stage_plan].index(stage.name)
    entry = cfg.stages[i]
    own = isinstance(entry, dict) and "rewards" in (entry[stage.kind] or {})
    return f"stages.{i}.{stage.kind}.rewards" if own else f"{stage.kind}.rewards"


def stage_dirs(cfg: RunCfg, run_dir: Path) -> list[tuple[StagePlan, Path]]:
    """Each stage of the run with its directory (named by the stage: ``grpo``, ``1-grpo``, or its own ``name``)."""
    return [(stage, run_dir / stage.name) for stage in cfg.stage_plan]


def run(cfg: RunCfg, run_dir: Path, *, resume: bool = False, init_path: Path | None = None, task=None,
        allow_changed_rewards: bool = False) -> dict:
    """Run every stage of ``cfg`` into ``run_dir``; returns the summary written to summary.json.

    ``init_path`` overrides the starting model; ``task`` (any object following the Task protocol)
    overrides the config's task section, for tasks written in Python. ``allow_changed_rewards``: resume although a
    reward's file changed since the run started."""
    from .check import FAULTS
    from .trainers import STAGES

    run_dir = Path(run_dir)
    dist = setup()
    saved = run_dir / "config.yaml"
    started = saved.exists() and holds_run(run_dir)  # a config alone: an earlier start stopped before any work
    if started and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if started and _saved_config(saved) != cfg:
        raise ConfigError(f"{saved} differs from the config given; resume with the same config")
    task = task if task is not None else build_task(cfg.task)  # task and model errors before anything is written
    reward_record = load_rewards(cfg, task)
    if dist.is_main:
        tracking.require(cfg.report_to)  # a tracker's missing package, before anything is written
    if started:
        _check_reward_files(run_dir, reward_record, allow_changed_rewards)
    if init_path is None and dist.is_main:
        base_model_path(cfg, task)  # a tiny base is built once, by rank 0 ...
    dist.barrier()
    init = init_path or base_model_path(cfg, task)  # ... and every rank then finds it in the cache
    models.check_source(str(init))
    check_inputs(cfg, task, Path(init))  # prompts and demonstrations that do not fit, before anything is written
    dist.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale_temps(run_dir)  # what a killed run left half-written
        checkpoint.atomic_write_text(saved, cfg.to_yaml())
        for r in reward_record:  # a copy of each reward file as it was when the run started, named by its hash
            if r["file"] is not None:
                copy = run_dir / "rewards" / r["copy"]
                copy.parent.mkdir(exist_ok=True)
                if not copy.exists():
                    checkpoint.atomic_write_text(copy, Path(r["file"]).read_text())
        checkpoint.atomic_write_text(run_dir / REWARDS_RECORD, json.dumps(reward_record, indent=2))
    torch.manual_seed(cfg.seed)
    summary_path = run_dir / "summary.json"
    summary = _read_summary(summary_path)
    for stage, stage_dir in stage_dirs(cfg, run_dir):
        final = stage_dir / "final"
        if (final / "DONE").exists():  # finished: its summary entry is in its final/, written before DONE
            init = final
            if (final / STAGE_RECORD).exists():
                summary["stages"][stage_dir.name] = json.loads((final / STAGE_RECORD).read_text())
            continue
        with _on_full_disk(stage_dir):
            resume_from = checkpoint.latest(stage_dir / "checkpoints") if resume else None
            model, tokenizer, device = load_stage_model(stage.cfg, init, resume_from, stage.kind)
            plan, sharded = FAULTS[cfg.debug.inject], None
            if cfg.distributed.strategy == "fsdp2" and dist.enabled:
                from .sharding import Lockstep, Sharded

                plan, sharded = Lockstep(dist), Sharded(model, dist, mixed_precision=cfg.distributed.mixed_precision)
            ctx = StageContext(stage.cfg, stage.kind, stage_dir, run_dir, init, model, tokenizer, task, device,
                               resume_from, dist, plan, sharded)
            t0 = time.time()
            result = STAGES[stage.kind](ctx)
            result = {"wall_s": round(time.time() - t0, 2), **result}
            init = save_final(ctx, result)
            summary["stages"][stage_dir.name] = result
            if dist.is_main:
                checkpoint.atomic_write_text(summary_path, json.dumps(summary, indent=2))
    summary["final_model"] = str(init)
    if dist.is_main:
        checkpoint.atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return summary
