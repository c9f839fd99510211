"""forkrl: RL post-training for reasoning language models, correct, cheap and legible.

Public API: ``load_config``, ``train`` (run a config's stages into a directory), ``Rollouts``/``Role``.
"""

from .config import ConfigError, RunCfg, load_config
from .types import Role, Rollouts, Scored

__version__ = "0.1.0"


def train(config, out_dir, *, resume: bool = False) -> dict:
    """Run every stage of ``config`` (a path or a RunCfg) into ``out_dir``; returns the run summary."""
    from pathlib import Path

    from .pipeline import run

    cfg = config if isinstance(config, RunCfg) else load_config(config)
    return run(cfg, Path(out_dir), resume=resume)


__all__ = ["ConfigError", "Role", "Rollouts", "RunCfg", "Scored", "load_config", "train"]
