"""GRPO-family trainer (METHODS §2): sample → score → advantages → filter → loss → update → stats.

The math is in ``forkrl.algos`` (pure functions); this module composes it. Choices the papers leave
open, made here and named in the config:

* old log-probs: with μ = 1 the ratio's denominator is the current log-prob detached (exactly the
  on-policy gradient, no extra forward); with μ > 1, or a KL penalty in the reward, they are recomputed
  by one no-grad forward before the first update and reused for all μ iterations.
* each of the μ inner iterations is one optimizer step over the whole batch (micro-batched).
* KL in the reward subtracts β · Σ_t kl_t (per row, detached) before advantages are computed.
* a reference model is loaded only when β > 0; under LoRA it is the adapter-disabled base.

The step's loss is ``algos.loss.grpo_loss``, accumulated over micro-batches by ``accumulate``; the log-probs come
from the policy forward (``forward.make_forward``: the replay of the decode where the fused CPU sampler recorded
it, else the model's forward).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..algos.advantages import get_advantage
from ..algos.filters import get_filter, group_reward_std, zero_variance_groups
from ..algos.kl import get_kl
from ..algos.loss import echo_loss, grpo_loss, zero_advantage_rows_vanish
from ..diagnostics.collapse import collapse_metrics
from ..forward import ModelForward, make_forward
from ..models import load_model
from .. import rewards as reward_api
from ..rewards import score_rollouts
from ..rewards.majority import LabelWatch
from ..sampling import make_sampler, row_seeds
from ..types import Role, Rollouts
from .accumulate import EXACT, Plan, accumulate, completion_counts, global_totals, micro_slices, parts
from .data import batch_indices
from .loop import StageLoop, want_eval
from .metrics import SpreadWatch, stage_sums
from .sources import EpisodeSource, HeldoutEpisodes, PromptSource, Rows, explore_flags
from .tree import tree_step

# summed over masked tokens, per step (the correction's: its weights, and the tokens it weighted 0)
STATS = ("entropy", "kl", "clip_low", "clip_high", "logp_mismatch", "correction_weight", "correction_zero")


@torch.no_grad()
def frozen_logprobs(model, batch: Rollouts, *, temperature: float, micro_batch_size: int, adapter_off: bool):
    """log-probs of ``batch`` under a frozen model (reference or old policy), micro-batched."""
    ctx = model.disable_adapter() if adapter_off else nullcontext()
    forward = ModelForward(model)
    out = torch.zeros(batch.num_rows, batch.input_ids_NL.shape[1] - 1)
    with ctx:
        for sl in micro_slices(batch.num_rows, micro_batch_size):
            logp, _, _ = forward.logprobs(batch, torch.arange(batch.num_rows)[sl], temperature=temperature)
            out[sl, : logp.shape[1]] = logp.float().cpu()
    return out


def loss_terms(cfg) -> dict:
    """The named arguments of ``grpo_loss`` that the ``grpo`` section sets."""
    clip = (cfg.eps_low, cfg.eps_high) if cfg.clip else (float("inf"), float("inf"))
    return dict(objective=cfg.objective, eps_low=clip[0], eps_high=clip[1], dual_clip=cfg.dual_clip,
                kl_estimator=cfg.kl.estimator, kl_coef=cfg.kl.beta if cfg.kl.active and cfg.kl.where == "loss" else 0.0,
                entropy_coef=cfg.entropy_coef, reduction=cfg.reduction, correction=cfg.sampler_correction,
                correction_cap=cfg.correction_cap)


class GrpoStepLoss:
    """``grpo_loss`` of the rows of ``batch`` a micro-batch holds, and its statistics (``STATS``). ``adv_N`` and the
    old and reference log-probs (full-batch [N, T], or None) are indexed like ``batch``'s rows."""

    def __init__(self, policy, batch: Rollouts, adv_N, old_logp_NT, ref_logp_NT, *, temperature: float,
                 entropy: str, t_max: int, terms: dict, echo: Echo | None = None):
        self.policy, self.batch, self.adv_N, self.old_NT, self.ref_NT = policy, batch, adv_N, old_logp_NT, ref_logp_NT
        self.temperature, self.entropy, self.t_max, self.terms, self.echo = temperature, entropy, t_max, terms, echo

    def counts(self, rows_N):
        return completion_counts(self.batch, rows_N)

    def __call__(self, rows_N, totals):
        logp, H, mask = self.policy.logprobs(self.batch, rows_N, temperature=self.temperature, entropy=self.entropy)
        width = logp.shape[1]
        if self.echo is not None:  # rows the filters dropped carry ECHO's loss only
            mask = mask & self.echo.policy_N[rows_N].to(mask.device)[:, None]
        old = logp.detach() if self.old_NT is None else self.old_NT[rows_N][:, :width].to(logp.device)
        ref = None if self.ref_NT is None else self.ref_NT[rows_N][:, :width].to(logp.device)
        sampler_logp = self.batch.sampler_logp_NL[rows_N][:, 1 : width + 1].to(logp.device)
        out = grpo_loss(logp, old, self.adv_N[rows_N], mask, total_tokens=totals[0], total_seqs=totals[1],
                        ref_logp_NT=ref, entropy_NT=H, t_max=self.t_max, sampler_logp_NT=sampler_logp, **self.terms)
        loss = out.loss
        m = mask.double()
        per_token = (("entropy", H), ("kl", out.kl_NT), ("clip_low", out.clip_low_NT), ("clip_high", out.clip_high_NT),
                     ("logp_mismatch", (logp.detach() - sampler_logp).abs()), ("correction_weight", out.weight_NT),
                     ("correction_zero", out.weight_NT == 0))
        stats = {key: (val.detach().double() * m).sum().cpu() for key, val in per_token}
        if self.echo is not None:
            env = (self.batch.role_NL[rows_N][:, 1 : width + 1] == Role.ENV).to(logp.device)
            if self.echo.coef:
                loss = loss + self.echo.coef * echo_loss(logp, env, total_env_tokens=self.echo.total)
            stats["env_nll"] = -(logp.detach().double() * env).sum().cpu()
            stats["env_tokens"] = env.sum().double().cpu()
        return loss, stats


