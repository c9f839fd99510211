"""The majority vote as a reward (TTRL, arXiv 2504.16084) and the health of its labels (arXiv 2605.19444).

TTRL trains on questions that have no gold answer. The G completions of a question vote with their extracted
answers a_1 … a_G (``task.extract``); the most common answer is the group's *label* ŷ, and

    R_i = 1[a_i = ŷ]          ŷ = argmax_a #{j : a_j = a}, over the answers that parse

Choices the paper leaves open, made here (``{name: majority}`` in ``grpo.rewards``; ``kwargs: {ties: none}``):

* Answers are compared as the task extracts them, as exact strings: two forms of one value that differ as text
  (``0.5`` and ``1/2``) are two candidates. TTRL's code counts extracted strings for the label too, but then
  rewards a row by its math verifier's verdict against the label, so an equivalent form there also scores 1.
* An unparseable completion (``task.extract`` gives None or an empty string) casts no vote and scores 0. A group in
  which no completion parses has no label: every row scores 0, a zero-variance group that trains nothing.
* Ties: ``ties: first`` (default, TTRL's ``Counter.most_common``): of the answers tied for most votes, the one that
  appears first in row order wins; ``ties: none``: a tie has no label and every row scores 0, so that no coin flip
  is rewarded (and the reward does not depend on the rows' order).

The reward never reads the gold answer. Its health does, where a problem has one (``health``, logged by the GRPO
trainer as ``ttrl_*`` step metrics through ``LabelWatch``):

* label accuracy: the share of groups whose label is right (a group without a label counts as wrong);
* reward accuracy: the share of rows whose majority reward equals their gold reward 1[a_i correct];
* flip rate: among the step's questions that were voted on before in the stage, the share whose label differs
  from the label of their last visit (2605.19444's leading indicator: a correct answer is suppressed while the
  label still moves, and stays suppressed once it locks);
* punished minority: the share of groups whose label is wrong while at least one row is right: the rows the vote
  trains away from the right answer.

"Right" is the task's verifier, ``task.score(problem, completion) >= 1 - 1e-9``; a label is right when a completion
carrying it is. The metrics cost one verifier call per row, as the ``correct`` reward does.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

TIES = ("first", "none")
CORRECT = 1.0 - 1e-9
VOTES = "majority.jsonl"  # in the run directory: each step's questions with their label, for flips across a resume


def vote(answers: Sequence[str | None], ties: str = "first") -> str | None:
    """The label of a group's extracted answers (module docstring): the most common answer that parses, ties
    broken by ``ties``; None when no answer parses (or, with ``ties="none"``, on a tie).

    Worked case: ["12", None, "13", "12", "13"] → "12" (2 votes each for 12 and 13; 12 came first); with
    ties="none" → None. [None, ""] → None."""
    if ties not in TIES:
        raise ValueError(f"majority: ties={ties!r} is not one of {', '.join(TIES)}")
    counts = Counter(a for a in answers if a)
    if not counts:
        return None
    (top, n), *rest = counts.most_common()  # most_common keeps first-seen order among equal counts
    if ties == "none" and rest and rest[0][1] == n:
        return None
    return top


def majority_scores(answers: Sequence[str | None], ties: str = "first") -> list[float]:
    """R_i = 1[a_i = ŷ] for each row (0 for every row when the group has no label)."""
    label = vote(answers, ties)
    return [float(label is not None and a == label) for a in answers]


def answers_of(task, completions: Sequence[str]) -> list[str | None]:
    """Each completion's answer as ``task.extract`` finds it; None for none (an empty answer is none)."""
    return [task.extract(c) or None for c in completions]


def majority(task, completions, ties="first"):
    """TTRL's majority-vote reward (arXiv 2504.16084), a group reward: R_i = 1[a_i = ŷ], ŷ the most common answer
    of the problem's G completions as ``task.extract`` finds them (the module docstring: unparseable answers score
    0 and do not vote; ``ties``: ``first`` or ``none``). Reads no gold answer. ``{name: majority}``."""
    return majority_scores(answers_of(task, completions), ties)


majority.mode = "group"  # a built-in's own mode: ``api.load`` calls it once per group


@dataclass(frozen=True)
class Vote:
    """One group's vote: its question, label, each row's majority reward and, where the problem has a gold answer,
    each row's gold verdict (``correct`` None where it has none)."""

    problem_id: str
    label: str | None
    scores: tuple[float, ...]
    correct: tuple[bool, ...] | None
    label_correct: bool | None


