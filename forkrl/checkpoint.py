"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``step-NNNNNN`` holding ``model/`` (``save_pretrained``, safetensors; the
adapter only under LoRA), ``trainer_state.pt`` (optimizer, scheduler, torch RNG: tensors and plain
containers, loaded with ``weights_only=True``), ``state.json`` (step and data cursor) and
``manifest.json`` (sha256 of every file). It is written under a temporary name, fsynced, then renamed:
a crash mid-save leaves the previous checkpoint untouched, and a directory without a valid manifest is
never picked up on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is damaged or missing; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")) + [root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written under a temporary name, fsynced, then renamed over ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(ckpt_root: Path, step: int, model, optimizer, scheduler, state: dict, *, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically under ``ckpt_root``, then prune to the newest ``keep_last``."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, step, model, optimizer, scheduler, state)
    except OSError as e:  # disk full, quota, I/O error: the previous checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(ckpt_root)
        kept = f"the newest intact checkpoint is {previous}" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint step {step} under {ckpt_root}: {e}; {kept}. "
                              "Free disk space and resume with --resume") from None
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_tree(ckpt_root)
    _prune(ckpt_root, keep_last)
    return final


def _write(tmp: Path, step: int, model, optimizer, scheduler, state: dict) -> None:
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    _fsync_tree(tmp)


def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file in the manifest is present with its checksum."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no manifest.json (an interrupted save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is damaged: {e}") from None
    for rel, digest in manifest.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"checkpoint file {p} is damaged (checksum mismatch)")


def intact(ckpt_root: Path) -> list[Path]:
    """Checkpoints under ``ckpt_root`` that verify, oldest first."""
    found = sorted(ckpt_root.glob("step-*")) if ckpt_root.is_dir() else []
    good = []
    for c in found:
        try:
            verify(c)
            good.append(c)
        except CheckpointError:
            continue
    return good


def latest(ckpt_root: Path) -> Path | None:
    good = intact(ckpt_root)
    return good[-1] if good else None


def load_trainer_state(ckpt: Path, optimizer, scheduler) -> dict:
    verify(ckpt)
    blob = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    return json.loads((ckpt / "state.json").read_text())


def _prune(ckpt_root: Path, keep_last: int) -> None:
    good = intact(ckpt_root)
    for old in good[:-keep_last] if len(good) > keep_last else []:
        shutil.rmtree(old, ignore_errors=True)