@dataclass(frozen=True)
class Echo:
    """ECHO's term in a step (``grpo.echo_coef``): λ, the step's ENV-token total over every rank (its fixed
    denominator), and which rows also carry the policy loss (``policy_N``, indexed like the batch: the rows the
    filters kept; the others are trained on their observations only, failed episodes included)."""

    coef: float
    total: int
    policy_N: torch.Tensor


def policy_update(policy, batch: Rollouts, adv_N, old_logp_NT, ref_logp_NT, cfg, *, temperature: float,
                  t_max: int, totals: tuple[int, int], rows_N: torch.Tensor | None = None, plan: Plan = EXACT,
                  world_size: int = 1, echo: Echo | None = None) -> dict[str, torch.Tensor]:
    """Accumulate this rank's gradient of one optimizer step over micro-batches of the rows ``rows_N`` of ``batch``
    (all rows by default); returns summed statistics. ``policy``: a ``forward.PolicyForward``.

    ``totals`` are the whole step's (tokens, sequences) over every rank, fixed before the loop (METHODS §1).

    Rows whose advantage is exactly 0 contribute exactly 0 to the loss and its gradient when nothing else in
    the loss reaches them (``zero_advantage_rows_vanish``): they keep their place in the denominators (the
    totals), and their statistics (entropy, KL, log-prob mismatch) are still computed, by a no-grad pass, but
    they get no backward. The gradient equals the full batch's to float rounding (tests/test_trainer_parts.py)."""
    rows_N = torch.arange(batch.num_rows) if rows_N is None else rows_N
    terms = loss_terms(cfg)
    loss = GrpoStepLoss(policy, batch, adv_N, old_logp_NT, ref_logp_NT, temperature=temperature,
                        entropy="grad" if cfg.entropy_coef > 0 else "metric", t_max=t_max, terms=terms, echo=echo)
    idle_R = torch.zeros(len(rows_N), dtype=torch.bool)
    if plan.exact and plan.lockstep is None and cfg.skip_zero_advantage and zero_advantage_rows_vanish(
            objective=cfg.objective, kl_coef=terms["kl_coef"], entropy_coef=cfg.entropy_coef,
            echo_coef=echo.coef if echo is not None else 0.0):
        idle_R = (adv_N[rows_N] == 0).cpu()
    live, idle = rows_N[~idle_R], rows_N[idle_R]
    # live rows first, then the idle ones in micro-batches of their own; without idle rows this is the plain split
    micro = parts(live, cfg.micro_batch_size) + parts(idle, cfg.micro_batch_size, grad=False)
    sums = accumulate(micro, loss, totals, plan=plan, world_size=world_size)
    sums = {"loss": sums["loss"], **{k: sums.get(k, torch.zeros((), dtype=torch.float64)) for k in STATS},
            **{k: sums[k] for k in ("env_nll", "env_tokens") if k in sums}}
    sums["rows_no_backward"] = torch.tensor(float(len(idle)), dtype=torch.float64)
    if not len(live):  # the full batch's backward would have left zeros, which AdamW still steps on (momentum, decay)
        model = policy.model
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return sums


