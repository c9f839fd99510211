"""Where a diagnostic's models and task come from: model directories or run directories, a config.

A *model* argument is a directory written by ``save_pretrained`` (``RUN/<stage>/final`` works), or a run
directory, which stands for its final model (``summary.json``'s ``final_model``, else the last stage's
``final/``). A *task* argument is a YAML config or a run directory (its ``config.yaml``): its ``task``,
``sampling`` and ``eval`` sections say what to sample and how.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import models
from ..config import ConfigError, RunCfg, load_config
from ..tasks import build_task


def resolve_model_dir(arg: str | Path) -> Path:
    """A model directory from a model directory or a run directory; ModelLoadError otherwise."""
    path = Path(arg).expanduser()
    if (path / "config.json").exists():
        return path
    if (path / "config.yaml").exists():  # a run directory
        summary = path / "summary.json"
        if summary.exists():
            from ..userfiles import read_json

            data = read_json(summary, "a run's summary", ConfigError)
            final = data.get("final_model") if isinstance(data, dict) else None
            if final and (Path(final) / "config.json").exists():
                return Path(final)
        cfg = load_config(path / "config.yaml")
        from ..pipeline import stage_dirs

        for _, stage_dir in reversed(stage_dirs(cfg, path)):
            if (stage_dir / "final" / "DONE").exists():
                return stage_dir / "final"
        raise models.ModelLoadError(f"run directory {path} has no finished stage (no <stage>/final/DONE); "
                                    "finish or resume the run first")
    raise models.ModelLoadError(f"{arg}: neither a model directory (with config.json) nor a run directory "
                                "(with config.yaml)")


def load_task_config(arg: str | Path) -> RunCfg:
    """The run config whose ``task`` / ``sampling`` / ``eval`` sections a diagnostic uses."""
    path = Path(arg).expanduser()
    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise ConfigError(f"--task {arg}: a directory without config.yaml; give a YAML config or a run directory")
        path = path / "config.yaml"
    return load_config(path)


def load_eval_model(path: Path, cfg: RunCfg | None = None):
    """(model in eval mode, tokenizer, device) for a model directory, in the config's dtype."""
    from ..pipeline import device_and_dtype

    device, dtype = device_and_dtype(cfg) if cfg is not None else (torch.device("cpu"), torch.float32)
    trc = bool(cfg and cfg.model.trust_remote_code)
    tokenizer = models.load_tokenizer(str(path), trust_remote_code=trc)
    model = models.load_model(str(path), dtype=dtype, trust_remote_code=trc).to(device).eval()
    return model, tokenizer, device


def same_tokenizer(tok_a, tok_b) -> str | None:
    """None when two tokenizers map text to the same ids; else what differs (for a refusal message)."""
    if len(tok_a) != len(tok_b):
        return f"vocabulary sizes differ ({len(tok_a)} vs {len(tok_b)})"
    if tok_a.get_vocab() != tok_b.get_vocab():
        diff = sorted(set(tok_a.get_vocab().items()) ^ set(tok_b.get_vocab().items()))[:3]
        return f"the vocabularies map tokens to different ids (e.g. {diff})"
    if (tok_a.eos_token_id, tok_a.pad_token_id) != (tok_b.eos_token_id, tok_b.pad_token_id):
        return "the EOS / pad token ids differ"
    return None


def heldout_problems(cfg: RunCfg, num: int | None = None):
    """(task, the first ``num`` held-out problems; default eval.num_problems)."""
    task = build_task(cfg.task)
    problems = list(task.problems("heldout"))[: num or cfg.eval.num_problems]
    return task, problems


def encode_prompts(cfg: RunCfg, tokenizer, task, model, problems) -> list[list[int]]:
    """Prompt ids of ``problems`` exactly as training encodes them (see ``pipeline.encode_prompt``)."""
    from ..pipeline import encode_prompt

    from ..tasks.base import describe

    return [encode_prompt(cfg, tokenizer, task, model, p.prompt, where=describe(p)) for p in problems]
