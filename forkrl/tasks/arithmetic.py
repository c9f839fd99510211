"""Built-in procedural task: multi-digit addition with several solution strategies and wrong turns.

Why this task. The literature's regime (METHODS §3) is a base model that *can* solve a problem along
some paths and fails along others, with the choice made at a few high-entropy "fork" tokens. The
demonstrations here reproduce that on purpose:

* four solution strategies, chosen at the completion's first token (the fork):
    ``col``    right-to-left columns with explicit carries: long, but every step is a one-digit sum;
    ``split``  place-value decomposition, then two multi-digit recombinations: medium length, the
               recombinations carry, so a tiny model errs there more often;
    ``direct`` the answer at once: short, and hard for a small transformer (carries look ahead);
    ``guess``  a sloppy shortcut (round each operand to tens, add): a wrong turn at the strategy level,
               right only when the rounding errors cancel. It stands for the low-quality share of real
               SFT data, and keeps the SFT'd base's pass@1 in the middle however long SFT runs;
* wrong turns: in a ``col`` column the demonstration sometimes writes a wrong digit sum, then
  ``no`` and the right one (a recovered mistake, the kind of token RL learns to avoid or use).

A tiny model SFT'd on these demonstrations picks strategies in proportion to the mix, so its pass@1
sits between the reliable and the unreliable strategies' accuracy; RL raises it mostly by re-ranking the
strategy token, which is already in the base's top-4. Difficulty is ``digits`` (operand length).

Splits: a problem's split is a hash of its *unordered* operands, so ``a+b`` and ``b+a`` always share a
split and train and held-out can never overlap.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from .base import Problem, Split, TaskConfig, TaskError
from .formatting import FormatCfg

STRATEGIES = ("col", "split", "direct", "guess")
_ANSWER_RE = re.compile(r"ans (-?\d+)")


def _split_of(a: int, b: int, heldout_percent: int) -> Split:
    key = f"{min(a, b)}+{max(a, b)}".encode()
    bucket = int.from_bytes(hashlib.sha1(key).digest()[:4], "big") % 100
    return "heldout" if bucket < heldout_percent else "train"


def _col(a: int, b: int, rng: random.Random, wrong_turn_rate: float) -> str:
    """Right-to-left columns: ``col 7+5=12 c1 ; 4+8+1=13 c1 ; 3+2+1=6 ; ans 632``."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lhs = f"{x}+{y}" + (f"+{carry}" if carry else "")
        if rng.random() < wrong_turn_rate:
            wrong = s + rng.choice((-1, 1)) if s > 0 else s + 1
            step = f"{lhs}={wrong} no {s}"
        else:
            step = f"{lhs}={s}"
        carry = s // 10
        steps.append(step + (" c1" if carry else ""))
    return "col " + " ; ".join(steps) + f" ; ans {a + b}"