def train_grpo(ctx) -> dict:
    cfg, run_cfg, dist = ctx.cfg.grpo, ctx.cfg, ctx.dist
    problems = list(ctx.task.problems("train"))
    rewards = reward_api.load(cfg.rewards, ctx.task, where="grpo.rewards", timeout_s=cfg.reward_timeout_s,
                              device=ctx.device, run_dir=ctx.run_dir)
    lora = run_cfg.model.lora.enabled
    ref_model = None
    if cfg.kl.active and not lora:
        ref_model = load_model(str(ctx.init_path), dtype=next(ctx.model.parameters()).dtype).to(ctx.device).eval()
    multi_turn = getattr(ctx.task, "multi_turn", False)
    # an episode's row is assembled from many decodes, so there is no single decode to replay: the model's forward;
    # under FSDP2 the decode ran on the full copy, and the update must differentiate the sharded model
    sampler = make_sampler(run_cfg.sampling, ctx.model, ctx.tokenizer, ctx.device,
                           record=not multi_turn and cfg.tree is None and ctx.sharded is None)
    policy = make_forward(ctx.train_model, sampler)
    source = EpisodeSource(ctx) if multi_turn else PromptSource(ctx)
    heldout = HeldoutEpisodes(ctx, sampler, source.codec) if multi_turn else None
    loop = StageLoop(ctx, steps=cfg.steps, optim=cfg.optim, eval_every=cfg.eval_every,
                     schedule_steps=cfg.steps * cfg.inner_iterations, samplers=(sampler,))
    shard = dist.shard(cfg.prompts_per_step, "grpo.prompts_per_step")
    spread = SpreadWatch(ctx.run_dir / "metrics.jsonl", ctx.stage_dir.name)  # after the loop cut the file back
    votes = LabelWatch.of(rewards, ctx, loop.start)  # TTRL's label health, where a reward is the majority vote
    for step in loop.steps():
        pick = batch_indices(len(problems), cfg.prompts_per_step, step - 1, run_cfg.seed)[shard]
        step_problems = [problems[i] for i in pick]
        seeds = row_seeds(f"grpo:{run_cfg.seed}:{step}", pick, cfg.group_size)
        explore = explore_flags(cfg.explore, step, cfg.prompts_per_step)[shard]
        if cfg.tree is not None:  # tree rollouts: shared prefixes sampled and trained once (trainers/tree.py)
            metrics = tree_step(ctx, loop, sampler, ref_model, source, rewards, pick, step_problems, step)
        else:
            metrics = grpo_step(ctx, loop, sampler, policy, ref_model, source, pick, step_problems, seeds, rewards,
                                step, explore=explore, votes=votes)
        metrics["reward_std_collapse_ratio"] = spread.ratio(step, metrics["group_reward_std"])
        if heldout is not None and (want_eval(cfg.eval_every, step, cfg.steps) or step == cfg.steps):
            metrics["env_ce_heldout"] = heldout.cross_entropy()  # ECHO's figure on the fixed base-model episodes
        loop.end_step(step, metrics)
    keys = ("tokens_sampled", "tokens_trained")
    sums = dict.fromkeys(keys, 0)
    if dist.is_main:
        sums = stage_sums(ctx.run_dir / "metrics.jsonl", ctx.stage_dir.name, keys)
    return {**loop.finish(), **sums}


