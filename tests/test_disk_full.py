"""A full disk on any write a run makes is a clean stop: one DiskFullError (exit status 2) saying what failed, how
much space the write needed and the newest intact checkpoint; no temporary file left; and, once space is freed, a
resume that reproduces the uninterrupted run. The disk is a small tmpfs, filled right before the write under test
(skipped where this machine does not let the tests mount one)."""

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

import forkrl.checkpoint as checkpoint
import forkrl.pipeline as pipeline
import forkrl.trainers.loop as loop
from forkrl.checkpoint import DiskFullError
from forkrl.pipeline import run
from forkrl.trainers.metrics import MetricsLog

from test_crash_windows import Kill, config, kill_on, record, same, temporaries


@pytest.fixture()
def disk(tmp_path):
    """A 48 MiB tmpfs at ``tmp_path / "disk"``, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


class Filler:
    """Fills a file system to the last byte, and frees it again."""

    def __init__(self, root: Path):
        self.path = root / f"filler-{uuid.uuid4().hex}"

    def fill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (1 << 20, 4096, 512, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        self.path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    run(config(), out)
    return record(out)


def fill_before(monkeypatch, filler, owner, name, when):
    """Fill the disk right before the call of ``owner.name`` for which ``when(*args)`` first holds."""
    real = getattr(owner, name)
    done = []

    def wrapper(*args, **kwargs):
        if not done and when(*args, **kwargs):
            done.append(1)
            filler.fill()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return done


WRITES = {
    "a checkpoint": (checkpoint, "_write", lambda tmp, step, *a: "grpo" in str(tmp) and step == 2),
    "a metrics line": (MetricsLog, "write", lambda self, step, metrics: self.stage == "grpo" and step == 2),
    "a stage's final model": (pipeline, "save_final", lambda ctx, result: ctx.name == "grpo"),
    "the summary": (checkpoint, "atomic_write_text", lambda path, text, **k: path.name == "summary.json"
                    and '"grpo"' in text),
}


@pytest.mark.parametrize("write", WRITES)
def test_a_full_disk_is_a_clean_stop_then_an_exact_resume(write, disk, uninterrupted, monkeypatch):
    filler = Filler(disk)
    out = disk / "run"
    owner, name, when = WRITES[write]
    done = fill_before(monkeypatch, filler, owner, name, when)
    with pytest.raises(DiskFullError) as e:
        run(config(), out)
    assert done
    message = str(e.value)
    assert "disk is full" in message and "needs about" in message and "resume with --resume" in message
    assert "newest intact checkpoint" in message or "no checkpoint yet" in message
    assert temporaries(out) == [], temporaries(out)
    monkeypatch.undo()
    filler.free()
    run(config(), out, resume=True)
    same(record(out), uninterrupted)


def test_the_metrics_rewrite_at_resume_on_a_full_disk(disk, uninterrupted, monkeypatch):
    """A resume first rewrites metrics.jsonl without the lines past its checkpoint: on a full disk that stops
    cleanly too, and the file is as it was."""
    filler = Filler(disk)
    out = disk / "run"
    kill_on(monkeypatch, checkpoint.os, "rename", when=lambda src, dst: "grpo" in str(dst)
            and Path(dst).name == "step-000002")
    with pytest.raises(Kill):
        run(config(), out)
    monkeypatch.undo()
    before = (out / "metrics.jsonl").read_bytes()
    fill_before(monkeypatch, filler, loop, "truncate_metrics", lambda path, stage, keep: stage == "grpo")
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        run(config(), out, resume=True)
    assert (out / "metrics.jsonl").read_bytes() == before and temporaries(out) == []
    monkeypatch.undo()
    filler.free()
    run(config(), out, resume=True)
    same(record(out), uninterrupted)


def test_the_report_on_a_full_disk(disk, tmp_path):
    from forkrl.report import write_report

    src = tmp_path / "run"
    run(config(), src)
    out = disk / "copy"
    shutil.copytree(src, out)
    Filler(disk).fill()
    with pytest.raises(DiskFullError, match="the report"):
        write_report(out)
    assert not (out / "report.html").exists() and temporaries(out) == []


def test_the_command_line_exits_with_2(disk, tmp_path):
    import sys

    import yaml

    from conftest import tiny_cfg_dict

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_cfg_dict(**{"grpo.steps": 1})))
    Filler(disk).fill()
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "train", str(tmp_path / "c.yaml"), "--out",
                           str(disk / "run")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "disk is full" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cached_tensors_and_atomic_text_on_a_full_disk(disk):
    """The fork stage's cached base rollouts and importance weights (``atomic_save_tensors``) and every atomic text
    file: a DiskFullError naming the file, the old file untouched, no temporary left."""
    import torch

    target = disk / "base_rollouts.safetensors"
    checkpoint.atomic_save_tensors({"x": torch.zeros(4)}, target)
    Filler(disk).fill()
    with pytest.raises(DiskFullError, match=r"base_rollouts.safetensors.*needs about 4,000,000"):
        checkpoint.atomic_save_tensors({"x": torch.zeros(1_000_000)}, target)
    with pytest.raises(DiskFullError, match="config.yaml"):
        checkpoint.atomic_write_text(disk / "config.yaml", "x" * 100_000)
    assert temporaries(disk) == [] and not (disk / "config.yaml").exists()
    from safetensors.torch import load_file

    assert load_file(str(target))["x"].shape == (4,)
