"""GRPO-family trainer (METHODS §2): sample → score → advantages → filter → loss → update → stats.

The math is in ``forkrl.algos`` (pure functions); this module composes it. Choices the papers leave
open, made here and named in the config:

* old log-probs: with μ = 1 the ratio's denominator is the current log-prob detached (exactly the
  on-policy gradient, no extra forward); with μ > 1, or a KL penalty in the reward, they are recomputed
  by one no-grad forward before the first update and reused for all μ iterations.
* each of the μ inner iterations is one optimizer step over the whole batch (micro-batched).
* KL in the reward subtracts β · Σ_t kl_t (per row, detached) before advantages are computed.
* a reference model is loaded only when β > 0; under LoRA it is the adapter-disabled base.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from ..algos.advantages import get_advantage
from ..algos.filters import zero_variance_groups
from ..algos.kl import get_kl
from ..algos.objectives import get_objective
from ..algos.reductions import reduce_loss
from ..models import load_model
from ..rewards import check_rewards, score_rollouts
from ..sampling import HFSampler
from ..types import Rollouts
from .common import (batch_indices, clip_and_step, completion_logprobs, decode_completions, end_step,
                     finish_stage, global_totals, make_optimizer, micro_denominators, micro_slices, resume_state,
                     row_seeds, sampling_params, skip_micro_batch, stage_log, stage_sums)


def _fit(t_NT: torch.Tensor, like_NT: torch.Tensor) -> torch.Tensor:
    """Trim a full-batch [N, T] tensor to a micro-batch's width (select() drops trailing padding)."""
    return t_NT[:, : like_NT.shape[1]].to(like_NT.device)


@torch.no_grad()
def frozen_logprobs(model, batch: Rollouts, *, temperature: float, micro_batch_size: int, adapter_off: bool):
    """log-probs of ``batch`` under a frozen model (reference or old policy), micro-batched."""
    ctx = model.disable_adapter() if adapter_off else nullcontext()
    out = torch.zeros(batch.num_rows, batch.input_ids_NL.shape[1] - 1)
    with ctx:
        for sl in micro_slices(batch.num_rows, micro_batch_size):
            logp, _, _ = completion_logprobs(model, batch.select(torch.arange(batch.num_rows)[sl]),
                                             temperature=temperature)
            out[sl, : logp.shape[1]] = logp.float().cpu()
    return out


