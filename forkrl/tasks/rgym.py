"""Reasoning-gym datasets as forkrl tasks: procedural problems scored by reasoning-gym's own verifiers.

Why an adapter and not a copy: reasoning-gym (github.com/open-thought/reasoning-gym) ships ~100
generators, each with a scorer that knows its answer format (partial credit, several valid answers,
...). We keep each generated entry in ``Problem.meta["entry"]`` and hand it back to
``dataset.score_answer`` untouched, so a score here is the score reasoning-gym would give.

Answers are read the reasoning-gym way: the last ``<answer>...</answer>`` in the completion
(``reasoning_gym.utils.extract_answer``). The prompt that teaches that convention is
``reasoning_gym.utils.SYSTEM_PROMPTS``; it is exposed as ``ReasoningGymTask.system_prompt`` so the
formatter can put it in front of the question.

Train / held-out separation. Most generators seed one RNG per item with ``seed + index``, so two
datasets whose seeds differ by less than their size share items. Held-out is therefore generated with
``seed + HELDOUT_SEED_OFFSET`` (far from any train index), and then every held-out problem whose
question text also appears in train is dropped, because small problem spaces repeat questions even
under unrelated seeds. The held-out split can thus be shorter than ``heldout_size``; the number
dropped is kept in ``heldout_dropped``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Annotated, Any, Literal, Mapping

from pydantic import Field

from .base import Problem, Split, TaskConfig, TaskError
from .formatting import FormatCfg

HELDOUT_SEED_OFFSET = 1_000_000_007  # far beyond any train size, so seed+index never collides


def _registry() -> dict[str, Any]:
    """reasoning-gym's dataset registry: name -> (dataset class, config dataclass)."""
    import reasoning_gym  # noqa: F401  (importing the package registers every dataset)
    from reasoning_gym.factory import DATASETS

    return DATASETS


def _check_name(name: str, registry: Mapping[str, Any]) -> None:
    if name in registry:
        return
    close = difflib.get_close_matches(name, list(registry), n=5) or sorted(registry)[:8]
    raise TaskError(
        f"task.name={name!r} is not a reasoning-gym dataset. Close or example names: {', '.join(close)}. "
        f"The full list ({len(registry)} names) is `sorted(reasoning_gym.factory.DATASETS)`."
    )


