"""The optimizer, its learning-rate schedule, and one optimizer step with the gradient norm of METHODS §1."""

from __future__ import annotations

import math

import torch


def _constant(frac: float) -> float:
    return 1.0


def _linear(frac: float) -> float:
    return 1.0 - frac


def _cosine(frac: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * frac))


def make_optimizer(params, cfg, total_steps: int):
    """AdamW, as one fused kernel per parameter group where torch has it (CPU and CUDA floating-point
    parameters: about 3× faster than torch's default for the 4.8M-parameter benchmark model on 2 CPU
    threads, ``benchmarks/cpu_levers.py``), else torch's default; and a warm-up × schedule ``LambdaLR``
    (``cfg``: an ``OptimCfg``; ``SCHEDULES`` below, by the fraction of ``total_steps`` done)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)
    decay = SCHEDULES[cfg.schedule]

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        return warm * max(decay(min(1.0, step / max(1, total_steps))), 0.0)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_and_step(model, opt, sched, grad_clip: float | None) -> float:
    """Optimizer step; returns the gradient norm *before* clipping (the signature metric of METHODS §1).

    A NaN or inf gradient (from a NaN/inf loss too) skips the update: no optimizer or scheduler step,
    the gradient is dropped, and the returned norm is not finite so the loop's guards can count it."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor's under FSDP2
    if math.isfinite(norm):
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


SCHEDULES = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
}
