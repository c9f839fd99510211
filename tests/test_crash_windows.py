"""No crash window loses a record, and no kill leaks a temporary file: a run killed at each phase of a checkpoint
write and of a stage's end, then resumed, has the uninterrupted run's summary, metrics and weights, and nothing
half-written left in its directory. The kill is a KeyboardInterrupt raised at the phase (what a SIGKILL leaves is
what the phase had written; tests/test_train_e2e.py SIGKILLs a real process too)."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forkrl.checkpoint as checkpoint
import forkrl.pipeline as pipeline
from forkrl.config import parse_config
from forkrl.pipeline import run

from conftest import tiny_cfg_dict

TIMES = {"time", "sample_s", "train_s", "sample_tokens_per_s", "train_tokens_per_s", "wall_s", "eval_s"}


def config():
    return parse_config(tiny_cfg_dict(**{"stages": ["sft", "grpo"], "sft.steps": 2, "grpo.steps": 2,
                                         "checkpoint": {"every": 1, "keep_last": 1},
                                         "grpo.rewards": [{"name": "random"}]}))


def record(run_dir: Path) -> dict:
    """What a resume must reproduce: the summary and metrics without times, and every stage's final weights."""
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = {k: {f: v for f, v in s.items() if f not in TIMES} for k, s in summary["stages"].items()}
    metrics = [{k: v for k, v in json.loads(x).items() if k not in TIMES}
               for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = {stage: load_file(str(run_dir / stage / "final" / "model.safetensors")) for stage in stages}
    return {"stages": stages, "metrics": metrics, "weights": weights}


def same(a: dict, b: dict) -> None:
    assert a["stages"] == b["stages"]
    assert a["metrics"] == b["metrics"]
    assert a["weights"].keys() == b["weights"].keys()
    for stage in a["weights"]:
        assert all(torch.equal(a["weights"][stage][k], b["weights"][stage][k]) for k in a["weights"][stage]), stage


def temporaries(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run(config(), out)
    return record(out)


class Kill(KeyboardInterrupt):
    pass


def kill_on(monkeypatch, owner, name, *, when, after: bool = False):
    """Replace ``owner.name`` so that its call for which ``when(*args)`` holds raises ``Kill`` (once), before the
    real call, or after it with ``after``."""
    real = getattr(owner, name)
    fired = []

    def wrapper(*args, **kwargs):
        hit = not fired and when(*args, **kwargs)
        if hit and not after:
            fired.append(1)
            raise Kill
        out = real(*args, **kwargs)
        if hit:
            fired.append(1)
            raise Kill
        return out

    monkeypatch.setattr(owner, name, wrapper)
    return fired


def grpo_ckpt(path, *a, **k) -> bool:
    return "grpo" in str(path)



PHASES = {
    # a checkpoint write: model saved, optimizer state not yet
    "checkpoint: before the optimizer state": (checkpoint.torch, "save",
                                               dict(when=lambda obj, path: "grpo" in str(path))),
    # the checkpoint complete under its temporary name, not yet renamed
    "checkpoint: before its rename": (checkpoint.os, "rename", dict(when=lambda src, dst: "grpo" in str(dst)
                                                                    and Path(dst).name.startswith("step-"))),
    # renamed, older checkpoints not yet pruned
    "checkpoint: before pruning": (checkpoint, "_prune", dict(when=grpo_ckpt)),
    # a stage's end: final/ written under its temporary name
    "final: before its rename": (Path, "rename", dict(when=lambda self, target: Path(target).name == "final"
                                                      and "grpo" in str(target))),
    # final/ in place, the run's summary not yet written
    "final: before the summary": (pipeline, "save_final", dict(when=lambda ctx, result: ctx.name == "grpo",
                                                              after=True)),
    # the summary written under its temporary name, not yet renamed over summary.json
    "summary: before its rename": (checkpoint.os, "replace",
                                   dict(when=lambda src, dst: Path(dst).name == "summary.json"
                                        and '"grpo"' in Path(src).read_text())),
}


@pytest.mark.parametrize("phase", PHASES)
def test_a_kill_at_each_phase_then_resume_equals_the_uninterrupted_run(phase, uninterrupted, tmp_path, monkeypatch):
    owner, name, how = PHASES[phase]
    fired = kill_on(monkeypatch, owner, name, **how)
    with pytest.raises(Kill):
        run(config(), tmp_path / "r")
    assert fired
    monkeypatch.undo()
    run(config(), tmp_path / "r", resume=True)
    same(record(tmp_path / "r"), uninterrupted)
    assert temporaries(tmp_path / "r") == []


def test_a_resume_removes_what_a_killed_process_left_and_keeps_a_live_ones(tmp_path):
    """Temporary files of dead processes go; one whose PID is alive (another run writing) stays."""
    import subprocess
    import sys

    run(config(), tmp_path / "r")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        ckpts = tmp_path / "r" / "grpo" / "checkpoints"
        stale = ckpts / f".step-000009.tmp-{dead.pid}"
        (stale / "model").mkdir(parents=True)
        (stale / "model" / "model.safetensors").write_bytes(b"\0" * 1024)
        (tmp_path / "r" / f".metrics.jsonl.tmp-{dead.pid}").write_text("{}\n")
        live = ckpts / f".step-000010.tmp-{sleeper.pid}"
        live.mkdir()
        run(config(), tmp_path / "r", resume=True)
        assert not stale.exists() and not (tmp_path / "r" / f".metrics.jsonl.tmp-{dead.pid}").exists()
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lost_summary_is_rebuilt_from_the_stages(uninterrupted, tmp_path):
    """Every finished stage keeps its summary entry in its final/ (written before the DONE mark): a missing or
    damaged summary.json comes back whole on the next start."""
    run(config(), tmp_path / "r")
    (tmp_path / "r" / "summary.json").write_bytes(b"\x00{torn")
    run(config(), tmp_path / "r", resume=True)
    same(record(tmp_path / "r"), uninterrupted)
    assert os.path.exists(tmp_path / "r" / "grpo" / "final" / "stage.json")
