"""Experiment trackers: every optimizer step's metrics line (what ``metrics.jsonl`` gets) also goes to TensorBoard,
Weights & Biases or Trackio, as the run config's ``report_to`` lists them (default none).

Each backend is an optional extra (``pip install 'forkrl[wandb]'``), imported when a stage's loop starts, on rank 0
only; a missing one is a ``ConfigError`` naming the extra (``require``). A ``Tracker`` has two methods, ``log(values,
step)`` and ``close()``; one adapter per backend, registered in ``TRACKERS`` at the bottom.

What a tracker sees:

* keys ``STAGE/METRIC`` (``grpo/reward_mean``, ``sft/loss``; STAGE is the stage directory's name, as in
  ``metrics.jsonl``), only the numeric values of the line (a bool as 0/1; None, NaN and strings left out);
* one step axis over the whole run, monotone as wandb requires: the step counts every optimizer step of the run so
  far, so with ``stages: [sft, grpo]`` and 3 SFT steps, SFT logs steps 1–3 and GRPO's step 1 is step 4 (the offset
  is the earlier stages' steps, read from ``metrics.jsonl``; ``step_offset``);
* the resolved config, once per tracker run (wandb ``config``, trackio ``config``, TensorBoard a ``config`` text).

One tracker run per run directory: each stage opens it and closes it at its end; a later stage, or a resumed run,
continues it (wandb: the id kept in ``RUN_DIR/tracking.json``, ``resume="allow"``; trackio: the run's name,
``resume="allow"``; TensorBoard: a new event file in ``RUN_DIR/tensorboard``). A resume redoes the steps past its
checkpoint: wandb drops the repeated steps (it warns: a step below its last one), TensorBoard and Trackio show them
twice (to float rounding the same values: resume is exact).

Where, set by environment variables (where a run is tracked is not part of the experiment, so not in the config,
which a resume must match): wandb reads its own ``WANDB_PROJECT`` (default ``forkrl``), ``WANDB_NAME`` (default the
run directory's name), ``WANDB_DIR`` (default the run directory: wandb writes ``RUN_DIR/wandb/``), ``WANDB_ENTITY``
and ``WANDB_MODE`` (``offline`` logs without a network; forkrl never sets a mode). Trackio: ``TRACKIO_PROJECT``
(forkrl's; default ``forkrl``), the run directory's name as the run's name, and trackio's own ``TRACKIO_DIR`` for
its local database. TensorBoard writes ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``).

Only rank 0 tracks: the metrics line is already the whole step's (every rank's rows).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import secrets
from pathlib import Path
from typing import Protocol


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _import(name: str):
    """Module ``name``, which forkrl's extra of the same name installs, or the ConfigError that says so."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        from .config import ConfigError

        raise ConfigError(f"report_to lists {name!r}, but {name} is not installed ({e}); install it with "
                          f"pip install 'forkrl[{name}]', or remove {name} from report_to") from None


def require(names) -> None:
    """Import every tracker backend in ``names``: a missing one is a ConfigError naming its extra. Call it before
    anything is written."""
    for name in names:
        if name not in TRACKERS:
            from .config import ConfigError

            raise ConfigError(f"report_to: unknown tracker {name!r}; valid: {', '.join(map(repr, TRACKERS))}")
        _import(name)


