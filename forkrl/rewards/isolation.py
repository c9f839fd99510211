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
import time
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

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def launch(self) -> None:
        """Start the process (it imports the reward); ``ready`` waits until it has."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.spec), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def ready(self, timeout: float = 120.0) -> None:
        if not self.conn.poll(timeout):  # the worker imports the reward (and what it imports) first
            self.kill()
            raise RewardTimeout(f"the reward worker for {self.spec} did not start within {timeout:g}s")
        tag, why = self.conn.recv()
        if tag != "ready":
            self.kill()
            raise RewardCallError(why)

    def send(self, kwargs: dict) -> None:
        if not self.alive:
            self.launch()
            self.ready()
        self.conn.send(kwargs)

    def receive(self):
        """The answer to the call sent (the worker has answered: its pipe is readable)."""
        try:
            tag, value = self.conn.recv()
        except EOFError:  # the worker died (a crash in C, a kill from outside)
            code = self.proc.exitcode if self.proc is not None else None
            self.kill()
            raise RewardCallError(f"the reward's worker process died (exit code {code})") from None
        if tag == "error":
            raise RewardCallError(value)
        return value

    def call(self, kwargs: dict, timeout: float | None):
        self.send(kwargs)
        if not self.conn.poll(timeout):
            self.kill()  # the next call starts a fresh worker
            raise RewardTimeout(f"took longer than {timeout:g}s; its worker process was killed")
        return self.receive()

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


class Pool:
    """``size`` workers for one reward spec: a batch of calls is spread over them, each call with its own deadline;
    a worker past its deadline is killed (with its process group) and replaced, and the other calls go on."""

    def __init__(self, spec: str, size: int):
        self.workers = [Worker(spec) for _ in range(size)]

    def map(self, calls: list[dict], timeout: float | None) -> list:
        """Each call's value, or the exception that makes its row unscorable, in order."""
        from multiprocessing.connection import wait

        out: list = [None] * len(calls)
        starting = [w for w in self.workers if not w.alive][: len(calls)]
        for w in starting:  # started together: each start imports the reward, which takes seconds
            w.launch()
        for w in starting:
            try:
                w.ready()
            except (RewardTimeout, RewardCallError) as e:
                return [e] * len(calls)  # the reward cannot even be imported: every row fails alike
        todo, busy = list(range(len(calls)))[::-1], {}  # busy: worker -> (call index, deadline)
        while todo or busy:
            for w in self.workers:
                if w not in busy and todo:
                    i = todo.pop()
                    try:
                        w.send(calls[i])
                    except (RewardTimeout, RewardCallError, OSError) as e:
                        out[i] = e
                        continue
                    busy[w] = (i, time.monotonic() + timeout if timeout else None)
            if not busy:
                continue
            deadlines = [d for _, d in busy.values() if d is not None]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            answered = set(wait([w.conn for w in busy], wait_s))
            for w, (i, deadline) in list(busy.items()):
                if w.conn in answered:
                    del busy[w]
                    try:
                        out[i] = w.receive()
                    except RewardCallError as e:
                        out[i] = e
                elif deadline is not None and time.monotonic() >= deadline:
                    del busy[w]
                    w.kill()  # its next call starts a fresh one
                    out[i] = RewardTimeout(f"took longer than {timeout:g}s; its worker process was killed")
        return out

    def close(self) -> None:
        for w in self.workers:
            w.kill()
