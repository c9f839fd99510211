"""Supervised fine-tuning on demonstrations: completion-only loss, named reduction, global denominator.

The loss of a step is ``reduce_loss(-log π(y_t), mask, mode, totals)`` where the totals (tokens and
sequences of the whole optimizer step) are fixed before the micro-batch loop, so the gradient does not
depend on how the step is split (METHODS §1).
"""

from __future__ import annotations

import time

import torch

from ..algos.reductions import reduce_loss
from ..sampling import HFSampler
from ..tasks.base import TaskError
from ..types import Role, Rollouts
from .common import (batch_indices, clip_and_step, completion_logprobs, end_step, finish_stage, global_totals,
                     make_optimizer, micro_denominators, micro_slices, resume_state, skip_micro_batch, stage_log)


def pack(examples: list[tuple[list[int], list[int]]], pad_id: int) -> Rollouts:
    """(prompt ids, completion ids) pairs as a right-padded batch with PROMPT/COMPLETION roles."""
    width = max(len(p) + len(c) for p, c in examples)
    N = len(examples)
    ids = torch.full((N, width), pad_id, dtype=torch.long)
    role = torch.full((N, width), int(Role.PAD), dtype=torch.int8)
    for r, (p, c) in enumerate(examples):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        role[r, : len(p)] = Role.PROMPT
        role[r, len(p) : len(p) + len(c)] = Role.COMPLETION
    zeros = torch.zeros(N, dtype=torch.long)
    return Rollouts(ids, role, torch.zeros(N, width), torch.arange(N), zeros, zeros.bool())


def encode_demonstrations(ctx) -> list[tuple[list[int], list[int]]]:
    demos = ctx.task.demonstrations("train")
    if not demos:
        raise TaskError(f"task {ctx.task.name!r} has no demonstrations for the sft stage")
    eos = ctx.tokenizer.eos_token_id
    return [(ctx.encode_prompt(p.prompt), ctx.tokenizer(c, add_special_tokens=False).input_ids + [eos])
            for p, c in demos]


def sft_step(model, batch: Rollouts, *, reduction: str, t_max: int, micro_batch_size: int,
             totals: tuple[int, int], inject: str = "none", world_size: int = 1) -> torch.Tensor:
    """Accumulate this rank's gradient of one optimizer step; returns its share of the loss (detached).

    ``totals`` are the whole step's (tokens, sequences) over every rank, fixed before the loop."""
    slices = micro_slices(batch.num_rows, micro_batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, sl in enumerate(slices):
        if skip_micro_batch(inject, i):
            continue
        mb = batch.select(torch.arange(batch.num_rows)[sl])
        logp_NT, _, mask_NT = completion_logprobs(model, mb)
        tokens, seqs, scale = micro_denominators(inject, totals, mask_NT, len(slices), world_size)
        loss = scale * reduce_loss(-logp_NT, mask_NT, reduction, total_tokens=tokens, total_seqs=seqs, t_max=t_max)
        loss.backward()
        loss_sum += loss.detach().double().cpu()
    return loss_sum


def train_sft(ctx) -> dict:
    cfg, dist = ctx.cfg.sft, ctx.dist
    examples = encode_demonstrations(ctx)
    t_max = cfg.t_max or max(len(c) for _, c in examples)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg.optim, cfg.steps)
    start = resume_state(ctx, opt, sched)
    sampler = HFSampler(ctx.model, ctx.tokenizer, batch_size=ctx.cfg.sampling.batch_size,
                        engine=ctx.cfg.sampling.engine)
    log = stage_log(ctx, cfg.steps, start)
    shard = dist.shard(cfg.batch_size, "sft.batch_size")
    ctx.model.train()
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.time()
        rows = batch_indices(len(examples), cfg.batch_size, step - 1, ctx.cfg.seed)[shard]
        batch = pack([examples[i] for i in rows], ctx.tokenizer.pad_token_id)
        totals = global_totals(batch.completion_mask_NL, dist)
        loss = sft_step(ctx.model, batch, reduction=cfg.reduction, t_max=t_max, micro_batch_size=cfg.micro_batch_size,
                        totals=totals, inject=ctx.cfg.debug.inject, world_size=dist.world_size)
        dist.sum_gradients(params)
        grad_norm = clip_and_step(ctx.model, opt, sched, cfg.optim.grad_clip)
        dt = time.time() - t0
        metrics = {"loss": float(dist.all_reduce_sum(loss)), "grad_norm": grad_norm, "lr": sched.get_last_lr()[0],
                   "tokens": totals[0], "train_s": dt, "train_tokens_per_s": totals[0] / dt,
                   "denominator": "tokens" if cfg.reduction == "token_mean" else "sequences",
                   "denominator_value": totals[0] if cfg.reduction == "token_mean" else totals[1],
                   "micro_batches": len(micro_slices(batch.num_rows, cfg.micro_batch_size)),
                   "world_size": dist.world_size}
        end_step(ctx, sampler, log, step, cfg, metrics, opt, sched)
    return finish_stage(ctx, sampler, log, cfg.steps)
