"""Decoding with two models in lockstep, and the causal test of METHODS §3 (2605.06241).

``decode`` runs the sampler's lockstep capability (``sampling.LockstepSampler``: the shared KV-cached decode loop,
``sampling.decode.decode_chunk``) over the BASE model (and, when a rule needs it, the TUNED model fed the same
tokens). At every step the base's next token is drawn exactly as the sampler draws it: the same ``RowSampler``
(temperature, top-k, top-p, and row r's counter-based uniform u = U(seed_r, t)), the same left padding and decode
engine. So with no substitution a
row reproduces the base's own sample token for token, and with substitutions a row differs from it only
because of them (the random stream does not shift: u at step t depends on (seed, t) alone).

A *rule* may overwrite the drawn token at some steps:

* ``Oracle``: where the tuned argmax differs from the base argmax and lies in the base's top-k (a
  RERANKED position), emit the tuned argmax.
* ``RandomControl``: the same number of substitutions per row as the oracle made, at positions drawn
  uniformly without replacement from ``range(L_r)``, with ``L_r`` the length of the row's oracle
  completion (the control's own length is unknown before it is decoded; a planned position past its
  EOS is lost, so the *realised* count is what is reported). The token emitted there is a uniformly
  random non-argmax token of the base's top-k. Why that token: it is the kind of token the oracle emits
  (in the base top-k, not its argmax), so the control differs from the oracle only in *which* positions
  and *which* top-k alternative were chosen, and not in how implausible the substituted token is to the base.
  Only top-k tokens with non-zero base probability are candidates; a planned step with none is skipped.
* ``EntropyGate``: where the base entropy H_t = −Σ_v π_b(v) log π_b(v) (of softmax(z_b), temperature
  1) exceeds τ, emit the tuned argmax. The gate chooses positions without the tuned model; taking the
  tuned argmax there (even where it equals the base argmax, which then forces a greedy step) measures
  whether entropy alone locates the forks that the tuned model uses.

Substitutions are counted only at steps where the row was still generating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algos.logprobs import entropy_from_logits
from ..config import ConfigError
from ..evaluation import heldout_scores
from ..sampling import LockstepSampler, SamplingParams, make_sampler
from ..sampling.decode import uniform
from ..types import Rollouts

_CONTROL_SALT = 0x2545F4914F6CDD1D  # keeps the control's token draws independent of the sampling draws


def rank_of(logits_NV: torch.Tensor, index_N: torch.Tensor) -> torch.Tensor:
    """1-based rank of token ``index_N`` in each row's order (logit descending, then token id ascending).

    rank = 1 + #{v : z_v > z_i} + #{v < i : z_v = z_i}. The id tie-break is the one ``argmax`` and
    ``topk`` use on CPU, so rank == 1 exactly when ``index`` is the argmax. Works on any leading dims."""
    z_i = logits_NV.gather(-1, index_N.unsqueeze(-1))
    ids_V = torch.arange(logits_NV.shape[-1], device=logits_NV.device)
    before = (logits_NV > z_i) | ((logits_NV == z_i) & (ids_V < index_N.unsqueeze(-1)))
    return 1 + before.sum(-1)


class NoSubstitution:
    needs_tuned = False

    def __call__(self, step, base_BV, tuned_BV, rows_B, seeds_B):
        return torch.zeros(base_BV.shape[0], dtype=torch.bool, device=base_BV.device), base_BV.argmax(-1)


@dataclass
class Oracle:
    top_k: int
    needs_tuned: bool = True

    def __call__(self, step, base_BV, tuned_BV, rows_B, seeds_B):
        a_base, a_tuned = base_BV.argmax(-1), tuned_BV.argmax(-1)
        return (a_tuned != a_base) & (rank_of(base_BV, a_tuned) <= self.top_k), a_tuned


@dataclass
class EntropyGate:
    tau: float
    needs_tuned: bool = True

    def __call__(self, step, base_BV, tuned_BV, rows_B, seeds_B):
        return entropy_from_logits(base_BV) > self.tau, tuned_BV.argmax(-1)


@dataclass
class RandomControl:
    """``plan_NS[r, s]``: substitute row r at step s; see ``control_plan``."""

    plan_NS: torch.Tensor
    top_k: int
    needs_tuned: bool = False

    def __call__(self, step, base_BV, tuned_BV, rows_B, seeds_B):
        if step >= self.plan_NS.shape[1]:
            return torch.zeros(base_BV.shape[0], dtype=torch.bool, device=base_BV.device), base_BV.argmax(-1)
        values_BK, top_BK = base_BV.topk(self.top_k, dim=-1)  # sorted: column 0 is the argmax
        n_B = torch.isfinite(values_BK[:, 1:]).sum(1).cpu()  # candidates the base could emit (p > 0)
        u_B = uniform(seeds_B ^ _CONTROL_SALT, step + 1)
        pick_B = 1 + (u_B * n_B).long().clamp_(min=0).minimum((n_B - 1).clamp(min=0))
        where_B = self.plan_NS[rows_B, step] & (n_B > 0)
        return where_B.to(base_BV.device), top_BK.gather(1, pick_B[:, None].to(top_BK.device)).squeeze(1)


def control_plan(subs_N: torch.Tensor, length_N: torch.Tensor, seeds: list[int], max_steps: int) -> torch.Tensor:
    """[N, max_steps] bool: ``subs_N[r]`` distinct steps drawn uniformly from ``range(length_N[r])``,
    from a generator seeded by the row's seed (reproducible, and independent of batching)."""
    plan = torch.zeros(len(seeds), max_steps, dtype=torch.bool)
    for r, (k, n, seed) in enumerate(zip(subs_N.tolist(), length_N.tolist(), seeds)):
        if k:
            gen = torch.Generator().manual_seed(seed % (1 << 63))
            plan[r, torch.randperm(n, generator=gen)[:k]] = True
    return plan


