"""The fork stage's data: scored base rollouts with the base's entropy at every position, made once.

METHODS §4 steps 1–3: n completions of each candidate problem from the frozen base (T = 0.6, top-p 0.95
by default), scored by the configured rewards, with the base's entropy H_t (temperature 1) at each
completion position read off the logits the decode computed anyway (step 3's teacher forcing gives the same
numbers, to float rounding: tested, and costs a second pass). All candidate rows are cached in
``<stage>/base_rollouts.safetensors`` (atomic write) under a key that covers the base's weights, the
sampling settings, the candidate problems and the rewards. A resumed stage, or an ablation pointed at it
with ``fork.rollouts_from``, reuses them instead of sampling again; a key mismatch is an error, never a
silent reuse. Problem selection (step 2) happens after loading, so ablations that change
the pass-rate window reuse the cache too.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_save_tensors
from ..config import ConfigError
from ..models import load_model
from .. import rewards as reward_api
from ..rewards import score_rollouts
from ..forward import ModelForward
from ..sampling import EntropySampler, SamplingParams, completion_texts, make_sampler, row_seeds
from ..tasks.base import describe
from ..types import Rollouts
from .accumulate import micro_slices
from .data import batch_indices

CACHE_NAME = "base_rollouts.safetensors"
_ROLLOUT_FIELDS = ("input_ids_NL", "role_NL", "sampler_logp_NL", "group_N", "problem_N", "truncated_N")


@dataclass(frozen=True)
class BaseRollouts:
    """Scored base rollouts. ``problem_N`` indexes the task's train problems; ``H_NT`` is the base's
    entropy (temperature 1) at each target position ``input_ids[:, 1:]``, 0 off the completion."""

    rollouts: Rollouts
    reward_N: torch.Tensor
    valid_N: torch.Tensor
    H_NT: torch.Tensor
    seconds: float  # sampling + scoring, when they were made

    def select(self, index_N: torch.Tensor) -> "BaseRollouts":
        r = self.rollouts.select(index_N)
        return BaseRollouts(r, self.reward_N[index_N], self.valid_N[index_N],
                            self.H_NT[index_N][:, : r.input_ids_NL.shape[1] - 1], self.seconds)


class FrozenBase:
    """π_b, frozen. Under LoRA it is the policy ``model`` with its adapter disabled (no second copy in
    memory); under full fine-tuning ``model`` is a separate frozen copy."""

    def __init__(self, model, lora: bool):
        self.model, self.lora = model, lora

    @classmethod
    def for_stage(cls, ctx) -> "FrozenBase":
        """The stage's starting model: the policy itself under LoRA, else a fresh copy of ``init_path``."""
        if ctx.cfg.lora_for(ctx.name).enabled:
            return cls(ctx.model, lora=True)
        dtype = next(ctx.model.parameters()).dtype
        return cls(load_model(str(ctx.init_path), dtype=dtype).to(ctx.device).eval().requires_grad_(False), lora=False)

    def active(self):
        """Context in which ``self.model`` computes π_b."""
        return self.model.disable_adapter() if self.lora else nullcontext()


def cache_key(ctx) -> str:
    """What the base rollouts depend on: the base's weight files (name, size, first and last MiB: enough
    to tell checkpoints apart without hashing gigabytes), the sampling settings, the candidates, the rewards."""
    cfg = ctx.cfg.fork
    h = hashlib.sha256()
    for f in sorted(Path(ctx.init_path).glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read()
        h.update(f"{f.name}:{size}".encode() + head + tail)
    settings = {"seed": ctx.cfg.seed, "task": ctx.cfg.task.model_dump(mode="json"),
                # "engine": the key's name from before sampling.engine became sampling.backend (same values), so that
                # base rollouts cached then are still found
                "max_new_tokens": ctx.cfg.sampling.max_new_tokens, "engine": ctx.cfg.sampling.backend,
                **{k: getattr(cfg, k) for k in ("candidates", "samples_per_problem", "temperature", "top_p")},
                "rewards": [reward_api.fingerprint(r) for r in cfg.rewards]}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def base_rollouts(ctx, base: FrozenBase) -> BaseRollouts:
    """The cached rollouts when their key matches (this stage's cache, else ``fork.rollouts_from``), or new
    ones, written to this stage's cache by rank 0."""
    key = cache_key(ctx)
    own = ctx.stage_dir / CACHE_NAME
    for path, required in ((own, False), (_rollouts_from(ctx.cfg.fork.rollouts_from), True)):
        if path is not None and path.exists():
            found = _load(path, key, required=required)
            if found is not None:
                if path != own and ctx.dist.is_main:
                    _save(own, found, key)
                return found
    made = _make(ctx, base)
    if ctx.dist.is_main:
        _save(own, made, key)
    return made


def _rollouts_from(arg: str | None) -> Path | None:
    if arg is None:
        return None
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    found = sorted(path.rglob(CACHE_NAME)) if path.is_dir() else []
    if len(found) != 1:
        what = "none" if not found else ", ".join(str(f) for f in found)
        raise ConfigError(f"fork.rollouts_from={arg!r}: expected exactly one {CACHE_NAME} there, found {what}; "
                          "point it at the file itself")
    return found[0]


def _make(ctx, base: FrozenBase) -> BaseRollouts:
    cfg, t0 = ctx.cfg.fork, time.time()
    problems = list(ctx.task.problems("train"))
    rewards = reward_api.load(cfg.rewards, ctx.task, where="fork.rewards", timeout_s=cfg.reward_timeout_s,
                              device=ctx.device, run_dir=ctx.run_dir)
    pick = batch_indices(len(problems), min(cfg.candidates, len(problems)), 0, ctx.cfg.seed)
    prompt_ids = [ctx.encode_prompt(problems[i].prompt, where=describe(problems[i])) for i in pick]
    seeds = row_seeds(f"fork:{ctx.cfg.seed}", pick, cfg.samples_per_problem)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                            max_new_tokens=ctx.cfg.sampling.max_new_tokens)
    with base.active():
        sampler = make_sampler(ctx.cfg.sampling, base.model, ctx.tokenizer, ctx.device)
        rollouts, H_NT = sample_with_entropy(sampler, base.model, prompt_ids, cfg.samples_per_problem, params,
                                             seeds=seeds)
    texts = completion_texts(ctx.tokenizer, rollouts)
    scored, _ = score_rollouts(rollouts, texts, [problems[i] for i in pick], ctx.task, rewards, seeds=seeds,
                               max_new_tokens=params.max_new_tokens)
    # index the task's train problems, not the candidate list, so a row names its problem on its own
    problem_N = torch.tensor(pick)[rollouts.problem_N]
    rollouts = Rollouts(**{**{f: getattr(rollouts, f) for f in _ROLLOUT_FIELDS}, "problem_N": problem_N,
                           "group_N": problem_N.clone()})
    return BaseRollouts(rollouts, scored.reward_N, scored.valid_N, H_NT, round(time.time() - t0, 3))


