"""Orchestration shared by the trainers: forward passes, micro-batches, optimizers, metrics, evaluation.

No RL math here (that is ``forkrl.algos``); these are the plumbing pieces every loop needs once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..algos.logprobs import entropy_from_logits, token_logprobs
from ..config import OptimCfg
from ..types import Role, Rollouts


def completion_logits(model, batch: Rollouts):
    """(logits_NSV, targets_NS, start): the logits that predict ``input_ids[:, start+1:]``, from the first
    completion target of the batch on (``logits_to_keep``: prompts cost no LM-head work).

    Position ``start + j`` of a row predicts its token ``start + j + 1``; slice any [N, L-1] tensor aligned to
    targets ``input_ids[:, 1:]`` with ``[:, start:]`` to match."""
    mask_NT = batch.role_NL[:, 1:] == Role.COMPLETION
    start = int(mask_NT.any(0).nonzero()[0]) if mask_NT.any() else 0
    device = next(model.parameters()).device
    ids = batch.input_ids_NL.to(device)
    out = model(input_ids=ids, attention_mask=batch.attention_mask_NL.to(device),
                logits_to_keep=ids.shape[1] - start)
    return out.logits[:, :-1], ids[:, start + 1 :], start


def completion_logprobs(model, batch: Rollouts, *, temperature: float = 1.0, entropy: str = "none"):
    """Per-token log π(y_t | y_<t) of ``batch`` under ``model``, aligned to targets ``input_ids[:, 1:]``.

    Returns (logp_NT, H_NT, mask_NT) with T = L - 1. ``entropy``: "none" (H_NT is zeros), "metric"
    (detached), or "grad" (differentiable, for an entropy bonus). Positions before the batch's first
    completion target are 0 (see ``completion_logits``).
    """
    mask_NT = batch.role_NL[:, 1:] == Role.COMPLETION
    logits_NSV, targets_NS, start = completion_logits(model, batch)
    logp = token_logprobs(logits_NSV, targets_NS, temperature=temperature)
    pad = torch.zeros(logp.shape[0], start, dtype=logp.dtype, device=logp.device)
    logp_NT = torch.cat([pad, logp], dim=1)
    if entropy == "none":
        H_NT = torch.zeros_like(logp_NT)
    else:
        src = logits_NSV if entropy == "grad" else logits_NSV.detach()
        H_NT = torch.cat([pad, entropy_from_logits(src, temperature=temperature)], dim=1)
    return logp_NT, H_NT, mask_NT.to(logp.device)


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


def row_seeds(namespace: str, problem_ids: list[int], group_size: int) -> list[int]:
    """One sampling seed per row, a pure function of (namespace, problem, sample index): a row's sample
    does not depend on how the step is batched, sharded across ranks, or resumed."""
    import hashlib

    return [int.from_bytes(hashlib.sha256(f"{namespace}:{p}:{j}".encode()).digest()[:8], "big") >> 1
            for p in problem_ids for j in range(group_size)]


INJECTIONS = ("none", "first_microbatch_only", "mean_of_means")


def global_totals(mask_NT: torch.Tensor, dist) -> tuple[int, int]:
    """(tokens, sequences) of the whole optimizer step across every rank: the fixed denominator."""
    local = torch.tensor([float(mask_NT.sum()), float(mask_NT.shape[0])], dtype=torch.float64)
    tokens, seqs = dist.all_reduce_sum(local).tolist()
    return int(tokens), int(seqs)


def micro_denominators(inject: str, totals: tuple[int, int], mb_mask_NT: torch.Tensor, n_micro: int,
                       world_size: int) -> tuple[int, int, float]:
    """(tokens, sequences, scale) a micro-batch divides by. Correct: the step's global totals, scale 1.

    ``mean_of_means`` is the historical bug kept as a fault injection (METHODS §1): each micro-batch
    divides by its own counts and accumulation averages the K micro-batch means (and DDP the W ranks),
    so tokens in short-response micro-batches weigh more. (With sequence-count reductions and equal-sized
    micro-batches the local counts equal the global share, so only ``token_mean`` shows it then.)"""
    if inject == "mean_of_means":
        return int(mb_mask_NT.sum()), int(mb_mask_NT.shape[0]), 1.0 / (n_micro * world_size)
    return totals[0], totals[1], 1.0


def skip_micro_batch(inject: str, index: int) -> bool:
    """``first_microbatch_only``: the optimizer-offload bug that kept only micro-batch 0's gradient."""
    return inject == "first_microbatch_only" and index > 0


def micro_slices(n_rows: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]


