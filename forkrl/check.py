"""`forkrl check`: prove that a configuration's gradient does not depend on how a step is split.

For the user's trainer(s), reduction, micro-batch size, accumulation steps and world size, the harness
computes one optimizer step's parameter gradient in float64 on a synthetic batch whose completion
lengths vary 20x, as one batch on one process (the reference), and then as K micro-batches, as
W ranks x K micro-batches, with the rows permuted and with extra padding. Ranks are simulated in one
process with exactly the arithmetic of a real run: each rank divides by the step's all-reduced totals
and the rank gradients are summed (the all-reduce); tests/test_distributed.py runs the same on real
torchrun processes. A fault injection (``--inject``) reproduces a historical bug so the table can be
seen to fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .algos.reductions import step_totals
from .trainers.accumulate import EXACT, Plan
from .types import Role, Rollouts

if TYPE_CHECKING:
    from .config import RunCfg

TOLERANCE = 1e-8  # float64 runs agree to ~1e-13; either bug moves the gradient by >1e-3


class FirstMicrobatchOnly(Plan):
    """The optimizer-offload bug that kept only micro-batch 0's gradient (METHODS §1): the update uses 1/K of the
    batch and the gradient norm is about 1/K of the true one."""

    name, exact = "first_microbatch_only", False

    def runs(self, index: int) -> bool:
        return index == 0


class MeanOfMeans(Plan):
    """Each micro-batch divides by its own counts and accumulation averages the K micro-batch means (and DDP the W
    ranks), so tokens in short-response micro-batches weigh more (METHODS §1). (With sequence-count reductions and
    equal-sized micro-batches the local counts equal the global share, so only ``token_mean`` shows it then.)"""

    name, exact = "mean_of_means", False

    def denominators(self, totals, local, n_parts: int, world_size: int):
        return local(), 1.0 / (n_parts * world_size)


# the accumulation plans ``--inject`` (and ``debug.inject``) can choose: the correct one and the two historical bugs
FAULTS = {
    "none": EXACT,
    "first_microbatch_only": FirstMicrobatchOnly(),
    "mean_of_means": MeanOfMeans(),
}


@dataclass(frozen=True)
class CheckRow:
    trainer: str
    split: str
    rel_error: float
    grad_norm_ratio: float  # this split's gradient norm / the reference's
    stage: str = ""  # the stage's name where a run has stages of its own name (``stages: [{grpo: {name: ...}}]``)

    @property
    def passed(self) -> bool:
        return self.rel_error < TOLERANCE


BRIDGE = (Role.PROMPT, Role.ENV, Role.ENV, Role.ENV, Role.PROMPT)  # a synthetic observation between two turns


def synthetic_batch(vocab: int, n_rows: int, *, prompt_len: int = 4, t_max: int = 40, seed: int = 0,
                    turns: int = 1) -> Rollouts:
    """Rows with completion lengths spread from 2 to ``t_max`` (20x), right-padded, fixed by ``seed``. With
    ``turns`` > 1 each row is an episode: its completion tokens split into that many actions (as evenly as they
    go), an observation's bridge (``BRIDGE``) between two, as ``envs.episodes`` lays rows out."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.linspace(2, t_max, n_rows).round().long()[torch.randperm(n_rows, generator=g)]
    layouts = []
    for n in lens.tolist():
        k = min(turns, n)
        spans = [n // k + (i < n % k) for i in range(k)]
        row = [Role.PROMPT] * prompt_len
        for i, a in enumerate(spans):
            row += [Role.COMPLETION] * a + (list(BRIDGE) if i < k - 1 else [])
        layouts.append(row)
    width = max(map(len, layouts))
    ids = torch.randint(2, min(vocab, 1000), (n_rows, width), generator=g)
    role = torch.full((n_rows, width), int(Role.PAD), dtype=torch.int8)
    for r, row in enumerate(layouts):
        role[r, : len(row)] = torch.tensor([int(x) for x in row], dtype=torch.int8)
    ids = torch.where(role == Role.PAD, torch.zeros_like(ids), ids)
    zeros = torch.zeros(n_rows, dtype=torch.long)
    return Rollouts(ids, role, torch.zeros(n_rows, width), torch.arange(n_rows) // 2, zeros, zeros.bool())


def _pad(batch: Rollouts, extra: int) -> Rollouts:
    n = batch.num_rows
    return Rollouts(torch.cat([batch.input_ids_NL, torch.zeros(n, extra, dtype=torch.long)], 1),
                    torch.cat([batch.role_NL, torch.zeros(n, extra, dtype=torch.int8)], 1),
                    torch.cat([batch.sampler_logp_NL, torch.zeros(n, extra)], 1),
                    batch.group_N, batch.problem_N, batch.truncated_N)


def _rank_gradient(model, batch, trainer: str, cfg: RunCfg, **kw) -> torch.Tensor:
    """One simulated rank's gradient, flat (``_accumulate``)."""
    _accumulate(model, batch, trainer, cfg, **kw)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters() if p.requires_grad])


