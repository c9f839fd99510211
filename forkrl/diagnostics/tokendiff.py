"""``forkrl diff``: what training changed, token by token (METHODS §3, Sparse Policy Selection 2605.06241).

Teacher-force the base π_b and the tuned π_t on the same sampled trajectories; at each completion
position t compare a_t = argmax π_t with π_b's order and call the position

* UNSHIFTED (U) when a_t is π_b's argmax (base rank 1),
* RERANKED  (R) when a_t has base rank 2..k (in π_b's top-k, ``--top-k``, default 5),
* SHIFTED   (S) when its base rank is > k.

Ranks are 1-based in the order (logit descending, token id ascending), the tie-break ``argmax`` uses, so
rank 1 ⇔ same argmax (``substitute.rank_of``). Entropy is H_t = −Σ_v π_b(v) log π_b(v) of the base's own
distribution softmax(z_b) (temperature 1, whatever the sampling temperature), here and in the entropy gate.

Reported: the three fractions over all completion positions; the histogram of the promoted token's base
rank over non-U positions (keys "2".."k" and ">k"); its mean over RERANKED positions only (a SHIFTED rank
can be in the thousands and would swamp the mean the paper reports, 2.1–2.4); the mean base entropy at R
positions divided by the mean over all completion positions; the top fork contexts; and the causal test
(``substitute``): oracle substitution, random control and entropy-only gate, pass@1 and recovered gain.

Choices where the paper is silent:
* Trajectories are sampled with the eval seeds of training (``row_seeds("eval:<seed>", ...)``), so the
  base and tuned pass@1 here equal held-out evaluations of the same problems; the causal decodes reuse the
  same per-row seeds, so the oracle with no substitution would reproduce the base's samples exactly.
* Fork contexts are grouped by (last ``--fork-context`` context tokens, default 1; base argmax; tuned
  argmax) over R and S positions, most frequent first (ties: higher mean base entropy). ``context`` is the
  last 60 characters of the group's first occurrence (prompt + completion so far); ``base_entropy`` is the
  group's mean; ``base_top`` / ``tuned_top`` are the first occurrence's top-k with probabilities.
* τ of the entropy gate: ``--tau``, else the ``--tau-quantile`` q of the teacher-forced base entropies,
  else q = 1 − (RERANKED fraction), so the gate opens at as many teacher-forced positions as the oracle
  substitutes there; when nothing was reranked, τ = log V, which no entropy exceeds (a gate that never opens).

Memory: logits exist one micro-batch (``--micro-batch-size`` rows) at a time and are reduced at once to
per-position statistics (ranks, entropy, top-k ids and probabilities).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..algos.logprobs import entropy_from_logits
from ..types import Role, Rollouts
from .substitute import rank_of

UNSHIFTED, RERANKED, SHIFTED = 0, 1, 2
CLASS_LETTERS = "URS"


@dataclass(frozen=True)
class PositionStats:
    """Per-position statistics of a teacher-forced batch; T index t is the distribution predicting token
    t + 1 (``forward.ModelForward.logprobs``' alignment). Masked positions hold cls −1, rank 0, H 0."""

    mask_NT: torch.Tensor  # bool: a completion target
    cls_NT: torch.Tensor  # int8: UNSHIFTED / RERANKED / SHIFTED, −1 where masked
    rank_NT: torch.Tensor  # long: 1-based base rank of the tuned argmax
    H_NT: torch.Tensor  # base entropy (nats)
    base_arg_NT: torch.Tensor
    tuned_arg_NT: torch.Tensor
    base_top_NTK: torch.Tensor  # the base's top tokens (ids) and their probabilities
    base_p_NTK: torch.Tensor
    tuned_top_NTK: torch.Tensor
    tuned_p_NTK: torch.Tensor


def classify(base_logits_NTV: torch.Tensor, tuned_logits_NTV: torch.Tensor, mask_NT: torch.Tensor,
             top_k: int, num_top: int | None = None) -> PositionStats:
    """Classify every position (see the module docstring) and keep ``num_top`` (default ``top_k``) top
    tokens of each model. cls = U if rank = 1, R if 2 ≤ rank ≤ k, S if rank > k, with rank the base rank
    of a_t = argmax z_t; H = −Σ softmax(z_b) log softmax(z_b), in the logits' dtype."""
    mask_NT = mask_NT.bool()
    base_arg, tuned_arg = base_logits_NTV.argmax(-1), tuned_logits_NTV.argmax(-1)
    rank = rank_of(base_logits_NTV, tuned_arg)
    cls = torch.where(rank == 1, UNSHIFTED, torch.where(rank <= top_k, RERANKED, SHIFTED)).to(torch.int8)
    H = entropy_from_logits(base_logits_NTV)
    k = min(num_top or top_k, base_logits_NTV.shape[-1])
    base_p, base_top = torch.softmax(base_logits_NTV, -1).topk(k, dim=-1)
    tuned_p, tuned_top = torch.softmax(tuned_logits_NTV, -1).topk(k, dim=-1)
    m, m3 = mask_NT, mask_NT.unsqueeze(-1)
    return PositionStats(mask_NT=m, cls_NT=cls.masked_fill(~m, -1), rank_NT=rank.masked_fill(~m, 0),
                         H_NT=H.masked_fill(~m, 0.0), base_arg_NT=base_arg.masked_fill(~m, 0),
                         tuned_arg_NT=tuned_arg.masked_fill(~m, 0), base_top_NTK=base_top.masked_fill(~m3, 0),
                         base_p_NTK=base_p.masked_fill(~m3, 0.0), tuned_top_NTK=tuned_top.masked_fill(~m3, 0),
                         tuned_p_NTK=tuned_p.masked_fill(~m3, 0.0))


def _mean(x: torch.Tensor) -> float | None:
    return float(x.double().mean()) if x.numel() else None


def summarize(stats: PositionStats, top_k: int) -> dict:
    """Fractions, promoted-rank histogram and mean, and base entropies (means over positions, float64).

    ``entropy.ratio`` = mean H over R positions / mean H over all completion positions (None without R
    positions); ``promoted_rank_mean`` is over R positions; the histogram counts every non-U position."""
    m = stats.mask_NT
    cls, rank, H = stats.cls_NT[m], stats.rank_NT[m], stats.H_NT[m].double()
    n = max(int(m.sum()), 1)
    fractions = {name: float((cls == c).sum()) / n for c, name in enumerate(("unshifted", "reranked", "shifted"))}
    hist = {str(r): int((rank == r).sum()) for r in range(2, top_k + 1)}
    hist[f">{top_k}"] = int((rank > top_k).sum())
    mean_all, mean_r = _mean(H), _mean(H[cls == RERANKED])
    ratio = mean_r / mean_all if mean_r is not None and mean_all else None
    entropy = {"mean": mean_all or 0.0, "reranked_mean": mean_r, "ratio": ratio,
               "unshifted_mean": _mean(H[cls == UNSHIFTED])}
    return {"fractions": fractions, "promoted_rank_hist": hist, "entropy": entropy,
            "promoted_rank_mean": _mean(rank[cls == RERANKED].double()), "num_positions": int(m.sum())}


@torch.no_grad()
def teacher_force(base, tuned, rollouts: Rollouts, top_k: int, *, micro_batch_size: int = 64,
                  num_top: int | None = None) -> PositionStats:
    """``classify`` over every completion position of ``rollouts``, ``micro_batch_size`` rows at a time.

    Each micro-batch is trimmed to its longest row and only positions from its first completion target
    on go through the LM heads (``logits_to_keep``); its [n, T, V] logits are dropped once reduced."""
    N, L = rollouts.input_ids_NL.shape
    parts: list[tuple[slice, int, PositionStats]] = []
    device = next(base.parameters()).device
    for s in range(0, N, micro_batch_size):
        sl = slice(s, min(s + micro_batch_size, N))
        role = rollouts.role_NL[sl]
        w = max(int((role != Role.PAD).sum(1).max()), 2)
        ids, attn = rollouts.input_ids_NL[sl, :w].to(device), (role[:, :w] != Role.PAD).long().to(device)
        mask_nT = (role[:, 1:w] == Role.COMPLETION).to(device)
        start = int(mask_nT.any(0).nonzero()[0]) if mask_nT.any() else 0
        logits = [m(input_ids=ids, attention_mask=attn, logits_to_keep=w - start).logits[:, :-1].float()
                  for m in (base, tuned)]
        parts.append((sl, start, classify(logits[0], logits[1], mask_nT[:, start:], top_k, num_top)))
        del logits
    return _stack(parts, N, L - 1)


def _stack(parts, N: int, T: int) -> PositionStats:
    """Place each micro-batch's [n, T_mb] statistics at its rows and columns of [N, T] tensors."""
    k = parts[0][2].base_top_NTK.shape[-1]
    full = {"mask_NT": torch.zeros(N, T, dtype=torch.bool), "cls_NT": torch.full((N, T), -1, dtype=torch.int8),
            "rank_NT": torch.zeros(N, T, dtype=torch.long), "H_NT": torch.zeros(N, T),
            "base_arg_NT": torch.zeros(N, T, dtype=torch.long), "tuned_arg_NT": torch.zeros(N, T, dtype=torch.long),
            "base_top_NTK": torch.zeros(N, T, k, dtype=torch.long), "base_p_NTK": torch.zeros(N, T, k),
            "tuned_top_NTK": torch.zeros(N, T, k, dtype=torch.long), "tuned_p_NTK": torch.zeros(N, T, k)}
    for sl, start, st in parts:
        for name, dst in full.items():
            src = getattr(st, name).cpu()
            dst[sl, start : start + src.shape[1]] = src.to(dst.dtype)
    return PositionStats(**full)


def entropy_threshold(H: torch.Tensor, reranked_frac: float, *, tau: float | None = None,
                      quantile: float | None = None, vocab_size: int | None = None) -> tuple[float, str]:
    """(τ, how it was chosen) for the entropy gate; see the module docstring. ``H``: entropies of all
    teacher-forced completion positions. By default, when nothing was reranked, τ = log V (no
    distribution's entropy exceeds it, so the gate never opens, as the oracle never substitutes)."""
    if tau is not None:
        return float(tau), "--tau"
    import numpy as np

    if quantile is None and reranked_frac == 0 and vocab_size:
        return math.log(vocab_size), "nothing reranked: log V, a gate that never opens"
    q = quantile if quantile is not None else 1.0 - reranked_frac
    values = H.double().numpy()
    value = float(np.quantile(values, q)) if values.size else 0.0
    if quantile is not None:
        return value, f"--tau-quantile {q:g} of the base entropy over {values.size} teacher-forced positions"
    return value, (f"quantile 1 - reranked fraction = {q:.4g} of the base entropy over {values.size} "
                   "teacher-forced positions (the gate opens about as often as the oracle substitutes)")


# ---------------------------------------------------------------------------------------- rendering
class _Tokens:
    """Token id -> display string, memoised (byte-level BPE pieces decoded one at a time)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            self.cache[i] = self.tokenizer.decode([i])
        return self.cache[i]

    def top(self, ids_K: torch.Tensor, p_K: torch.Tensor) -> list:
        return [[self(i), round(p, 4)] for i, p in zip(ids_K.tolist(), p_K.tolist())]


def fork_table(stats: PositionStats, rollouts: Rollouts, tokenizer, *, num: int = 20,
               context_tokens: int = 1, context_chars: int = 60) -> list[dict]:
    """The most frequent fork contexts among R and S positions (grouping: see the module docstring)."""
    tok = _Tokens(tokenizer)
    groups: dict[tuple, list[tuple[int, int]]] = {}
    ids_NL = rollouts.input_ids_NL
    for r, t in (stats.cls_NT > UNSHIFTED).nonzero().tolist():
        suffix = tuple(ids_NL[r, max(0, t + 1 - context_tokens) : t + 1].tolist())
        key = (suffix, int(stats.base_arg_NT[r, t]), int(stats.tuned_arg_NT[r, t]))
        groups.setdefault(key, []).append((r, t))
    mean_H = {key: sum(float(stats.H_NT[r, t]) for r, t in at) / len(at) for key, at in groups.items()}
    order = sorted(groups, key=lambda key: (-len(groups[key]), -mean_H[key]))[:num]
    out = []
    for key in order:
        r, t = groups[key][0]
        context = tokenizer.decode(ids_NL[r, : t + 1].tolist())
        context = context if len(context) <= context_chars else "…" + context[-context_chars:]
        out.append({"context": context, "token": tok(key[2]), "base_entropy": round(mean_H[key], 6),
                    "base_top": tok.top(stats.base_top_NTK[r, t], stats.base_p_NTK[r, t]),
                    "tuned_top": tok.top(stats.tuned_top_NTK[r, t], stats.tuned_p_NTK[r, t]),
                    "count": len(groups[key])})
    return out


def heatmap_rows(stats: PositionStats, rollouts: Rollouts, tokenizer, correct: list[bool], *,
                 num: int = 8) -> list[dict]:
    """``num`` trajectories for the report's heat map, in row order: rows with at least one changed
    (non-U) position, half of them correct and half wrong where both kinds exist, so the map shows the
    typical fork rather than only the failures that have the most changed positions."""
    tok = _Tokens(tokenizer)
    changed = [r for r in range(stats.cls_NT.shape[0]) if bool((stats.cls_NT[r] > UNSHIFTED).any())]
    right, wrong = [r for r in changed if correct[r]], [r for r in changed if not correct[r]]
    half = min(num // 2, len(right), len(wrong)) if right and wrong else 0
    chosen = right[:half] + wrong[:half]
    chosen = sorted(chosen + [r for r in changed if r not in chosen][: num - len(chosen)])
    out = []
    for r in chosen:
        ids, role = rollouts.input_ids_NL[r], rollouts.role_NL[r]
        prompt = tokenizer.decode(ids[role == Role.PROMPT].tolist())
        cols = ((role[1:] == Role.COMPLETION).nonzero().squeeze(1)).tolist()  # T index t predicts token t + 1
        out.append({"prompt": prompt, "correct": bool(correct[r]),
                    "tokens": [tok(int(ids[t + 1])) for t in cols],
                    "base_entropy": [round(float(stats.H_NT[r, t]), 5) for t in cols],
                    "class": [CLASS_LETTERS[int(stats.cls_NT[r, t])] for t in cols],
                    "base_top": [tok.top(stats.base_top_NTK[r, t], stats.base_p_NTK[r, t]) for t in cols],
                    "tuned_top": [tok.top(stats.tuned_top_NTK[r, t], stats.tuned_p_NTK[r, t]) for t in cols]})
    return out


# ---------------------------------------------------------------------------------------- the command
def _check_options(top_k: int, tau_quantile: float | None, samples_from: str, **counts: int | None) -> None:
    """Every problem with the options at once, as a ConfigError (exit status 2). ``counts``: option name
    (``micro_batch_size``...) -> value that must be positive (``fork_context`` and ``heatmap``: >= 0)."""
    from ..config import ConfigError

    problems = []
    if top_k < 2:
        problems.append(f"--top-k must be at least 2 (RERANKED means base rank 2..k), got {top_k}")
    if tau_quantile is not None and not 0.0 <= tau_quantile <= 1.0:
        problems.append(f"--tau-quantile must lie in [0, 1], got {tau_quantile}")
    if samples_from not in ("tuned", "base", "both"):
        problems.append(f"--samples-from must be tuned, base or both, got {samples_from!r}")
    for name, value in counts.items():
        least = 0 if name in ("fork_context", "heatmap", "num_forks") else 1
        if value is not None and value < least:
            flag = "--heatmap-trajectories" if name == "heatmap" else "--" + name.replace("_", "-")
            problems.append(f"{flag} must be an integer >= {least}, got {value}")
    if problems:
        raise ConfigError("; ".join(problems))


def _concat(a: Rollouts, b: Rollouts, pad_id: int) -> Rollouts:
    """Rows of ``a`` then ``b``, right-padded to the wider one; ``b``'s groups renumbered after ``a``'s."""
    L = max(a.input_ids_NL.shape[1], b.input_ids_NL.shape[1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, L - x.shape[1]), value=value)

    return Rollouts(input_ids_NL=torch.cat([pad(a.input_ids_NL, pad_id), pad(b.input_ids_NL, pad_id)]),
                    role_NL=torch.cat([pad(a.role_NL, int(Role.PAD)), pad(b.role_NL, int(Role.PAD))]),
                    sampler_logp_NL=torch.cat([pad(a.sampler_logp_NL, 0.0), pad(b.sampler_logp_NL, 0.0)]),
                    group_N=torch.cat([a.group_N, b.group_N + int(a.group_N.max()) + 1]),
                    problem_N=torch.cat([a.problem_N, b.problem_N]),
                    truncated_N=torch.cat([a.truncated_N, b.truncated_N]))


def _load_pair(base: str, tuned: str, cfg):
    from ..models import ModelLoadError
    from .source import load_eval_model, resolve_model_dir, same_tokenizer

    base_model, tokenizer, _ = load_eval_model(resolve_model_dir(base), cfg)
    tuned_model, tuned_tokenizer, _ = load_eval_model(resolve_model_dir(tuned), cfg)
    why = same_tokenizer(tokenizer, tuned_tokenizer)
    if why:
        raise ModelLoadError(f"--base {base} and --tuned {tuned} use different tokenizers: {why}. forkrl diff "
                             "compares the two models' next-token distributions token by token, which needs "
                             "one shared vocabulary: give two checkpoints of the same model family")
    return base_model, tuned_model, tokenizer


def _causal_setup(cfg, task: str, tokenizer, base_model, num_problems: int | None, spp: int):
    """Held-out problems, prompts, eval sampling params and the eval seeds of training (one per row)."""
    from ..config import ConfigError
    from ..sampling import row_seeds, sampling_params
    from .source import encode_prompts, heldout_problems
    from .substitute import CausalSetup

    task_obj, problems = heldout_problems(cfg, num_problems)
    if not problems:
        raise ConfigError(f"--task {task}: the task has no held-out problems to sample")
    prompt_ids = encode_prompts(cfg, tokenizer, task_obj, base_model, problems)
    seeds = row_seeds(f"eval:{cfg.seed}", list(range(len(problems))), spp)
    return CausalSetup(task_obj, problems, prompt_ids, spp, sampling_params(cfg, for_eval=True), seeds, cfg.sampling)


def _sample_both(base_model, tuned_model, tokenizer, setup, samples_from: str):
    """Both models' own samples on the setup's rows: (trajectories to teacher-force, their correctness,
    base pass@1, tuned pass@1)."""
    from ..sampling import make_sampler
    from .substitute import score_rollouts

    samples, scores = {}, {}
    for name, model in (("base", base_model), ("tuned", tuned_model)):
        sampler = make_sampler(setup.sampling, model, tokenizer)
        samples[name] = sampler.sample(setup.prompt_ids, setup.group_size, setup.params, seeds=setup.seeds)
        scores[name] = score_rollouts(setup.task, setup.problems, tokenizer, samples[name])
    names = ("base", "tuned") if samples_from == "both" else (samples_from,)
    traj = samples[names[0]] if len(names) == 1 else _concat(samples["base"], samples["tuned"], tokenizer.pad_token_id)
    correct = [s > 0 for name in names for s in scores[name]]
    return traj, correct, *(sum(scores[n]) / len(scores[n]) for n in ("base", "tuned"))


def run_diff(base: str, tuned: str, task: str, *, out: str | Path | None = None, samples_from: str = "tuned",
             num_problems: int | None = None, samples_per_problem: int | None = None, top_k: int = 5,
             tau: float | None = None, tau_quantile: float | None = None, micro_batch_size: int = 64,
             num_forks: int = 20, fork_context: int = 1, heatmap: int = 8) -> dict:
    """Everything ``forkrl diff`` computes, as the ``diff.json`` dict (written to ``out/diff.json`` if given)."""
    from .source import load_task_config
    from .substitute import causal_test

    _check_options(top_k, tau_quantile, samples_from, micro_batch_size=micro_batch_size, num_problems=num_problems,
                   samples_per_problem=samples_per_problem, num_forks=num_forks, fork_context=fork_context,
                   heatmap=heatmap)
    cfg = load_task_config(task)
    base_model, tuned_model, tokenizer = _load_pair(base, tuned, cfg)
    spp = samples_per_problem or cfg.eval.samples_per_problem
    setup = _causal_setup(cfg, task, tokenizer, base_model, num_problems, spp)
    t0 = time.time()
    traj, correct, p_base, p_tuned = _sample_both(base_model, tuned_model, tokenizer, setup, samples_from)
    t1 = time.time()
    stats = teacher_force(base_model, tuned_model, traj, top_k, micro_batch_size=micro_batch_size)
    agg = summarize(stats, top_k)
    t2 = time.time()
    tau_value, tau_rule = entropy_threshold(stats.H_NT[stats.mask_NT], agg["fractions"]["reranked"], tau=tau,
                                            quantile=tau_quantile, vocab_size=base_model.config.vocab_size)
    causal = causal_test(base_model, tuned_model, tokenizer, setup, p_base=p_base, p_tuned=p_tuned, top_k=top_k,
                         tau=tau_value)
    t3 = time.time()
    result = {
        "base": str(base), "tuned": str(tuned), "samples_from": samples_from, "top_k": top_k,
        "temperature": setup.params.temperature, "num_trajectories": traj.num_rows,
        "num_positions": agg["num_positions"], "summary": _headline(agg, causal),
        "fractions": agg["fractions"], "promoted_rank_hist": agg["promoted_rank_hist"], "entropy": agg["entropy"],
        "forks": fork_table(stats, traj, tokenizer, num=num_forks, context_tokens=fork_context),
        "causal": {"tau": tau_value, "tau_rule": tau_rule, "samples_per_problem": spp,
                   "num_problems": len(setup.problems), **causal},
        "trajectories": heatmap_rows(stats, traj, tokenizer, correct, num=heatmap),
        "seconds": {"sample": t1 - t0, "teacher_force": t2 - t1, "causal": t3 - t2},
    }
    result = _rounded(result)
    if out is not None:
        from ..checkpoint import atomic_write_text

        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / "diff.json", json.dumps(result, indent=1, allow_nan=False, ensure_ascii=False))
    return result


def _headline(agg: dict, causal: dict) -> dict:
    return {"agreement": agg["fractions"]["unshifted"], "reranked": agg["fractions"]["reranked"],
            "shifted": agg["fractions"]["shifted"], "entropy_ratio": agg["entropy"]["ratio"],
            "oracle_recovery": causal["oracle"]["recovery"], "random_recovery": causal["random"]["recovery"],
            "entropy_gate_recovery": causal["entropy_gate"]["recovery"],
            "promoted_rank_mean": agg["promoted_rank_mean"]}


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def format_table(d: dict) -> str:
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    fr, ent, c = d["fractions"], d["entropy"], d["causal"]
    lines = [f"forkrl diff: {d['num_trajectories']} trajectories from {d['samples_from']}, {d['num_positions']} "
             f"completion positions, top-{d['top_k']}",
             f"  unshifted {fr['unshifted']:.4f}  reranked {fr['reranked']:.4f}  shifted {fr['shifted']:.4f}  "
             f"promoted rank (mean over R) {f(d['summary']['promoted_rank_mean'], '.2f')}",
             f"  base entropy: all {ent['mean']:.3f}  reranked {f(ent['reranked_mean'])}  "
             f"ratio {f(ent['ratio'], '.2f')}",
             f"  causal test ({c['num_problems']} problems x {c['samples_per_problem']}), tau {c['tau']:.3f}:",
             f"    {'':<14}{'pass@1':>8}{'recovery':>10}{'subs/traj':>11}"]
    for name in ("base", "tuned", "oracle", "random", "entropy_gate"):
        row = c[name]
        lines.append(f"    {name:<14}{row['pass_at_1']:>8.3f}{f(row.get('recovery'), '.2f'):>10}"
                     f"{f(row.get('substitutions_per_traj'), '.2f'):>11}")
    for fork in d["forks"][:5]:
        base_tok = fork["base_top"][0][0] if fork["base_top"] else "?"
        lines.append(f"  fork x{fork['count']}: {fork['context']!r}  base {base_tok!r} -> tuned {fork['token']!r}  "
                     f"H {fork['base_entropy']:.2f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model: a model directory or a run directory")
    p.add_argument("--tuned", required=True, help="tuned model: a model directory or a run directory")
    p.add_argument("--task", required=True, help="YAML config or run directory (its task, sampling, eval sections)")
    p.add_argument("--out", required=True, help="directory to write diff.json into (created)")
    p.add_argument("--samples-from", choices=["tuned", "base", "both"], default="tuned",
                   help="whose samples are teacher-forced (default: tuned)")
    p.add_argument("--num-problems", type=int, help="held-out problems (default: eval.num_problems)")
    p.add_argument("--samples-per-problem", type=int, help="default: eval.samples_per_problem")
    p.add_argument("--top-k", type=int, default=5, help="RERANKED = tuned argmax in the base top-k (default 5)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tau", type=float, help="entropy-gate threshold in nats")
    g.add_argument("--tau-quantile", type=float,
                   help="τ = this quantile of the teacher-forced base entropies (default: 1 - reranked fraction)")
    p.add_argument("--micro-batch-size", type=int, default=64, help="rows per teacher-forced forward (default 64)")
    p.add_argument("--num-forks", type=int, default=20, help="fork contexts to list (default 20)")
    p.add_argument("--fork-context", type=int, default=1, help="context tokens that key a fork group (default 1)")
    p.add_argument("--heatmap-trajectories", type=int, default=8, help="trajectories kept for the heat map")


def main(args) -> int:
    result = run_diff(args.base, args.tuned, args.task, out=args.out, samples_from=args.samples_from,
                      num_problems=args.num_problems, samples_per_problem=args.samples_per_problem, top_k=args.top_k,
                      tau=args.tau, tau_quantile=args.tau_quantile, micro_batch_size=args.micro_batch_size,
                      num_forks=args.num_forks, fork_context=args.fork_context, heatmap=args.heatmap_trajectories)
    print(format_table(result))
    print(f"wrote {Path(args.out) / 'diff.json'}")
    return 0
