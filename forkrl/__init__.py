"""forkrl: RL post-training for reasoning language models, correct, cheap and legible.

Public API: ``load_config``, ``train`` (run a config's stages into a directory), ``diff`` (what training
changed, token by token), ``write_report`` (the offline HTML report of a run), ``Rollouts``/``Role``.
"""

from .config import ConfigError, RunCfg, load_config
from .types import Role, Rollouts, Scored

__version__ = "0.1.0"


def train(config, out_dir, *, resume: bool = False, task=None) -> dict:
    """Run every stage of ``config`` (a path or a RunCfg) into ``out_dir``; returns the run summary. ``task``: any
    object following the Task protocol (``tasks.base.Task``), instead of the config's ``task`` section."""
    from pathlib import Path

    from .pipeline import run

    cfg = config if isinstance(config, RunCfg) else load_config(config)
    return run(cfg, Path(out_dir), resume=resume, task=task)


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
