"""The environment protocol (AGENTS.md): the environment owns state, reward and termination; forkrl owns the
template, the tokens and the masks.

An environment is ``reset(seed) -> observation`` and ``step(action_text) -> StepResult``. The same seed gives the
same episode; the environment parses the raw action text itself, and an action it cannot parse is an ordinary step
(``info["action_valid"] = 0``, a small penalty, the state unchanged), never an exception. An ``EnvTask`` adds what
training needs: the instruction, the turn budget, train and held-out seeds that never overlap, demonstrations as
action lists replayed through the environment (so SFT and RL see the same renderings), and the success test.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence, runtime_checkable

from ..tasks.base import Split

HELDOUT_SEED0 = 1_000_000  # held-out seeds start here; train seeds are 0 .. train_size - 1: disjoint by construction


@dataclass(frozen=True)
class StepResult:
    observation: str | None  # shown to the policy next (None: nothing more to show)
    reward: float  # this turn's reward, summed into the episode's return
    done: bool
    info: Mapping[str, float] = field(default_factory=dict)  # success, action_valid, ...


@runtime_checkable
class Env(Protocol):
    def reset(self, seed: int) -> str:
        """The first observation of the episode ``seed`` (same seed, same episode)."""
        ...

    def step(self, action: str) -> StepResult:
        """Apply the policy's raw action text."""
        ...


@dataclass(frozen=True)
class Demo:
    """A demonstration: the env seed and the action text of each turn, replayed through the environment."""

    seed: int
    turns: tuple[str, ...]
    kind: str = "optimal"


def split_seeds(split: Split, train_size: int, heldout_size: int) -> range:
    """The env seeds of a split: train 0 .. train_size − 1, held-out from ``HELDOUT_SEED0``; never overlapping."""
    if train_size > HELDOUT_SEED0:
        raise ValueError(f"train_size {train_size} is larger than {HELDOUT_SEED0}: the splits would overlap")
    return range(train_size) if split == "train" else range(HELDOUT_SEED0, HELDOUT_SEED0 + heldout_size)


ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
SEPARATOR = re.compile(r"\s*(?:\|\||,|\s)\s*")


def parse_actions(text: str, names: Sequence[str], limit: int) -> list[str] | None:
    """The actions a turn's text names, or None when it names none, too many, or a word that is not an action.

    The actions are the content of the last ``<answer>…</answer>`` if there is one, else the text's last line;
    separated by ``||``, commas or spaces; matched case-insensitively against ``names`` (returned as spelled
    there). ``"I go right. <answer>Right || Down</answer>"`` → ``["Right", "Down"]``."""
    found = ANSWER.findall(text)
    body = found[-1] if found else (text.strip().splitlines() or [""])[-1]
    words = [w for w in SEPARATOR.split(body.strip()) if w]
    lookup = {n.lower(): n for n in names}
    actions = [lookup.get(w.lower().strip(".!")) for w in words]
    if not actions or len(actions) > limit or None in actions:
        return None
    return actions


def episode_rng(seed: int, what: str) -> random.Random:
    """A random stream for one purpose of one episode (map, slips, demonstrations): a function of the seed only."""
    return random.Random(f"{what}:{seed}")
