"""The reverse-perplexity curriculum for SFT (arXiv 2605.13301, METHODS §8) and its ablations (``sft.order``).

``perplexity_desc`` (the paper's rule): the demonstrations ordered by their response's perplexity under the stage's
starting model, highest first, and taken in that order with no shuffle; ``perplexity_asc`` is the ablation lowest
first; ``shuffle`` (the default) is the other ablation, seeded per-epoch permutations (``data.batch_indices``).

The perplexity of example i is exp(mean over its completion tokens of −log π₀(y_t | y_<t)), the mean taken over the
tokens the SFT loss reads (an env task's actions, its observations too with ``sft.observations: train``). π₀ is the
model the stage starts from, so the perplexities are computed once, before the first step, and cached in the stage
directory (``perplexity.json``, with a fingerprint of the examples' tokens): a resumed stage, whose model has moved,
reads them back instead of scoring again. Ties keep the demonstrations' own order. Past the last example the order
starts again from the top (an epoch is the same order).
"""

from __future__ import annotations

import hashlib
import json
import math

import torch

from ..forward import ModelForward
from ..types import Role

CACHE = "perplexity.json"


def fingerprint(batch_of, n: int) -> str:
    """A hash of the examples' token ids and roles, in order: what the cached perplexities are of."""
    h = hashlib.sha256()
    for i in range(n):
        b = batch_of([i])
        h.update(b.input_ids_NL.numpy().tobytes())
        h.update(b.role_NL.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def example_perplexities(model, batch_of, n: int, *, micro_batch_size: int, rank: int = 0,
                         world_size: int = 1) -> torch.Tensor:
    """Perplexity of each of the ``n`` examples (``batch_of(indices)`` packs them) under ``model``: this rank scores
    every ``world_size``-th example from ``rank``; the others are 0 (the caller sums the ranks' vectors)."""
    was_training = model.training
    model.eval()
    forward = ModelForward(model)
    nll_N = torch.zeros(n, dtype=torch.float64)
    mine = list(range(rank, n, world_size))
    for start in range(0, len(mine), micro_batch_size):
        rows = mine[start : start + micro_batch_size]
        batch = batch_of(rows)
        logp_NT, _, _ = forward.logprobs(batch)
        mask_NT = (batch.role_NL[:, 1:] == Role.COMPLETION).to(logp_NT.device)
        tokens = mask_NT.sum(1).clamp_min(1)
        nll_N[rows] = (-(logp_NT * mask_NT).sum(1) / tokens).double().cpu()
    model.train(was_training)
    return torch.where(torch.arange(n) % world_size == rank, nll_N.exp(), torch.zeros(n, dtype=torch.float64))


def curriculum_order(ppl: list[float], order: str) -> list[int]:
    """The examples' indices in the order ``order`` takes them: highest perplexity first (``perplexity_desc``) or
    lowest first (``perplexity_asc``); ties in the examples' own order."""
    sign = -1.0 if order == "perplexity_desc" else 1.0
    return sorted(range(len(ppl)), key=lambda i: (sign * ppl[i], i))


def ordered_indices(order: list[int], batch_size: int, step: int) -> list[int]:
    """Examples of optimizer step ``step`` (0-based): the next ``batch_size`` of ``order``, from the top again past
    its end. A pure function of the step, as ``data.batch_indices`` is, so a resume needs no data-loader state."""
    n = len(order)
    return [order[(step * batch_size + j) % n] for j in range(batch_size)]


def load_or_score(ctx, batch_of, n: int, micro_batch_size: int) -> list[float]:
    """The examples' perplexities under the stage's starting model: read from the stage directory's cache when it
    holds these examples' (a resume), else scored now (every rank a share) and cached by rank 0."""
    from ..checkpoint import atomic_write_text

    path = ctx.stage_dir / CACHE
    key = fingerprint(batch_of, n)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == key and len(saved.get("perplexity", ())) == n:
            return [float(x) for x in saved["perplexity"]]
    if ctx.resume_from is not None:
        from ..checkpoint import CheckpointError

        raise CheckpointError(f"{path}: the cached perplexities of the starting model are missing or are of other "
                           "examples, and the model has trained since; start the stage again (remove "
                           f"{ctx.stage_dir.name}/checkpoints) to score them anew")
    dist = ctx.dist
    ppl = dist.all_reduce_sum(example_perplexities(ctx.model, batch_of, n, micro_batch_size=micro_batch_size,
                                                   rank=dist.rank, world_size=dist.world_size))
    values = [float(x) for x in ppl]
    if dist.is_main:
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"fingerprint": key, "perplexity": values}))
    dist.barrier()
    return values


def summary(ppl: list[float]) -> dict:
    """What the stage records of the perplexities: their range and median, in nats per token too."""
    s = sorted(ppl)
    return {"ppl_max": s[-1], "ppl_median": s[len(s) // 2], "ppl_min": s[0],
            "nll_mean": sum(math.log(max(x, 1e-300)) for x in s) / len(s)}
