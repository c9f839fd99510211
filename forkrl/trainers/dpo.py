"""The DPO stage (``stages: [sft, dpo]``): pairs → reference log-probs → loss → update → stats.

Online (``dpo.data: online``, OAIF, arXiv 2402.04792): each step samples two completions of each of its prompts from
the current policy (seeded per row, as GRPO's), scores both with ``dpo.rewards`` (a judge, a reward model, the
verifier), and makes a pair of the higher (chosen) and the lower (rejected); a tie or an unscorable sample drops the
prompt's pair (counted). Offline (``data: offline``): each step takes ``pairs_per_step`` pairs of ``pairs_path``.

The loss is ``algos.dpo.dpo_loss`` against the stage's starting model, frozen (under LoRA the adapter-disabled
base, no second copy), over the step's pairs with the step's number of pairs as its denominator, every rank's
counted, accumulated over micro-batches of pairs (``accumulate``). A step with no pair (online: every prompt's two
samples tied) skips its update, as GRPO's empty batches do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import rewards as reward_api
from ..algos.dpo import dpo_loss, dpo_margin
from ..forward import ModelForward
from ..models import load_model
from ..rewards import score_rollouts
from ..sampling import completion_texts, make_sampler, row_seeds, sampling_params
from ..tasks.base import TaskError
from ..types import Rollouts
from .accumulate import accumulate, parts
from .data import batch_indices
from .loop import StageLoop
from .sft import pack

STATS = ("margin", "accuracy", "chosen_logratio", "rejected_logratio")  # summed over pairs


@dataclass(frozen=True)
class Pairs:
    """A step's pairs on this rank: ``batch`` holds the chosen completions in rows 0 … P−1 and the rejected ones in
    rows P … 2P−1; ``ref_N`` is each row's sequence log-prob under the frozen reference."""

    batch: Rollouts
    ref_N: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.batch.num_rows // 2


class DpoLoss:
    """The step loss of ``accumulate`` over pair indices: Σ −log σ(z) / the step's pairs (``algos.dpo``)."""

    def __init__(self, forward, pairs: Pairs, *, beta: float):
        self.forward, self.pairs, self.beta = forward, pairs, beta

    def rows(self, pairs_P: torch.Tensor) -> torch.Tensor:
        return torch.cat([pairs_P, pairs_P + self.pairs.num_pairs])

    def counts(self, pairs_P):
        return int(self.pairs.batch.completion_mask_NL[self.rows(pairs_P)].sum()), len(pairs_P)

    def __call__(self, pairs_P, totals):
        rows, k = self.rows(pairs_P), len(pairs_P)
        logp_NT, _, mask_NT = self.forward.logprobs(self.pairs.batch, rows)
        seq_N = (logp_NT * mask_NT).sum(1)
        ref_N = self.pairs.ref_N[rows].to(seq_N)
        loss = dpo_loss(seq_N[:k], seq_N[k:], ref_N[:k], ref_N[k:], beta=self.beta, total_pairs=totals[1])
        with torch.no_grad():
            z_P = dpo_margin(seq_N[:k], seq_N[k:], ref_N[:k], ref_N[k:], beta=self.beta)
            stats = {"margin": z_P.sum(), "accuracy": (z_P > 0).sum().double(),
                     "chosen_logratio": (seq_N[:k] - ref_N[:k]).sum(), "rejected_logratio": (seq_N[k:] - ref_N[k:]).sum()}
        return loss, stats


def sequence_logprobs(model, batch: Rollouts, *, micro_batch_size: int, adapter_off: bool) -> torch.Tensor:
    """Each row's completion log-prob (summed over its completion tokens) under a frozen model: GRPO's frozen pass
    (``grpo.frozen_logprobs``), summed."""
    from .grpo import frozen_logprobs

    logp_NT = frozen_logprobs(model, batch, temperature=1.0, micro_batch_size=micro_batch_size, adapter_off=adapter_off)
    return (logp_NT.double() * batch.completion_mask_NL[:, 1:]).sum(1)


def read_pairs(path: str, max_field_bytes: int) -> list[tuple[str, str, str, str]]:
    """(where, prompt, chosen, rejected) of every line of a preference JSON Lines file; a bad line is a TaskError
    naming file:line and the field."""
    from ..userfiles import json_objects

    p = Path(path)
    if not p.is_file():
        raise TaskError(f"dpo.pairs_path: {p} does not exist (a relative path is relative to the config file)")
    out = []
    for where, row in json_objects(p, "a preference pairs file", TaskError, max_line_bytes=8 * max_field_bytes
                                   + (64 << 10), advice="each line is one pair: is it the right file?",
                                   shape='{"prompt": ..., "chosen": ..., "rejected": ...}'):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise TaskError(f"{where}: field {key!r} is missing or not a non-empty string")
        out.append((where, row["prompt"], row["chosen"], row["rejected"]))
    if not out:
        raise TaskError(f"dpo.pairs_path: {p} holds no pairs")
    return out