def make_optimizer(params, cfg: OptimCfg, total_steps: int):
    """AdamW, as one fused kernel per parameter group where torch has it (CPU and CUDA floating-point
    parameters: about 3× faster than torch's default for the 4.8M-parameter benchmark model on 2 CPU
    threads, ``benchmarks/cpu_levers.py``), else torch's default; and a warm-up × schedule ``LambdaLR``."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        frac = min(1.0, step / max(1, total_steps))
        decay = {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.schedule]
        return warm * max(decay, 0.0)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated NaN/inf gradients); the message says what to try."""


def clip_and_step(model, opt, sched, grad_clip: float | None) -> float:
    """Optimizer step; returns the gradient norm *before* clipping (the signature metric of METHODS §1).

    A NaN or inf gradient (from a NaN/inf loss too) skips the update: no optimizer or scheduler step,
    the gradient is dropped, and the returned norm is not finite so ``end_step`` can count it."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf")))
    if math.isfinite(norm):
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


class MetricsLog:
    """Appends one JSON line per step to ``metrics.jsonl``; a progress bar on a TTY, log lines otherwise."""

    KEYS = ("loss", "reward_mean", "pass_at_1", "entropy", "kl", "grad_norm")

    def __init__(self, path: Path, *, stage: str, total: int, start: int = 0, log_every: int = 1,
                 enabled: bool = True):
        self.path, self.stage, self.total, self.log_every = path, stage, total, log_every
        self.t0, self.start, self.enabled = time.time(), start, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:  # only rank 0 writes files
            return
        row = {"stage": self.stage, "step": step, "time": round(time.time(), 3), **metrics}
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")  # strict JSON: a NaN is written as null
            f.flush()
        shown = {k: metrics[k] for k in self.KEYS if k in metrics and metrics[k] is not None}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
            vals = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"[{self.stage}] step {step}/{self.total} {vals} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class EvalResult:
    pass_at_1: float
    per_strategy: dict[str, list[float]]  # strategy -> [share of samples, accuracy]
    seconds: float


def evaluate(sampler, task, problems, prompt_ids, params, samples: int, *, seed: int = 0) -> EvalResult:
    """Held-out pass@1: the mean score over ``samples`` completions of each problem (unbiased for k=1)."""
    t0 = time.time()
    seeds = row_seeds(f"eval:{seed}", list(range(len(problems))), samples)
    rollouts = sampler.sample(prompt_ids, samples, params, seeds=seeds)
    texts, scores = heldout_scores(task, problems, sampler.tokenizer, rollouts)
    strat = {}
    for text, s in zip(texts, scores):
        if hasattr(task, "strategy"):
            strat.setdefault(task.strategy(text), []).append(s)
    per = {k: [len(v) / len(scores), sum(v) / len(v)] for k, v in sorted(strat.items())}
    return EvalResult(sum(scores) / max(len(scores), 1), per, time.time() - t0)


def heldout_scores(task, problems, tokenizer, rollouts: Rollouts) -> tuple[list[str], list[float]]:
    """(completion texts, task scores) of every row; for held-out pass@1 an unscorable row (None / NaN)
    counts as a failure, 0."""
    texts = decode_completions(tokenizer, rollouts)
    scores = []
    for text, pi in zip(texts, rollouts.problem_N.tolist()):
        s = task.score(problems[pi], text)
        scores.append(0.0 if s is None or s != s else float(s))
    return texts, scores


def decode_completions(tokenizer, rollouts: Rollouts) -> list[str]:
    mask = rollouts.completion_mask_NL
    return [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
            for ids, m in zip(rollouts.input_ids_NL, mask)]


# ---------------------------------------------------------------- stage plumbing (pipeline.StageContext)
def sampling_params(cfg, *, for_eval: bool = False):
    from ..sampling import SamplingParams

    s = cfg.sampling
    temp = cfg.eval.temperature if (for_eval and cfg.eval.temperature is not None) else s.temperature
    return SamplingParams(temperature=temp, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens)


def heldout_eval(ctx, sampler) -> EvalResult:
    problems = list(ctx.task.problems("heldout"))[: ctx.cfg.eval.num_problems]
    ids = [ctx.encode_prompt(p.prompt) for p in problems]
    result = evaluate(sampler, ctx.task, problems, ids, sampling_params(ctx.cfg, for_eval=True),
                      ctx.cfg.eval.samples_per_problem, seed=ctx.cfg.seed)
    ctx.eval_s += result.seconds
    return result


def resume_state(ctx, opt, sched) -> int:
    """Restore optimizer, scheduler and RNG from ``ctx.resume_from``; drop metrics past that step.

    Returns the first step to run (0 for a fresh stage)."""
    from .. import checkpoint

    state = checkpoint.load_trainer_state(ctx.resume_from, opt, sched) if ctx.resume_from else {"step": 0}
    if ctx.dist.is_main:
        _truncate_metrics(ctx.run_dir / "metrics.jsonl", ctx.stage_dir.name, state["step"])
    return state["step"]


def _truncate_metrics(path: Path, stage: str, keep_through: int) -> None:
    """Keep other stages' lines and this stage's lines up to ``keep_through``: no duplicate steps."""
    if not path.exists():
        return
    from ..checkpoint import atomic_write_text

    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if row.get("stage") != stage or row.get("step", 0) <= keep_through:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def maybe_checkpoint(ctx, step: int, total: int, opt, sched) -> None:
    from .. import checkpoint

    every = ctx.cfg.checkpoint.every
    if (every and step % every == 0) or step == total:
        if ctx.dist.is_main:  # ranks hold identical weights and optimizer state: one copy is the checkpoint
            checkpoint.save(ctx.stage_dir / "checkpoints", step, ctx.model, opt, sched, {},
                            keep_last=ctx.cfg.checkpoint.keep_last)
        ctx.dist.barrier()


def want_eval(every: int, step: int, total: int) -> bool:
    return bool(every and step % every == 0) and step != total


def end_step(ctx, sampler, log: MetricsLog, step: int, stage_cfg, metrics: dict, opt, sched, *,
             total: int | None = None) -> None:
    """The non-finite guard, held-out pass@1 when due, the metrics line, and a checkpoint when due.
    ``total``: the stage's step count, when its config does not name it ``steps``."""
    total = total or stage_cfg.steps
    stop = run_guards(ctx, step, metrics)
    if want_eval(stage_cfg.eval_every, step, total) and ctx.dist.is_main and not stop:
        metrics["pass_at_1"] = heldout_eval(ctx, sampler).pass_at_1
    log.write(step, metrics)
    maybe_checkpoint(ctx, step, total, opt, sched)
    if stop:
        log.close()
        raise TrainingError(stop)


