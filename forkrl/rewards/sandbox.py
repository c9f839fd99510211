"""Run untrusted Python (a model's code answer) as a reward building block, contained.

Layers, each covering what the others may miss:

* a separate process in its own session (process group), killed with all its children on timeout;
* resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE, which
  also caps stdout/stderr: they are files in the sandbox directory), and a wall-clock limit;
* an empty environment, ``python -I`` (no user site, no PYTHON* variables), and a fresh temporary
  directory as the working directory, deleted afterwards;
* a network namespace with no interfaces (``unshare -n``) where the OS allows it;
* a PEP 578 audit hook installed before the program runs, which refuses process creation (fork, exec,
  spawn, subprocess), sockets, ctypes, and any write, rename, delete or chmod outside the directory.

An audit hook is not a security boundary against a determined attacker with a C extension; it turns the
everyday hostile snippets (fork bombs, stray writes, network calls) into clean, reported failures. Run
rewards for untrusted code on machines you can afford to lose, as with every RL framework.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    output_bytes: int = 64_000


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    limit: str | None  # "wall", "cpu", "memory", "output", or None when no limit was hit
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.limit is None


_GUARD = r'''
import os, sys
ROOT = os.path.realpath(sys.argv[1])
PROGRAM = sys.argv[2]
DENY = {"os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.exec", "os.spawn", "subprocess.Popen",
        "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "ctypes.dlopen", "os.kill",
        "os.killpg", "sys.addaudithook", "os.chdir", "os.chroot"}
DENY_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing"}
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
               "os.symlink": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
               "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,)}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    p = os.path.realpath(os.fsdecode(path))
    return p == ROOT or p.startswith(ROOT + os.sep)

def hook(event, args):
    if event in DENY or (event == "import" and args[0] in DENY_IMPORTS):
        what = f"import {args[0]}" if event == "import" else event
        raise PermissionError(f"sandbox: {what} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE)
        if writing and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
    elif event in PATH_EVENTS:
        for i in PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not inside(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory is not allowed")

sys.addaudithook(hook)
sys.argv = [PROGRAM]
import runpy
runpy.run_path(PROGRAM, run_name="__main__")
'''


@lru_cache(maxsize=1)
def _net_isolation() -> list[str]:
    """``unshare -n`` when this OS lets us make an empty network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if not unshare:
        return []
    for cmd in ([unshare, "-n"], [unshare, "-n", "-r"]):
        try:
            if subprocess.run([*cmd, "true"], capture_output=True, timeout=5).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    return []


def _limit(limits: Limits):
    def apply() -> None:
        os.setsid()
        mem = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_python(code: str, *, stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox; never raises for anything the program does."""
    root = Path(tempfile.mkdtemp(prefix="forkrl-sandbox-"))
    try:
        (root / "program.py").write_text(code)
        (root / "guard.py").write_text(_GUARD)
        out, err = open(root / "stdout", "wb"), open(root / "stderr", "wb")
        cmd = [*_net_isolation(), sys.executable, "-I", str(root / "guard.py"), str(root), str(root / "program.py")]
        t0 = time.monotonic()
        with out, err:
            proc = subprocess.Popen(cmd, cwd=root, env={}, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    preexec_fn=_limit(limits))
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        wall = time.monotonic() - t0
        raw_out, raw_err = (root / "stdout").read_bytes(), (root / "stderr").read_bytes()
        full = max(len(raw_out), len(raw_err)) >= limits.output_bytes
        stdout = raw_out[: limits.output_bytes].decode(errors="replace")
        stderr = raw_err[: limits.output_bytes].decode(errors="replace")
        return SandboxResult(proc.returncode, stdout, stderr,
                             _which_limit(proc.returncode, stderr, timed_out, full), wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _which_limit(returncode: int | None, stderr: str, timed_out: bool, output_full: bool) -> str | None:
    if timed_out:
        return "wall"
    if output_full or returncode == -signal.SIGXFSZ:  # Python ignores SIGXFSZ: the write fails with EFBIG
        return "output"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in stderr:
        return "cpu"
    if "MemoryError" in stderr:
        return "memory"
    return None


def pass_rate(code: str, cases: list[tuple[str, str]], *, limits: Limits = Limits()) -> float:
    """The share of (stdin, expected stdout) cases the program passes: the usual reward of a code task.
    Output is compared after stripping trailing whitespace; any limit hit fails that case."""
    if not cases:
        raise ValueError("pass_rate needs at least one (stdin, expected stdout) case")
    passed = 0
    for stdin, expected in cases:
        r = run_python(code, stdin=stdin, limits=limits)
        passed += r.ok and r.stdout.rstrip() == expected.rstrip()
    return passed / len(cases)
