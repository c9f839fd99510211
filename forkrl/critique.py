"""The self-critique loop at inference (arXiv 2605.13301, METHODS §8): generate, self-check, accept after
``accept_after`` (5) consecutive passing checks, give up after ``give_up_after`` (10) consecutive failed ones.

A candidate is a sampled completion. A self-check asks the model itself whether it is right: the candidate's tokens
as sampled (never decoded and re-encoded), then the ``check`` text's tokens, and the model's next-token
probabilities of the ``yes`` and ``no`` words' first tokens; a check passes with probability
q = p(yes) / (p(yes) + p(no)), the verdict sampled from the model restricted to its two answers. Each check is drawn
from its own seeded stream (problem, candidate, check), so one forward per candidate gives all its checks and a
problem's outcome does not depend on its batch. A failed check discards the candidate and a new one is sampled;
``give_up_after`` failed checks in a row (a passing check resets the count) end the problem with its last candidate,
flagged given up; so does reaching ``max_candidates``, a bound the paper does not state.

Departures from the paper: the check prompt is a fixed text appended to the candidate, not a free-form critique the
model writes; and a given-up problem is answered with its last candidate rather than left unanswered (both counts
are reported), so its pass@1 is comparable with plain sampling's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .sampling import row_seeds


@dataclass(frozen=True)
class Verdict:
    """How one problem's loop ended: the index of the candidate answered with, whether it was accepted (else given
    up), how many candidates were drawn and how many checks were run."""

    answer: int
    accepted: bool
    candidates: int
    checks: int


def run_checks(q: float, rng: random.Random, *, accept_after: int, failures: int):
    """Checks on one candidate whose pass probability is ``q``, ``failures`` failed checks in a row before it:
    (accepted, failures in a row after it, checks run). The candidate is accepted after ``accept_after`` passes in a
    row and dropped at its first failure."""
    checks = 0
    for _ in range(accept_after):
        checks += 1
        if rng.random() < q:
            failures = 0
        else:
            return False, failures + 1, checks
    return True, failures, checks


@dataclass
class Loop:
    """One problem's loop, fed a candidate's pass probability at a time; candidate c's checks draw from the stream
    (``seed``, c)."""

    accept_after: int
    give_up_after: int
    max_candidates: int
    seed: int
    failures: int = 0
    checks: int = 0
    candidates: int = 0

    def feed(self, q: float) -> Verdict | None:
        """The Verdict once the loop ends with this candidate, else None (a next candidate is wanted)."""
        c = self.candidates
        accepted, self.failures, ran = run_checks(q, random.Random(f"{self.seed}:{c}"), accept_after=self.accept_after,
                                                  failures=self.failures)
        self.checks, self.candidates = self.checks + ran, c + 1
        if accepted or self.failures >= self.give_up_after or self.candidates == self.max_candidates:
            return Verdict(c, accepted, c + 1, self.checks)
        return None


def critique_loop(q_of_candidate, *, accept_after: int, give_up_after: int, max_candidates: int, seed: int
                  ) -> Verdict:
    """One problem's loop; ``q_of_candidate(c)`` is candidate c's pass probability (sampling it when first asked)."""
    loop = Loop(accept_after, give_up_after, max_candidates, seed)
    while (verdict := loop.feed(q_of_candidate(loop.candidates))) is None:
        pass
    return verdict


@torch.no_grad()
def pass_probabilities(model, rows: list[list[int]], check_ids: list[int], yes_id: int, no_id: int) -> list[float]:
    """q for each row of token ids (prompt and candidate as sampled): the model's p(yes) / (p(yes) + p(no)) after
    the row and the check's tokens, from one right-padded forward."""
    device = next(model.parameters()).device
    seqs = [r + check_ids for r in rows]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], attn[i, : len(s)] = torch.tensor(s), 1
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
    last = logits[torch.arange(len(seqs)), torch.tensor([len(s) - 1 for s in seqs])].float()
    two = torch.log_softmax(last[:, [yes_id, no_id]], dim=-1).exp()
    return two[:, 0].cpu().tolist()


def first_token(tokenizer, word: str, where: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        from .config import ConfigError

        raise ConfigError(f"{where}: {word!r} has no tokens under this tokenizer")
    return ids[0]


def self_critique(model, tokenizer, sampler, params, prompt_ids: list[list[int]], cfg, *, key: str
                  ) -> tuple[list[list[int]], list[Verdict]]:
    """(each problem's answer as completion token ids, its Verdict). Candidates are drawn in rounds: every problem
    still open samples its next candidate (one batched call, row seeds of (key, problem, candidate)), and one forward
    gives their q."""
    check_ids = tokenizer(cfg.check, add_special_tokens=False).input_ids
    yes_id = first_token(tokenizer, cfg.yes, "eval.self_critique.yes")
    no_id = first_token(tokenizer, cfg.no, "eval.self_critique.no")
    P = len(prompt_ids)
    candidates: list[list[list[int]]] = [[] for _ in range(P)]
    qs: list[list[float]] = [[] for _ in range(P)]

    def draw(open_problems: list[int], c: int) -> None:
        seeds = [row_seeds(key, [p], c + 1)[c] for p in open_problems]
        rollouts = sampler.sample([prompt_ids[p] for p in open_problems], 1, params, seeds=seeds)
        mask = rollouts.completion_mask_NL
        done = [ids[m].tolist() for ids, m in zip(rollouts.input_ids_NL, mask)]
        eos = tokenizer.eos_token_id
        answers = [d[:-1] if d and d[-1] == eos else d for d in done]  # the check follows the answer, not its EOS
        q = pass_probabilities(model, [prompt_ids[p] + a for p, a in zip(open_problems, answers)], check_ids,
                               yes_id, no_id)
        for p, d, v in zip(open_problems, done, q):
            candidates[p].append(d)
            qs[p].append(v)

    verdicts: list[Verdict | None] = [None] * P
    loops = [Loop(cfg.accept_after, cfg.give_up_after, cfg.max_candidates, seed)
             for seed in row_seeds(key + ":check", list(range(P)), 1)]
    for c in range(cfg.max_candidates):
        open_problems = [p for p in range(P) if verdicts[p] is None]
        if not open_problems:
            break
        draw(open_problems, c)
        for p in open_problems:
            verdicts[p] = loops[p].feed(qs[p][c])
    return [candidates[p][v.answer] for p, v in enumerate(verdicts)], verdicts  # type: ignore[union-attr]
