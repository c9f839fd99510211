"""The Task protocol: problems with gold answers, a verifier, and (optionally) demonstrations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict

Split = Literal["train", "heldout"]


class TaskError(ValueError):
    """A user-facing problem with task data: the message says what, where and what to do."""


@dataclass(frozen=True)
class Problem:
    """One problem. ``prompt`` is the question text before any chat template is applied."""

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def problems(self, split: Split) -> Sequence[Problem]:
        """All problems of a split. Train and held-out never share a problem."""
        ...

    def score(self, problem: Problem, completion: str) -> float:
        """Reward of a completion in [0, 1] (1 = correct). May raise or return None: the caller
        treats that row as unscorable, never as 0."""
        ...

    def demonstrations(self, split: Split) -> Sequence[tuple[Problem, str]]:
        """(problem, completion) pairs for SFT. Raises TaskError when the task has none."""
        ...


def describe(problem: Problem) -> str:
    """Where a problem comes from, for a message: ``file:line`` for a problem read from a JSONL file, ``path[row N]``
    for one read through ``datasets``, else its id. forkrl's own location keys (``forkrl_path``, …; used when the
    row has its own ``path``/``line`` fields, see ``tasks.jsonl``) come first."""
    m = problem.meta
    for path, at, shown in (("forkrl_path", "forkrl_line", "{}:{}"), ("forkrl_path", "forkrl_row", "{}[row {}]"),
                            ("path", "line", "{}:{}"), ("path", "row", "{}[row {}]")):
        if path in m and at in m:
            return shown.format(m[path], m[at])
    return f"problem {problem.id!r}"


class TaskConfig(BaseModel):
    """A task's section of the run config (``task``): ``type`` is the task's name in ``tasks.TASKS``, the other keys
    are the task's own; ``build`` makes the task. Unknown keys are refused and the section is never mutated, as
    every config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def build(self) -> Task:
        raise NotImplementedError
