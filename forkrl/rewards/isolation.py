"""Rewards called in a worker process (``isolation: process``), so that one stuck anywhere, C code included, cannot
hang a run: each call has a deadline, and past it the worker is killed with its whole process group and a fresh one
is started for the next call (the row is unscorable, as after any timeout).

The worker is a spawned interpreter that imports the reward by its spec string (``api.resolve``: a user's file is
loaded under the same stable module name as in the trainer), so nothing but the call's arguments (texts, ids,
the problem, a copy of the row's random generator) crosses the pipe.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import os
import signal
import traceback


class RewardTimeout(Exception):
    pass


class RewardCallError(Exception):
    """The reward raised in its worker; the message carries its traceback there."""


def _serve(conn, spec: str) -> None:
    os.setpgid(0, 0)  # its own process group: a kill takes what the reward started too
    from .api import resolve

    try:
        fn, _ = resolve(spec, "reward worker")
    except Exception as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            kwargs = conn.recv()
        except EOFError:
            return
        try:
            value = fn(**kwargs)
            conn.send(("ok", asyncio.run(value) if inspect.iscoroutine(value) else value))
        except Exception as e:  # noqa: BLE001 - a per-row outcome, reported to the trainer
            conn.send(("error", "".join(traceback.format_exception_only(type(e), e)).strip()
                       + "\n" + "".join(traceback.format_tb(e.__traceback__)[-3:])))


class Worker:
    """One worker process for one reward spec, started on the first call."""

    def __init__(self, spec: str):
        self.spec, self.proc, self.conn = spec, None, None

    def _start(self, timeout: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.spec), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(max(timeout, 60.0)):  # the worker imports the reward (and what it imports) first
            self.kill()
            raise RewardTimeout(f"the reward worker for {self.spec} did not start")
        tag, why = parent.recv()
        if tag != "ready":
            self.kill()
            raise RewardCallError(why)

    def call(self, kwargs: dict, timeout: float | None):
        if self.proc is None or not self.proc.is_alive():
            self._start(timeout or 60.0)
        self.conn.send(kwargs)
        if not self.conn.poll(timeout):
            self.kill()  # the next call starts a fresh worker
            raise RewardTimeout(f"took longer than {timeout:g}s; its worker process was killed")
        try:
            tag, value = self.conn.recv()
        except EOFError:  # the worker died (a crash in C, a kill from outside)
            self.kill()
            raise RewardCallError(f"the reward's worker process died (exit code {self.proc.exitcode})") from None
        if tag == "error":
            raise RewardCallError(value)
        return value

    def kill(self) -> None:
        if self.proc is not None and self.proc.pid is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # not yet its own group leader
                pass
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join(timeout=5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None

    def __del__(self):
        try:
            self.kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