def _accumulate(model, batch, trainer: str, cfg: RunCfg, *, micro: int, totals, inject: str, world: int,
                adv_N, old_NT, ref_NT, gate_NT=None, base=None, echo=None, plan=None) -> None:
    """Accumulate one rank's share of the step's gradient into ``model``'s ``.grad``, as its trainer does."""
    from .forward import ModelForward
    from .trainers.fork import fork_update
    from .trainers.grpo import policy_update
    from .trainers.sft import sft_step

    plan = plan or FAULTS[inject]
    model.zero_grad(set_to_none=True)
    if trainer == "sft":
        sft_step(model, batch, reduction=cfg.sft.reduction, t_max=cfg.sft.t_max or 40, micro_batch_size=micro,
                 totals=totals, plan=plan, world_size=world)
    elif trainer == "fork":
        fork_update(model, base, batch, adv_N, gate_NT, kl_coef=cfg.fork.kl_coef, micro_batch_size=micro,
                    totals=totals, neg_floor=cfg.fork.neg_floor, plan=plan, world_size=world)
    else:
        gcfg = cfg.grpo.model_copy(update={"micro_batch_size": micro})
        policy_update(ModelForward(model), batch, adv_N, old_NT, ref_NT, gcfg, temperature=cfg.sampling.temperature,
                      t_max=cfg.grpo.t_max or 40, totals=totals, plan=plan, world_size=world, echo=echo)


def step_gradient(model, batch: Rollouts, trainer: str, cfg: RunCfg, *, micro: int, world: int, inject: str,
                  adv_N, old_NT, ref_NT, gate_NT=None, base=None) -> torch.Tensor:
    """The optimizer step's gradient with ``world`` simulated ranks of contiguous row shards."""
    from .trainers.fork import step_counts

    # the whole step's counts: what the all-reduce of the ranks' counts gives
    mask_NT = batch.completion_mask_NL[:, 1:]
    totals = step_counts(gate_NT, mask_NT) if trainer == "fork" else step_totals(batch.completion_mask_NL)
    echo_total = int((batch.role_NL == Role.ENV).sum())  # ECHO's denominator: the step's ENV tokens, every rank's
    per_rank = batch.num_rows // world
    total = None
    for r in range(world):
        idx = torch.arange(r * per_rank, (r + 1) * per_rank)
        shard = batch.select(idx)
        t = shard.input_ids_NL.shape[1] - 1
        echo = None
        if cfg.task.type == "env":
            from .trainers.grpo import Echo

            echo = Echo(cfg.grpo.echo_coef, echo_total, torch.ones(len(idx), dtype=torch.bool))
        g = _rank_gradient(model, shard, trainer, cfg, micro=micro, totals=totals, inject=inject, world=world,
                           adv_N=adv_N[idx], old_NT=old_NT[idx, :t], ref_NT=None if ref_NT is None else ref_NT[idx, :t],
                           gate_NT=None if gate_NT is None else gate_NT[idx, :t], base=base, echo=echo)
        total = g if total is None else total + g
    return total


