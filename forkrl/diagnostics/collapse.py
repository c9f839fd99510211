"""Template collapse: RAGEN-2's in-batch estimate of the mutual information between input and reasoning
(arXiv 2604.06268, METHODS §6).

H(Z) = H(Z|X) + I(X;Z): entropy sees only H(Z|X); template collapse is I(X;Z) → 0 with H(Z|X) flat, reasoning that
no longer depends on its input. For a step's N distinct prompts x_j and M sampled reasonings z_m (true prompt
c(m)), every reasoning is scored under every prompt, ℓ_j(z_m) = log π(z_m | x_j) over the reasoning tokens (summed,
and per token):

    matched_m  = ℓ_{c(m)}(z_m)
    marginal_m = logsumexp_j ℓ_j(z_m) − log N
    MI         = mean_m (matched_m − marginal_m) ∈ [0, log N]   (each term is ≤ log N; the mean is ≥ 0 in expectation)
    retrieval  = mean_m [argmax_j ℓ_j(z_m) = c(m)]             (chance 1/N)

Departure from RAGEN: Z is the sampled token ids themselves (RAGEN re-tokenises the decoded text), so no token is
scored that the policy did not draw.
"""

from __future__ import annotations

import math

import torch

from ..forward import ModelForward
from ..types import Role, Rollouts


def mutual_information(score_MJ: torch.Tensor, true_M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MI, retrieval accuracy) from the cross-scores ``score_MJ`` (ℓ_j(z_m)) and each reasoning's true prompt
    ``true_M``. Hand case: N = 2, one reasoning scored [0, log(1/3)] under its true prompt 0: matched 0, marginal
    log((1 + 1/3)/2) = log(2/3), so MI = log(3/2); retrieval 1."""
    n = score_MJ.shape[1]
    matched_M = score_MJ.gather(1, true_M[:, None]).squeeze(1)
    marginal_M = torch.logsumexp(score_MJ, dim=1) - math.log(n)
    retrieved_M = score_MJ.argmax(dim=1) == true_M
    return (matched_M - marginal_M).mean(), retrieved_M.to(score_MJ.dtype).mean()


@torch.no_grad()
def cross_scores(model, prompts: list[list[int]], reasonings: list[list[int]], *, pad_id: int,
                 temperature: float = 1.0, micro_batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_MJ, mean_MJ): log π(z_m | x_j) of every reasoning under every prompt, summed over z_m's tokens and per
    token; one teacher-forced forward per (m, j) pair, micro-batched. An empty reasoning scores 0."""
    pairs = [(m, j) for m in range(len(reasonings)) for j in range(len(prompts))]
    forward = ModelForward(model)
    total = torch.zeros(len(reasonings), len(prompts), dtype=torch.float64)
    for start in range(0, len(pairs), micro_batch_size):
        chunk = pairs[start:start + micro_batch_size]
        rows = [(prompts[j], reasonings[m]) for m, j in chunk]
        width = max(len(x) + len(z) for x, z in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        role = torch.zeros((len(rows), width), dtype=torch.int8)
        for r, (x, z) in enumerate(rows):
            ids[r, : len(x) + len(z)] = torch.tensor(x + z, dtype=torch.long)
            role[r, : len(x)] = Role.PROMPT
            role[r, len(x): len(x) + len(z)] = Role.COMPLETION
        n = len(rows)
        batch = Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=torch.zeros(n, width),
                         group_N=torch.zeros(n, dtype=torch.long), problem_N=torch.zeros(n, dtype=torch.long),
                         truncated_N=torch.zeros(n, dtype=torch.bool))
        logp, _, mask = forward.logprobs(batch, temperature=temperature)
        sums = (logp.double() * mask).sum(1).cpu()
        for (m, j), v in zip(chunk, sums):
            total[m, j] = v
    lens = torch.tensor([max(len(z), 1) for z in reasonings], dtype=torch.float64)
    return total, total / lens[:, None]


def collapse_metrics(model, prompts: list[list[int]], reasonings: list[list[int]], true_M: list[int], *, pad_id: int,
                     temperature: float = 1.0, micro_batch_size: int = 64) -> dict[str, float] | None:
    """The step's MI estimates (summed over the reasoning and per token), retrieval accuracy and its chance level;
    None below 2 distinct prompts (nothing to tell apart)."""
    if len(prompts) < 2 or not reasonings:
        return None
    sum_MJ, mean_MJ = cross_scores(model, prompts, reasonings, pad_id=pad_id, temperature=temperature,
                                   micro_batch_size=micro_batch_size)
    true = torch.tensor(true_M)
    mi_seq, acc = mutual_information(sum_MJ, true)
    mi_tok, acc_tok = mutual_information(mean_MJ, true)
    return {"mi_seq": float(mi_seq), "mi_token": float(mi_tok), "mi_retrieval_acc": float(acc),
            "mi_retrieval_chance": 1 / len(prompts), "mi_upper_bound": math.log(len(prompts))}
