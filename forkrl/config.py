"""One validated config tree, loaded from YAML, never mutated, saved resolved into every run.

Every section forbids unknown keys. ``load_config`` turns pydantic's errors into messages that name the
key path, the YAML line, and the allowed keys or values, and raises ``ConfigError``; the CLI prints it
and exits with status 2.

Names of things forkrl has a registry of (advantage estimators, objectives, reductions, KL estimators, rewards,
filters, fork gates, stages, sampler backends, schedules, verifiers, fault injections) are checked against that
registry itself (``names.named``; ``NAMED`` lists them), not against a copy of its keys: a name added to a registry is a
valid config value.
Keys renamed since a run was written are read under their new name (``_MOVED``), so older run directories load.
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Annotated, Any, Literal, NamedTuple, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator,
                      model_validator)

from .algos.advantages import ADVANTAGES
from .algos.filters import FILTERS
from .algos.fork import GATES
from .algos.kl import KL_ESTIMATORS
from .algos.objectives import OBJECTIVES
from .algos.correction import CORRECTIONS
from .algos.reductions import REDUCTIONS
from .check import FAULTS
from .names import named
from .rewards import REWARDS
from .rewards.judge import JudgeCfg
from .rewards.models import RewardModelCfg
from .sampling.base import SAMPLERS
from .tasks import TASKS
from .tasks.jsonl import VERIFIERS
from .trainers import STAGES
from .trainers.optim import SCHEDULES


Advantage = named(ADVANTAGES, "advantage estimator")
Objective = named(OBJECTIVES, "objective")
Reduction = named(REDUCTIONS, "loss reduction")
KlEstimator = named(KL_ESTIMATORS, "KL estimator", extra=("none",))
RewardName = named(REWARDS, "reward")
FilterName = named(FILTERS, "filter", extra=("none",))
GateKind = named(GATES, "fork gate")
StageName = named(STAGES, "stage")
Backend = named(SAMPLERS, "sampler backend")
Schedule = named(SCHEDULES, "learning-rate schedule")
Fault = named(FAULTS, "fault injection")
Correction = named(CORRECTIONS, "sampler correction")

# config key (a list's entries: ``[]``) -> (the registry it names an entry of, names it accepts besides)
NAMED = {
    "grpo.advantage": (ADVANTAGES, ()), "grpo.objective": (OBJECTIVES, ()), "grpo.reduction": (REDUCTIONS, ()),
    "sft.reduction": (REDUCTIONS, ()), "grpo.kl.estimator": (KL_ESTIMATORS, ("none",)),
    "grpo.rewards[].name": (REWARDS, ()), "fork.rewards[].name": (REWARDS, ()), "grpo.filter": (FILTERS, ("none",)),
    "fork.gate.kind": (GATES, ()), "stages[]": (STAGES, ()), "sampling.backend": (SAMPLERS, ()),
    "sft.optim.schedule": (SCHEDULES, ()), "grpo.optim.schedule": (SCHEDULES, ()),
    "fork.optim.schedule": (SCHEDULES, ()), "dpo.optim.schedule": (SCHEDULES, ()),
    "dpo.rewards[].name": (REWARDS, ()), "task.verifier": (VERIFIERS, ()), "debug.inject": (FAULTS, ()),
    "grpo.sampler_correction": (CORRECTIONS, ()),
}

Pos = Annotated[int, Field(ge=1)]
NonNeg = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(gt=0.0, le=1.0)]


class ConfigError(ValueError):
    """A config a user wrote is wrong; the message lists every problem with its key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinySpec(Strict):
    """A tiny Llama/Qwen2-style model built locally, with a BPE tokenizer trained on the task's text."""

    arch: Literal["qwen2", "llama"] = "qwen2"
    hidden_size: Pos = 128
    num_layers: Pos = 4
    num_heads: Pos = 4
    num_kv_heads: Pos = 2
    intermediate_size: Pos = 384
    max_positions: Pos = 256
    vocab_size: Annotated[int, Field(ge=260, le=65536)] = 320
    seed: int = 0


class LoraCfg(Strict):
    enabled: bool = False
    r: Pos = 8
    alpha: float = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class ModelCfg(Strict):
    path: str | None = None  # a local directory written by save_pretrained, or a hub id
    tokenizer: str | None = None  # defaults to path
    tiny: TinySpec | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    trust_remote_code: bool = False
    lora: LoraCfg = LoraCfg()
    # recompute each decoder layer's activations in the backward instead of keeping them (less memory, ~1/3 more
    # compute): the trained model only; sampling and no-grad passes are unchanged
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path (a local model directory or hub id) "
                             "or model.tiny (the built-in tiny model spec)")
        return self


TaskCfg = Annotated[Union[tuple(TASKS.values())], Field(discriminator="type")]


class VllmCfg(Strict):
    """The vLLM backend's engine (``sampling.backend: vllm``, ``forkrl.sampling.vllm``; experimental): one colocated
    engine per process, sharing the GPU with training."""

    gpu_memory_utilization: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3  # the GPU share the engine may take
    # 1: between samplings the engine's weights go to CPU memory and its KV cache is freed; 0: it stays awake
    sleep_level: NonNeg = 1
    enable_prefix_caching: bool = True  # a group's G rows share their prompt's KV cache
    max_model_len: Pos | None = None  # default: the model's own context length

    @field_validator("sleep_level")
    @classmethod
    def _safe_level(cls, level: int) -> int:
        if level > 1:
            raise ValueError(f"sleep level {level}: level 2 discards the weights and has been reported to corrupt "
                             "outputs after waking; use 1 (weights kept in CPU memory) or 0 (no sleep)")
        return level