def run_checks(model, cfg: RunCfg, *, trainers: list[str], micro: int, accum: int, world: int,
               inject: str, base=None) -> list[CheckRow]:
    """``base`` (the fork stage's frozen π_b: ``.model``, ``.active()``) is needed for the fork trainer only."""
    model = model.double()
    n = world * accum * micro
    # an env task's rows are episodes: actions with observations between them (ENV tokens the loss must not read)
    turns = min(cfg.task.max_turns, 4) if cfg.task.type == "env" else 1
    batch = synthetic_batch(model.config.vocab_size, n, seed=cfg.seed, turns=turns)
    g = torch.Generator().manual_seed(1)
    adv_N = torch.randn(n, generator=g, dtype=torch.float64)
    T = batch.input_ids_NL.shape[1] - 1
    old_NT = -2.0 + 0.1 * torch.randn(n, T, generator=g, dtype=torch.float64)  # ratios away from 1: clipping active
    ref_NT = -2.0 + 0.1 * torch.randn(n, T, generator=g, dtype=torch.float64) if cfg.grpo.kl.active else None
    gate_NT = (torch.rand(n, T, generator=g) < 0.3) & batch.completion_mask_NL[:, 1:]  # the fork's decision set
    perm = torch.randperm(n, generator=g)
    rows = []
    for trainer in trainers:
        common = dict(adv_N=adv_N, old_NT=old_NT, ref_NT=ref_NT, gate_NT=gate_NT, base=base)
        ref = step_gradient(model, batch, trainer, cfg, micro=n, world=1, inject="none", **common)
        splits = {
            f"1 process x {n // micro} micro-batches of {micro}": (batch, dict(micro=micro, world=1), common),
            f"{world} ranks x {accum} micro-batches of {micro}": (batch, dict(micro=micro, world=world), common),
            "rows permuted": (batch.select(perm), dict(micro=micro, world=world),
                              {k: v[perm] if isinstance(v, torch.Tensor) else v for k, v in common.items()}),
            "extra padding": (_pad(batch, 7), dict(micro=micro, world=world),
                              {k: _pad_cols(v, 7) if isinstance(v, torch.Tensor) and v.dim() == 2 else v
                               for k, v in common.items()}),
        }
        for name, (b, split, extra) in splits.items():
            got = step_gradient(model, b, trainer, cfg, inject=inject, **split, **extra)
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
            rows.append(CheckRow(trainer, name, err, float(got.norm() / ref.norm())))
    return rows