def policy_update(model, batch: Rollouts, adv_N, old_logp_NT, ref_logp_NT, cfg, *, temperature: float,
                  t_max: int, totals: tuple[int, int], inject: str = "none", world_size: int = 1,
                  trace=None, rows_N: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Accumulate this rank's gradient of one optimizer step over micro-batches; returns summed statistics.

    ``totals`` are the whole step's (tokens, sequences) over every rank, fixed before the loop (METHODS §1).
    ``trace``: the sampler's ``RolloutTrace`` of the rows ``rows_N`` that make up ``batch``; the log-probs are
    then replayed from the decode instead of a forward of ``model`` (same values and gradient, tested).

    Rows whose advantage is exactly 0 contribute exactly 0 to the loss and its gradient when nothing else in
    the loss reaches them (see ``zero_advantage_skippable``): they keep their place in the denominators (the
    totals), and their statistics (entropy, KL, log-prob mismatch) are still computed, by a no-grad pass, but
    they get no backward. The gradient equals the full batch's to float rounding (tests/test_trainer_parts.py)."""
    objective = get_objective(cfg.objective)
    kl_fn = get_kl(cfg.kl.estimator) if cfg.kl.active else None
    eps_low, eps_high = (cfg.eps_low, cfg.eps_high) if cfg.clip else (float("inf"), float("inf"))
    sums = {k: torch.zeros((), dtype=torch.float64) for k in
            ("loss", "entropy", "kl", "clip_low", "clip_high", "logp_mismatch")}
    rows = torch.arange(batch.num_rows)
    idle_N = torch.zeros(batch.num_rows, dtype=torch.bool)
    if zero_advantage_skippable(cfg, inject):
        idle_N = (adv_N == 0).cpu()
    live, idle = rows[~idle_N], rows[idle_N]
    # live rows first, then the idle ones in micro-batches of their own; without idle rows this is the plain split
    slices = [(live[sl], True) for sl in micro_slices(len(live), cfg.micro_batch_size)]
    slices += [(idle[sl], False) for sl in micro_slices(len(idle), cfg.micro_batch_size)]
    sums["rows_no_backward"] = torch.tensor(float(len(idle)), dtype=torch.float64)
    for i, (idx, grad) in enumerate(slices):
        if skip_micro_batch(inject, i):
            continue
        mb = batch.select(idx)
        entropy = "grad" if cfg.entropy_coef > 0 else "metric"
        with torch.enable_grad() if grad else torch.no_grad():
            if trace is not None:
                logp, H, mask = trace.completion_logprobs(mb, rows_N[idx], temperature=temperature, entropy=entropy)
            else:
                logp, H, mask = completion_logprobs(model, mb, temperature=temperature, entropy=entropy)
        old = logp.detach() if old_logp_NT is None else _fit(old_logp_NT[idx], logp)
        loss_NT, clip_low, clip_high = objective(logp, old, adv_N[idx].to(logp.device), mask,
                                                 eps_low=eps_low, eps_high=eps_high, dual_clip=cfg.dual_clip)
        kl_NT = kl_fn(logp, _fit(ref_logp_NT[idx], logp)) if kl_fn is not None else torch.zeros_like(logp)
        if cfg.kl.active and cfg.kl.where == "loss":
            loss_NT = loss_NT + cfg.kl.beta * kl_NT
        if cfg.entropy_coef > 0:
            loss_NT = loss_NT - cfg.entropy_coef * H
        tokens, seqs, scale = micro_denominators(inject, totals, mask, len(slices), world_size)
        loss = scale * reduce_loss(loss_NT, mask, cfg.reduction, total_tokens=tokens, total_seqs=seqs, t_max=t_max)
        if grad:
            loss.backward()
        m = mask.double()
        sampler_logp = mb.sampler_logp_NL[:, 1:].to(logp.device)
        for key, val in (("entropy", H), ("kl", kl_NT), ("clip_low", clip_low), ("clip_high", clip_high),
                         ("logp_mismatch", (logp.detach() - sampler_logp).abs())):
            sums[key] += (val.detach().double() * m).sum().cpu()
        sums["loss"] += loss.detach().double().cpu()
    if not len(live):  # the full batch's backward would have left zeros, which AdamW still steps on (momentum, decay)
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return sums


def zero_advantage_skippable(cfg, inject: str) -> bool:
    """Whether a row with advantage 0 has exactly zero loss and gradient: both objectives are −A·(a function of
    the ratio), and their clip flags need A ≠ 0, so it holds unless a KL or entropy term is in the loss (or a
    fault injection, which must see the step as written)."""
    kl_in_loss = cfg.kl.active and cfg.kl.where == "loss"
    return (cfg.skip_zero_advantage and cfg.objective in ("ppo_clip", "gspo") and not kl_in_loss
            and cfg.entropy_coef == 0 and inject == "none")


def train_grpo(ctx) -> dict:
    cfg, run_cfg, dist = ctx.cfg.grpo, ctx.cfg, ctx.dist
    problems = list(ctx.task.problems("train"))
    check_rewards(ctx.task, [r.name for r in cfg.rewards])
    lora = run_cfg.model.lora.enabled
    ref_model = None
    if cfg.kl.active and not lora:
        ref_model = load_model(str(ctx.init_path), dtype=next(ctx.model.parameters()).dtype).to(ctx.device).eval()
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg.optim, cfg.steps * cfg.inner_iterations)
    start = resume_state(ctx, opt, sched)
    sampler = HFSampler(ctx.model, ctx.tokenizer, batch_size=run_cfg.sampling.batch_size,
                         engine=run_cfg.sampling.engine)
    log = stage_log(ctx, cfg.steps, start)
    shard = dist.shard(cfg.prompts_per_step, "grpo.prompts_per_step")
    prompt_cache: dict[int, list[int]] = {}
    for step in range(start + 1, cfg.steps + 1):
        pick = batch_indices(len(problems), cfg.prompts_per_step, step - 1, run_cfg.seed)[shard]
        step_problems = [problems[i] for i in pick]
        prompt_ids = [prompt_cache.setdefault(i, ctx.encode_prompt(problems[i].prompt)) for i in pick]
        seeds = row_seeds(f"grpo:{run_cfg.seed}:{step}", pick, cfg.group_size)
        metrics = grpo_step(ctx, sampler, ref_model, opt, sched, step_problems, prompt_ids, seeds, step)
        end_step(ctx, sampler, log, step, cfg, metrics, opt, sched)
    return {**finish_stage(ctx, sampler, log, cfg.steps), **stage_sums(ctx, ("tokens_sampled", "tokens_trained"))}


