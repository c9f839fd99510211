"""The fork stage: fork-gated contrastive training from base rollouts, RL-free (METHODS §4, ReasonMaxxer,
arXiv 2605.06241).

base rollouts (once, cached) → select mid-pass-rate problems → clipped group advantages → gate (decision
set) → for ``epochs`` × batches: advantage-weighted cross-entropy on decision tokens + λ·KL(π_b ‖ π_θ) on
the rest → update. No sampling during training: the only generation is the base rollouts.

Departures from the paper, each a config key: τ defaults to a quantile of the base's entropies
(``fork.gate.quantile``) because an absolute τ does not transfer across vocabulary sizes; rows of a step
are shuffled per epoch by a seeded permutation; under data parallelism every rank makes the same base
rollouts (seeded) and trains on every W-th row of each step; every rank holds the whole step's gate, so
the step's decision and anchor counts, fixed before the micro-batch loop (METHODS §1), need no all-reduce.
"""

from __future__ import annotations

import math
import time

import torch

from ..algos.fork import entropy_tau, fork_advantages, fork_loss, full_kl, get_gate
from ..algos.logprobs import token_logprobs
from ..config import ConfigError
from ..sampling import HFSampler
from ..types import Role, Rollouts
from .common import (batch_indices, clip_and_step, completion_logits, end_step, finish_stage, make_optimizer,
                     micro_slices, resume_state, skip_micro_batch, stage_log)
from .fork_data import BaseRollouts, FrozenBase, base_rollouts, select_problems


def prepare(ctx, base: FrozenBase) -> tuple[BaseRollouts, torch.Tensor, torch.Tensor, dict]:
    """(training rows, their advantages adv_N, their gate gate_NT, stats) from the base rollouts."""
    cfg = ctx.cfg.fork
    data = base_rollouts(ctx, base)
    keep_N, stats = select_problems(data, lo=cfg.pass_rate_min, hi=cfg.pass_rate_max, max_problems=cfg.max_problems)
    if not keep_N.any():
        raise ConfigError(f"fork: none of the {stats['candidates']} candidate problems has a base pass rate in "
                          f"[{cfg.pass_rate_min}, {cfg.pass_rate_max}] (mean pass rate "
                          f"{stats['base_pass_rate_candidates']}); widen the window, raise fork.candidates, or "
                          "choose a task of a difficulty the base sometimes solves")
    tokens_sampled = int(data.rollouts.completion_len_N.sum())  # every candidate's, the sampling cost
    data = data.select(keep_N)
    adv_N = fork_advantages(data.reward_N, data.rollouts.group_N, data.valid_N, clip=cfg.adv_clip)
    if cfg.positive_only:  # the ablation: rows with A > 0 only, in both terms
        data, adv_N = data.select(adv_N > 0), adv_N[adv_N > 0]
    mask_NT = data.rollouts.completion_mask_NL[:, 1:]
    tau = entropy_tau(data.H_NT, mask_NT, tau=cfg.gate.tau, quantile=cfg.gate.quantile)
    gate_NT = get_gate(cfg.gate.kind)(data.H_NT, mask_NT, tau=tau, seed=ctx.cfg.seed)
    tokens = int(mask_NT.sum())
    stats.update(tau=tau, gate_share=int(gate_NT.sum()) / max(tokens, 1), rows=data.rollouts.num_rows,
                 rollout_s=data.seconds, tokens_sampled=tokens_sampled,
                 positive_rows=int((adv_N > 0).sum()), negative_rows=int((adv_N < 0).sum()))
    return data, adv_N, gate_NT, stats