def _split(a: int, b: int) -> str:
    """Place values, then recombine: ``split 300+200=500 ; 40+80=120 ; 7+5=12 ; 500+120=620 ; ...``."""
    n = max(len(str(a)), len(str(b)))
    parts = []
    for p in reversed(range(n)):
        x, y = (a // 10**p % 10) * 10**p, (b // 10**p % 10) * 10**p
        parts.append((f"{x}+{y}={x + y}", x + y))
    steps = [s for s, _ in parts]
    total = parts[0][1]
    for _, v in parts[1:]:
        steps.append(f"{total}+{v}={total + v}")
        total += v
    return "split " + " ; ".join(steps) + f" ; ans {total}"


def demonstration(a: int, b: int, strategy: str, rng: random.Random, wrong_turn_rate: float) -> str:
    if strategy == "col":
        return _col(a, b, rng, wrong_turn_rate)
    if strategy == "split":
        return _split(a, b)
    if strategy == "direct":
        return f"direct ans {a + b}"
    if strategy == "guess":
        ra, rb = round(a, -1), round(b, -1)
        return f"guess {ra}+{rb}={ra + rb} ; ans {ra + rb}"
    raise TaskError(f"unknown arithmetic strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


def extract_answer(completion: str) -> str | None:
    """The last ``ans N`` in the completion, or None."""
    found = _ANSWER_RE.findall(completion)
    return found[-1] if found else None


@dataclass
class ArithmeticTask:
    """Addition of two ``digits``-digit numbers; see the module docstring for the design."""

    digits: int = 3
    train_size: int = 4000
    heldout_size: int = 200
    heldout_percent: int = 10
    strategy_weights: tuple[float, ...] = (0.2, 0.2, 0.1, 0.5)  # col, split, direct, guess
    wrong_turn_rate: float = 0.1
    seed: int = 0
    name: str = "arithmetic"

    def __post_init__(self) -> None:
        if len(self.strategy_weights) != len(STRATEGIES) or min(self.strategy_weights) < 0 or not sum(self.strategy_weights):
            raise TaskError(f"task.strategy_weights must be {len(STRATEGIES)} non-negative numbers, not all 0, "
                            f"for the strategies {', '.join(STRATEGIES)}; got {list(self.strategy_weights)}")
        self._splits = {"train": self._generate("train", self.train_size),
                        "heldout": self._generate("heldout", self.heldout_size)}

    def _generate(self, split: Split, size: int) -> list[Problem]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        capacity = (hi - lo + 1) ** 2 * (self.heldout_percent if split == "heldout" else 100 - self.heldout_percent) // 100
        if size > capacity * 3 // 4:
            raise TaskError(f"task.{split}_size={size} is too large for digits={self.digits} "
                            f"(about {capacity} distinct problems in that split); lower it or raise task.digits")
        rng = random.Random(f"{self.seed}:{split}:{self.digits}")
        seen: set[tuple[int, int]] = set()
        problems = []
        while len(problems) < size:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if (a, b) in seen or _split_of(a, b, self.heldout_percent) != split:
                continue
            seen.add((a, b))
            problems.append(Problem(id=f"{split}-{len(problems)}", prompt=f"{a}+{b}=", answer=str(a + b),
                                    meta={"a": a, "b": b}))
        return problems

    def problems(self, split: Split) -> list[Problem]:
        return self._splits[split]

    def score(self, problem: Problem, completion: str) -> float:
        return float(extract_answer(completion) == problem.answer)

    def has_answer(self, completion: str) -> bool:
        return extract_answer(completion) is not None

    def extract(self, completion: str) -> str | None:
        """The completion's answer as ``score`` reads it (the last ``ans N``), or None: what the majority vote counts."""
        return extract_answer(completion)

    def strategy(self, completion: str) -> str:
        """Canonical solution strategy of a completion (its first word), for diversity metrics."""
        head = completion.strip().split(" ", 1)[0]
        return head if head in STRATEGIES else "other"

    def gold_completion(self, problem: Problem) -> str:
        """A correct completion of ``problem`` (what ``forkrl rewards check`` scores as the gold answer)."""
        return " " + demonstration(problem.meta["a"], problem.meta["b"], "direct", random.Random(0), 0.0)

    def demonstrations(self, split: Split) -> list[tuple[Problem, str]]:
        rng = random.Random(f"{self.seed}:demos:{split}")
        out = []
        for p in self._splits[split]:
            strategy = rng.choices(STRATEGIES, weights=self.strategy_weights)[0]
            # The leading space makes the first completion token the strategy word, as sampled after "=".
            out.append((p, " " + demonstration(p.meta["a"], p.meta["b"], strategy, rng, self.wrong_turn_rate)))
        return out


class ArithmeticCfg(TaskConfig):
    """``task: {type: arithmetic, ...}``: the built-in addition task (``digits`` is the difficulty)."""

    type: Literal["arithmetic"]
    digits: Annotated[int, Field(ge=1, le=9)] = 2
    train_size: Annotated[int, Field(ge=1)] = 3000
    heldout_size: Annotated[int, Field(ge=1)] = 200
    strategy_weights: tuple[float, float, float, float] = (0.2, 0.2, 0.1, 0.5)  # col, split, direct, guess
    wrong_turn_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    seed: int = 0
    format: FormatCfg = FormatCfg()

    def build(self) -> ArithmeticTask:
        return ArithmeticTask(digits=self.digits, train_size=self.train_size, heldout_size=self.heldout_size,
                              strategy_weights=tuple(self.strategy_weights), wrong_turn_rate=self.wrong_turn_rate,
                              seed=self.seed)