class OfflinePairs:
    """A step's pairs from ``dpo.pairs_path``: ``pairs_per_step`` of them in seeded order (``data.batch_indices``)."""

    def __init__(self, ctx):
        self.ctx = ctx
        from ..pipeline import MAX_PAIR_FIELD_BYTES

        self.rows = read_pairs(ctx.cfg.dpo.pairs_path, MAX_PAIR_FIELD_BYTES)
        eos = ctx.tokenizer.eos_token_id
        enc = lambda text: ctx.tokenizer(text, add_special_tokens=False).input_ids + [eos]  # noqa: E731
        self.encoded = [(ctx.encode_prompt(prompt, where=where), enc(chosen), enc(rejected))
                        for where, prompt, chosen, rejected in self.rows]

    def step(self, step: int, shard: slice) -> tuple[Rollouts | None, dict]:
        cfg = self.ctx.cfg
        pick = batch_indices(len(self.encoded), cfg.dpo.pairs_per_step, step - 1, cfg.seed)[shard]
        chosen = [(self.encoded[i][0], self.encoded[i][1]) for i in pick]
        rejected = [(self.encoded[i][0], self.encoded[i][2]) for i in pick]
        return pack(chosen + rejected, self.ctx.tokenizer.pad_token_id), {}


class OnlinePairs:
    """A step's pairs sampled now (OAIF): two completions of each prompt, the preferred picked by the rewards."""

    def __init__(self, ctx, sampler):
        from .sources import PromptSource

        cfg = ctx.cfg.dpo
        self.ctx, self.sampler, self.prompts = ctx, sampler, PromptSource(ctx)  # prompts encoded once, cached
        self.problems = list(ctx.task.problems("train"))
        self.rewards = reward_api.load(cfg.rewards, ctx.task, where="dpo.rewards", timeout_s=cfg.reward_timeout_s,
                                       device=ctx.device, run_dir=ctx.run_dir)

    def step(self, step: int, shard: slice) -> tuple[Rollouts | None, dict]:
        ctx, cfg = self.ctx, self.ctx.cfg
        pick = batch_indices(len(self.problems), cfg.dpo.pairs_per_step, step - 1, cfg.seed)[shard]
        problems = [self.problems[i] for i in pick]
        seeds = row_seeds(f"dpo:{cfg.seed}:{step}", pick, 2)
        rollouts = self.sampler.sample([self.prompts.prompt(i, p) for i, p in zip(pick, problems)], 2,
                                       sampling_params(cfg), seeds=seeds)
        texts = completion_texts(ctx.tokenizer, rollouts)
        scored, failures = score_rollouts(rollouts, texts, problems, ctx.task, self.rewards, seeds=seeds, step=step,
                                          progress=step / cfg.dpo.steps, max_new_tokens=cfg.sampling.max_new_tokens)
        chosen, rejected, ties, unscorable, gaps = pick_pairs(rollouts.group_N, scored.reward_N, scored.valid_N)
        stats = {"prompts": len(problems), "ties": ties, "unscorable": unscorable, "reward_gap_sum": sum(gaps),
                 "reward_sum": float(scored.reward_N[scored.valid_N].sum()), "rewarded_rows": int(scored.valid_N.sum()),
                 "first_error": failures.first_message}
        if not chosen:
            return None, stats
        return rollouts.select(torch.tensor(chosen + rejected)), stats


def pick_pairs(group_N: torch.Tensor, reward_N: torch.Tensor, valid_N: torch.Tensor):
    """(chosen rows, rejected rows, tied groups, unscorable groups, reward gaps) of groups of two samples: the higher
    reward is chosen; a group with an unscorable sample or equal rewards gives no pair."""
    chosen, rejected, ties, unscorable, gaps = [], [], 0, 0, []
    for g in group_N.unique(sorted=True).tolist():
        a, b = (group_N == g).nonzero().squeeze(1).tolist()
        if not (valid_N[a] and valid_N[b]):
            unscorable += 1
            continue
        ra, rb = float(reward_N[a]), float(reward_N[b])
        if ra == rb:
            ties += 1
            continue
        chosen.append(a if ra > rb else b)
        rejected.append(b if ra > rb else a)
        gaps.append(abs(ra - rb))
    return chosen, rejected, ties, unscorable, gaps


