"""Supervised fine-tuning on demonstrations: completion-only loss, named reduction, global denominator.

The loss of a step is ``reduce_loss(-log π(y_t), mask, mode, totals)`` where the totals (tokens and
sequences of the whole optimizer step) are fixed before the micro-batch loop, so the gradient does not
depend on how the step is split (METHODS §1).
"""

from __future__ import annotations

import time

import torch

from ..algos.reductions import reduce_loss, step_totals
from ..sampling import HFSampler
from ..tasks.base import TaskError
from ..types import Role, Rollouts
from .common import (MetricsLog, batch_indices, clip_and_step, completion_logprobs, end_step, finish_stage,
                     make_optimizer, micro_slices, resume_state)


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


def sft_step(model, batch: Rollouts, *, reduction: str, t_max: int, micro_batch_size: int) -> torch.Tensor:
    """Accumulate the gradient of one optimizer step; returns the step's loss (detached)."""
    total_tokens, total_seqs = step_totals(batch.completion_mask_NL)
    loss_sum = torch.zeros(())
    for sl in micro_slices(batch.num_rows, micro_batch_size):
        logp_NT, _, mask_NT = completion_logprobs(model, batch.select(torch.arange(batch.num_rows)[sl]))
        loss = reduce_loss(-logp_NT, mask_NT, reduction, total_tokens=total_tokens, total_seqs=total_seqs,
                           t_max=t_max)
        loss.backward()
        loss_sum += loss.detach().cpu()
    return loss_sum


def train_sft(ctx) -> dict:
    cfg = ctx.cfg.sft
    examples = encode_demonstrations(ctx)
    t_max = cfg.t_max or max(len(c) for _, c in examples)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg.optim, cfg.steps)
    start = resume_state(ctx, opt, sched)
    sampler = HFSampler(ctx.model, ctx.tokenizer, batch_size=ctx.cfg.sampling.batch_size)
    log = MetricsLog(ctx.run_dir / "metrics.jsonl", stage=ctx.stage_dir.name, total=cfg.steps, start=start,
                     log_every=ctx.cfg.log_every)
    ctx.model.train()
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.time()
        batch = pack([examples[i] for i in batch_indices(len(examples), cfg.batch_size, step - 1, ctx.cfg.seed)],
                     ctx.tokenizer.pad_token_id)
        loss = sft_step(ctx.model, batch, reduction=cfg.reduction, t_max=t_max, micro_batch_size=cfg.micro_batch_size)
        grad_norm = clip_and_step(ctx.model, opt, sched, cfg.optim.grad_clip)
        tokens = int(batch.completion_mask_NL.sum())
        dt = time.time() - t0
        metrics = {"loss": float(loss), "grad_norm": grad_norm, "lr": sched.get_last_lr()[0],
                   "tokens": tokens, "train_s": dt, "train_tokens_per_s": tokens / dt,
                   "denominator": "tokens" if cfg.reduction == "token_mean" else "sequences",
                   "micro_batches": len(micro_slices(batch.num_rows, cfg.micro_batch_size))}
        end_step(ctx, sampler, log, step, cfg, metrics, opt, sched)
    return finish_stage(ctx, sampler, log, cfg.steps)