def _check_config(name: str, config: Mapping[str, Any], config_cls: type) -> None:
    """Reject unknown keys before reasoning-gym turns them into a bare TypeError."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in config:
        if key in ("seed", "size"):
            raise TaskError(
                f"task.config.{key} for reasoning-gym dataset {name!r}: set it with task.{key} "
                f"(forkrl derives the train and held-out {key}s from it), not inside task.config."
            )
        if key not in fields - {"seed", "size"}:
            valid = ", ".join(sorted(fields - {"seed", "size"})) or "(none)"
            raise TaskError(
                f"task.config.{key} is not an option of reasoning-gym dataset {name!r}. "
                f"Valid options of {config_cls.__name__}: {valid}."
            )


def _create(name: str, config: Mapping[str, Any], size: int, seed: int):
    import reasoning_gym

    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    except (AssertionError, ValueError, TypeError) as e:
        # reasoning-gym validates configs with bare asserts; say which dataset and what to change.
        raise TaskError(
            f"reasoning-gym rejected task.config for dataset {name!r} (size={size}, seed={seed}): "
            f"{e or type(e).__name__}. Fix the value in task.config."
        ) from e


class ReasoningGymTask:
    """One reasoning-gym dataset, split into disjoint train and held-out problems (see module doc)."""

    def __init__(
        self,
        name: str,
        config: Mapping[str, Any] | None = None,
        size: int = 1000,
        seed: int = 0,
        heldout_size: int = 200,
        *,
        system_prompt_style: str = "default",
    ) -> None:
        from reasoning_gym.utils import SYSTEM_PROMPTS

        config = dict(config or {})
        registry = _registry()
        _check_name(name, registry)
        _check_config(name, config, registry[name][1])
        if size < 1 or heldout_size < 1:
            raise TaskError(f"task.size={size} and task.heldout_size={heldout_size} must both be >= 1.")
        if system_prompt_style not in SYSTEM_PROMPTS:
            raise TaskError(
                f"system_prompt_style={system_prompt_style!r} is not a reasoning-gym system prompt; "
                f"valid: {', '.join(SYSTEM_PROMPTS)}."
            )
        self.name = f"rgym:{name}"
        self.dataset_name = name
        self.config = config
        self.seed = seed
        self.system_prompt: str = SYSTEM_PROMPTS[system_prompt_style]
        self._train_ds = _create(name, config, size, seed)
        self._heldout_ds = _create(name, config, heldout_size, seed + HELDOUT_SEED_OFFSET)
        self._splits = self._build_splits()

    def _build_splits(self) -> dict[str, list[Problem]]:
        train = [self._problem("train", i, e) for i, e in enumerate(self._train_ds)]
        seen = {p.prompt for p in train}
        heldout_all = [self._problem("heldout", i, e) for i, e in enumerate(self._heldout_ds)]
        heldout = [p for p in heldout_all if p.prompt not in seen]
        self.heldout_dropped = len(heldout_all) - len(heldout)
        if not heldout:
            raise TaskError(
                f"every held-out problem of reasoning-gym dataset {self.dataset_name!r} also appears in train "
                f"(problem space too small for task.size={len(train)}). Lower task.size or widen task.config."
            )
        return {"train": train, "heldout": heldout}

    def _problem(self, split: Split, index: int, entry: dict[str, Any]) -> Problem:
        answer = entry.get("answer")
        return Problem(
            id=f"{self.dataset_name}-{split}-{index}",
            prompt=entry["question"],
            answer=answer if isinstance(answer, str) else str(answer),
            meta={"entry": entry},
        )

    def problems(self, split: Split) -> list[Problem]:
        if split not in self._splits:
            raise TaskError(f"unknown split {split!r}; valid: train, heldout.")
        return self._splits[split]

    def score(self, problem: Problem, completion: str) -> float:
        """reasoning-gym's score of the last ``<answer>`` in the completion; 0.0 when there is none.

        A scorer that crashes on the model's text is scored 0.0: that text is a malformed answer, and
        calling it unscorable would exempt exactly the garbage outputs from any penalty.
        """
        from reasoning_gym.utils import extract_answer

        answer = extract_answer(completion)
        if answer is None:
            return 0.0
        try:
            reward = float(self._train_ds.score_answer(answer, problem.meta["entry"]))
        except Exception:  # noqa: BLE001  (see docstring)
            return 0.0
        return min(max(reward, 0.0), 1.0)

    def gold_completion(self, problem: Problem) -> str:
        """The gold answer in the ``<answer>`` tags the task reads (``forkrl rewards check``'s gold row)."""
        return f"<answer>{problem.answer}</answer>"

    def has_answer(self, completion: str) -> bool:
        """Whether the completion has an ``<answer>`` to score at all (the ``format`` reward)."""
        from reasoning_gym.utils import extract_answer

        return extract_answer(completion) is not None

    def extract(self, completion: str) -> str | None:
        """The last ``<answer>`` (stripped), as ``score`` reads it, or None: what the majority vote counts."""
        from reasoning_gym.utils import extract_answer

        answer = extract_answer(completion)
        return (answer.strip() or None) if answer is not None else None

    def demonstrations(self, split: Split) -> list[tuple[Problem, str]]:
        raise TaskError(
            f"reasoning-gym dataset {self.dataset_name!r} has no step-by-step demonstrations, so it cannot "
            f"be used for SFT. For SFT use a JSONL task whose rows have a completion field "
            f"(task.completion_field), then train RL on this task."
        )


class ReasoningGymCfg(TaskConfig):
    """``task: {type: reasoning_gym, name: ..., config: {...}}``: one reasoning-gym dataset."""

    type: Literal["reasoning_gym"]
    name: str
    config: dict[str, Any] = {}
    size: Annotated[int, Field(ge=1)] = 1000
    heldout_size: Annotated[int, Field(ge=1)] = 200
    seed: int = 0
    format: FormatCfg = FormatCfg()

    def build(self) -> ReasoningGymTask:
        return ReasoningGymTask(self.name, dict(self.config), size=self.size, seed=self.seed,
                                heldout_size=self.heldout_size)