def grpo_step(ctx, loop, sampler, policy, ref_model, source, pick, step_problems, seeds, rewards, step, *,
              explore=None, votes: LabelWatch | None = None) -> dict:
    """One GRPO step, top to bottom, on this rank's shard of the step's prompts (``pick``, indices of the task's
    problems; ``source`` makes their rows; ``explore``: which of their groups are exploration episodes; ``votes``:
    the majority vote's label history, for its ``ttrl_*`` metrics)."""
    cfg, run_cfg, dist = ctx.cfg.grpo, ctx.cfg, ctx.dist
    t0 = time.time()
    rows = source.sample(sampler, pick, step_problems, seeds, explore)
    rollouts, texts = rows.rollouts, rows.texts
    sample_s = time.time() - t0
    collapse = template_collapse(ctx, rows, step)
    scored, failures = score_rollouts(rollouts, texts, step_problems, ctx.task, rewards, seeds=seeds,
                                      step=step, progress=step / cfg.steps,
                                      max_new_tokens=run_cfg.sampling.max_new_tokens, episodes=rows.episodes)
    scored = with_exploration(scored, rows, cfg.explore.reward)
    ttrl = votes.step(step, ctx.task, step_problems, rollouts, texts, dist) if votes is not None else {}
    t1 = time.time()
    old_logp, ref_logp = frozen_passes(ctx, ref_model, rollouts)
    reward_N = scored.reward_N
    if cfg.kl.active and cfg.kl.where == "reward":
        kl_N = (get_kl(cfg.kl.estimator)(old_logp, ref_logp) * rollouts.completion_mask_NL[:, 1:]).sum(1)
        reward_N = reward_N - cfg.kl.beta * kl_N
    # Advantages and filters over the whole step (every rank's rows): exact for batch-level statistics and for a
    # filter that ranks groups against each other (snr).
    group_all = dist.all_gather(rollouts.group_N + dist.rank * len(step_problems))
    task_all, valid_all = dist.all_gather(scored.reward_N), dist.all_gather(scored.valid_N)
    type_all = dist.all_gather(rows.explore_N) if rows.explore_N is not None else None
    adv_all = advantages(cfg, dist.all_gather(reward_N), group_all, valid_all, type_all)
    mine = dist.shard(len(adv_all), "rows per step")
    adv_N = adv_all[mine]
    loop.log_completions(step, step_problems, texts, scored, adv_N, rows.episodes)  # RUN_DIR/completions.jsonl
    # Zero variance and filters are judged on the task reward: a KL-in-reward term would make every group look
    # informative.
    zero_var_all = ~zero_variance_groups(task_all, group_all, valid_all)
    keep_all = torch.ones_like(zero_var_all) if cfg.filter == "none" else \
        get_filter(cfg.filter)(task_all, group_all, valid_all, **cfg.filter_kwargs)
    keep_N = keep_all[mine]
    if cfg.mask_truncated:  # DAPO's overlong filtering: a cut-off row keeps its place in the baseline, not the loss
        keep_N = keep_N & ~rollouts.truncated_N
    rows_N = keep_N.nonzero().squeeze(1)
    totals = global_totals(rollouts.completion_mask_NL[keep_N], dist)
    echo = None
    if rows.episodes is not None:  # the observations' cross-entropy is logged; ECHO trains on it when λ > 0
        # ECHO's rows: every scorable episode's observations, the filtered-out ones' too
        echo_N = keep_N | scored.valid_N if cfg.echo_coef else keep_N
        env_tokens = (rollouts.role_NL[echo_N] == Role.ENV).sum().double()
        echo = Echo(cfg.echo_coef, int(dist.all_reduce_sum(env_tokens)), keep_N)
        rows_N = echo_N.nonzero().squeeze(1)
    replayed = policy.replayed
    stats = {}
    for _ in range(cfg.inner_iterations if totals[1] or (echo and echo.coef and echo.total) else 0):
        stats = policy_update(policy, rollouts, adv_N, old_logp, ref_logp, cfg, rows_N=rows_N,
                              temperature=run_cfg.sampling.temperature,
                              t_max=cfg.t_max or source.t_max, totals=totals, plan=ctx.plan,
                              world_size=dist.world_size, echo=echo)
        stats = {k: dist.all_reduce_sum(v) for k, v in stats.items()}
        stats["grad_norm"] = loop.optimizer_step()  # the sampler releases its record here: the weights moved
    stats["tokens"] = totals[0]
    stats["replayed_decode"] = policy.replayed > replayed and totals[1] > 0
    train_s = time.time() - t1
    nan_N = torch.full_like(scored.reward_N, float("nan"))  # a component another rank's rows have and these lack
    components = {k: scored.components.get(k, nan_N) for k in dist.union(list(scored.components))}
    gathered = {"reward": task_all, "valid": valid_all, "adv": adv_all, "zero_var": zero_var_all, "group": group_all,
                **{k: dist.all_gather(v) for k, v in (
                    ("keep", keep_N), ("len", rollouts.completion_len_N), ("truncated", rollouts.truncated_N),
                    *((f"reward/{k}", v) for k, v in components.items()))}}
    return {**step_metrics(gathered, stats, failures, cfg, dist.world_size, sample_s=sample_s, train_s=train_s,
                           lr=loop.lr), **episode_figures(rows, dist), **collapse, **ttrl}