class SamplingCfg(Strict):
    temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    top_p: Prob = 1.0
    top_k: NonNeg = 0  # 0 = off
    max_new_tokens: Pos = 64
    batch_size: Pos = 256  # rows decoded together
    # auto: forkrl's fused CPU decoder where it runs the model (float32 on a CPU, Llama/Qwen2: forkrl.cpu), else hf
    backend: Backend = "auto"
    # the fused backend keeps the record of each decode the GRPO update trains on, and the update replays it
    # instead of running the model's forward again (same log-probs and gradients to float rounding)
    replay: bool = True
    vllm: VllmCfg = VllmCfg()  # backend vllm's engine


class OptimCfg(Strict):
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: NonNeg = 0
    schedule: Schedule = "constant"
    grad_clip: Annotated[float, Field(gt=0.0)] | None = 1.0


class SftCfg(Strict):
    steps: Pos = 500
    batch_size: Pos = 64  # sequences per optimizer step
    micro_batch_size: Pos = 64
    reduction: Reduction = "token_mean"
    t_max: Pos | None = None  # for seq_mean_token_sum_norm; default: the longest demonstration
    eval_every: NonNeg = 0  # held-out pass@1 every K optimizer steps (0: only at the end of the stage)
    optim: OptimCfg = OptimCfg(lr=3e-3, warmup_steps=30, schedule="linear")
    # env tasks: the observations' tokens (role ENV) are masked out of the loss, or trained on as targets too
    observations: Literal["mask", "train"] = "mask"
    # the data order: seeded shuffles; or the reverse-perplexity curriculum (arXiv 2605.13301): by the response's
    # perplexity under the starting model, highest first (perplexity_desc, the paper's) or lowest first, no shuffle
    order: Literal["shuffle", "perplexity_desc", "perplexity_asc"] = "shuffle"

    @model_validator(mode="after")
    def _divides(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"sft.micro_batch_size ({self.micro_batch_size}) must divide "
                             f"sft.batch_size ({self.batch_size})")
        return self


class RewardCfg(Strict):
    """One reward of a stage (``rewards.api``): a built-in by ``name``, or a callable by ``fn`` (``PATH.py:NAME``,
    the path relative to the config file; ``package.module:NAME``; or a name registered under the entry-point
    group ``forkrl.rewards``), called with its parameters filled by name, plus ``kwargs``."""

    name: RewardName | None = None
    fn: Annotated[str, Field(min_length=1)] | None = None
    reward_model: RewardModelCfg | None = None  # a sequence-classification model (rewards.models)
    judge: JudgeCfg | None = None  # an LLM judge: a local causal LM or an OpenAI-compatible endpoint (rewards.judge)
    label: Annotated[str, Field(min_length=1)] | None = None  # what its metrics are logged under (default: its name)
    weight: float = 1.0
    kwargs: dict[str, Any] = {}
    mode: Literal["row", "batch", "group"] = "row"  # batch / group: one call per batch / per problem's group
    isolation: Literal["inline", "process"] = "inline"  # process: a worker killed and respawned on a timeout
    workers: Annotated[int, Field(ge=1, le=64)] = 1  # with isolation: process, the worker processes a batch is spread on
    timeout_s: Annotated[float, Field(gt=0.0)] | None = None  # per call; default: the stage's reward_timeout_s

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("name", "fn", "reward_model", "judge") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give a reward exactly one of name (a built-in: {', '.join(REWARDS)}), fn (your "
                             f"own: PATH.py:NAME, package.module:NAME, or an installed entry point), reward_model "
                             f"or judge; got {', '.join(given) or 'none'}")
        return self


class ExploreCfg(Strict):
    """Exploration-interleaved training (arXiv 2605.16143; env tasks): exploration episodes, shown
    ``instruction`` instead of the task's and rewarded by ``info[reward]`` at their end (the map's coverage), in
    groups of their own whose advantages are normalised apart from the task's. "5:1" is read two ways:
    ``mode: steps``, every (``ratio`` + 1)-th step explores; ``mode: groups``, 1 in (``ratio`` + 1) of every step's
    groups (at least one) explores. Exploration has value only where the map is not all visible (FrozenLake
    ``view: 1``)."""

    mode: Literal["off", "steps", "groups"] = "off"
    ratio: Pos = 5
    reward: str = "coverage"
    instruction: str = ("Explore: move around and see as much of the map as you can. Answer with one action, e.g. "
                        "<answer>Left</answer>.")