def grpo_step(ctx, sampler, ref_model, opt, sched, step_problems, prompt_ids, seeds, step: int) -> dict:
    """One GRPO step, top to bottom, on this rank's shard of the step's prompts."""
    cfg, run_cfg, dist = ctx.cfg.grpo, ctx.cfg, ctx.dist
    temperature = run_cfg.sampling.temperature
    t0 = time.time()
    if cfg.reuse_decode:  # trace: the decode's record for the update to replay, or None where it does not apply
        rollouts, trace = sampler.sample(prompt_ids, cfg.group_size, sampling_params(run_cfg), seeds=seeds, trace=True)
    else:
        rollouts, trace = sampler.sample(prompt_ids, cfg.group_size, sampling_params(run_cfg), seeds=seeds), None
    sample_s = time.time() - t0
    texts = decode_completions(ctx.tokenizer, rollouts)
    scored, failures = score_rollouts(rollouts, texts, step_problems, ctx.task,
                                      [(r.name, r.weight) for r in cfg.rewards], seeds=seeds,
                                      timeout_s=cfg.reward_timeout_s)
    t1 = time.time()
    old_logp, ref_logp = frozen_passes(ctx, ref_model, rollouts)
    reward_N = scored.reward_N
    if cfg.kl.active and cfg.kl.where == "reward":
        kl_N = (get_kl(cfg.kl.estimator)(old_logp, ref_logp) * rollouts.completion_mask_NL[:, 1:]).sum(1)
        reward_N = reward_N - cfg.kl.beta * kl_N
    # Advantages over the whole step (every rank's rows): exact for batch-level statistics too.
    group_N = rollouts.group_N + dist.rank * len(step_problems)
    adv_all = get_advantage(cfg.advantage)(dist.all_gather(reward_N), dist.all_gather(group_N),
                                           dist.all_gather(scored.valid_N), eps=cfg.adv_eps)
    adv_N = adv_all[dist.shard(len(adv_all), "rows per step")]
    # Zero variance is judged on the task reward: a KL-in-reward term would make every group look informative.
    zero_var = ~zero_variance_groups(scored.reward_N, rollouts.group_N, scored.valid_N)
    keep_N = ~zero_var if cfg.filter_zero_variance else torch.ones_like(zero_var)
    batch = rollouts.select(keep_N)
    totals = global_totals(batch.completion_mask_NL, dist)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    stats = {}
    for it in range(cfg.inner_iterations if totals[1] else 0):
        stats = policy_update(ctx.model, batch, adv_N[keep_N], _rows(old_logp, keep_N), _rows(ref_logp, keep_N), cfg,
                              temperature=temperature, t_max=cfg.t_max or run_cfg.sampling.max_new_tokens,
                              totals=totals, inject=run_cfg.debug.inject, world_size=dist.world_size,
                              trace=trace if it == 0 else None, rows_N=keep_N.nonzero().squeeze(1))
        dist.sum_gradients(params)
        stats = {k: dist.all_reduce_sum(v) for k, v in stats.items()}
        stats["grad_norm"] = clip_and_step(ctx.model, opt, sched, cfg.optim.grad_clip)
    stats["tokens"] = totals[0]
    stats["replayed_decode"] = trace is not None and totals[1] > 0
    del trace  # its record is the step's largest allocation
    train_s = time.time() - t1
    gathered = {k: dist.all_gather(v) for k, v in (
        ("reward", scored.reward_N), ("valid", scored.valid_N), ("adv", adv_N), ("keep", keep_N),
        ("len", rollouts.completion_len_N), ("truncated", rollouts.truncated_N), ("zero_var", zero_var),
        ("group", group_N), *((f"reward/{k}", v) for k, v in scored.components.items()))}
    return step_metrics(gathered, stats, failures, cfg, dist.world_size,
                        sample_s=sample_s, train_s=train_s, lr=sched.get_last_lr()[0])


