"""Supervised fine-tuning on demonstrations: completion-only loss, named reduction, global denominator.

The loss of a step is ``reduce_loss(-log π(y_t), mask, mode, totals)`` where the totals (tokens and
sequences of the whole optimizer step) are fixed before the micro-batch loop, so the gradient does not
depend on how the step is split (METHODS §1).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..algos.reductions import reduce_loss
from ..forward import ModelForward
from ..tasks.base import TaskError, describe
from ..types import Role, Rollouts
from . import curriculum
from .accumulate import EXACT, Plan, accumulate, completion_counts, global_totals, micro_slices, parts
from .data import batch_indices
from .loop import StageLoop


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
    return [(ctx.encode_prompt(p.prompt, where=describe(p)),
             ctx.tokenizer(c, add_special_tokens=False).input_ids + [eos]) for p, c in demos]


def episode_demonstrations(ctx):
    """An env task's demonstrations replayed through the environment (``envs.episodes.replay``), each a row with
    its actions as COMPLETION and its observations as ENV: the rows ``run_episodes`` would have built."""
    from ..envs.episodes import make_codec, replay

    demos = ctx.task.episode_demos("train")
    if not demos:
        raise TaskError(f"task {ctx.task.name!r} has no demonstrations for the sft stage")
    codec = make_codec(ctx.task, ctx.tokenizer)
    return [replay(ctx.task, codec, d) for d in demos]


def pack_episodes(episodes, pad_id: int, *, observations: str) -> Rollouts:
    """Replayed demonstrations as a batch; ``observations: train`` makes the ENV tokens targets of the loss too."""
    from ..envs.episodes import episode_rollouts

    batch = episode_rollouts(episodes, pad_id=pad_id, group_size=1)
    if observations == "train":
        role = batch.role_NL.clone()
        role[role == int(Role.ENV)] = int(Role.COMPLETION)
        batch = dataclasses.replace(batch, role_NL=role)
    return batch


class SftLoss:
    """The step loss of ``accumulate``: reduce(−log π(y_t)) over the rows of ``batch`` a micro-batch holds."""

    def __init__(self, forward, batch: Rollouts, *, reduction: str, t_max: int):
        self.forward, self.batch, self.reduction, self.t_max = forward, batch, reduction, t_max

    def counts(self, rows_N):
        return completion_counts(self.batch, rows_N)

    def __call__(self, rows_N, totals):
        logp_NT, _, mask_NT = self.forward.logprobs(self.batch, rows_N)
        loss = reduce_loss(-logp_NT, mask_NT, self.reduction, total_tokens=totals[0], total_seqs=totals[1],
                           t_max=self.t_max)
        return loss, {}


def sft_step(model, batch: Rollouts, *, reduction: str, t_max: int, micro_batch_size: int,
             totals: tuple[int, int], plan: Plan = EXACT, world_size: int = 1) -> torch.Tensor:
    """Accumulate this rank's gradient of one optimizer step; returns its share of the loss (detached).

    ``totals`` are the whole step's (tokens, sequences) over every rank, fixed before the loop."""
    loss = SftLoss(ModelForward(model), batch, reduction=reduction, t_max=t_max)
    micro = parts(torch.arange(batch.num_rows), micro_batch_size)
    return accumulate(micro, loss, totals, plan=plan, world_size=world_size)["loss"]


def train_sft(ctx) -> dict:
    cfg, dist = ctx.cfg.sft, ctx.dist
    if getattr(ctx.task, "multi_turn", False):
        examples = episode_demonstrations(ctx)
        batch_of = lambda rows: pack_episodes(rows, ctx.tokenizer.pad_token_id,  # noqa: E731
                                              observations=cfg.observations)
        t_max = cfg.t_max or max(int(batch_of([e]).completion_mask_NL.sum()) for e in examples)
    else:
        examples = encode_demonstrations(ctx)
        batch_of = lambda rows: pack(rows, ctx.tokenizer.pad_token_id)  # noqa: E731
        t_max = cfg.t_max or max(len(c) for _, c in examples)
    ppl = order = None
    if cfg.order != "shuffle":  # the curriculum: the starting model's perplexities, before any step
        ppl = curriculum.load_or_score(ctx, lambda idx: batch_of([examples[i] for i in idx]), len(examples),
                                       cfg.micro_batch_size)
        order = curriculum.curriculum_order(ppl, cfg.order)
    loop = StageLoop(ctx, steps=cfg.steps, optim=cfg.optim, eval_every=cfg.eval_every)
    shard = dist.shard(cfg.batch_size, "sft.batch_size")
    ctx.train_model.train()
    for step in loop.steps():
        t0 = time.time()
        step_rows = (curriculum.ordered_indices(order, cfg.batch_size, step - 1) if order is not None else
                     batch_indices(len(examples), cfg.batch_size, step - 1, ctx.cfg.seed))
        rows = step_rows[shard]
        batch = batch_of([examples[i] for i in rows])
        totals = global_totals(batch.completion_mask_NL, dist)
        loss = sft_step(ctx.train_model, batch, reduction=cfg.reduction, t_max=t_max, micro_batch_size=cfg.micro_batch_size,
                        totals=totals, plan=ctx.plan, world_size=dist.world_size)
        grad_norm = loop.optimizer_step()
        dt = time.time() - t0
        metrics = {"loss": float(dist.all_reduce_sum(loss)), "grad_norm": grad_norm, "lr": loop.lr,
                   "tokens": totals[0], "train_s": dt, "train_tokens_per_s": totals[0] / dt,
                   "denominator": "tokens" if cfg.reduction == "token_mean" else "sequences",
                   "denominator_value": totals[0] if cfg.reduction == "token_mean" else totals[1],
                   "micro_batches": len(micro_slices(batch.num_rows, cfg.micro_batch_size)),
                   "world_size": dist.world_size,
                   # the step's examples' perplexity under the starting model: the curriculum, seen step by step
                   "batch_start_ppl": sum(ppl[i] for i in step_rows) / len(step_rows) if ppl is not None else None}
        loop.end_step(step, metrics)
    result = loop.finish()
    return {**result, **({"order": cfg.order, "start_ppl": curriculum.summary(ppl)} if ppl is not None else {})}