class DpoCfg(Strict):
    """DPO (arXiv 2305.18290) against a frozen reference (the stage's starting model; under LoRA the adapter-disabled
    base). ``data: online`` is OAIF (arXiv 2402.04792): two fresh samples of each prompt from the current policy, the
    preferred one the higher under ``rewards`` (a judge, a reward model, a verifier: any reward entries), a tie or an
    unscorable sample dropping the pair. ``data: offline`` reads ``pairs_path``, JSON Lines of ``{"prompt": ...,
    "chosen": ..., "rejected": ...}`` (prompts formatted as the task formats them; relative to the config file)."""

    steps: Pos = 100
    pairs_per_step: Pos = 16  # online: prompts per step (each gives at most one pair); offline: pairs per step
    micro_batch_size: Pos = 16  # pairs per forward/backward (two rows each)
    beta: Annotated[float, Field(gt=0.0)] = 0.1
    data: Literal["online", "offline"] = "online"
    pairs_path: str | None = None
    rewards: list[RewardCfg] = [RewardCfg(name="correct")]
    reward_timeout_s: Annotated[float, Field(gt=0.0)] | None = 10.0
    eval_every: NonNeg = 0
    optim: OptimCfg = OptimCfg(lr=1e-4)

    @model_validator(mode="after")
    def _source(self):
        if self.data == "offline" and not self.pairs_path:
            raise ValueError("dpo.data: offline reads its pairs from dpo.pairs_path (JSON Lines of {\"prompt\": ..., "
                             "\"chosen\": ..., \"rejected\": ...}); give it, or use data: online")
        if self.data == "online" and not self.rewards:
            raise ValueError("dpo.rewards is empty: online DPO needs a reward or judge to pick the preferred sample")
        if self.pairs_per_step % self.micro_batch_size:
            raise ValueError(f"dpo.micro_batch_size ({self.micro_batch_size}) must divide dpo.pairs_per_step "
                             f"({self.pairs_per_step})")
        return self


class TreeCfg(Strict):
    """Tree rollouts (Tree-GRPO arXiv 2509.21240, TreeRL arXiv 2506.11902; ``algos.tree``): per prompt ``chains``
    completions sampled whole, and ``forks`` continuations forked from each at positions drawn at random or at its
    highest-entropy tokens (``at``), each sharing the chain's tokens before the fork; every root-to-leaf path is
    rewarded and gets the tree advantage; shared prefixes are sampled and trained once."""

    chains: Pos = 2  # M
    forks: Pos = 3  # N per chain
    at: Literal["random", "highest_entropy"] = "random"


class KlCfg(Strict):
    estimator: KlEstimator = "k3"
    beta: Annotated[float, Field(ge=0.0)] = 0.0  # 0: no reference model is loaded
    where: Literal["loss", "reward"] = "loss"

    @model_validator(mode="after")
    def _consistent(self):
        if self.estimator == "none" and self.beta > 0:
            raise ValueError("grpo.kl.beta > 0 needs grpo.kl.estimator k1 or k3 (or set beta: 0)")
        return self

    @property
    def active(self) -> bool:
        return self.beta > 0 and self.estimator != "none"


class GrpoCfg(Strict):
    steps: Pos = 100
    prompts_per_step: Pos = 16  # B
    group_size: Pos = 8  # G
    micro_batch_size: Pos = 64  # rows per forward/backward
    advantage: Advantage = "grpo"
    adv_eps: Annotated[float, Field(ge=0.0)] = 1e-4
    objective: Objective = "ppo_clip"
    clip: bool = True  # False: plain ratio * A (the Spurious Rewards control)
    eps_low: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    eps_high: Annotated[float, Field(gt=0.0)] = 0.28
    dual_clip: Annotated[float, Field(gt=1.0)] | None = None
    kl: KlCfg = KlCfg()
    entropy_coef: Annotated[float, Field(ge=0.0)] = 0.0
    reduction: Reduction = "token_mean"
    t_max: Pos | None = None  # for seq_mean_token_sum_norm; default sampling.max_new_tokens
    inner_iterations: Pos = 1  # μ: optimizer steps per batch, on stored old log-probs
    # rows whose advantage is 0 get a no-grad pass (their statistics) and no backward, where their loss and
    # gradient are exactly 0 (no KL or entropy term in the loss); false: every row gets a backward
    skip_zero_advantage: bool = True
    filter: FilterName = "none"  # zero_variance_groups: drop groups whose rewards are all equal (DAPO); snr: RAGEN-2
    snr_top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None  # filter snr: share of the total std kept (0.9)
    snr_mode: Literal["linear", "softmax"] | None = None  # filter snr: linear (default) or softmax top-p
    mask_truncated: bool = False  # DAPO's overlong filtering: completions cut at max_new_tokens get no loss
    rewards: list[RewardCfg] = [RewardCfg(name="correct")]
    reward_timeout_s: Annotated[float, Field(gt=0.0)] | None = 10.0  # per reward call; past it the row is unscorable
    eval_every: NonNeg = 0  # held-out pass@1 every K steps (0: only at the end of the stage)
    # RAGEN-2's input-reasoning MI estimate every K steps (0: never): one no-grad forward per (completion, prompt)
    # pair of the step, B × B × G rows (diagnostics/collapse.py)
    mi_every: NonNeg = 0
    # ECHO (env tasks): λ of a next-token loss on the observations' (ENV) tokens, over the step's ENV tokens
    echo_coef: Annotated[float, Field(ge=0.0)] = 0.0
    explore: ExploreCfg = ExploreCfg()  # env tasks: exploration episodes interleaved with the task's
    tree: TreeCfg | None = None  # tree rollouts instead of group_size flat samples a prompt (algos.tree)
    # the sampler/trainer mismatch (algos.correction): importance weights π_old/π_sampler on the objective, truncated
    # at correction_cap (tis) or zero outside [1/cap, cap] (mis); for rows an engine (vllm, static) sampled
    sampler_correction: Correction = "none"
    correction_cap: Annotated[float, Field(gt=1.0)] = 2.0
    optim: OptimCfg = OptimCfg(lr=1e-4)

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def filter_kwargs(self) -> dict:
        """The named arguments of the configured filter (``algos.filters``)."""
        if self.filter != "snr":
            return {}
        return {"top_p": 0.9 if self.snr_top_p is None else self.snr_top_p, "mode": self.snr_mode or "linear"}

    @model_validator(mode="after")
    def _divides(self):
        if self.tree is not None:
            wrong = [f"{k} is {v!r}" for k, v, ok in (
                ("grpo.inner_iterations", self.inner_iterations, 1), ("grpo.objective", self.objective, "ppo_clip"),
                ("grpo.filter", self.filter, "none"), ("grpo.mask_truncated", self.mask_truncated, False),
                ("grpo.kl.where", self.kl.where, "loss"), ("grpo.sampler_correction", self.sampler_correction, "none"))
                if v != ok]
            if wrong:
                raise ValueError("grpo.tree: a shared prefix is trained once with the sum of its paths' advantages, "
                                 "exact for the on-policy PPO surrogate over every path (inner_iterations 1, objective "
                                 f"ppo_clip, filter none, mask_truncated false, kl.where loss, sampler_correction none); "
                                 f"here {', '.join(wrong)}")
        elif self.rows_per_step % self.micro_batch_size:
            raise ValueError(f"grpo.micro_batch_size ({self.micro_batch_size}) must divide the rows per step, "
                             f"grpo.prompts_per_step × grpo.group_size = {self.rows_per_step}")
        if not self.rewards:
            raise ValueError("grpo.rewards is empty: give at least one, e.g. [{name: correct}]")
        if self.filter != "snr" and (self.snr_top_p is not None or self.snr_mode is not None):
            raise ValueError(f"grpo.snr_top_p and grpo.snr_mode set the snr filter, but grpo.filter is "
                             f"{self.filter!r}: set grpo.filter: snr, or remove them")
        return self


