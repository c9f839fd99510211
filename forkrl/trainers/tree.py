"""A GRPO step on tree rollouts (``grpo.tree``; the math in ``algos.tree``): sample trees → score paths → tree
advantages → coefficients → loss over the compact rows → update → stats.

Per prompt, ``chains`` completions are sampled whole (the sampler's rows, seeded per (step, problem, chain)); from
each, ``forks`` fork points f are drawn among its tokens 1 … L−1 (at random, seeded, or its highest-entropy tokens
under the current policy), and a continuation is sampled from the prompt plus the chain's first f tokens, its budget
the chain's, ``max_new_tokens − f`` (one sampler call for all of a step's continuations, each cut to its budget,
which is a sample of the shorter budget). A chain of one token forks at 0: a fresh sample of the prompt.

The compact rows are the chains and, for each continuation, the prompt and the shared prefix as context (role
PROMPT: read, not trained) and its own tokens; their forward recomputes the prefix as context, but no prefix token
is sampled or trained twice. Reported: ``tree_paths`` and ``tree_path_tokens`` (what the paths hold, expanded),
``tokens_sampled`` and ``tree_sampled_frac`` (the share of the paths' tokens that were sampled).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import torch

from ..algos.tree import path_weights, tree_advantages, tree_coefficients, tree_loss
from ..forward import ModelForward
from ..rewards import score_rollouts
from ..rewards.debug import rollouts_of
from ..sampling import row_seeds, sampling_params
from ..types import Rollouts
from .accumulate import accumulate, parts


@dataclass(frozen=True)
class Trees:
    """A step's trees on this rank: the compact rows, and per path its pieces (row, first target, end) of those
    rows, its completion ids, its problem (index into the step's problems) and its tree."""

    compact: Rollouts
    spans: list[list[tuple[int, int, int]]]
    path_ids: list[list[int]]
    problem_L: torch.Tensor
    tree_L: torch.Tensor
    sampled_tokens: int


def fork_points(length: int, n: int, rng: random.Random, entropy: list[float] | None) -> list[int]:
    """``n`` fork points of a chain of ``length`` tokens: among 1 … length − 1 (without repeats while there are
    enough), the highest-entropy ones when ``entropy`` (of each token's distribution) is given; 0 for a chain of
    one token."""
    choices = list(range(1, length))
    if not choices:
        return [0] * n
    if entropy is not None:
        ranked = sorted(choices, key=lambda f: (-entropy[f], f))
        return [ranked[i % len(ranked)] for i in range(n)]
    return rng.sample(choices, n) if n <= len(choices) else [rng.choice(choices) for _ in range(n)]


@torch.no_grad()
def chain_entropies(model, chains: Rollouts) -> list[list[float]]:
    """Each chain's per-token entropy under the current policy (token j's distribution, j = 0 … L−1)."""
    _, H_NT, mask_NT = ModelForward(model).logprobs(chains, entropy="detached")
    return [H_NT[i][mask_NT[i]].tolist() for i in range(chains.num_rows)]


def sample_trees(ctx, sampler, prompt_ids: list[list[int]], pick: list[int], step: int) -> Trees:
    cfg, tree = ctx.cfg, ctx.cfg.grpo.tree
    M, N = tree.chains, tree.forks
    params = sampling_params(cfg)
    chains = sampler.sample(prompt_ids, M, params, seeds=row_seeds(f"tree:{cfg.seed}:{step}", pick, M))
    chain_ids = [ids[m].tolist() for ids, m in zip(chains.input_ids_NL, chains.completion_mask_NL)]
    entropies = chain_entropies(ctx.model, chains) if tree.at == "highest_entropy" else None
    forks = []  # (chain row, f)
    for c, ids in enumerate(chain_ids):
        rng = random.Random(f"tree-fork:{cfg.seed}:{step}:{pick[int(chains.problem_N[c])]}:{c % M}")
        forks += [(c, f) for f in fork_points(len(ids), N, rng, None if entropies is None else entropies[c])]
    budget = params.max_new_tokens
    contexts = [prompt_ids[int(chains.problem_N[c])] + chain_ids[c][:f] for c, f in forks]
    seeds = [row_seeds(f"tree-cont:{cfg.seed}:{step}", [pick[int(chains.problem_N[c])]], M * N)[(c % M) * N + k % N]
             for k, (c, _) in enumerate(forks)]
    longest = budget - min(f for _, f in forks)
    conts = sampler.sample(contexts, 1, dataclasses.replace(params, max_new_tokens=longest), seeds=seeds)
    suffixes = [ids[m].tolist()[: budget - f] for ids, m, (_, f) in zip(conts.input_ids_NL, conts.completion_mask_NL,
                                                                        forks)]
    rows_ctx = [prompt_ids[int(chains.problem_N[c])] for c in range(len(chain_ids))] + contexts
    compact = rollouts_of(rows_ctx, chain_ids + suffixes, ctx.tokenizer)  # context PROMPT, own tokens COMPLETION
    spans, path_ids, problem, tree_of = [], [], [], []
    for c, ids in enumerate(chain_ids):  # the chain's own path
        start = len(rows_ctx[c]) - 1
        spans.append([(c, start, start + len(ids))])
        path_ids.append(ids)
        problem.append(int(chains.problem_N[c]))
        tree_of.append(c)
    for k, ((c, f), suffix) in enumerate(zip(forks, suffixes)):
        row, start = len(chain_ids) + k, len(rows_ctx[c]) - 1
        spans.append(([(c, start, start + f)] if f else []) + [(row, start + f, start + f + len(suffix))])
        path_ids.append(chain_ids[c][:f] + suffix)
        problem.append(int(chains.problem_N[c]))
        tree_of.append(c)
    sampled = sum(map(len, chain_ids)) + sum(map(len, suffixes))
    return Trees(compact, spans, path_ids, torch.tensor(problem), torch.tensor(tree_of), sampled)


class TreeLoss:
    """The step loss of ``accumulate`` over compact rows: ``algos.tree.tree_loss`` with the step's coefficients."""

    def __init__(self, forward, batch: Rollouts, a_NT, b_NT, ref_NT, cfg):
        self.forward, self.batch, self.a_NT, self.b_NT, self.ref_NT, self.cfg = forward, batch, a_NT, b_NT, ref_NT, cfg

    def counts(self, rows_N):
        return int((self.b_NT[rows_N] > 0).sum()), len(rows_N)

    def __call__(self, rows_N, totals):
        cfg = self.cfg
        need_H = "grad" if cfg.entropy_coef > 0 else "detached"
        logp_NT, H_NT, mask_NT = self.forward.logprobs(self.batch, rows_N, entropy=need_H)
        T = logp_NT.shape[1]
        a_NT, b_NT = self.a_NT[rows_N, :T], self.b_NT[rows_N, :T]
        ref = None if self.ref_NT is None else self.ref_NT[rows_N, :T]
        loss, kl_NT = tree_loss(logp_NT, a_NT, b_NT, ref_logp_NT=ref, kl_estimator=cfg.kl.estimator,
                                kl_coef=cfg.kl.beta if cfg.kl.active else 0.0, entropy_NT=H_NT,
                                entropy_coef=cfg.entropy_coef)
        live = mask_NT & (b_NT > 0)
        return loss, {"entropy": (H_NT.detach() * live).sum(), "kl": (kl_NT.detach() * live).sum(),
                      "trained_tokens": live.sum().double()}


def tree_step(ctx, loop, sampler, ref_model, source, rewards, pick, step_problems, step: int) -> dict:
    """One GRPO step on trees for this rank's share of the step's prompts (``pick``: indices of the task's
    problems; ``source.prompt`` encodes them)."""
    from .grpo import frozen_logprobs

    cfg, run_cfg, dist = ctx.cfg.grpo, ctx.cfg, ctx.dist
    t0 = time.time()
    prompts = [source.prompt(i, p) for i, p in zip(pick, step_problems)]
    trees = sample_trees(ctx, sampler, prompts, pick, step)
    sample_s = time.time() - t0
    problem_of = trees.problem_L.tolist()
    expanded = dataclasses.replace(rollouts_of([prompts[j] for j in problem_of], trees.path_ids, ctx.tokenizer),
                                   problem_N=trees.problem_L, group_N=trees.problem_L)
    texts = [ctx.tokenizer.decode(ids, skip_special_tokens=True) for ids in trees.path_ids]
    # a path's reward seed: (step, its problem, its index among that problem's paths), as a flat row's is
    seeds = [row_seeds(f"tree-reward:{run_cfg.seed}:{step}", [pick[j]], n + 1)[n]
             for n, j in zip(path_index_within(problem_of), problem_of)]
    scored, failures = score_rollouts(expanded, texts, step_problems, ctx.task, rewards, seeds=seeds, step=step,
                                      progress=step / cfg.steps, max_new_tokens=run_cfg.sampling.max_new_tokens)
    t1 = time.time()
    adv_L = tree_advantages(scored.reward_N, trees.tree_L, trees.problem_L, scored.valid_N, eps=cfg.adv_eps)
    len_L = torch.tensor([len(p) for p in trees.path_ids])
    total_tokens, total_paths = (int(x) for x in dist.all_reduce_sum(
        torch.tensor([float(len_L.sum()), float(len(len_L))], dtype=torch.float64)).tolist())
    weight_L = path_weights(len_L, cfg.reduction, total_tokens=total_tokens, total_paths=total_paths,
                            t_max=cfg.t_max or run_cfg.sampling.max_new_tokens)
    shape = (trees.compact.num_rows, trees.compact.input_ids_NL.shape[1] - 1)
    a_NT, b_NT = tree_coefficients(trees.spans, adv_L, weight_L, shape)
    ref_NT = None
    if cfg.kl.active:
        ref_NT = frozen_logprobs(ref_model or ctx.model, trees.compact, temperature=run_cfg.sampling.temperature,
                                 micro_batch_size=cfg.micro_batch_size, adapter_off=ref_model is None)
    loss = TreeLoss(ModelForward(ctx.model), trees.compact, a_NT, b_NT, ref_NT, cfg)
    sums = accumulate(parts(torch.arange(trees.compact.num_rows), cfg.micro_batch_size), loss, (0, 0),
                      plan=ctx.plan, world_size=dist.world_size)
    sums = {k: dist.all_reduce_sum(v) for k, v in sums.items()}
    grad_norm = loop.optimizer_step()
    valid = scored.valid_N
    stats = dist.all_reduce_sum(torch.tensor([float(scored.reward_N[valid].sum()), float(valid.sum()),
                                              float(trees.sampled_tokens), float(group_std_sum(scored, trees)),
                                              float(len(pick))], dtype=torch.float64)).tolist()
    trained = max(float(sums["trained_tokens"]), 1.0)
    return {"reward_mean": stats[0] / stats[1] if stats[1] else None, "unscorable_rows": int(total_paths - stats[1]),
            "unscorable_first_error": failures.first_message, "loss": float(sums["loss"]), "grad_norm": grad_norm,
            "lr": loop.lr, "entropy": float(sums["entropy"]) / trained,
            "kl": float(sums["kl"]) / trained if cfg.kl.active else None,
            "group_reward_std": stats[3] / max(stats[4], 1), "tree_paths": total_paths,
            "tree_path_tokens": total_tokens, "tokens_sampled": int(stats[2]), "tokens_trained": int(trained),
            "tree_sampled_frac": stats[2] / max(total_tokens, 1), "adv_abs_max": float(adv_L.abs().max()),
            "sample_s": sample_s, "train_s": time.time() - t1, "rows_trained": trees.compact.num_rows}


def path_index_within(problem_of: list[int]) -> list[int]:
    """Each path's index among its own problem's paths."""
    seen: dict[int, int] = {}
    out = []
    for j in problem_of:
        out.append(seen.get(j, 0))
        seen[j] = out[-1] + 1
    return out


def group_std_sum(scored, trees: Trees) -> float:
    """Σ over this rank's prompts of their paths' reward std (RAGEN-2's spread, for the collapse ratio)."""
    out = 0.0
    for j in trees.problem_L.unique().tolist():
        r = scored.reward_N[(trees.problem_L == j) & scored.valid_N]
        out += float(r.std()) if len(r) > 1 else 0.0
    return out
