"""An environment as a task (AGENTS.md): ``task: {type: env, env: frozenlake}`` trains a policy over many turns.

``env`` names a built-in environment (``envs.ENVS``: ``frozenlake``, ``sokoban``) or the user's own class,
``PATH.py:Class`` (relative to the config file's directory) or ``package.module:Class``; ``kwargs`` go to its
constructor. A class must give instances with ``reset(seed) -> str`` and ``step(action) -> StepResult`` (or anything
with ``observation``, ``reward``, ``done`` and ``info``); a class that does not is a config error naming what is
missing, found before a run writes anything.

The task's problems are its env seeds (train ``0 … train_size − 1``, held-out from ``envs.base.HELDOUT_SEED0``:
disjoint by construction), each with the instruction and first observation as its prompt text. Demonstrations are
action lists replayed through the environment, so SFT and RL see the same renderings: for a built-in environment
drawn from ``demos`` (a mix of ``optimal``, ``greedy``, ``noisy`` and ``wander`` policies, ``envs.grid``), for any
environment read from ``demos_file`` (JSON Lines ``{"seed": 3, "turns": ["<answer>Left</answer>", …]}``, train
seeds only). An episode succeeds when its last ``info["success"]`` is positive, or, with ``success_return``, when its
return reaches that value.
"""

from __future__ import annotations

import inspect
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from .base import Problem, Split, TaskConfig, TaskError
from .formatting import FormatCfg


def load_env_class(spec: str, where: str = "task.env"):
    """The environment class (or factory) ``spec`` names: a built-in's name, ``PATH.py:Class`` or ``module:Class``."""
    from ..envs import ENVS
    from ..rewards.api import RewardError, resolve, split_spec

    if spec in ENVS:
        return ENVS[spec]
    head, name = split_spec(spec)
    if name is None:
        raise TaskError(f"{where}: {spec!r} is not a built-in environment ({', '.join(ENVS)}) nor PATH.py:Class or "
                        "package.module:Class")
    if head.endswith(".py") and not Path(head).expanduser().is_file():
        raise TaskError(f"{where}: environment file {head} does not exist (a relative path is relative to the config "
                        "file's directory)")
    try:
        cls, _ = resolve(spec, where)
    except RewardError as e:
        raise TaskError(str(e)) from None
    return cls


def check_env(env, spec: str, where: str = "task.env") -> None:
    """A TaskError naming what an environment instance lacks of the protocol (``envs.base.Env``)."""
    missing = []
    for method, params in (("reset", 1), ("step", 1)):
        fn = getattr(env, method, None)
        if not callable(fn):
            missing.append(f"a method {method}()")
            continue
        try:
            inspect.signature(fn).bind(*range(params))
        except TypeError:
            missing.append(f"{method}() taking one argument ({'the seed' if method == 'reset' else 'the action text'})")
        except ValueError:  # a builtin without a signature: trust it
            pass
    if missing:
        raise TaskError(f"{where}: {spec!r} does not follow the environment protocol: it lacks {' and '.join(missing)}"
                        " (reset(seed) -> observation text; step(action text) -> StepResult(observation, reward, "
                        "done, info); see forkrl.envs.base)")