def sample_with_entropy(sampler, model, prompt_ids, group_size: int, params: SamplingParams, *, seeds):
    """(rollouts, H_NT): the decode's own entropies where the backend has them (``EntropySampler``), else one
    teacher-forced no-grad pass of the sampled ``model`` over its rollouts (the same numbers to float rounding)."""
    if isinstance(sampler, EntropySampler):
        return sampler.sample_with_entropy(prompt_ids, group_size, params, seeds=seeds)
    rollouts = sampler.sample(prompt_ids, group_size, params, seeds=seeds)
    forward, H_NT = ModelForward(model), torch.zeros(rollouts.num_rows, rollouts.input_ids_NL.shape[1] - 1)
    with torch.no_grad():
        for sl in micro_slices(rollouts.num_rows, 64):
            _, H, mask = forward.logprobs(rollouts, torch.arange(rollouts.num_rows)[sl], entropy="metric")
            H_NT[sl, : H.shape[1]] = (H * mask).float().cpu()
    return rollouts, H_NT


def _save(path: Path, data: BaseRollouts, key: str) -> None:
    tensors = {f: getattr(data.rollouts, f) for f in _ROLLOUT_FIELDS}
    tensors.update(reward_N=data.reward_N, valid_N=data.valid_N, H_NT=data.H_NT)
    atomic_save_tensors(tensors, path, metadata={"key": key, "seconds": str(data.seconds)})


def _load(path: Path, key: str, *, required: bool) -> BaseRollouts | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged cache is a user-facing problem with a file
        if not required:
            return None  # our own cache, damaged: sample again
        raise ConfigError(f"fork.rollouts_from: {path} is not a readable base-rollouts file ({e})") from None
    if meta.get("key") != key:
        if not required:
            return None
        raise ConfigError(f"fork.rollouts_from: {path} holds rollouts of a different base model or different "
                          "sampling settings (fork.candidates, samples_per_problem, temperature, top_p, rewards, "
                          "task, seed, sampling.max_new_tokens); use matching settings or remove fork.rollouts_from")
    rollouts = Rollouts(**{f: tensors[f] for f in _ROLLOUT_FIELDS})
    return BaseRollouts(rollouts, tensors["reward_N"], tensors["valid_N"], tensors["H_NT"], float(meta["seconds"]))


def select_problems(data: BaseRollouts, *, lo: float, hi: float, max_problems: int) -> tuple[torch.Tensor, dict]:
    """Rows of the problems whose pass rate (mean valid reward) lies in [lo, hi], at most ``max_problems``
    of them, closest to 0.5 first (ties: lower problem index first) — METHODS §4 step 2. Returns
    (row mask, stats)."""
    valid_f = data.valid_N.float()
    problems, inv = torch.unique(data.rollouts.problem_N, return_inverse=True)
    count = torch.zeros(len(problems)).index_add_(0, inv, valid_f)
    rate = torch.zeros(len(problems)).index_add_(0, inv, data.reward_N * valid_f) / count.clamp(min=1)
    eligible = (count > 0) & (rate >= lo) & (rate <= hi)
    order = sorted(torch.nonzero(eligible).squeeze(1).tolist(), key=lambda j: (abs(float(rate[j]) - 0.5), j))
    kept = torch.zeros(len(problems), dtype=torch.bool)
    kept[order[:max_problems]] = True
    stats = {"candidates": len(problems), "eligible": int(eligible.sum()), "problems_kept": int(kept.sum()),
             "base_pass_rate_candidates": float(rate[count > 0].mean()) if (count > 0).any() else None}
    return kept[inv], stats