def _right(task, problem, completion: str) -> bool | None:
    try:
        s = task.score(problem, completion)
        s = None if s is None else float(s)
    except Exception:  # noqa: BLE001 - a verifier that fails on a row: no gold verdict for that group
        return None
    return None if s is None or math.isnan(s) else s >= CORRECT


def group_vote(task, problem, completions: Sequence[str], ties: str = "first") -> Vote:
    """The vote of one problem's completions, with the gold verdicts where ``problem.answer`` is not empty."""
    answers = answers_of(task, completions)
    label = vote(answers, ties)
    scores = tuple(majority_scores(answers, ties))
    verdicts = [_right(task, problem, c) for c in completions] if problem.answer else [None]
    if any(v is None for v in verdicts):
        return Vote(problem.id, label, scores, None, None)
    carrier = next((i for i, a in enumerate(answers) if label is not None and a == label), None)
    label_correct = carrier is not None and bool(verdicts[carrier])
    return Vote(problem.id, label, scores, tuple(verdicts), label_correct)


def health(votes: Sequence[Vote], last: dict[str, str | None]) -> dict:
    """The step's ``ttrl_*`` metrics from its groups' votes and each question's label at its last visit (``last``,
    not changed here). A metric is None where no group (row, revisited question) counts toward it."""
    gold = [v for v in votes if v.correct is not None]
    rows = [(s, float(c)) for v in gold for s, c in zip(v.scores, v.correct)]
    seen = [v for v in votes if v.problem_id in last]

    def share(hits: int, n: int) -> float | None:
        return hits / n if n else None

    return {"ttrl_label_accuracy": share(sum(v.label_correct for v in gold), len(gold)),
            "ttrl_reward_accuracy": share(sum(s == c for s, c in rows), len(rows)),
            "ttrl_flip_rate": share(sum(last[v.problem_id] != v.label for v in seen), len(seen)),
            "ttrl_punished_minority": share(sum(not v.label_correct and any(v.correct) for v in gold), len(gold)),
            "ttrl_no_label_frac": share(sum(v.label is None for v in votes), len(votes)),
            "ttrl_revisited": len(seen)}


class LabelWatch:
    """Each question's last label across a GRPO stage, for the flip rate, and ``RUN/majority.jsonl``: one line per
    group and step (question, label, whether it is right, the shares of the majority and of right rows), written
    by rank 0 and cut back to the checkpoint on resume, so a resumed stage's flips equal an uninterrupted one's.
    Flat GRPO steps only: a stage with tree rollouts (``grpo.tree``) logs no label health."""

    def __init__(self, path: Path, stage: str, *, start: int, ties: str, enabled: bool):
        from ..trainers.metrics import stage_rows, truncate_metrics

        self.path, self.stage, self.ties, self.enabled = path, stage, ties, enabled
        self.last: dict[str, str | None] = {}
        if enabled:  # rank 0 writes the file and the metrics; the other ranks' flips are never read
            truncate_metrics(path, stage, start)
            for row in stage_rows(path, stage):
                self.last[row["problem_id"]] = row["label"]

    @classmethod
    def of(cls, rewards, ctx, start: int) -> "LabelWatch | None":
        """The watch of a stage whose rewards include the built-in ``majority`` (its ``ties``), else None."""
        found = [r for r in rewards if r.fn is majority]
        if not found:
            return None
        return cls(ctx.run_dir / VOTES, ctx.stage_dir.name, start=start, ties=found[0].kwargs.get("ties", "first"),
                   enabled=ctx.dist.is_main)

    def step(self, step: int, task, problems, rollouts, texts: list[str], dist) -> dict:
        """The step's ``health`` over every rank's groups (``problems`` indexed by ``rollouts.problem_N``); then each
        question's label is remembered and its line written."""
        by_group: dict[int, list[int]] = {}
        for r, g in enumerate(rollouts.group_N.tolist()):
            by_group.setdefault(g, []).append(r)
        problem_N = rollouts.problem_N.tolist()
        votes = [group_vote(task, problems[problem_N[rs[0]]], [texts[r] for r in rs], self.ties)
                 for rs in by_group.values()]
        votes = dist.gather_objects(votes)
        out = health(votes, self.last)
        lines = []
        for v in votes:
            self.last[v.problem_id] = v.label
            lines.append({"stage": self.stage, "step": step, "problem_id": v.problem_id, "label": v.label,
                          "label_correct": v.label_correct, "majority_share": sum(v.scores) / len(v.scores),
                          "correct_share": None if v.correct is None else sum(v.correct) / len(v.correct)})
        if self.enabled:
            from ..trainers.metrics import append_jsonl

            append_jsonl(self.path, lines, what="the majority votes")
        return out