class GateCfg(Strict):
    """Which completion positions are decisions (METHODS §4 step 5)."""

    kind: GateKind = "entropy"  # random/all: the ablations
    tau: Annotated[float, Field(ge=0.0)] | None = None  # absolute base entropy in nats; None: use quantile
    quantile: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9  # τ = this quantile of the base's entropies


class ForkCfg(Strict):
    """Fork-gated contrastive training from base rollouts, RL-free (METHODS §4, ReasonMaxxer)."""

    candidates: Pos = 200  # training problems sampled from the frozen base
    samples_per_problem: Annotated[int, Field(ge=2)] = 20  # n
    temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 0.6
    top_p: Prob = 0.95
    pass_rate_min: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25
    pass_rate_max: Annotated[float, Field(ge=0.0, le=1.0)] = 0.75
    max_problems: Pos = 50  # kept problems, pass rate closest to 0.5 first
    adv_clip: Annotated[float, Field(gt=0.0)] = 2.5
    gate: GateCfg = GateCfg()
    positive_only: bool = False  # the ablation: train on rows with A > 0 only
    kl_coef: Annotated[float, Field(ge=0.0)] = 0.1  # λ of the KL(π_b ‖ π_θ) anchor off the decision set
    neg_floor: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # A<0 tokens stop at this × π_b (not the paper)
    epochs: Pos = 3
    reweight: bool = False  # epochs after the first: advantages under π_θ by importance weights (not the paper)
    batch_size: Pos = 64  # rows per optimizer step
    micro_batch_size: Pos = 64
    rewards: list[RewardCfg] = [RewardCfg(name="correct")]
    reward_timeout_s: Annotated[float, Field(gt=0.0)] | None = 10.0
    lora: LoraCfg = LoraCfg(enabled=True, r=8, alpha=16.0, target_modules=["o_proj"])  # enabled: false = full FT
    rollouts_from: str | None = None  # a run (or its base_rollouts.safetensors) whose base rollouts to reuse
    eval_every: NonNeg = 0
    optim: OptimCfg = OptimCfg(lr=2e-4, grad_clip=1.0)

    @model_validator(mode="after")
    def _consistent(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"fork.micro_batch_size ({self.micro_batch_size}) must divide "
                             f"fork.batch_size ({self.batch_size})")
        if self.pass_rate_min > self.pass_rate_max:
            raise ValueError(f"fork.pass_rate_min ({self.pass_rate_min}) is above fork.pass_rate_max "
                             f"({self.pass_rate_max})")
        if not self.rewards:
            raise ValueError("fork.rewards is empty: give at least one, e.g. [{name: correct}]")
        return self


class SelfCritiqueCfg(Strict):
    """The self-critique loop of ``forkrl eval --self-critique`` (``forkrl/critique.py``, arXiv 2605.13301): accept
    a candidate after ``accept_after`` passing self-checks in a row, give up after ``give_up_after`` failed ones in a
    row (or ``max_candidates``); a check appends ``check`` to the candidate and compares the model's ``yes`` and
    ``no`` next tokens."""

    accept_after: Pos = 5
    give_up_after: Pos = 10
    max_candidates: Pos = 32
    check: Annotated[str, Field(min_length=1)] = "\nIs the answer above correct? Answer Yes or No:"
    yes: Annotated[str, Field(min_length=1)] = " Yes"
    no: Annotated[str, Field(min_length=1)] = " No"