def advantages(cfg, reward_N, group_N, valid_N, explore_N=None):
    """The step's advantages; exploration rows (``explore_N``) normalised apart from the task's (their own groups
    already; a batch-level estimator's statistics too)."""
    estimator = get_advantage(cfg.advantage)
    if explore_N is None or not explore_N.any():
        return estimator(reward_N, group_N, valid_N, eps=cfg.adv_eps)
    adv_N = torch.zeros_like(reward_N)
    for part in (~explore_N, explore_N):
        if part.any():
            adv_N[part] = estimator(reward_N[part], group_N[part], valid_N[part], eps=cfg.adv_eps)
    return adv_N


def with_exploration(scored, rows: Rows, key: str):
    """``scored`` with each exploration row's reward replaced by its episode's ``info[key]`` (coverage), unscorable
    where missing, and the task rewards' components blanked there (they were not its reward)."""
    if rows.explore_N is None or not rows.explore_N.any():
        return scored
    from .sources import exploration_rewards

    x = rows.explore_N
    values = torch.full_like(scored.reward_N, float("nan"))
    values[x] = exploration_rewards([e for e, f in zip(rows.episodes, x.tolist()) if f], key).to(values.dtype)
    reward = torch.where(x, torch.nan_to_num(values, nan=0.0), scored.reward_N)
    valid = torch.where(x, ~values.isnan(), scored.valid_N)
    components = {k: torch.where(x, torch.full_like(v, float("nan")), v) for k, v in scored.components.items()}
    components["explore"] = values
    return dataclasses.replace(scored, reward_N=reward, valid_N=valid, components=components)