def fork_update(model, base, rollouts: Rollouts, adv_N, gate_NT, *, kl_coef: float, micro_batch_size: int,
                totals: tuple[int, int], neg_floor: float | None = None, inject: str = "none",
                world_size: int = 1) -> dict[str, torch.Tensor]:
    """Accumulate one optimizer step's gradient over micro-batches; returns summed statistics.

    ``totals`` = (|D|, |¬D|) of the whole step over every rank, fixed before the loop. ``base`` has
    ``.model`` and ``.active()`` (see ``FrozenBase``). ``inject`` reproduces the historical accumulation
    bugs for ``forkrl check`` (METHODS §1): ``mean_of_means`` divides each micro-batch by its own counts."""
    sums = {k: torch.zeros((), dtype=torch.float64) for k in ("loss", "contrastive", "anchor_kl")}
    slices = micro_slices(rollouts.num_rows, micro_batch_size)
    for i, sl in enumerate(slices):
        if skip_micro_batch(inject, i):
            continue
        idx = torch.arange(rollouts.num_rows)[sl]
        mb = rollouts.select(idx)
        with torch.no_grad(), base.active():
            ref_logits, _, _ = completion_logits(base.model, mb)  # same rows: same ``start``
        logits, targets, start = completion_logits(model, mb)
        width = mb.input_ids_NL.shape[1] - 1
        mask = (mb.role_NL[:, 1:] == Role.COMPLETION)[:, start:].to(logits.device)
        gate = gate_NT[idx][:, :width][:, start:].to(logits.device)
        counts, scale = totals, 1.0
        if inject == "mean_of_means":
            counts = (int((mask & gate).sum()), int((mask & ~gate).sum()))
            scale = 1.0 / (len(slices) * world_size)
        logp = token_logprobs(logits, targets)
        kl = full_kl(ref_logits, logits)
        loss, con, anc = fork_loss(logp, kl, adv_N[idx].to(logits.device), gate, mask, kl_coef=kl_coef,
                                   total_decision=counts[0], total_anchor=counts[1], neg_floor=neg_floor,
                                   base_logp_NT=token_logprobs(ref_logits, targets) if neg_floor else None)
        (scale * loss).backward()
        for k, v in (("loss", loss), ("contrastive", con), ("anchor_kl", anc)):
            sums[k] += scale * v.detach().double().cpu()
    return sums


def step_counts(gate_NT: torch.Tensor, mask_NT: torch.Tensor) -> tuple[int, int]:
    """(|D|, |¬D|): the step's decision and anchor token counts, the fork loss's two denominators."""
    decision = gate_NT & mask_NT
    return int(decision.sum()), int((mask_NT & ~decision).sum())


def train_fork(ctx) -> dict:
    cfg, dist = ctx.cfg.fork, ctx.dist
    base = FrozenBase.for_stage(ctx)
    data, adv_N, gate_NT, stats = prepare(ctx, base)
    n_rows = data.rollouts.num_rows
    per_epoch = math.ceil(n_rows / cfg.batch_size)
    total = cfg.epochs * per_epoch
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg.optim, total)
    start = resume_state(ctx, opt, sched)
    sampler = HFSampler(ctx.model, ctx.tokenizer, batch_size=ctx.cfg.sampling.batch_size)
    log = stage_log(ctx, total, start)
    mask_NT = data.rollouts.completion_mask_NL[:, 1:]
    ctx.model.train()
    for step in range(start + 1, total + 1):
        t0 = time.time()
        epoch, j = divmod(step - 1, per_epoch)
        order = batch_indices(n_rows, n_rows, epoch, ctx.cfg.seed)  # one seeded permutation per epoch
        rows = torch.tensor(order[j * cfg.batch_size : (j + 1) * cfg.batch_size])
        totals = step_counts(gate_NT[rows], mask_NT[rows])  # every rank holds the whole step: no all-reduce
        mine = rows[dist.rank :: dist.world_size]
        sums = fork_update(ctx.model, base, data.select(mine).rollouts, adv_N[mine], gate_NT[mine],
                           kl_coef=cfg.kl_coef, micro_batch_size=cfg.micro_batch_size, totals=totals,
                           neg_floor=cfg.neg_floor, inject=ctx.cfg.debug.inject, world_size=dist.world_size)
        dist.sum_gradients(params)
        sums = {k: float(dist.all_reduce_sum(v)) for k, v in sums.items()}
        grad_norm = clip_and_step(ctx.model, opt, sched, cfg.optim.grad_clip)
        dt = time.time() - t0
        trained = int(mask_NT[rows].sum())
        metrics = {**sums, "grad_norm": grad_norm, "lr": sched.get_last_lr()[0], "epoch": epoch + 1,
                   "decision_tokens": totals[0], "anchor_tokens": totals[1], "tau": stats["tau"],
                   "gate_share": stats["gate_share"], "rows_trained": len(rows), "tokens_trained": trained,
                   "train_s": dt, "train_tokens_per_s": trained / max(dt, 1e-9),
                   "micro_batches": len(micro_slices(len(mine), cfg.micro_batch_size)), "world_size": dist.world_size}
        end_step(ctx, sampler, log, step, cfg, metrics, opt, sched, total=total)
    result = finish_stage(ctx, sampler, log, total)
    return {**result, **stats, "tokens_trained": int(mask_NT.sum()) * cfg.epochs}