def decode(base, tuned, tokenizer, prompt_ids: list[list[int]], group_size: int, params: SamplingParams,
           seeds: list[int], rule=None, *, sampling) -> tuple[Rollouts, torch.Tensor]:
    """Sample ``group_size`` rows per prompt from ``base`` under ``rule``; returns (rollouts, subs_N).

    The sampler is the one ``sampling`` (a ``SamplingCfg``) builds for ``base``, and the decode its lockstep
    capability, so with ``rule=None`` the rollouts equal that sampler's ``sample(...)``."""
    rule = rule or NoSubstitution()
    sampler = make_sampler(sampling, base, tokenizer)
    if not isinstance(sampler, LockstepSampler):
        raise ConfigError(f"sampling.backend {sampling.backend!r} cannot decode two models in lockstep, which forkrl "
                          "diff's causal test needs; use sampling.backend: auto or hf for the diagnostic")
    return sampler.lockstep(tuned if rule.needs_tuned else None, prompt_ids, group_size, params, seeds=seeds,
                            rule=rule)


# ---------------------------------------------------------------------------------------- the causal test
def score_rollouts(task, problems, tokenizer, rollouts: Rollouts) -> list[float]:
    """Each row's task score; an unscorable row (None / NaN) counts as a failure, as in ``evaluate``."""
    return heldout_scores(task, problems, tokenizer, rollouts)[1]


def recovery(p_x: float, p_base: float, p_tuned: float, num_samples: int) -> float | None:
    """Fraction of the base→tuned pass@1 gain an intervention recovers: (p_x − p_base) / (p_tuned − p_base).

    None when the gain is below the resolution of the estimate, |p_tuned − p_base| < 1 / num_samples
    (less than one sample's worth): the ratio would be noise divided by noise."""
    gain = p_tuned - p_base
    if num_samples <= 0 or abs(gain) < 1.0 / num_samples:
        return None
    return (p_x - p_base) / gain


@dataclass(frozen=True)
class CausalSetup:
    """What every decode of the causal test shares: the rows (prompts × group), their seeds, the params."""

    task: object
    problems: list
    prompt_ids: list[list[int]]
    group_size: int
    params: SamplingParams
    seeds: list[int]
    sampling: object  # the run's SamplingCfg: the backend and its chunk size


def causal_test(base, tuned, tokenizer, setup: CausalSetup, *, p_base: float, p_tuned: float, top_k: int,
                tau: float) -> dict:
    """Oracle, random-control and entropy-gate decodes (see the module docstring) with their pass@1,
    recovered gain fraction and substitutions per trajectory. ``p_base`` / ``p_tuned``: pass@1 of the
    two models' own samples on the same rows and seeds."""
    n = len(setup.seeds)

    def run(rule):
        rollouts, subs_N = decode(base, tuned, tokenizer, setup.prompt_ids, setup.group_size, setup.params,
                                  setup.seeds, rule, sampling=setup.sampling)
        scores = score_rollouts(setup.task, setup.problems, tokenizer, rollouts)
        p = sum(scores) / max(n, 1)
        return rollouts, subs_N, {"pass_at_1": p, "recovery": recovery(p, p_base, p_tuned, n),
                                  "substitutions_per_traj": float(subs_N.double().mean()) if n else 0.0}

    oracle_rollouts, oracle_subs, oracle = run(Oracle(top_k))
    plan = control_plan(oracle_subs, oracle_rollouts.completion_len_N, setup.seeds, setup.params.max_new_tokens)
    _, _, random = run(RandomControl(plan, top_k))
    _, _, gate = run(EntropyGate(tau))
    return {"base": {"pass_at_1": p_base}, "tuned": {"pass_at_1": p_tuned},
            "oracle": oracle, "random": random, "entropy_gate": gate}
