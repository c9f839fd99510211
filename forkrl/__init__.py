"""forkrl: RL post-training for reasoning language models, correct, cheap and legible.

Public API: ``load_config``, ``train`` (run a config's stages into a directory, with rewards, a task or a model
given as Python objects), ``diff`` (what training
changed, token by token), ``write_report`` (the offline HTML report of a run), ``Rollouts``/``Role``.
"""

from .config import ConfigError, RunCfg, load_config
from .types import Role, Rollouts, Scored

__version__ = "0.1.0"


def train(config, out_dir, *, rewards=None, task=None, model=None, tokenizer=None, overrides=(), resume: bool = False,
          allow_changed_rewards: bool = False) -> dict:
    """Run every stage of ``config`` into ``out_dir``; returns the run summary.

    ``config``: a YAML path, a dict (as the YAML would read) or a ``RunCfg``; ``overrides``: ``KEY=VALUE`` strings,
    as ``--set`` takes them. ``rewards``: the rewards of every stage that scores (grpo, fork), instead of the
    config's: each a callable (weight 1), a ``(callable, weight)`` pair, or a dict of a reward entry's keys with
    ``fn`` a callable (``{"fn": f, "weight": 0.5, "mode": "batch", "kwargs": {...}}``) or a name; parameters are
    filled by name as for a reward in the config. ``task``: any object following the Task protocol
    (``tasks.base.Task``), instead of the config's ``task`` section. ``model`` (and its ``tokenizer``): a
    transformers model object (or a model directory) to start from instead of ``model.path``; an object is saved
    into ``out_dir/input-model`` when the run starts, and a resumed run starts from that copy."""
    from pathlib import Path

    from .pipeline import run

    out = Path(out_dir)
    cfg = _config_of(config, overrides, rewards)
    init_path = None
    if isinstance(model, (str, Path)):
        init_path = Path(model)
    elif model is not None:
        init_path = _save_input_model(model, tokenizer, out / "input-model", reuse=resume)
    return run(cfg, out, resume=resume, task=task, init_path=init_path, allow_changed_rewards=allow_changed_rewards)


def _config_of(config, overrides, rewards) -> RunCfg:
    from .config import parse_config

    if isinstance(config, RunCfg):
        data = config.model_dump(mode="json", exclude_defaults=True)
    elif isinstance(config, dict):
        data = config
    else:
        if not overrides and rewards is None:
            return load_config(config)
        cfg = load_config(config, list(overrides))
        data, overrides = cfg.model_dump(mode="json", exclude_defaults=True), ()
    if rewards is not None:
        from .config import REWARD_SECTIONS

        entries = [_reward_entry(r, i) for i, r in enumerate(rewards)]
        for section in REWARD_SECTIONS:
            data = {**data, section: {**data.get(section, {}), "rewards": entries}}
    return parse_config(data, source="forkrl.train(config=...)", overrides=list(overrides))


def _reward_entry(reward, i: int) -> dict:
    """A reward handed to ``train(rewards=...)`` as a config entry (``rewards.api.given`` names a callable)."""
    from .rewards.api import given

    if isinstance(reward, tuple) and len(reward) == 2 and callable(reward[0]):
        return {"fn": given(reward[0]), "weight": float(reward[1])}
    if callable(reward):
        return {"fn": given(reward)}
    if isinstance(reward, dict):
        return {**reward, "fn": given(reward["fn"])} if callable(reward.get("fn")) else dict(reward)
    raise ConfigError(f"train(rewards=...)[{i}]: {reward!r} is not a callable, a (callable, weight) pair or a "
                      "reward entry dict")


def _save_input_model(model, tokenizer, path, *, reuse: bool):
    """``model`` and ``tokenizer`` saved with save_pretrained under ``path``; the copy already there when ``reuse``
    (a resume); nothing written into a run directory that holds a run (the run then refuses to start)."""
    import os
    import shutil

    from . import checkpoint
    from .pipeline import holds_run

    if (reuse and (path / "DONE").exists()) or holds_run(path.parent):
        return path
    if tokenizer is None:
        raise ConfigError("train(model=...) needs its tokenizer too: train(..., model=model, tokenizer=tokenizer)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    checkpoint.fsync_tree(tmp)
    (tmp / "DONE").write_text("ok\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def diff(base, tuned, task, **options) -> dict:
    """``forkrl diff`` as a function: the ``diff.json`` dict of ``tuned`` against ``base`` (model or run
    directories) on ``task`` (a config or run directory); options as in ``diagnostics.tokendiff.run_diff``."""
    from .diagnostics.tokendiff import run_diff

    return run_diff(str(base), str(tuned), str(task), **options)


def write_report(run_dir, out=None):
    """``forkrl report`` as a function: write the run directory's HTML report; returns its path. (Not named
    ``report``: that is the subpackage.)"""
    from .report import write_report as write

    return write(run_dir, out)


__all__ = ["ConfigError", "Role", "Rollouts", "RunCfg", "Scored", "diff", "load_config", "train", "write_report"]
