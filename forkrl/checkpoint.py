"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``step-NNNNNN`` holding ``model/`` (``save_pretrained``, safetensors; the
adapter only under LoRA), ``trainer_state.pt`` (optimizer, scheduler, torch RNG: tensors and plain
containers, loaded with ``weights_only=True``), ``state.json`` (step and data cursor) and
``manifest.json`` (sha256 of every file). It is written under a temporary name, fsynced, then renamed:
a crash mid-save leaves the previous checkpoint untouched, and a directory without a valid manifest is
never picked up on resume.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A checkpoint is damaged or missing; the message names the file."""


class DiskFullError(CheckpointError):
    """A write failed because the disk (or a quota) is full. ``what`` failed, at ``path``; it needed about ``need``
    bytes and ``free`` were left. Nothing half-written is left behind, and the earlier checkpoints are intact."""

    def __init__(self, message: str, *, what: str, path: Path, need: int, free: int):
        super().__init__(message)
        self.what, self.path, self.need, self.free = what, path, need, free


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _disk_full(e: Exception, path: Path, need: int) -> bool:
    """Whether ``e``, raised while writing about ``need`` bytes to ``path``, is the disk being full. torch.save
    reports it as a RuntimeError ("unexpected pos", "failed writing") and safetensors as its own error, neither with
    an errno: then the free space decides."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return _free_bytes(path) < max(need, 1 << 20)
    except OSError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def guarded_write(what: str, path: Path, need: int, *, cleanup: tuple[Path, ...] = ()):
    """A write of about ``need`` bytes of ``what`` to ``path``: any failure removes ``cleanup`` (the write's
    temporary files); a full disk becomes one ``DiskFullError`` saying what failed and how much it needed, another
    I/O error (a read-only or vanished directory, permissions) one ``CheckpointError`` naming the file."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever the writer raised, its temporary files go
        for p in cleanup:
            _remove(p)
        if not _disk_full(e, path, need):
            if isinstance(e, OSError):
                raise CheckpointError(f"could not write {what} {path}: {e.strerror or e}; check that the "
                                      "directory exists and is writable") from None
            raise
        free = _free_bytes(path)
        raise DiskFullError(f"could not write {what} {path}: the disk is full ({free:,} bytes free, this write needs "
                            f"about {need:,}; {type(e).__name__}: {str(e)[:200]})",
                            what=what, path=path, need=need, free=free) from None


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in ``obj`` (nested dicts, lists and tuples): what saving it writes, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")  # .NAME.tmp-PID: what atomic writes, checkpoints and final/ write first


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove the temporary files and directories (``.NAME.tmp-PID``) under ``root`` that no other live process
    owns: what a killed run left half-written (a checkpoint's, with a real model, is a full copy of the weights and
    the optimizer state). This process's own are stale too: it calls this before writing anything. Returns what
    it removed."""
    removed = []
    for path in sorted(Path(root).rglob(".*.tmp-*"), key=lambda p: len(p.parts)):
        m = _TEMP.match(path.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and (pid == os.getpid() or not _alive(pid)) and path.exists():
            _remove(path)
            removed.append(path)
    return removed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")) + [root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str, *, what: str | None = None) -> None:
    """``text`` written under a temporary name, fsynced, then renamed over ``path``; a full disk is a
    ``DiskFullError`` and leaves ``path`` as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = text.encode("utf-8")
    with guarded_write(what or path.name, path, len(data), cleanup=(tmp,)):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written under a temporary name, fsynced, then renamed over ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with guarded_write(path.name, path, tensor_bytes(tensors), cleanup=(tmp,)):
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
    need = tensor_bytes(model.state_dict()) + tensor_bytes(optimizer.state_dict())
    try:
        _write(tmp, step, model, optimizer, scheduler, state)
    except Exception as e:  # noqa: BLE001 - disk full, quota, I/O error: the previous checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(e, ckpt_root, need)
        if not full and not isinstance(e, OSError):
            raise
        previous = latest(ckpt_root)
        kept = f"the newest intact checkpoint is {previous}" if previous else "no earlier checkpoint exists"
        why = (f"the disk is full ({_free_bytes(ckpt_root):,} bytes free, a checkpoint needs about {need:,}; "
               f"{type(e).__name__}: {str(e)[:200]})" if full else str(e))
        message = (f"could not write checkpoint step {step} under {ckpt_root}: {why}; {kept}. "
                   "Free disk space and resume with --resume")
        if full:
            raise DiskFullError(message, what=f"checkpoint step {step}", path=ckpt_root, need=need,
                                free=_free_bytes(ckpt_root)) from None
        raise CheckpointError(message) from None
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_tree(ckpt_root)
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
    fsync_tree(tmp)


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