def _rows(t_NT: torch.Tensor | None, keep_N: torch.Tensor) -> torch.Tensor | None:
    return t_NT[keep_N] if t_NT is not None else None


def frozen_passes(ctx, ref_model, rollouts: Rollouts):
    """(old log-probs or None, reference log-probs or None), each one no-grad forward when needed."""
    cfg = ctx.cfg.grpo
    frozen = dict(temperature=ctx.cfg.sampling.temperature, micro_batch_size=cfg.micro_batch_size)
    ref_logp = None
    if cfg.kl.active:
        adapter_off = ref_model is None and ctx.cfg.model.lora.enabled
        ref_logp = frozen_logprobs(ref_model or ctx.model, rollouts, adapter_off=adapter_off, **frozen)
    need_old = cfg.inner_iterations > 1 or (cfg.kl.active and cfg.kl.where == "reward")
    old_logp = frozen_logprobs(ctx.model, rollouts, adapter_off=False, **frozen) if need_old else None
    return old_logp, ref_logp


def step_metrics(g: dict, stats: dict, failures, cfg, world_size: int, *, sample_s, train_s, lr) -> dict:
    """The step's metrics line from every rank's rows ``g``; rewards are the task's (before KL shaping)."""
    valid, reward_N, adv_N = g["valid"], g["reward"], g["adv"]
    lens = g["len"].float()
    tokens = float(stats["tokens"]) or 1.0
    per_tok = lambda k: float(stats[k]) / tokens if k in stats else None  # noqa: E731
    sample_tokens = float(lens.sum())
    return {
        "reward_mean": float(reward_N[valid].mean()) if valid.any() else None,
        "reward_std": float(reward_N[valid].std()) if valid.sum() > 1 else None,
        **{k: float(v[~v.isnan()].mean()) if (~v.isnan()).any() else None
           for k, v in g.items() if k.startswith("reward/")},
        "unscorable_rows": int((~valid).sum()), "unscorable_frac": float((~valid).float().mean()),
        "unscorable_first_error": failures.first_message,
        "zero_variance_group_frac": len(g["group"][g["zero_var"]].unique()) / max(len(g["group"].unique()), 1),
        "rows_trained": int(g["keep"].sum()),
        "adv_mean": float(adv_N[valid].mean()) if valid.any() else None,
        "adv_std": float(adv_N[valid].std()) if valid.sum() > 1 else None,
        "adv_abs_max": float(adv_N.abs().max()),
        "loss": float(stats["loss"]) if "loss" in stats else None,
        "entropy": per_tok("entropy"), "kl": per_tok("kl") if cfg.kl.active else None,
        "clip_frac_low": per_tok("clip_low"), "clip_frac_high": per_tok("clip_high"),
        "logp_mismatch": per_tok("logp_mismatch"),
        "grad_norm": stats.get("grad_norm"), "lr": lr,
        "completion_len_mean": float(lens.mean()), "completion_len_min": int(lens.min()),
        "completion_len_max": int(lens.max()), "truncation_rate": float(g["truncated"].float().mean()),
        "sample_s": sample_s, "train_s": train_s,
        "tokens_sampled": int(sample_tokens), "tokens_trained": int(stats["tokens"]) * cfg.inner_iterations,
        "sample_tokens_per_s": sample_tokens / max(sample_s, 1e-9),
        "train_tokens_per_s": float(stats["tokens"]) * cfg.inner_iterations / max(train_s, 1e-9),
        "denominator": "tokens" if cfg.reduction == "token_mean" else "sequences",
        "denominator_value": stats["tokens"] if cfg.reduction == "token_mean" else int(g["keep"].sum()),
        "micro_batches": len(micro_slices(int(g["keep"].sum()) // world_size, cfg.micro_batch_size)),
        "world_size": world_size,
        "replayed_decode": bool(stats.get("replayed_decode", False)),  # the update replayed the decode's forward
        # rows with advantage 0 that got a no-grad pass and no backward (their gradient is exactly 0)
        "rows_no_backward": int(stats.get("rows_no_backward", 0)),
    }