class TensorBoardTracker:
    """``torch.utils.tensorboard.SummaryWriter`` on ``RUN_DIR/tensorboard``: a scalar per key, the config as text."""

    def __init__(self, run_dir: Path, config: dict, *, fresh: bool):
        _import("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if fresh:  # text is Markdown there: indent 4 spaces for a code block
            text = _config_yaml(config)
            self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), global_step=0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """``wandb.init(project=, name=, dir=, id=, resume="allow", config=)``, then ``run.log(values, step=)`` and
    ``run.finish()``. The id is kept in ``RUN_DIR/tracking.json`` so a later stage or a resume continues the run."""

    def __init__(self, run_dir: Path, config: dict, *, fresh: bool):
        wandb = _import("wandb")
        directory = Path(os.environ.get("WANDB_DIR") or run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "forkrl",
                              name=os.environ.get("WANDB_NAME") or run_dir.resolve().name,
                              dir=str(directory), id=_wandb_id(run_dir, fresh), resume="allow", config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """``trackio.init(project=, name=, config=, resume=)``, then ``trackio.log(values, step=)`` and
    ``trackio.finish()``: a new run when the run directory starts, the same run (by name) after."""

    def __init__(self, run_dir: Path, config: dict, *, fresh: bool):
        self.trackio = _import("trackio")
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT") or "forkrl", name=run_dir.resolve().name,
                          config=config, resume="never" if fresh else "allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


STATE = "tracking.json"  # in the run directory: the tracker runs' ids, so a later stage or a resume continues them


def _wandb_id(run_dir: Path, fresh: bool) -> str:
    """The run directory's wandb run id: kept in ``STATE``, made (8 hex digits) when none is kept or the run
    directory starts over."""
    from .checkpoint import atomic_write_text

    path = run_dir / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    state = state if isinstance(state, dict) else {}
    if fresh or not isinstance(state.get("wandb_id"), str):
        state["wandb_id"] = secrets.token_hex(4)
        atomic_write_text(path, json.dumps(state, indent=2), what="the trackers' state")
    return state["wandb_id"]


def _config_yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def scalars(stage: str, metrics: dict) -> dict[str, float]:
    """The numeric values of a metrics line, keyed ``stage/metric`` (a bool as 0/1; None, NaN, text left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{stage}/{key}"] = value
    return out


def step_offset(metrics_path: Path, stage: str) -> int:
    """The run's optimizer steps before ``stage``: the sum of every other stage's last step in ``metrics.jsonl``
    (stages run in order, so those are the earlier ones)."""
    last: dict[str, int] = {}
    if metrics_path.exists():
        for line in metrics_path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if isinstance(row, dict) and row.get("stage") != stage and isinstance(row.get("step"), int):
                last[row["stage"]] = max(last.get(row["stage"], 0), row["step"])
    return sum(last.values())


class Trackers:
    """The trackers of one stage on rank 0 (none elsewhere, or when ``report_to`` is empty): ``log(step,
    metrics)`` sends the stage's metrics line at the run-wide step; ``close()`` ends them (idempotent)."""

    def __init__(self, trackers: list, *, stage: str, offset: int):
        self.trackers, self.stage, self.offset = trackers, stage, offset

    def log(self, step: int, metrics: dict) -> None:
        if self.trackers:
            values = scalars(self.stage, metrics)
            for tracker in self.trackers:
                tracker.log(values, self.offset + step)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()
        if _OPEN and _OPEN[-1] is self:
            _OPEN.pop()


_OPEN: list[Trackers] = []  # the process's open trackers: a stage that raised never closed its own


def open_trackers(names, *, run_dir: Path, stage: str, config: dict, enabled: bool = True) -> Trackers:
    """The trackers ``names`` for ``stage`` of the run in ``run_dir``; none unless ``enabled`` (rank 0). A missing
    backend is a ConfigError before any tracker starts. Trackers a stage left open (it raised) are closed first."""
    if not enabled or not names:
        return Trackers([], stage=stage, offset=0)
    require(names)
    while _OPEN:
        _OPEN[-1].close()
    metrics = run_dir / "metrics.jsonl"
    fresh = not (metrics.exists() and metrics.stat().st_size > 0)  # nothing logged yet: new tracker runs
    trackers = []
    try:
        for name in dict.fromkeys(names):
            trackers.append(TRACKERS[name](run_dir, config, fresh=fresh))
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    opened = Trackers(trackers, stage=stage, offset=step_offset(metrics, stage))
    _OPEN.append(opened)
    return opened


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}