class EnvTask:
    """A multi-turn task: an environment, its instruction and budgets, its seeds, demonstrations and success test.

    ``multi_turn`` tells the trainers and the evaluation to play episodes (``envs.episodes``) instead of sampling
    one completion per prompt."""

    multi_turn = True

    def __init__(self, spec: str, make, *, instruction: str, max_turns: int, max_episode_tokens: int,
                 train_size: int, heldout_size: int, demos: dict[str, float], demos_file: str | None,
                 success_return: float | None, style: str = "plain", system_prompt: str | None = None):
        self.spec, self._make, self.instruction, self.max_turns = spec, make, instruction, max_turns
        self.max_episode_tokens, self.train_size, self.heldout_size = max_episode_tokens, train_size, heldout_size
        self.mix, self.demos_file, self.success_return = dict(demos), demos_file, success_return
        self.style, self.system_prompt = style, system_prompt
        self.name = f"env:{spec}"

    def make(self):
        return self._make()

    def seeds(self, split: Split) -> range:
        from ..envs.base import split_seeds

        return split_seeds(split, self.train_size, self.heldout_size)

    def problems(self, split: Split) -> list[Problem]:
        """A problem per env seed: the prompt text is the instruction and the first observation, as the policy sees
        them; ``meta`` holds the seed (``env_seed``) and the first ``observation``."""
        return self._problems[split]

    @cached_property
    def _problems(self) -> dict[str, list[Problem]]:
        out = {}
        for split in ("train", "heldout"):
            env, out[split] = self.make(), []
            for s in self.seeds(split):
                try:
                    obs = env.reset(s)
                except Exception as e:  # noqa: BLE001 - the user's environment, or a split larger than it has
                    raise TaskError(f"task.env {self.spec!r}: reset({s}) raised {type(e).__name__}: {e} (the "
                                    f"{split} seeds are {self.seeds(split).start} … {self.seeds(split).stop - 1}; "
                                    f"task.{split}_size sets how many)") from None
                out[split].append(Problem(id=f"seed-{s}", prompt=f"{self.instruction}\n{obs}", answer="",
                                          meta={"env_seed": s, "observation": obs}))
        return out

    def success(self, episode) -> bool:
        if episode.error is not None:
            return False
        if self.success_return is not None:
            return episode.ret >= self.success_return
        return float(episode.info.get("success", 0.0)) > 0

    def solved_at(self, episode) -> int | None:
        """The turn (1-based) by which the episode had succeeded, or None: the first turn whose ``info["success"]``
        is positive, or, with ``success_return``, whose cumulative reward reaches it (PASS@(k,T) counts an episode
        solved within T turns when this is at most T)."""
        if episode.error is not None:
            return None
        total = 0.0
        for t, turn in enumerate(episode.turns, 1):
            total += turn.reward
            if (total >= self.success_return) if self.success_return is not None else \
                    float(turn.info.get("success", 0.0)) > 0:
                return t
        return None

    def score(self, problem: Problem, completion: str) -> float:
        raise TaskError(f"task {self.name!r} is scored by playing episodes, not by one completion's text")

    def episode_demos(self, split: Split = "train"):
        """The demonstrations (``envs.base.Demo``) of a split: from ``demos_file`` if given, else drawn from the
        ``demos`` mix by a built-in environment's solver."""
        from ..envs.base import Demo
        from ..envs.grid import mixed_demos

        if self.demos_file is not None:
            return [d for d in self._file_demos if d.seed in self.seeds(split)] if split == "train" else []
        probe = self.make()
        if callable(getattr(probe, "demonstration", None)):  # the environment's own, per seed (the tool env)
            turns = [(s, probe.demonstration(s)) for s in self.seeds(split)]
            return [Demo(s, tuple(t), "optimal") for s, t in turns if t]
        if not hasattr(probe, "optimal"):
            raise TaskError(f"task.env {self.spec!r} has no solver to draw demonstrations from: give "
                            "task.demos_file (JSON Lines of {\"seed\": ..., \"turns\": [...]})")
        return [Demo(d.seed, d.turns, d.kind) for d in mixed_demos(
            self.make, list(self.seeds(split)), self.mix, max_turns=self.max_turns,
            actions_per_turn=getattr(probe, "actions_per_turn", 1))]

    @cached_property
    def _file_demos(self):
        from ..envs.base import Demo
        from ..userfiles import json_objects

        out, train = [], self.seeds("train")
        path = Path(self.demos_file)
        if not path.is_file():
            raise TaskError(f"task.demos_file: {path} does not exist (a relative path is relative to the config file)")
        for where, row in json_objects(path, "a demonstrations file", TaskError, max_line_bytes=16 << 20,
                                       advice="each line is one demonstration: is it the right file?",
                                       shape='{"seed": 3, "turns": [...]}'):
            seed, turns = row.get("seed"), row.get("turns")
            if not isinstance(seed, int) or not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise TaskError(f"{where}: a demonstration is {{\"seed\": int, \"turns\": [action text, ...]}}")
            if seed not in train:
                raise TaskError(f"{where}: seed {seed} is not a train seed (0 … {self.train_size - 1}); held-out "
                                "seeds must stay unseen")
            if len(turns) > self.max_turns:
                raise TaskError(f"{where}: {len(turns)} turns, more than task.max_turns={self.max_turns}")
            out.append(Demo(seed, tuple(turns), "file"))
        if not out:
            raise TaskError(f"{self.demos_file}: no demonstrations")
        return out

    def demonstrations(self, split: Split):
        """(problem, transcript) pairs: each demonstration's turns and observations as one text (what a tiny model's
        tokenizer is trained on; the SFT stage replays the demonstrations token by token instead)."""
        by_seed = {p.meta["env_seed"]: p for p in self.problems(split)}
        out = []
        for demo in self.episode_demos(split):
            env, parts = self.make(), []
            env.reset(demo.seed)
            for action in demo.turns:
                result = env.step(action)
                parts.append(f"{action}\n{result.observation or ''}")
                if result.done:
                    break
            out.append((by_seed[demo.seed], "\n" + "\n".join(parts)))
        return out


