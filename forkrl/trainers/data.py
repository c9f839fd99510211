"""Data order: which examples or prompts an optimizer step takes, a pure function of (step, seed)."""

from __future__ import annotations

import torch


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Examples of optimizer step ``step``: consecutive slices of per-epoch seeded permutations.

    A pure function of (step, seed): the data cursor is the step, so resume needs no extra state."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[offset : offset + batch_size - len(out)].tolist()
        out += take
        pos += len(take)
    return out