def run_guards(ctx, step: int, metrics: dict) -> str | None:
    """Count consecutive skipped (NaN/inf) updates and mostly-unscorable batches; once either reaches its
    ``guards`` limit, the message that stops the run (with what to try), else None."""
    norm = metrics.get("grad_norm")
    skipped = norm is not None and not math.isfinite(norm)
    metrics["update_skipped"] = skipped
    if skipped:
        metrics["grad_norm"] = None  # JSON has no NaN; update_skipped says why it is missing
    ctx.nonfinite_streak = ctx.nonfinite_streak + 1 if skipped else 0
    ctx.unscorable_streak = ctx.unscorable_streak + 1 if metrics.get("unscorable_frac", 0.0) > 0.5 else 0
    guards, stage = ctx.cfg.guards, ctx.stage_dir.name
    if ctx.nonfinite_streak >= guards.max_consecutive_nonfinite:
        return (f"{stage} step {step}: the loss or gradient was NaN/inf for {ctx.nonfinite_streak} consecutive "
                f"steps, so those updates were skipped and the run stopped (the last checkpoint is intact). Try: a "
                f"lower {stage}.optim.lr, {stage}.optim.grad_clip on, float32 instead of float16 (model.dtype), and "
                f"rewards that stay finite and bounded; raise guards.max_consecutive_nonfinite to tolerate more.")
    if ctx.unscorable_streak >= guards.max_unscorable_steps:
        return (f"{stage} step {step}: more than half of the rows were unscorable for {ctx.unscorable_streak} "
                f"consecutive steps (first error this step: {metrics.get('unscorable_first_error')}). Fix the "
                f"reward or verifier, or raise guards.max_unscorable_steps.")
    return None


def finish_stage(ctx, sampler, log: MetricsLog, steps: int) -> dict:
    """Held-out evaluation on rank 0 (the others wait at the next barrier). ``eval_s`` is the stage's time
    in held-out evaluation (interim and final), so wall_s − eval_s is the training cost."""
    log.close()
    trainable = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
    if not ctx.dist.is_main:
        return {"steps": steps, "trainable_params": trainable}
    final = heldout_eval(ctx, sampler)
    return {"pass_at_1": final.pass_at_1, "strategies": final.per_strategy, "steps": steps,
            "trainable_params": trainable, "eval_s": round(ctx.eval_s, 2)}


def stage_sums(ctx, keys: tuple[str, ...]) -> dict:
    """Sums of ``keys`` over this stage's lines of metrics.jsonl (so a resumed stage counts every step)."""
    path = ctx.run_dir / "metrics.jsonl"
    sums = dict.fromkeys(keys, 0)
    if not ctx.dist.is_main or not path.exists():
        return sums
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("stage") == ctx.stage_dir.name:
            for k in keys:
                sums[k] += row.get(k) or 0
    return sums


def stage_log(ctx, total: int, start: int) -> MetricsLog:
    return MetricsLog(ctx.run_dir / "metrics.jsonl", stage=ctx.stage_dir.name, total=total, start=start,
                      log_every=ctx.cfg.log_every, enabled=ctx.dist.is_main)
