"""The sampler seam: what every rollout backend gives the trainers and diagnostics, and the one factory.

A backend is a ``Sampler``: ``sample(prompt_ids, group_size, params, *, seeds) -> Rollouts`` and
``sync_weights()``, which the training loop calls after every optimizer step (a backend that holds its own copy of
the weights, such as a GPU inference engine, pushes them there; one that reads the model's parameters does
nothing). Two further capabilities are named here, for the backends that have them:

* ``EntropySampler.sample_with_entropy``: the sampled model's entropy at each completion position, read off the
  decode's own logits (the fork stage's gate; without it the fork stage teacher-forces the base once more);
* ``LockstepSampler.lockstep``: decode a second model fed the same tokens, with a rule that may substitute the
  drawn token (``forkrl diff``'s causal test);
* ``policy_forward(model)``: the backend's own policy forward for an update that trains on its rollouts, or None
  (``forward.make_forward`` then takes the model's forward); the fused CPU backend's replays its decode.

``make_sampler(cfg.sampling, model, tokenizer, device)`` is the only place a backend is chosen
(``sampling.backend``; the registry ``SAMPLERS`` at the bottom). Every row is drawn from its own seeded stream
(``row_seeds``), so a row's sample does not depend on its batch, chunk, rank or a resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from ..types import Rollouts

if TYPE_CHECKING:
    from ..config import RunCfg, SamplingCfg


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@runtime_checkable
class Sampler(Protocol):
    """Samples ``group_size`` completions per prompt. ``seeds``: one per row, prompt-major
    (``len(prompt_ids) * group_size``); row r's tokens depend on ``seeds[r]`` and the weights alone. The returned
    ``Rollouts`` hold, at each completion position, the sampler's log-prob of the drawn token at the sampling
    temperature (before top-k / top-p truncation), and ``truncated_N`` for rows that hit ``max_new_tokens``."""

    tokenizer: object

    def sample(self, prompt_ids: list[list[int]], group_size: int, params: SamplingParams, *,
               seeds: list[int]) -> Rollouts: ...

    def sync_weights(self) -> None:
        """Called after every optimizer step: the policy's weights changed."""


@runtime_checkable
class EntropySampler(Sampler, Protocol):
    def sample_with_entropy(self, prompt_ids: list[list[int]], group_size: int, params: SamplingParams, *,
                            seeds: list[int]) -> tuple[Rollouts, torch.Tensor]:
        """(rollouts, H_NT): also the sampled model's entropy (temperature 1) at each target position
        ``input_ids[:, 1:]`` of the completions, 0 elsewhere."""


@runtime_checkable
class LockstepSampler(Sampler, Protocol):
    def lockstep(self, other, prompt_ids: list[list[int]], group_size: int, params: SamplingParams, *,
                 seeds: list[int], rule) -> tuple[Rollouts, torch.Tensor]:
        """Sample from this sampler's model while ``other`` (a model, or None) is fed the same tokens;
        ``rule(step, logits, other_logits, rows_B, seeds_B)`` returns (where_B, token_B) to overwrite the draw
        (``diagnostics.substitute``). Returns (rollouts, substitutions per row). With a rule that never
        substitutes, the rollouts equal ``sample``'s."""


def row_seeds(namespace: str, problem_ids: list[int], group_size: int) -> list[int]:
    """One sampling seed per row, a pure function of (namespace, problem, sample index): a row's sample
    does not depend on how the step is batched, sharded across ranks, or resumed."""
    return [int.from_bytes(hashlib.sha256(f"{namespace}:{p}:{j}".encode()).digest()[:8], "big") >> 1
            for p in problem_ids for j in range(group_size)]


def sampling_params(cfg: RunCfg, *, for_eval: bool = False) -> SamplingParams:
    """The run's sampling settings (``sampling``); for held-out evaluation at ``eval.temperature`` if set."""
    s = cfg.sampling
    temp = cfg.eval.temperature if (for_eval and cfg.eval.temperature is not None) else s.temperature
    return SamplingParams(temperature=temp, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens)


def completion_texts(tokenizer, rollouts: Rollouts) -> list[str]:
    """Each row's completion, decoded (special tokens dropped)."""
    mask = rollouts.completion_mask_NL
    return [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
            for ids, m in zip(rollouts.input_ids_NL, mask)]


class SamplerError(ValueError):
    """A backend cannot run what the config asks of it (a ``ConfigError`` for the user; see ``make_sampler``)."""


def make_sampler(cfg: SamplingCfg, model, tokenizer, device: torch.device | None = None, *,
                 record: bool = False) -> Sampler:
    """The sampler ``cfg.backend`` names, for ``model`` (on ``device``: by default where its parameters are).

    ``record``: the GRPO update will train on these rollouts. A backend that can replay its decode for the
    update (the fused CPU decoder, with ``sampling.replay``) then keeps each call's record, and
    ``forward.make_forward`` gives the replaying policy forward; every other backend ignores it."""
    from ..config import ConfigError

    try:
        return SAMPLERS[cfg.backend](cfg, model, tokenizer, device, record)
    except SamplerError as e:
        raise ConfigError(f"sampling.backend: {e}") from None


def _hf(cfg, model, tokenizer, device, record):
    from .hf import HFSampler

    return HFSampler(model, tokenizer, batch_size=cfg.batch_size)


def _fused(cfg, model, tokenizer, device, record, *, auto: bool = False):
    from ..cpu import FusedSampler, fused_unsupported

    why = fused_unsupported(model)
    if why is not None:
        raise SamplerError(f"'fused' (forkrl's CPU decoder) cannot run this model: {why}; use 'auto' or 'hf'")
    return FusedSampler(model, tokenizer, batch_size=cfg.batch_size, record=record and cfg.replay, auto=auto)


def _auto(cfg, model, tokenizer, device, record):
    """The fused CPU decoder where it runs the model (float32 on a CPU, Llama/Qwen2 layers: see ``forkrl.cpu``) and
    is the faster one (every call but the smallest: ``cpu.sampler``), else Hugging Face's forward."""
    from ..cpu import fused_unsupported

    if fused_unsupported(model) is None:
        return _fused(cfg, model, tokenizer, device, record, auto=True)
    return _hf(cfg, model, tokenizer, device, record)


def _static(cfg, model, tokenizer, device, record):
    """The model's forward over a static KV cache, its one-token step compiled on CUDA (``sampling/static.py``): the
    CUDA candidate, not yet measured on a GPU, so ``auto`` does not take it."""
    from .static import StaticSampler, static_unsupported

    why = static_unsupported(model)
    if why is not None:
        raise SamplerError(f"'static' cannot run this model: {why}; use 'hf'")
    return StaticSampler(model, tokenizer, batch_size=cfg.batch_size)


def _vllm(cfg, model, tokenizer, device, record):
    """vLLM, one engine colocated in the process (``forkrl.sampling.vllm``; the optional extra ``forkrl[vllm]``,
    GPU machines only, experimental). Imported here, on use, so nothing else ever needs vLLM."""
    from .vllm import make_vllm_sampler

    return make_vllm_sampler(cfg, model, tokenizer)


SAMPLERS = {
    "auto": _auto,
    "hf": _hf,
    "fused": _fused,
    "static": _static,
    "vllm": _vllm,
}
