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

``fork.reweight`` (off by default, on in the demo; not in the paper): at the start of every epoch after the
first, each problem's advantage baseline and spread are re-estimated under the current policy π_θ from the
same base rollouts, by self-normalised importance weights w_i ∝ π_θ,T(y_i) / π_b,T(y_i) (whole-sequence
ratio at the rollouts' temperature T). Why: with base-only advantages a strategy whose base accuracy is near
the problem's base pass rate keeps an advantage near 0, so it is never pushed down, although the policy has
meanwhile learned a better one; GRPO sees the rising pass rate because it samples again. Reweighting sees it
without sampling (one no-grad forward over the rows per epoch). The rows' loss weights are unchanged: only
the advantages move. The mean effective sample size (Σw)² / Σw² per group is logged as ``ess``.
"""

from __future__ import annotations

import math
import time

import torch
from safetensors.torch import load_file

from ..algos.fork import entropy_tau, fork_advantages, fork_loss, full_kl, get_gate, reweighted_advantages
from ..algos.logprobs import token_logprobs
from ..checkpoint import atomic_save_tensors
from ..config import ConfigError
from ..forward import ModelForward
from ..types import Role, Rollouts
from .accumulate import EXACT, Plan, accumulate, micro_slices, parts
from .data import batch_indices
from .fork_data import BaseRollouts, FrozenBase, base_rollouts, select_problems
from .loop import StageLoop, TrainingError


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


REF_CACHE_BYTES = 1 << 30  # the base's logits over the stage's rows are held in memory up to this size
NO_GRAD_LOGITS_BYTES = 256 << 20  # a no-grad pass takes as many rows at once as keep its logits under this


def no_grad_rows(model, rollouts: Rollouts, micro_batch_size: int) -> int:
    """Rows per forward for a pass without gradients: at least ``micro_batch_size``, and more while their
    logits [rows, L, V] stay under ``NO_GRAD_LOGITS_BYTES`` (no activations are kept, and on a CPU one large
    forward costs much less than several small ones)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    per_row = rollouts.input_ids_NL.shape[1] * vocab * 4
    return max(micro_batch_size, NO_GRAD_LOGITS_BYTES // max(per_row, 1))


@torch.no_grad()
def base_logits(base, rollouts: Rollouts, micro_batch_size: int) -> torch.Tensor | None:
    """The frozen base's logits [N, L-1, V] at every target position of every row, computed once for all
    epochs instead of at every step (they never change). Positions before a micro-batch's first completion
    target are 0 (prompt positions: masked out of the loss). None when they would exceed ``REF_CACHE_BYTES``
    (a real vocabulary and real lengths): ``fork_update`` then recomputes them per micro-batch."""
    n, length = rollouts.input_ids_NL.shape
    out = None
    with base.active():
        for sl in micro_slices(n, no_grad_rows(base.model, rollouts, micro_batch_size)):
            logits, _, start = ModelForward(base.model).logits(rollouts, torch.arange(n)[sl])
            if out is None:
                if n * (length - 1) * logits.shape[-1] * 4 > REF_CACHE_BYTES:
                    return None
                out = torch.zeros(n, length - 1, logits.shape[-1], dtype=torch.float32, device=logits.device)
            out[sl, start : start + logits.shape[1]] = logits.float()
    return out


class ForkStepLoss:
    """The fork loss (``algos.fork.fork_loss``) of the rows of ``rollouts`` a micro-batch holds: the policy's logits,
    the frozen base's (from ``ref_logits_NTV``, the cache of ``base_logits``, or a forward of ``base``), the exact
    KL between them off the decision set ``gate_NT``."""

    def __init__(self, model, base, rollouts: Rollouts, adv_N, gate_NT, *, kl_coef: float,
                 neg_floor: float | None, ref_logits_NTV: torch.Tensor | None):
        self.policy, self.base, self.rollouts = ModelForward(model), base, rollouts
        self.adv_N, self.gate_NT = adv_N, gate_NT
        self.kl_coef, self.neg_floor, self.ref_logits_NTV = kl_coef, neg_floor, ref_logits_NTV

    def counts(self, rows_N):
        mask_NT = self.rollouts.completion_mask_NL[rows_N, 1:]
        decision = self.gate_NT[rows_N][:, : mask_NT.shape[1]] & mask_NT
        return int(decision.sum()), int((mask_NT & ~decision).sum())

    def __call__(self, rows_N, totals):
        mb = self.rollouts.select(rows_N)
        logits, targets, start = self.policy.logits(mb)
        width = mb.input_ids_NL.shape[1] - 1
        if self.ref_logits_NTV is not None:
            ref_logits = self.ref_logits_NTV[rows_N][:, start:width].to(logits.device)
        else:
            with torch.no_grad(), self.base.active():
                ref_logits, _, _ = ModelForward(self.base.model).logits(mb)  # same rows: same ``start``
        mask = (mb.role_NL[:, 1:] == Role.COMPLETION)[:, start:].to(logits.device)
        gate = self.gate_NT[rows_N][:, :width][:, start:].to(logits.device)
        logp = token_logprobs(logits, targets)
        kl = full_kl(ref_logits, logits)
        loss, con, anc = fork_loss(logp, kl, self.adv_N[rows_N].to(logits.device), gate, mask, kl_coef=self.kl_coef,
                                   total_decision=totals[0], total_anchor=totals[1], neg_floor=self.neg_floor,
                                   base_logp_NT=token_logprobs(ref_logits, targets) if self.neg_floor else None)
        return loss, {"contrastive": con, "anchor_kl": anc}


def fork_update(model, base, rollouts: Rollouts, adv_N, gate_NT, *, kl_coef: float, micro_batch_size: int,
                totals: tuple[int, int], neg_floor: float | None = None, plan: Plan = EXACT,
                world_size: int = 1, ref_logits_NTV: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Accumulate one optimizer step's gradient over micro-batches; returns summed statistics.

    ``totals`` = (|D|, |¬D|) of the whole step over every rank, fixed before the loop. ``base`` has
    ``.model`` and ``.active()`` (see ``FrozenBase``); ``ref_logits_NTV``, the base's logits of these rows
    (``base_logits``), saves its forward."""
    loss = ForkStepLoss(model, base, rollouts, adv_N, gate_NT, kl_coef=kl_coef, neg_floor=neg_floor,
                        ref_logits_NTV=ref_logits_NTV)
    sums = accumulate(parts(torch.arange(rollouts.num_rows), micro_batch_size), loss, totals, plan=plan,
                      world_size=world_size)
    return {k: sums.get(k, torch.zeros((), dtype=torch.float64)) for k in ("loss", "contrastive", "anchor_kl")}


@torch.no_grad()
def policy_logratio(model, rollouts: Rollouts, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """logw_N = Σ_t [log π_θ,T(y_t) − log π_b,T(y_t)] over each row's completion: the sequence importance
    log-weight of a base rollout under the current policy, both tempered at the rollouts' temperature
    (the base's tempered log-probs are the sampler's, stored with the rollouts)."""
    out = torch.zeros(rollouts.num_rows, dtype=torch.float64)
    was_training = model.training
    model.eval()
    forward = ModelForward(model)
    for sl in micro_slices(rollouts.num_rows, no_grad_rows(model, rollouts, micro_batch_size)):
        mb = rollouts.select(torch.arange(rollouts.num_rows)[sl])
        logp_NT, _, mask_NT = forward.logprobs(mb, temperature=temperature)
        diff = (logp_NT.double().cpu() - mb.sampler_logp_NL[:, 1:].double()) * mask_NT.cpu()
        out[sl] = diff.sum(1)
    model.train(was_training)
    return out


def epoch_log_weights(ctx, rollouts: Rollouts, epoch: int, *, fresh: bool) -> torch.Tensor:
    """``fork.reweight``: each row's importance log-weight under the policy as it stands at the start of
    ``epoch`` (0-based). Computed at the epoch's first step and written to
    ``<stage>/reweight-epoch{epoch + 1}.safetensors`` (1-based, as the metrics' ``epoch``); a run resumed
    inside the epoch reads it back, so its advantages are those of the uninterrupted run."""
    path = ctx.stage_dir / f"reweight-epoch{epoch + 1}.safetensors"
    if not fresh:
        if not path.exists():
            raise TrainingError(f"fork.reweight: resuming inside epoch {epoch + 1}, but {path} (the importance "
                                "weights taken at that epoch's start) is missing; restart the stage without --resume")
        return load_file(str(path))["logw_N"]
    cfg = ctx.cfg.fork
    logw_N = policy_logratio(ctx.model, rollouts, cfg.temperature, cfg.micro_batch_size)
    if ctx.dist.is_main:
        atomic_save_tensors({"logw_N": logw_N}, path)
    return logw_N


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
    loop = StageLoop(ctx, steps=total, optim=cfg.optim, eval_every=cfg.eval_every)
    mask_NT = data.rollouts.completion_mask_NL[:, 1:]
    ref_NTV = base_logits(base, data.rollouts, cfg.micro_batch_size)
    ctx.train_model.train()
    adv_base_N, ess = adv_N, None
    for step in loop.steps():
        t0 = time.time()
        epoch, j = divmod(step - 1, per_epoch)
        if cfg.reweight and epoch > 0 and (j == 0 or step == loop.start + 1):
            logw_N = epoch_log_weights(ctx, data.rollouts, epoch, fresh=j == 0)
            adv_N, ess_N = reweighted_advantages(data.reward_N, data.rollouts.group_N, data.valid_N, logw_N,
                                                 clip=cfg.adv_clip)
            if cfg.positive_only:  # the rows stay those with A > 0 under the base; their sign may not flip
                adv_N = adv_N.clamp(min=0)
            ess = float(ess_N.mean())
        order = batch_indices(n_rows, n_rows, epoch, ctx.cfg.seed)  # one seeded permutation per epoch
        rows = torch.tensor(order[j * cfg.batch_size : (j + 1) * cfg.batch_size])
        totals = step_counts(gate_NT[rows], mask_NT[rows])  # every rank holds the whole step: no all-reduce
        mine = rows[dist.rank :: dist.world_size]
        sums = fork_update(ctx.train_model, base, data.select(mine).rollouts, adv_N[mine], gate_NT[mine],
                           kl_coef=cfg.kl_coef, micro_batch_size=cfg.micro_batch_size, totals=totals,
                           neg_floor=cfg.neg_floor, plan=ctx.plan, world_size=dist.world_size,
                           ref_logits_NTV=None if ref_NTV is None else ref_NTV[mine])
        sums = {k: float(dist.all_reduce_sum(v)) for k, v in sums.items()}
        grad_norm = loop.optimizer_step()
        dt = time.time() - t0
        trained = int(mask_NT[rows].sum())
        metrics = {**sums, "grad_norm": grad_norm, "lr": loop.lr, "epoch": epoch + 1,
                   "decision_tokens": totals[0], "anchor_tokens": totals[1], "tau": stats["tau"],
                   "gate_share": stats["gate_share"], "ess": ess, "rows_trained": len(rows), "tokens_trained": trained,
                   "train_s": dt, "train_tokens_per_s": trained / max(dt, 1e-9),
                   "micro_batches": len(micro_slices(len(mine), cfg.micro_batch_size)), "world_size": dist.world_size}
        loop.end_step(step, metrics)
    result = loop.finish()
    moved = float((adv_N - adv_base_N).abs().mean())  # how far the last epoch's advantages moved from the base's
    return {**result, **stats, "tokens_trained": int(mask_NT.sum()) * cfg.epochs,
            "reweight_ess": ess, "reweight_adv_shift": moved if cfg.reweight else None}
