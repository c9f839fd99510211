"""One optimizer step's gradient, accumulated over micro-batches with the step's fixed denominators (METHODS §1).

Every trainer (SFT, GRPO, fork) computes its step the same way: the step's two denominators (tokens and
sequences; the fork stage's decision and anchor tokens) are counted over the whole step, every rank included,
before the loop; each micro-batch's loss divides its masked sum by them and is backpropagated at once; the
gradients add up to the full batch's exactly. ``accumulate`` is that loop, once. A trainer gives it the
micro-batches (``Part``: rows of the step's batch, and whether they need a backward) and a ``StepLoss``.

The loop follows a ``Plan``; the default, ``EXACT``, is the rule above. ``forkrl check`` supplies other plans
(``check.FAULTS``), the two historical bugs kept as fault injections, so that its harness can be seen to fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Totals = tuple[int, int]


def micro_slices(n_rows: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]


@dataclass(frozen=True)
class Part:
    """A micro-batch: rows ``rows_N`` of the step's batch; ``grad`` False for a no-grad pass whose rows' gradient is
    exactly 0 (statistics only)."""

    rows_N: torch.Tensor
    grad: bool = True


def parts(rows_N: torch.Tensor, size: int, *, grad: bool = True) -> list[Part]:
    """``rows_N`` in micro-batches of ``size`` rows, in order."""
    return [Part(rows_N[sl], grad) for sl in micro_slices(len(rows_N), size)]


class StepLoss(Protocol):
    def __call__(self, rows_N: torch.Tensor, totals: Totals) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(this micro-batch's loss with the denominators ``totals``, statistics to sum over the step)."""

    def counts(self, rows_N: torch.Tensor) -> Totals:
        """This micro-batch's own two counts (what a per-micro-batch denominator would divide by)."""


class Plan:
    """How ``accumulate`` runs a step's micro-batches. This one is the correct rule: every micro-batch runs and
    divides by the step's totals. ``exact`` says whether a plan computes the step as written (optimisations that
    rely on it, like skipping the backward of zero-advantage rows, are off otherwise)."""

    name = "exact"
    exact = True
    lockstep = None  # under FSDP2, the ``Dist`` whose ranks must run equal forward/backward counts (``sharding``)

    def runs(self, index: int) -> bool:
        return True

    def denominators(self, totals: Totals, local: Callable[[], Totals], n_parts: int,
                     world_size: int) -> tuple[Totals, float]:
        """(the denominators micro-batch ``local`` divides by, the factor its loss is scaled by)."""
        return totals, 1.0


EXACT = Plan()


def accumulate(micro: list[Part], loss: StepLoss, totals: Totals, *, plan: Plan = EXACT,
               world_size: int = 1) -> dict[str, torch.Tensor]:
    """Backpropagate each micro-batch's loss into the parameters' ``.grad``; returns the step's summed loss and
    statistics (float64, on the CPU). ``totals``: the whole step's denominators over every rank.

    Under a lockstep plan (FSDP2) every micro-batch gets a backward, and a rank with fewer than the busiest rank's
    count runs zero-weight ones (the loss of its first row times 0: a zero gradient, no statistics) to match."""
    sums = {"loss": torch.zeros((), dtype=torch.float64)}
    padding = 0
    if plan.lockstep is not None:
        micro = [Part(p.rows_N) for p in micro]
        padding = int(plan.lockstep.all_reduce_max(torch.tensor(float(len(micro))))) - len(micro)
    for _ in range(padding):
        value, _ = loss(micro[0].rows_N[:1] if micro else torch.zeros(1, dtype=torch.long), totals)
        (0.0 * value).backward()
    for i, part in enumerate(micro):
        if not plan.runs(i):
            continue
        denominators, scale = plan.denominators(totals, lambda: loss.counts(part.rows_N), len(micro), world_size)
        with torch.enable_grad() if part.grad else torch.no_grad():
            value, stats = loss(part.rows_N, denominators)
            value = scale * value
        if part.grad:
            value.backward()
        sums["loss"] += value.detach().double().cpu()
        for key, v in stats.items():
            sums[key] = sums.get(key, 0.0) + v.detach().double().cpu()
    return sums


def completion_counts(batch, rows_N: torch.Tensor) -> Totals:
    """(completion tokens, rows) of the rows ``rows_N`` of ``batch``: the two counts of SFT's and GRPO's reductions."""
    mask_NT = batch.completion_mask_NL[rows_N, 1:]
    return int(mask_NT.sum()), int(mask_NT.shape[0])


def global_totals(mask_NT: torch.Tensor, dist) -> Totals:
    """(tokens, sequences) of the whole optimizer step across every rank: the fixed denominator."""
    local = torch.tensor([float(mask_NT.sum()), float(mask_NT.shape[0])], dtype=torch.float64)
    tokens, seqs = dist.all_reduce_sum(local).tolist()
    return int(tokens), int(seqs)
