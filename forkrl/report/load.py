"""Read what a run directory holds: metrics, completions, summary, config, diff.json, passk.json.

A run directory is what ``forkrl train --out`` writes (``metrics.jsonl`` at its top) or what ``forkrl demo
--out`` writes (runs in subdirectories, e.g. ``grpo-run/metrics.jsonl``). Every malformed file is a
``ConfigError`` naming the file (and the line, for metrics); a torn last metrics line, which a killed run
leaves behind, is skipped as the trainers skip it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from ..userfiles import read_text


@dataclass(frozen=True)
class MetricsSource:
    """One ``metrics.jsonl``, the summary next to it and the rows of the ``completions.jsonl`` next to it (none
without one); ``label`` is "" at the top of the run directory, else the subdirectory's name."""

    label: str
    path: Path
    rows: list[dict]
    summary: dict | None
    torn_last_line: bool = False
    completions: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class RunData:
    run_dir: Path
    summary: dict | None
    configs: list[tuple[str, str]] = field(default_factory=list)  # (path relative to run_dir, text)
    sources: list[MetricsSource] = field(default_factory=list)
    diff: dict | None = None
    passk: dict | None = None

    @property
    def empty(self) -> bool:
        return not (self.sources or self.summary or self.diff or self.passk)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ConfigError with the line and column when it does not parse."""
    try:
        data = json.loads(read_text(path, "a run's JSON file", ConfigError))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); "
                          "re-run the command that wrote it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top, found {type(data).__name__}")
    return data


def read_metrics(path: Path, what: str = "a run's metrics file") -> tuple[list[dict], bool]:
    """(one dict per line, whether a torn last line was skipped). A broken line before the last one is an
    error naming its line: it means the file was edited or corrupted, not that a run was killed. (Also reads
    completions.jsonl, ``what`` says which.)"""
    lines = read_text(path, what, ConfigError).splitlines()
    filled = [i for i, line in enumerate(lines) if line.strip()]
    rows, torn = [], False
    for i in filled:
        try:
            row = json.loads(lines[i])
        except json.JSONDecodeError as e:
            if i == filled[-1]:
                torn = True  # a torn last line from a killed run
                continue
            raise ConfigError(f"{path}, line {i + 1}: not valid JSON ({e.msg}); each line must be one JSON "
                              "object (only a torn last line, from a killed run, is skipped)") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, line {i + 1}: expected a JSON object, found {type(row).__name__}")
        rows.append(row)
    return rows, torn


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def metrics_sources(run_dir: Path) -> list[MetricsSource]:
    """``run_dir/metrics.jsonl``, or else every ``run_dir/*/metrics.jsonl`` (the demo's layout)."""
    top = run_dir / "metrics.jsonl"
    paths = [top] if top.is_file() else sorted(run_dir.glob("*/metrics.jsonl"))
    out = []
    for path in paths:
        rows, torn = read_metrics(path)
        label = "" if path.parent == run_dir else path.parent.name
        completions = path.parent / "completions.jsonl"
        sample = read_metrics(completions, "a run's completions file")[0] if completions.is_file() else []
        out.append(MetricsSource(label, path, rows, _optional_json(path.parent / "summary.json"), torn, sample))
    return out


def config_files(run_dir: Path) -> list[tuple[str, str]]:
    top = run_dir / "config.yaml"
    paths = [top] if top.is_file() else sorted(run_dir.glob("*/config.yaml"))
    out = []
    for path in paths:
        out.append((str(path.relative_to(run_dir)), read_text(path, "a run's config", ConfigError)))
    return out


DIFF_KEYS = ("fractions", "promoted_rank_hist", "trajectories")
PASSK_KEYS = ("ks", "models")


def _require(data: dict | None, path: Path, keys, writer: str) -> dict | None:
    if data is None:
        return None
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}; is it a file written by `{writer}`? "
                          "Re-run it to rewrite the file")
    return data


def load_run(run_dir: Path) -> RunData:
    """Everything reportable in ``run_dir``; ConfigError when it is missing or holds nothing to report."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such directory; give the directory a `forkrl train --out` or "
                          "`forkrl demo --out` wrote")
    data = RunData(
        run_dir=run_dir,
        summary=_optional_json(run_dir / "summary.json"),
        configs=config_files(run_dir),
        sources=metrics_sources(run_dir),
        diff=_require(_optional_json(run_dir / "diff.json"), run_dir / "diff.json", DIFF_KEYS, "forkrl diff"),
        passk=_require(_optional_json(run_dir / "passk.json"), run_dir / "passk.json", PASSK_KEYS, "forkrl passk"),
    )
    if data.empty:
        raise ConfigError(f"{run_dir}: nothing to report (no metrics.jsonl here or in a subdirectory, no "
                          "summary.json, diff.json or passk.json); give a directory written by `forkrl train "
                          "--out` or `forkrl demo --out`")
    return data