def _env_spec(value: str) -> str:
    from ..envs import ENVS

    if value not in ENVS and ":" not in value:
        raise ValueError(f"unknown environment {value!r}; valid: {', '.join(map(repr, ENVS))}, or your own class as "
                         "'PATH.py:Class' or 'package.module:Class'")
    return value


class EnvCfg(TaskConfig):
    """``task: {type: env, env: frozenlake, kwargs: {size: 4}, max_turns: 5}``: a multi-turn task (module docstring).

    ``instruction``: shown before the first observation (default: the environment class's ``INSTRUCTION``).
    ``max_episode_tokens``: an episode's whole row (prompt, actions, observations); the next turn is not started when
    its bridge and ``sampling.max_new_tokens`` would not fit, and the episode is flagged truncated."""

    type: Literal["env"]
    env: str = "frozenlake"
    kwargs: dict[str, Any] = {}
    instruction: str | None = None
    max_turns: Annotated[int, Field(ge=1)] = 5
    max_episode_tokens: Annotated[int, Field(ge=16)] = 512
    train_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    heldout_size: Annotated[int, Field(ge=1)] = 100
    demos: dict[Literal["optimal", "greedy", "noisy", "wander", "random"], Annotated[float, Field(gt=0)]] = \
        {"optimal": 1.0}
    demos_file: str | None = None
    success_return: float | None = None
    format: FormatCfg = FormatCfg()

    _check_env = field_validator("env")(classmethod(lambda cls, v: _env_spec(v)))

    def build(self) -> EnvTask:
        cls = load_env_class(self.env)
        try:
            make = (lambda: cls(**self.kwargs))
            probe = make()
        except TypeError as e:
            raise TaskError(f"task.kwargs: {self.env!r} cannot be built with {self.kwargs} ({e})") from None
        check_env(probe, self.env)
        instruction = self.instruction or getattr(cls, "INSTRUCTION", None)
        if not instruction:
            raise TaskError(f"task.instruction: {self.env!r} has no INSTRUCTION of its own; write the instruction the "
                            "policy is shown before the first observation")
        if self.format.template != "{prompt}":
            raise TaskError("task.format.template: an env task's prompt is its instruction and first observation; "
                            "write the wording into task.instruction instead")
        return EnvTask(self.env, make, instruction=instruction, max_turns=self.max_turns,
                       max_episode_tokens=self.max_episode_tokens, train_size=self.train_size,
                       heldout_size=self.heldout_size, demos=self.demos, demos_file=self.demos_file,
                       success_return=self.success_return, style=self.format.style,
                       system_prompt=self.format.system_prompt)
