"""A reward of the user's own, from the config: where it comes from, what it is given, how it is called.

An entry of ``grpo.rewards`` (or ``fork.rewards``) names a built-in (``name: correct``) or a callable (``fn``):

* ``PATH.py:NAME``: a function in a Python file (a relative path is relative to the config file's directory). The
  file is loaded under a stable module name registered in ``sys.modules`` (``forkrl_rewards.<stem>_<hash>``), so a
  worker process can import it by the same string;
* ``package.module:NAME``: a function in an importable module;
* ``NAME``: a function an installed package registered under the entry-point group ``forkrl.rewards``.

Its parameters are filled by name from what forkrl knows about the row (``PARAMETERS``), plus the entry's
``kwargs``; a ``**kw`` parameter gets everything. The signature is checked when the rewards are loaded (``load``,
before a run writes anything), so a parameter forkrl does not provide is a config error naming the reward and
listing what is available. ``mode: row`` (default) calls it once per row; ``mode: batch`` once per batch and
``mode: group`` once per group of one problem's completions, with the plural names (``PLURAL``; in group mode the
problem's own fields, singular, too); both return one value per row.

A value is a float; None, NaN, inf or an exception make the row unscorable (never a silent 0); or a mapping with
``score`` whose other keys are logged as ``reward/<label>/<key>``, not summed.

``isolation: process`` calls the reward in a pool of ``workers`` processes (``isolation.Pool``); one whose call runs
past ``timeout_s`` is killed, with its process group, and respawned, while the others go on: a reward stuck in C code cannot hang the run.
``inline`` (default) calls it in this process under a SIGALRM time limit, which stops Python code that loops or
waits but not a call that never returns to the interpreter.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .builtin import REWARDS
from .majority import TIES

PARAMETERS = {
    "completion": "the completion's text",
    "prompt": "the problem's prompt text (before any chat template)",
    "answer": "the gold answer",
    "problem": "the Problem (id, prompt, answer, meta)",
    "meta": "the problem's metadata (a JSONL row's extra fields, a generator's entry)",
    "task": "the task object",
    "rng": "a random.Random seeded by the row",
    "step": "the optimizer step (1-based; 0 outside a training step)",
    "progress": "the stage's progress in [0, 1] (step / steps)",
    "completion_ids": "the completion's token ids",
    "truncated": "whether the completion hit sampling.max_new_tokens",
    "group_index": "the row's index among its problem's completions (0 … G-1)",
    "max_new_tokens": "sampling.max_new_tokens: the completion length at which a completion is cut off",
    "episode": "the played episode of an env task (turns with actions, observations, rewards and info; ret; "
               "error), None for a single-turn task",
}
PLURAL = {"completion": "completions", "prompt": "prompts", "answer": "answers", "problem": "problems",
          "meta": "metas", "rng": "rngs", "completion_ids": "completion_ids_list", "truncated": "truncateds",
          "group_index": "group_indices", "episode": "episodes"}
SHARED = ("task", "step", "progress", "max_new_tokens")  # the same for every row: singular in every mode
GROUP_SINGULAR = ("prompt", "answer", "problem", "meta")  # in group mode, the group's problem's own fields too
MODES = ("row", "batch", "group")
ISOLATION = ("inline", "process")
GROUP = "forkrl.rewards"  # the entry-point group of rewards that installed packages register


class RewardError(ValueError):
    """A reward entry of the config cannot be loaded or called as written (a ``ConfigError`` for the CLI)."""


def available(mode: str) -> dict[str, str]:
    """The parameter names forkrl fills in ``mode``, with what each holds."""
    if mode == "row":
        return dict(PARAMETERS)
    out = {PLURAL.get(k, k): (v if k in SHARED else f"list: {v}, one per row") for k, v in PARAMETERS.items()}
    if mode == "group":
        out.update({k: f"the group's problem's: {PARAMETERS[k]}" for k in GROUP_SINGULAR})
    return out


@dataclass(frozen=True)
class Reward:
    """One loaded reward entry. ``wants``: the parameters forkrl fills (``kwargs`` are the entry's own);
    ``takes_all``: it has ``**kw``. ``spec``: how a worker process imports it; ``file``/``sha256``: the user's file,
    recorded with the run."""

    label: str
    fn: Callable
    weight: float = 1.0
    mode: str = "row"
    kwargs: dict = field(default_factory=dict)
    wants: tuple[str, ...] = ()
    takes_all: bool = False
    isolation: str = "inline"
    workers: int = 1
    timeout_s: float | None = 10.0
    spec: str | None = None
    file: Path | None = None
    sha256: str | None = None

    def arguments(self, known: dict[str, Any]) -> dict[str, Any]:
        """The call's keyword arguments from what forkrl ``known``s of the row (or rows) and the entry's kwargs."""
        chosen = dict(known) if self.takes_all else {k: known[k] for k in self.wants if k in known}
        return {**chosen, **self.kwargs}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_spec(spec: str) -> tuple[str, str | None]:
    """(module or path, attribute) of ``PATH.py:NAME`` or ``module:NAME``, split on the last colon; (name, None)
    for an entry-point name."""
    if ":" not in spec:
        return spec, None
    head, _, name = spec.rpartition(":")
    return head, name


def _user_traceback(e: BaseException, path: str) -> str:
    """The frames of the user's own file, as Python prints them."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == Path(path).resolve()]
    lines = traceback.format_list(frames) if frames else []
    return "".join(lines) + "".join(traceback.format_exception_only(type(e), e))


def load_file(path: Path, where: str):
    """The module of a user's reward file, under a stable name in ``sys.modules``."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RewardError(f"{where}: reward file {path} does not exist (a relative path is relative to the "
                          "config file's directory)")
    name = f"forkrl_rewards.{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001 - the user's import error, shown as the user's own traceback
        del sys.modules[name]
        if isinstance(e, KeyboardInterrupt):
            raise
        raise RewardError(f"{where}: importing {path} raised {type(e).__name__}; the error in that file:\n"
                          f"{_user_traceback(e, str(path))}".rstrip()) from None
    return module


def resolve(spec: str, where: str) -> tuple[Callable, Path | None]:
    """(the callable a ``fn`` spec names, its file for a path spec)."""
    head, name = split_spec(spec)
    if name is None:
        from importlib.metadata import entry_points

        found = [ep for ep in entry_points(group=GROUP) if ep.name == head]
        if not found:
            names = sorted(ep.name for ep in entry_points(group=GROUP))
            raise RewardError(f"{where}: {spec!r} is neither PATH.py:NAME nor module:NAME, and no installed package "
                              f"registers a reward of that name in the entry-point group {GROUP!r} (registered: "
                              f"{', '.join(names) or 'none'})")
        try:
            return found[0].load(), None
        except Exception as e:  # noqa: BLE001
            raise RewardError(f"{where}: loading the entry point {spec!r} raised {type(e).__name__}: {e}") from None
    if head.endswith(".py"):
        module, file = load_file(Path(head), where), Path(head).expanduser().resolve()
    else:
        file = None
        try:
            module = importlib.import_module(head)
        except ModuleNotFoundError as e:
            raise RewardError(f"{where}: no module {head!r} to import ({e}); give PATH.py:NAME for a file, or "
                              "install the package") from None
        except Exception as e:  # noqa: BLE001
            raise RewardError(f"{where}: importing {head!r} raised {type(e).__name__}; the error:\n"
                              f"{_user_traceback(e, getattr(e, 'filename', '') or '')}".rstrip()) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        names = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        what = "is not callable" if fn is not None else "is not defined"
        raise RewardError(f"{where}: {name!r} {what} in {head} (its functions: {', '.join(names) or 'none'})")
    return fn, file


def check_signature(fn: Callable, label: str, mode: str, kwargs: dict, isolation: str, where: str):
    """(the parameters forkrl fills, whether it takes ``**kw``); a RewardError for one it cannot fill."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return (), True
    given = available(mode)
    if isolation == "process":
        given.pop("task", None)
    wants, takes_all = [], False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            takes_all = True
        elif p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            raise RewardError(f"{where}: reward {label!r} has the positional-only parameter {p.name!r}; forkrl fills "
                              "parameters by name: make it a normal parameter")
        elif p.name in kwargs:
            continue
        elif p.name in given:
            wants.append(p.name)
        elif p.default is p.empty:
            hint = " (not with isolation: process, whose worker has no task object)" if p.name == "task" else ""
            raise RewardError(f"{where}: reward {label!r} takes a parameter {p.name!r} that forkrl does not "
                              f"provide{hint}; in mode {mode!r} it provides: {', '.join(given)}; or give it in "
                              f"the entry's kwargs")
    extra = [k for k in kwargs if k not in sig.parameters]
    if extra and not takes_all:
        raise RewardError(f"{where}: kwargs {extra} are not parameters of reward {label!r} "
                          f"({', '.join(sig.parameters) or 'none'})")
    return tuple(wants), takes_all


GIVEN: dict[str, Callable] = {}  # rewards handed to ``forkrl.train(rewards=...)`` as objects, by their ``python:`` spec


def given(fn: Callable) -> str:
    """The ``fn`` spec of a callable handed over in Python: ``module:NAME`` when it can be imported again by that name
    (so a worker process, and a later resume, find it), else ``python:<module>.<qualname>``, found only in this
    process (``GIVEN``)."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and name and module != "__main__" and "<" not in name and "." not in name:
        try:
            if getattr(importlib.import_module(module), name, None) is fn:
                return f"{module}:{name}"
        except Exception:  # noqa: BLE001 - not importable again: keep the object itself
            pass
    spec = f"python:{module or '?'}.{name or type(fn).__name__}"
    if spec in GIVEN and GIVEN[spec] is not fn:
        spec = f"{spec}#{id(fn):x}"
    GIVEN[spec] = fn
    return spec


def _source_sha256(fn: Callable) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    except Exception:  # noqa: BLE001 - no source to read (a builtin, exec'd text, a source file gone or changed)
        return None


def _source_file(fn: Callable) -> Path | None:
    """The Python file that defines ``fn``, where there is one."""
    try:
        found = inspect.getsourcefile(inspect.unwrap(fn))
    except (TypeError, OSError):
        return None
    return Path(found).resolve() if found and Path(found).is_file() else None


def spec_file(spec: str | None) -> Path | None:
    """The user's file a ``PATH.py:NAME`` spec names, else None."""
    if not spec:
        return None
    head, name = split_spec(spec)
    return Path(head).expanduser().resolve() if name is not None and head.endswith(".py") else None


def fingerprint(entry) -> dict:
    """What a reward entry's values depend on, for caches keyed by it: the entry as written (fields left at their
    defaults omitted, so a key made before a field existed still matches; ``weight`` always there, as it always was)
    and the content hash of the user's file or, for a callable handed over in Python, of its source."""
    out = entry.model_dump(mode="json", exclude_defaults=True)
    out["weight"] = entry.weight
    file = spec_file(entry.fn)
    if file is not None and file.is_file():
        out["sha256"] = file_sha256(file)
    elif entry.fn is not None and entry.fn in GIVEN:
        out["sha256"] = _source_sha256(GIVEN[entry.fn])
    return out


def load(entries, task, *, where: str, timeout_s: float | None, device=None, run_dir=None) -> list[Reward]:
    """The rewards of a stage's config entries (``RewardCfg``), checked against ``task``. A reward model or judge is
    built lazily (its weights load on its first call, on ``device``); ``run_dir`` holds a judge's response cache.
    A call's time limit is the entry's ``timeout_s``, else ``timeout_s`` (the stage's ``reward_timeout_s``); a reward
    model's or judge's batch call has none unless its entry sets one (its first call loads weights, and a judge's
    requests have their own timeouts and retries)."""
    out, labels = [], set()
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        file, spec, mode = None, None, entry.mode
        if entry.name is not None:
            fn, label = REWARDS[entry.name], entry.label or entry.name
            if entry.name == "format" and not hasattr(task, "has_answer"):
                raise RewardError(f"{at}: the 'format' reward needs a task that can tell whether a completion has "
                                  f"an answer, and task {getattr(task, 'name', task)!r} cannot; remove it or use "
                                  "'correct'")
            if entry.name == "majority" and not hasattr(task, "extract"):
                raise RewardError(f"{at}: the 'majority' reward votes with the answers the task extracts, and task "
                                  f"{getattr(task, 'name', task)!r} has no extract(completion); use a task that "
                                  "has one (arithmetic, jsonl, reasoning_gym)")
            if entry.name == "majority" and entry.kwargs.get("ties", "first") not in TIES:
                raise RewardError(f"{at}: kwargs.ties={entry.kwargs['ties']!r}; the majority vote's ties are "
                                  f"{', '.join(TIES)}")
            mode = getattr(fn, "mode", "row")  # a built-in's own: majority votes over a group
            if "mode" in entry.model_fields_set and entry.mode != mode:
                raise RewardError(f"{at}: the built-in {entry.name!r} is a {mode}-mode reward; remove mode: "
                                  f"{entry.mode}")
        elif entry.fn is not None and entry.fn.startswith("python:"):
            if entry.fn not in GIVEN:
                raise RewardError(f"{at}: {entry.fn!r} is a reward that was handed to forkrl.train as a Python "
                                  "object; pass the same callable again (rewards=[...]) to resume or re-run it")
            fn, label = GIVEN[entry.fn], entry.label or entry.fn.rpartition(".")[2].split("#")[0]
            spec = entry.fn
            if entry.isolation == "process":
                raise RewardError(f"{at}: reward {label!r} was handed over as an object that cannot be imported by "
                                  "name (a lambda, a closure, or defined in the script being run), so it cannot "
                                  "run in a worker process; move it into a module, or use isolation: inline")
        elif entry.fn is not None:
            fn, file = resolve(entry.fn, at)
            label = entry.label or split_spec(entry.fn)[1] or entry.fn
            spec = f"{file}:{split_spec(entry.fn)[1]}" if file is not None else entry.fn
            file = file or _source_file(fn)  # a module's or entry point's file: recorded and hashed the same way
        elif entry.reward_model is not None:
            from .models import build_reward_model

            fn, label, mode = build_reward_model(entry.reward_model, device=device, where=at), \
                entry.label or "reward_model", "batch"
        else:
            from .judge import build_judge

            fn, label, mode = build_judge(entry.judge, task=task, device=device, where=at, run_dir=run_dir), \
                entry.label or "judge", "batch"
        if label in labels:
            raise RewardError(f"{at}: a second reward labelled {label!r}; give one of them its own label: (what its "
                              "metrics are logged under)")
        labels.add(label)
        wants, takes_all = check_signature(fn, label, mode, dict(entry.kwargs), entry.isolation, at)
        out.append(Reward(label=label, fn=fn, weight=entry.weight, mode=mode, kwargs=dict(entry.kwargs),
                          wants=wants, takes_all=takes_all, isolation=entry.isolation, workers=entry.workers,
                          timeout_s=entry.timeout_s if entry.timeout_s is not None else
                          None if entry.name is None and entry.fn is None else timeout_s,
                          spec=spec, file=file, sha256=file_sha256(file) if file is not None else
                          (_source_sha256(fn) if spec in GIVEN else None)))
    return out