class EvalCfg(Strict):
    num_problems: Pos = 200
    samples_per_problem: Pos = 4
    temperature: Annotated[float, Field(ge=0.0)] | None = None  # None: sampling.temperature; 0: greedy
    self_critique: SelfCritiqueCfg = SelfCritiqueCfg()


class CheckpointCfg(Strict):
    every: NonNeg = 0  # optimizer steps between checkpoints (0: only at the end of a stage)
    keep_last: Pos = 2


class GuardsCfg(Strict):
    # A NaN/inf loss or gradient skips that update; this many in a row stop the run with advice.
    max_consecutive_nonfinite: Pos = 3
    # A batch more than half unscorable (rewards that raise or return None/NaN); this many in a row stop it.
    max_unscorable_steps: Pos = 3
    # A filter (grpo.filter) that keeps no row skips the update; this many in a row stop the run (RAGEN stops at 5).
    max_empty_steps: Pos = 5
    # RAGEN-2's reward-std collapse stop: this many steps in a row whose mean in-group reward std is below
    # std_collapse_ratio × the mean of the stage's first 10 steps stop the run (0: never; RAGEN uses 10).
    max_std_collapse_steps: NonNeg = 0
    std_collapse_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    # A jump in the sampler/trainer mismatch (logp_mismatch, mean |Δ log p| a token), the signature of a sampling
    # engine left on stale weights, stops the run: a step above both mismatch_floor and mismatch_jump × the median
    # of the stage's earlier steps (at least 3 of them). mismatch_jump 0: never.
    mismatch_jump: Annotated[float, Field(ge=0.0)] = 10.0
    mismatch_floor: Annotated[float, Field(gt=0.0)] = 0.02