def train_dpo(ctx) -> dict:
    cfg, dist = ctx.cfg.dpo, ctx.dist
    lora = ctx.cfg.lora_for("dpo").enabled
    ref_model = None if lora else load_model(str(ctx.init_path), dtype=next(ctx.model.parameters()).dtype
                                             ).to(ctx.device).eval().requires_grad_(False)
    sampler = make_sampler(ctx.cfg.sampling, ctx.model, ctx.tokenizer, ctx.device) if cfg.data == "online" else None
    source = OnlinePairs(ctx, sampler) if cfg.data == "online" else OfflinePairs(ctx)
    loop = StageLoop(ctx, steps=cfg.steps, optim=cfg.optim, eval_every=cfg.eval_every,
                     samplers=(sampler,) if sampler is not None else ())
    shard = dist.shard(cfg.pairs_per_step, "dpo.pairs_per_step")
    for step in loop.steps():
        t0 = time.time()
        batch, made = source.step(step, shard)
        sample_s = time.time() - t0
        metrics = dpo_update(ctx, loop, batch, ref_model, lora=lora)
        metrics.update(pair_metrics(made, dist), sample_s=sample_s, train_s=time.time() - t0 - sample_s)
        loop.end_step(step, metrics)
    return loop.finish()


def dpo_update(ctx, loop, batch: Rollouts | None, ref_model, *, lora: bool) -> dict:
    """One optimizer step on this rank's pairs (``batch``: chosen rows then rejected rows, or None for none)."""
    cfg, dist = ctx.cfg.dpo, ctx.dist
    n_pairs = 0 if batch is None else batch.num_rows // 2
    tokens = 0 if batch is None else int(batch.completion_mask_NL.sum())
    total_tokens, total_pairs = (int(x) for x in dist.all_reduce_sum(
        torch.tensor([float(tokens), float(n_pairs)], dtype=torch.float64)).tolist())
    sums = {}
    if total_pairs:
        if n_pairs:
            ctx.model.train()
            ref_N = sequence_logprobs(ref_model or ctx.model, batch, micro_batch_size=2 * cfg.micro_batch_size,
                                      adapter_off=lora)
            loss = DpoLoss(ModelForward(ctx.model), Pairs(batch, ref_N), beta=cfg.beta)
            sums = accumulate(parts(torch.arange(n_pairs), cfg.micro_batch_size), loss, (total_tokens, total_pairs),
                              plan=ctx.plan, world_size=dist.world_size)
        else:  # this rank has no pair, the others do: its gradient is zero, and it still joins the step
            for p in ctx.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        sums = {k: dist.all_reduce_sum(sums.get(k, torch.zeros((), dtype=torch.float64)))
                for k in ("loss", *STATS)}
        grad_norm = loop.optimizer_step()
    else:
        grad_norm = None
    per_pair = lambda k: float(sums[k]) / total_pairs if total_pairs else None  # noqa: E731
    return {"loss": float(sums["loss"]) if total_pairs else None, "pairs": total_pairs, "empty_batch": not total_pairs,
            "tokens": total_tokens, "margin": per_pair("margin"), "preference_accuracy": per_pair("accuracy"),
            "chosen_logratio": per_pair("chosen_logratio"), "rejected_logratio": per_pair("rejected_logratio"),
            "grad_norm": grad_norm, "lr": loop.lr}


def pair_metrics(made: dict, dist) -> dict:
    """Online pairs' figures over every rank: the share of prompts whose samples tied or were unscorable, the mean
    reward gap of the kept pairs and the mean reward of the samples."""
    if not made:
        return {}
    keys = ("prompts", "ties", "unscorable", "reward_gap_sum", "reward_sum", "rewarded_rows")
    s = dict(zip(keys, dist.all_reduce_sum(torch.tensor([float(made[k]) for k in keys], dtype=torch.float64)).tolist()))
    kept = s["prompts"] - s["ties"] - s["unscorable"]
    return {"pairs_kept_frac": kept / max(s["prompts"], 1), "tied_frac": s["ties"] / max(s["prompts"], 1),
            "unscorable_frac": s["unscorable"] / max(s["prompts"], 1),
            "reward_gap_mean": s["reward_gap_sum"] / kept if kept else None,
            "reward_mean": s["reward_sum"] / s["rewarded_rows"] if s["rewarded_rows"] else None,
            "unscorable_first_error": made.get("first_error")}