def _pad_cols(t_NT: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([t_NT, torch.zeros(t_NT.shape[0], extra, dtype=t_NT.dtype)], 1)


def _reduction(cfg: RunCfg, trainer: str) -> str:
    return {"sft": cfg.sft.reduction, "grpo": cfg.grpo.reduction, "fork": "decisions|anchor"}[trainer]


def table(rows: list[CheckRow], cfg: RunCfg, inject: str) -> str:
    head = ("trainer", "reduction", "split", "max rel. grad error", "grad-norm ratio", "result")
    views = {s.name: s.cfg for s in cfg.stage_plan}
    body = [(r.trainer + (f" ({r.stage})" if r.stage and r.stage != r.trainer else ""),
             _reduction(views.get(r.stage, cfg), r.trainer), r.split,
             f"{r.rel_error:.2e}", f"{r.grad_norm_ratio:.4f}", "PASS" if r.passed else "FAIL") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [head, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if cfg.task.type == "env":
        lines.append(f"rows: episodes of up to {min(cfg.task.max_turns, 4)} turns, observation (ENV) tokens between "
                     "the actions")
    note = f"fault injected: {inject}; " if inject != "none" else ""
    lines.append(f"{note}reference: the whole step as one batch on one process, float64; PASS below {TOLERANCE:g}")
    return "\n".join(lines)


def check_model(cfg: RunCfg):
    """The user's model if small (<= 20M parameters), else a tiny model of the same architecture family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import check_source, load_model
    from .pipeline import base_model_path
    from .tasks import build_task

    if cfg.model.tiny is not None:
        return load_model(str(base_model_path(cfg, build_task(cfg.task))), dtype=torch.float64)
    check_source(cfg.model.path)
    config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    size = config.vocab_size * config.hidden_size + 12 * config.num_hidden_layers * config.hidden_size**2
    if size <= 20_000_000:
        return load_model(cfg.model.path, dtype=torch.float64, trust_remote_code=cfg.model.trust_remote_code)
    for key, value in {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "head_dim": 32, "vocab_size": min(config.vocab_size, 1024)}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code).double()


def _frozen_base(model, lora: bool):
    """The fork stage's π_b for the check: the adapter-disabled policy under LoRA, else a fixed copy of
    the model with its weights moved a little (so the KL anchor has a gradient to check)."""
    import copy

    from .trainers.fork_data import FrozenBase

    if lora:
        return FrozenBase(model, lora=True)
    frozen = copy.deepcopy(model).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return FrozenBase(frozen, lora=False)


def _with_lora(model, lora):
    """``model`` with a LoRA adapter as configured; a trained adapter (lora_B ≠ 0), not the
    zero-initialised one, so its gradient is not trivial and the policy differs from its base."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    return model


def check_config(cfg: RunCfg, *, world: int, inject: str) -> tuple[list[CheckRow], str]:
    """Run the harness on each of ``cfg``'s stages with its own section: its micro-batch size, accumulation steps,
    reduction and loss terms (stages whose sections are the same are checked once)."""
    rows: list[CheckRow] = []
    seen = []
    for plan in cfg.stage_plan:
        trainer, view = plan.kind, plan.cfg
        stage = getattr(view, trainer)
        if trainer not in ("sft", "grpo", "fork"):  # dpo: its split invariance is tested in tests/test_dpo.py
            continue
        if (trainer, stage) in seen:
            continue
        seen.append((trainer, stage))
        lora = view.lora_for(trainer)
        model = _with_lora(check_model(view), lora) if lora.enabled else check_model(view)
        rows_per_step = stage.rows_per_step if trainer == "grpo" else stage.batch_size
        accum = max(1, rows_per_step // (stage.micro_batch_size * world))
        micro = min(stage.micro_batch_size, 2)  # the split's shape is what matters, not the micro-batch width
        base = _frozen_base(model, lora.enabled) if trainer == "fork" else None
        rows += [dataclasses.replace(r, stage=plan.name)
                 for r in run_checks(model, view, trainers=[trainer], micro=micro, accum=accum, world=world,
                                     inject=inject, base=base)]
    text = table(rows, cfg, inject)
    if "dpo" in cfg.stage_kinds:
        text += ("\ndpo: not in this harness; its loss divides by the step's pairs, and tests/test_dpo.py checks that "
                 "its gradient does not depend on the micro-batch split")
    return rows, text


def distributed_step_gradient(model, batch: Rollouts, trainer: str, cfg: RunCfg, dist, *, micro: int, inject: str,
                              adv_N, old_NT, ref_NT, strategy: str = "ddp", uneven: bool = False) -> torch.Tensor:
    """The same gradient on real processes: this rank's shard, the all-reduced totals, summed gradients (``ddp``), or
    the model sharded with FSDP2 and its gradient gathered whole (``fsdp2``). ``uneven`` (2 ranks): rank 0 takes two
    thirds of the rows, so the ranks run different numbers of micro-batches (FSDP2's lockstep pads the other)."""
    from .trainers.accumulate import global_totals

    n = batch.num_rows
    if uneven:
        if dist.world_size != 2:
            raise ValueError(f"uneven shards are laid out for 2 ranks, not {dist.world_size}")
        cut = 2 * n // 3
        idx = torch.arange(0, cut) if dist.rank == 0 else torch.arange(cut, n)
    else:
        idx = torch.arange(n)[dist.shard(n, "rows")]
    shard = batch.select(idx)
    t = shard.input_ids_NL.shape[1] - 1
    totals = global_totals(shard.completion_mask_NL, dist)
    plan, trained, sharded = FAULTS[inject], model, None
    if strategy == "fsdp2":
        from .sharding import Lockstep, Sharded

        sharded = Sharded(model, dist)
        plan, trained = Lockstep(dist), sharded.module
    _accumulate(trained, shard, trainer, cfg, micro=micro, totals=totals, inject=inject, world=dist.world_size,
                adv_N=adv_N[idx], old_NT=old_NT[idx, :t], ref_NT=None if ref_NT is None else ref_NT[idx, :t],
                plan=plan)
    params = [p for p in trained.parameters() if p.requires_grad]
    if sharded is None:
        dist.sum_gradients(params)
        return torch.cat([p.grad.flatten() for p in params])
    sharded.finish_gradients(params)
    return torch.cat([p.grad.full_tensor().flatten() for p in params])