class DistributedCfg(Strict):
    """How a run under torchrun (several processes) trains. ``ddp``: every rank holds the whole model, gradients are
    summed once a step. ``fsdp2``: torch's ``fully_shard`` shards the trained parameters, their gradients and the
    optimizer state across ranks (``forkrl.sharding``); every rank keeps one full copy of the weights for sampling
    and no-grad passes, refreshed after each optimizer step. One process trains unsharded either way."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    # fsdp2: forward and backward in bf16 with the gradients reduced and the sharded weights kept in float32
    mixed_precision: Literal["none", "bf16"] = "none"

    @model_validator(mode="after")
    def _fsdp2_only(self):
        if self.mixed_precision != "none" and self.strategy != "fsdp2":
            raise ValueError("distributed.mixed_precision is FSDP2's policy: set distributed.strategy: fsdp2, or "
                             "model.dtype: bfloat16 to train in bf16 without it")
        return self


class DebugCfg(Strict):
    # Fault injection of the two historical accumulation bugs (METHODS §1), for `forkrl check` and tests.
    inject: Fault = "none"


# a stage entry is a kind or a one-key mapping {kind: its own keys}; the tag keeps a wrong entry's error to its branch
StageEntry = Annotated[Union[Annotated[StageName, Tag("<stage>")],
                             Annotated[dict[StageName, Optional[dict[str, Any]]], Tag("<stage with keys>")]],
                       Discriminator(lambda v: "<stage with keys>" if isinstance(v, dict) else "<stage>")]
_UNION_TAGS = ("<stage>", "<stage with keys>", "[key]")  # in an error's location, not keys of the YAML
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RESERVED_NAMES = ("rewards", "checkpoints")  # what else a run directory holds


class StagePlan(NamedTuple):
    """One stage of a run. ``name``: its directory in the run, its rows' ``stage`` in metrics.jsonl, its key in
    summary.json; ``kind``: its trainer (a key of ``trainers.STAGES``); ``cfg``: the run's config as the stage sees it,
    ``cfg.<kind>`` being the kind's section with the stage's own keys merged in."""

    name: str
    kind: str
    cfg: RunCfg


def deep_merge(base: dict, own: dict) -> dict:
    """``base`` with ``own``'s keys over it; mappings merge key by key, anything else (a list too) is replaced."""
    out = dict(base)
    for k, v in own.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class RunCfg(Strict):
    seed: int = 0
    # a stage is a kind (sft, grpo, fork, dpo) trained with its section, or {kind: {name: NAME, KEY: VALUE, ...}},
    # the kind's section with these keys over it (so two grpo stages can have their own rewards, steps, lr, ...)
    stages: list[StageEntry] = Field(min_length=1)
    model: ModelCfg
    task: TaskCfg
    sampling: SamplingCfg = SamplingCfg()
    sft: SftCfg = SftCfg()
    grpo: GrpoCfg = GrpoCfg()
    fork: ForkCfg = ForkCfg()
    dpo: DpoCfg = DpoCfg()
    eval: EvalCfg = EvalCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    guards: GuardsCfg = GuardsCfg()
    distributed: DistributedCfg = DistributedCfg()
    debug: DebugCfg = DebugCfg()
    log_every: Pos = 1
    # experiment trackers each optimizer step's metrics line also goes to (forkrl.tracking; optional extras)
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = []
    log_completions: NonNeg = 4  # GRPO rows per step sampled into RUN_DIR/completions.jsonl (0: none)
    _sections: tuple = PrivateAttr(default=())  # (name, kind, section) of each stage, from _stage_sections

    @model_validator(mode="after")
    def _stage_sections(self):
        """Each stage's name and section, its own keys merged over the kind's section and validated as it."""
        entries = []
        for i, entry in enumerate(self.stages):
            if isinstance(entry, dict):
                if len(entry) != 1:
                    raise ValueError(f"stages.{i}: a stage is a kind ({', '.join(STAGES)}) or one mapping "
                                     f"{{kind: {{name: ..., its section's keys}}}}; got the keys {', '.join(entry)}")
                ((kind, own),) = entry.items()
                entries.append((i, kind, dict(own or {})))
            else:
                entries.append((i, entry, {}))
        kinds = [kind for _, kind, _ in entries]
        sections, names = [], set()
        for i, kind, own in entries:
            name = own.pop("name", None)
            if name is None:
                name = kind if kinds.count(kind) == 1 else f"{i}-{kind}"
            elif not isinstance(name, str) or not STAGE_NAME.fullmatch(name) or name in RESERVED_NAMES:
                raise ValueError(f"stages.{i}.{kind}.name: {name!r} names the stage's directory in the run: letters, "
                                 f"digits, '_', '.', '-', at most 64, not {' or '.join(RESERVED_NAMES)}")
            if name in names:
                raise ValueError(f"stages.{i}: two stages are named {name!r}; give each its own name "
                                 f"({{{kind}: {{name: ...}}}})")
            names.add(name)
            section = getattr(self, kind)
            if own:
                try:
                    section = type(section).model_validate(deep_merge(section.model_dump(exclude_unset=True), own))
                except ValidationError as e:
                    raise ValueError("; ".join(_describe(err, None, ("stages", i, kind), type(section))
                                               for err in e.errors())) from None
            sections.append((name, kind, section))
        self._sections = tuple(sections)
        self._stage_rules()
        return self

    def _stage_rules(self) -> None:
        for stage in self.stage_plan:
            where = stage.kind if stage.name == stage.kind else f"stage {stage.name!r}: {stage.kind}"
            if stage.kind == "grpo" and stage.cfg.grpo.echo_coef and self.task.type != "env":
                raise ValueError(f"{where}.echo_coef: ECHO's loss is on the observation tokens of an env task's "
                                 f"episodes; task {self.task.type!r} has none (set task.type: env, or leave echo_coef "
                                 "at 0)")
            if stage.kind == "grpo" and stage.cfg.grpo.tree is not None and self.task.type == "env":
                raise ValueError(f"{where}.tree: tree rollouts fork single completions; an env task's episodes are "
                                 "played turn by turn (leave grpo.tree unset)")
            if stage.kind == "grpo" and stage.cfg.grpo.explore.mode != "off" and self.task.type != "env":
                raise ValueError(f"{where}.explore: exploration episodes need an env task (task.type: env)")
        if self.distributed.strategy == "fsdp2":
            self._fsdp2_rules()
        self._vllm_rules()
        if self.task.type == "env" and "dpo" in self.stage_kinds:
            raise ValueError("stages: the dpo stage is single-turn (pairs of completions of one prompt); an env task "
                             "(task.type: env) trains with sft and grpo stages")
        if self.task.type == "env" and "fork" in self.stage_kinds:
            raise ValueError("stages: the fork stage is single-turn (it contrasts completions at fork tokens of one "
                             "prompt); an env task (task.type: env) trains with sft and grpo stages")

    def _fsdp2_rules(self) -> None:
        """What FSDP2 does not run yet, refused at load rather than deadlocked at the first step."""
        for stage in self.stage_plan:
            if stage.kind == "dpo" or (stage.kind == "grpo" and stage.cfg.grpo.tree is not None):
                what = "the dpo stage" if stage.kind == "dpo" else f"stage {stage.name!r}: grpo.tree"
                raise ValueError(f"distributed.strategy: fsdp2 does not run {what} yet (its update is not routed "
                                 "through the sharded model); use distributed.strategy: ddp for it")
        if self.distributed.mixed_precision == "bf16" and self.model.dtype != "float32":
            raise ValueError(f"distributed.mixed_precision: bf16 computes in bf16 from float32 weights, which are what "
                             f"the optimizer steps and checkpoints keep; model.dtype is {self.model.dtype!r}: set "
                             "model.dtype: float32")
        if self.debug.inject != "none":
            raise ValueError("debug.inject runs the accumulation bugs of forkrl check on one process or under ddp; "
                             "set distributed.strategy: ddp")

    def _vllm_rules(self) -> None:
        """vLLM's log-probs under top-p / top-k are those of the truncated, renormalised distribution (its
        ``processed_logprobs``), not the tempered policy's that the trainers recompute: GRPO's ratio and the fork
        stage's importance weights would be biased on every token. Refused for the stages that sample to train
        (grpo, dpo) and for fork.reweight; evaluation alone may truncate."""
        s = self.sampling
        if s.backend != "vllm":
            return
        trains = [k for k in ("grpo", "dpo") if k in self.stage_kinds]
        cut = [f"sampling.{k} is {v}" for k, v, on in (("top_p", s.top_p, s.top_p < 1), ("top_k", s.top_k, s.top_k > 0))
               if on]
        if trains and cut:
            raise ValueError(f"{' and '.join(cut)} with sampling.backend: vllm and a {' and a '.join(trains)} stage: "
                             "vLLM returns the log-probs of the truncated distribution, not the policy's, which biases "
                             "the policy ratio on every token. Set sampling.top_p: 1.0 and sampling.top_k: 0 (or use "
                             "sampling.backend: hf)")
        for stage in self.stage_plan:
            fork = stage.cfg.fork
            if stage.kind == "fork" and fork.reweight and fork.top_p < 1:
                raise ValueError(f"fork.top_p is {fork.top_p} with fork.reweight and sampling.backend: vllm: the "
                                 "importance weights would use the truncated distribution's log-probs. Set "
                                 "fork.top_p: 1.0, turn fork.reweight off, or use sampling.backend: hf")

    @property
    def stage_plan(self) -> list[StagePlan]:
        """The run's stages in order, each with its name, kind and the config it trains with."""
        return [StagePlan(name, kind, self if section is getattr(self, kind) else
                          self.model_copy(update={kind: section})) for name, kind, section in self._sections]

    @property
    def stage_kinds(self) -> list[str]:
        """The trainer of each stage, in order (``sft``, ``grpo``, ``fork``, ``dpo``)."""
        return [kind for _, kind, _ in self._sections]

    def lora_for(self, stage: str) -> LoraCfg:
        """The LoRA setting of a stage: ``fork.lora`` for the fork stage, ``model.lora`` for the others."""
        return self.fork.lora if stage == "fork" else self.model.lora

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading and error messages
def _node_line(root: yaml.Node | None, loc: tuple) -> int | None:
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                return line
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:  # a union branch name or similar that has no node in the YAML
            continue
    return line