def episode_figures(rows: Rows, dist) -> dict:
    """An env task's episode figures over every rank's episodes (success, return, turns, valid actions, errors: the
    task episodes'; ``explore_reward_mean``: the exploration episodes')."""
    if rows.episodes is None:
        return {}
    n_explore = int(rows.explore_N.sum()) if rows.explore_N is not None else 0
    counts = {False: len(rows.episodes) - n_explore, True: n_explore}
    total = {k: float(dist.all_reduce_sum(torch.tensor(float(v), dtype=torch.float64))) for k, v in counts.items()}
    out = {"explore_rows": int(total[True])}
    for k, v in rows.metrics.items():
        if k == "env_errors":
            out[k] = int(dist.all_reduce_sum(torch.tensor(float(v), dtype=torch.float64)))
        elif k == "env_first_error":
            out[k] = v  # rank 0's
        else:  # a mean over this rank's episodes of its kind, weighted back to the whole step's
            kind = k.startswith("explore")
            part = torch.tensor(0.0 if v is None else v * counts[kind], dtype=torch.float64)
            got = float(dist.all_reduce_sum(part))
            out[k] = got / total[kind] if total[kind] else None
    return out


def template_collapse(ctx, rows: Rows, step: int) -> dict:
    """RAGEN-2's MI estimate on the step's rows before any filter, every ``grpo.mi_every`` steps, on rank 0 (from its
    own shard of the prompts): each completion (an episode's first action) scored under each of the step's distinct
    prompts (first observations)."""
    every = ctx.cfg.grpo.mi_every
    if not every or step % every or not ctx.dist.is_main:
        return {}
    keep = [r for r, z in enumerate(rows.reasonings) if z]  # an episode whose environment failed at reset has none
    problem_N = rows.rollouts.problem_N.tolist()
    out = collapse_metrics(ctx.model, rows.prompt_ids, [rows.reasonings[r] for r in keep], [problem_N[r] for r in keep],
                           pad_id=ctx.tokenizer.pad_token_id, temperature=ctx.cfg.sampling.temperature or 1.0,
                           micro_batch_size=ctx.cfg.grpo.micro_batch_size)
    return out or {}


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
    std_g, idx_N = group_reward_std(reward_N, g["group"], valid)  # RAGEN-2's in-group reward spread
    kept_g = torch.zeros(len(std_g), dtype=torch.bool).index_fill_(0, idx_N[g["keep"]], True)
    return {
        "reward_mean": float(reward_N[valid].mean()) if valid.any() else None,
        "reward_std": float(reward_N[valid].std()) if valid.sum() > 1 else None,
        **{k: float(v[~v.isnan()].mean()) if (~v.isnan()).any() else None
           for k, v in g.items() if k.startswith("reward/")},
        "unscorable_rows": int((~valid).sum()), "unscorable_frac": float((~valid).float().mean()),
        "unscorable_first_error": failures.first_message,
        "zero_variance_group_frac": len(g["group"][g["zero_var"]].unique()) / max(len(g["group"].unique()), 1),
        "rows_trained": int(g["keep"].sum()), "empty_batch": not bool(g["keep"].any()),
        "groups_kept_frac": float(kept_g.float().mean()),
        "group_reward_std": float(std_g.mean()),
        "group_reward_std_kept": float(std_g[kept_g].mean()) if kept_g.any() else None,
        "adv_mean": float(adv_N[valid].mean()) if valid.any() else None,
        "adv_std": float(adv_N[valid].std()) if valid.sum() > 1 else None,
        "adv_abs_max": float(adv_N.abs().max()),
        "loss": float(stats["loss"]) if "loss" in stats else None,
        "entropy": per_tok("entropy"), "kl": per_tok("kl") if cfg.kl.active else None,
        "clip_frac_low": per_tok("clip_low"), "clip_frac_high": per_tok("clip_high"),
        "logp_mismatch": per_tok("logp_mismatch"),
        # grpo.sampler_correction's mean weight and the share of tokens it weighted 0 (mis's dropped tokens)
        **({"correction_weight_mean": per_tok("correction_weight"), "correction_zero_frac": per_tok("correction_zero")}
           if cfg.sampler_correction != "none" else {}),
        # an env task's observations: their cross-entropy under the policy (ECHO's loss, logged at any λ)
        "env_ce": float(stats["env_nll"] / stats["env_tokens"]) if float(stats.get("env_tokens", 0)) else None,
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