def _section(loc: tuple, cls: Any = None) -> type[BaseModel] | None:
    """The model class at ``loc`` under ``cls`` (the whole config's, by default), for listing the allowed keys of an
    unknown key's parent."""
    cls = RunCfg if cls is None else cls
    for key in loc:
        if key in _TASK_TYPES:  # pydantic puts the union branch's tag in the location
            cls = _TASK_TYPES[key]
            continue
        if isinstance(key, int):
            continue
        field = cls.model_fields.get(key) if cls is not None else None
        if field is None:
            return None
        cands = [a for a in getattr(field.annotation, "__args__", (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = cands[0] if len(cands) == 1 else None
    return cls


_TASK_TYPES = TASKS


def _describe(err: dict, root: yaml.Node | None, prefix: tuple = (), cls: Any = None) -> str:
    """One line for a validation error: key path (``prefix`` before the error's own location, which is under the
    model ``cls``), YAML line where known, and what is wrong."""
    loc = tuple(err["loc"])
    shown = [*prefix, *(k for k in loc if k not in _TASK_TYPES and k not in _UNION_TAGS)]
    path = ".".join(str(k) for k in shown)
    line = _node_line(root, tuple(shown))
    where = f"{path}" + (f" (line {line})" if line else "")
    if err["type"] == "extra_forbidden":
        parent = _section(loc[:-1], cls)
        allowed = ", ".join(parent.model_fields) if parent else "see the docs"
        return f"{where}: unknown key; allowed keys here: {allowed}"
    msg = err["msg"].removeprefix("Value error, ")
    if not shown:  # a rule over several sections: its message names the keys
        return msg
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    got = err.get("input")
    got_txt = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return f"{where}: {msg}{got_txt}"


# keys renamed since runs were written: (section, old key) -> (section, new key, how an old value reads now)
_MOVED = {
    ("sampling", "engine"): ("sampling", "backend", lambda v: v),
    ("grpo", "reuse_decode"): ("sampling", "replay", lambda v: v),
    ("grpo", "filter_zero_variance"): ("grpo", "filter", lambda v: "zero_variance_groups" if v is True else
                                       "none" if v is False else v),
}


def _migrate(data: dict) -> dict:
    """``data`` with every renamed key under its new name (``_MOVED``); a key given under both names is an error."""
    data = dict(data)
    for (section, old), (new_section, new, convert) in _MOVED.items():
        part, target = data.get(section), data.get(new_section, {})
        if not (isinstance(part, dict) and old in part and isinstance(target, dict)):
            continue  # nothing to move, or a section that is not a mapping (validation names it)
        value = part[old]
        data[section] = {k: v for k, v in part.items() if k != old}
        target = dict(data.get(new_section, {}))
        if new in target:
            raise ConfigError(f"{section}.{old} is the old name of {new_section}.{new}; give only {new_section}.{new}")
        data[new_section] = {**target, new: convert(value)}
    return data


def parse_config(data: Any, *, source: str = "<config>", text: str | None = None,
                 overrides: list[str] = ()) -> RunCfg:
    """The validated config of ``data`` (the YAML's text, when given, lets errors name their lines), with the
    command line's ``--set KEY=VALUE`` ``overrides`` applied first and validated like the file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping of keys to values, got {type(data).__name__}")
    data, set_keys = apply_overrides(data, overrides)
    return _validate(data, source, yaml.compose(text) if text else None, set_keys)


def _validate(data: dict, source: str, root: yaml.Node | None, set_keys: list[str]) -> RunCfg:
    data = _migrate(data)
    try:
        return RunCfg.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, None if _set_by(err, set_keys) else root) + _set_by(err, set_keys)
                 for err in e.errors()]
        raise ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines)) from None


def _set_by(err: dict, set_keys: list[str]) -> str:
    """`` (from --set KEY)`` for a validation error at or under a key the command line set, else ''."""
    path = ".".join(str(k) for k in err["loc"] if k not in _TASK_TYPES and k not in _UNION_TAGS)
    key = next((k for k in set_keys if path == k or path.startswith(k + ".")), None)
    return f" (from --set {key})" if key else ""


def apply_overrides(data: dict, overrides) -> tuple[dict, list[str]]:
    """(``data`` with each ``KEY=VALUE`` of ``overrides`` set, the keys set). KEY is a dotted path (a number picks
    a list entry: ``grpo.rewards.0.weight``); VALUE is read as YAML (``10``, ``0.5``, ``true``, ``[a, b]``,
    ``{name: correct}``), so it validates exactly as the same value in the file would."""
    import copy

    data, keys = copy.deepcopy(data), []
    for item in overrides:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. --set grpo.steps=10")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
        node, parts = data, key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[:depth]) or "the config"
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {here} is a list of {len(node)}; {part!r} is not an index of it")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {here} is {node!r}, not a section with keys")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    if parts[depth + 1].isdigit():
                        raise ConfigError(f"--set {key}: the config has no list {'.'.join(parts[:depth + 1])} to "
                                          f"index; set the whole list, e.g. --set '{'.'.join(parts[:depth + 1])}="
                                          "[{name: correct, weight: 2}]'")
                    node[part] = {}
                node = node[part]
        keys.append(key)
    return data, keys


def _anchor_reward_files(data: Any, base: Path) -> Any:
    """``data`` with every reward entry's relative paths (``fn: PATH.py:NAME``, a reward model's or local judge's
    ``path``, a judge's ``criteria_file``) made absolute from ``base`` (the config file's directory), so the resolved
    config saved with a run names the files wherever it is run from."""
    if not isinstance(data, dict):
        return data
    data = {**data, **{section: _anchor_rewards(data.get(section), base) for section in REWARD_SECTIONS
                       if section in data}}
    if isinstance(data.get("stages"), list):  # a stage's own rewards: {grpo: {rewards: [...]}}
        data["stages"] = [{k: _anchor_rewards(v, base) if k in REWARD_SECTIONS else v for k, v in entry.items()}
                          if isinstance(entry, dict) else entry for entry in data["stages"]]
    return data


def _anchor_rewards(part: Any, base: Path) -> Any:
    """A section (``grpo``, ``fork``, ``dpo`` or a stage's own) with its reward entries' relative paths made absolute,
    and DPO's ``pairs_path``."""
    if not isinstance(part, dict):
        return part
    pairs = part.get("pairs_path")
    if isinstance(pairs, str) and not Path(pairs).expanduser().is_absolute():
        part = {**part, "pairs_path": str((base / pairs).resolve())}
    if not isinstance(part.get("rewards"), list):
        return part
    entries = []
    for entry in part["rewards"]:
        spec = entry.get("fn") if isinstance(entry, dict) else None
        if isinstance(spec, str) and ":" in spec and spec.rpartition(":")[0].endswith(".py"):
            head, _, name = spec.rpartition(":")
            if not Path(head).expanduser().is_absolute():
                entry = {**entry, "fn": f"{(base / head).resolve()}:{name}"}
        for source, key in (("reward_model", "path"), ("judge", "path"), ("judge", "criteria_file")):
            inner = entry.get(source) if isinstance(entry, dict) else None
            value = inner.get(key) if isinstance(inner, dict) else None
            if isinstance(value, str) and not Path(value).expanduser().is_absolute():
                entry = {**entry, source: {**inner, key: str((base / value).resolve())}}
        entries.append(entry)
    return {**part, "rewards": entries}


REWARD_SECTIONS = ("grpo", "fork", "dpo")  # the config sections whose ``rewards`` entries name reward callables


def _anchor_task_files(data: Any, base: Path) -> Any:
    """``data`` with an env task's files (``task.env: PATH.py:Class``, ``task.demos_file``) made absolute from
    ``base``, as reward files are."""
    task = data.get("task") if isinstance(data, dict) else None
    if not isinstance(task, dict) or task.get("type") != "env":
        return data
    task = dict(task)
    spec = task.get("env")
    if isinstance(spec, str) and ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        head, _, name = spec.rpartition(":")
        if not Path(head).expanduser().is_absolute():
            task["env"] = f"{(base / head).resolve()}:{name}"
    demos = task.get("demos_file")
    if isinstance(demos, str) and not Path(demos).expanduser().is_absolute():
        task["demos_file"] = str((base / demos).resolve())
    return {**data, "task": task}


def load_config(path: str | Path, overrides: list[str] = ()) -> RunCfg:
    """The config in the YAML file ``path``, with ``--set`` ``overrides``; reward files relative to its directory."""
    from .userfiles import MAX_CONFIG_BYTES, read_text

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = read_text(path, "a YAML config", ConfigError, max_bytes=MAX_CONFIG_BYTES)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        return parse_config(data, source=str(path))
    data, set_keys = apply_overrides(data, overrides)  # before anchoring: a --set fn: is relative to the file too
    data = _anchor_task_files(_anchor_reward_files(data, path.parent), path.parent)
    return _validate(data, str(path), yaml.compose(text), set_keys)
