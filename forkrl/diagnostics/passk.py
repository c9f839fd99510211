"""``forkrl passk``: pass@k curves, capability boundaries and strategy diversity (METHODS §5, arXiv 2604.14877).

Each model draws ``n`` completions of each held-out problem at the config's evaluation temperature,
the task's verifier scores them, and from the per-problem correct counts c this module reports:

* unbiased pass@k = 1 − C(n−c, k) / C(n, k) per problem (Chen et al. 2021, arXiv 2107.03374), averaged
  over problems, for k = 1, 2, 4, … up to n (and n itself when it is not a power of two), with a
  percentile bootstrap confidence interval over problems;
* where two models' curves cross (the sign of pass@k_a − pass@k_b flips between two consecutive k);
* the boundary B(π) = {problems with c ≥ 1} of each model, and for each pair (a, b) in the order given
  the problems gained (in B(b), not B(a)), lost and kept;
* strategy diversity: distinct ``task.strategy(completion)`` values per problem, when the task has one;
* for an env task (``task.type: env``), PASS@(k,T): ``n`` episodes of each held-out env seed, an episode solved
  within T turns when ``task.solved_at`` is at most T, pass@k for every T = 1 … ``max_turns`` (the boundary and the
  seeds gained and lost at T = ``max_turns``).

Choices the paper leaves open, made here:
* *Correct* means ``task.score(problem, completion) >= 1 − 1e-9``: pass@k asks "did any attempt solve
  it", so a partial-credit score is not a solve. A completion whose score raises or is None/NaN counts
  as incorrect (it did not demonstrably solve the problem) and is counted in the model's ``unscorable``.
* Every model is sampled with the same seeds, ``row_seeds(f"passk:{seed}", problems, n)``, and every
  model's bootstrap uses the same resampled problem sets, so the comparison is paired: the same model
  under two names gives identical curves and intervals.
* ``per_problem[].strategies`` counts distinct strategies among the *correct* completions (0 when none
  is correct; the paper counts the distinct ways a model succeeds); ``strategies_all`` counts them among
  all n completions. ``diversity_mean`` averages ``strategies`` over all problems (an unsolved problem
  adds 0), ``diversity_all_mean`` averages ``strategies_all``.

Models are loaded one at a time (load, sample, free), so peak memory is one model. Models whose
tokenizers differ from the first model's are allowed: each model encodes the prompts and decodes its
completions with its own tokenizer (the verifier reads text), and ``tokenizer_differs`` records how it
differs. Use ``forkrl diff`` where token-level alignment matters.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

CORRECT_THRESHOLD = 1.0 - 1e-9


# ---------------------------------------------------------------- pure math
def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, … ≤ n, and n itself when n is not a power of two."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def pass_at_k(n: int, c_P, k: int):
    """Unbiased pass@k of each problem from n samples of which c_P are correct (Chen et al. 2021, eq. 1):

        pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)

    the probability that a k-subset drawn without replacement from the n samples holds a correct one.
    The product form avoids the huge binomials; it is computed in float64 as suffix products
    S_j = Π_{i=j}^{n} (1 − k/i), so pass@k = 1 − S_{n−c+1} (S_{n+1} = 1). When n − c < k every k-subset
    holds a correct sample: the product then contains the factor i = k, which is exactly 0, so pass@k = 1.

    Worked case: n = 4, c = 2, k = 2: C(2, 2)/C(4, 2) = 1/6, so pass@2 = 5/6; in product form
    1 − (1 − 2/3)(1 − 2/4) = 1 − (1/3)(1/2) = 5/6. Also c = 0 → 0, c = n → 1, k = 1 → c/n.

    Returns a float for a scalar c, else a float64 array shaped like c_P.
    """
    c = np.asarray(c_P, dtype=np.int64)
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n; got k={k}, n={n}")
    if c.size and (c.min() < 0 or c.max() > n):
        raise ValueError(f"correct counts must lie in [0, n={n}]; got {c.min()}..{c.max()}")
    factor_n = 1.0 - k / np.arange(1, n + 1, dtype=np.float64)  # factor_n[i-1] = 1 − k/i
    suffix = np.ones(n + 2, dtype=np.float64)  # suffix[j] = S_j, j = 1..n+1
    suffix[1 : n + 1] = np.cumprod(factor_n[::-1])[::-1]
    out = 1.0 - suffix[n - c + 1]
    return float(out) if out.ndim == 0 else out


def bootstrap_ci(values_PK, *, resamples: int = 1000, ci: float = 0.95, seed: int = 0):
    """Percentile bootstrap over problems of the mean of ``values_PK`` (one column per k).

    Draw ``resamples`` sets of P problems with replacement (the same sets for every column, and for
    every model given the same seed: paired comparisons), take each set's mean m_r, and report
    (mean, lo, hi) with lo, hi the (1 − ci)/2 and (1 + ci)/2 quantiles of m_r (linear interpolation).
    A resample's mean cannot leave [min_p v_p, max_p v_p], so the results are clipped there, which makes
    the interval exactly degenerate (lo = hi = mean) when every problem has the same value despite
    float rounding. Vectorised: resample counts [R, P] times values [P, K].

    Returns three float64 arrays of shape [K] (or floats for a 1-D input).
    """
    v = np.asarray(values_PK, dtype=np.float64)
    flat = v.ndim == 1
    v_PK = v[:, None] if flat else v
    P = v_PK.shape[0]
    if P == 0 or resamples < 1 or not 0.0 < ci < 1.0:
        raise ValueError(f"bootstrap needs problems, resamples >= 1 and 0 < ci < 1; got P={P}, "
                         f"resamples={resamples}, ci={ci}")
    idx_RP = np.random.default_rng(seed).integers(0, P, size=(resamples, P))
    offset_RP = (np.arange(resamples) * P)[:, None]
    counts_RP = np.bincount((idx_RP + offset_RP).ravel(), minlength=resamples * P).reshape(resamples, P)
    means_RK = counts_RP.astype(np.float64) @ v_PK / P
    alpha = (1.0 - ci) / 2.0
    lo_K, hi_K = np.quantile(means_RK, [alpha, 1.0 - alpha], axis=0)
    vmin_K, vmax_K = v_PK.min(0), v_PK.max(0)
    out = [np.clip(x, vmin_K, vmax_K) for x in (v_PK.mean(0), lo_K, hi_K)]
    return tuple(float(x[0]) for x in out) if flat else tuple(out)


def crossings(ks: list[int], curve_a, curve_b) -> list[list[int]]:
    """[k_lo, k_hi] for each flip of sign(curve_a − curve_b) between consecutive ks.

    Exact ties (difference 0) are skipped, so a flip is reported between the last k where one curve led
    and the next k where the other leads: differences (+, 0, −) at k = 1, 2, 4 give [[1, 4]]. Curves
    that never differ, or where one never falls below the other, give [].
    """
    out, last = [], None  # last: (k, a > b) at the latest untied k
    for k, a, b in zip(ks, curve_a, curve_b):
        if a == b:
            continue
        if last is not None and (a > b) != last[1]:
            out.append([last[0], k])
        last = (k, a > b)
    return out


def boundary_sets(ids: list[str], correct_a, correct_b) -> dict:
    """Problems gained, lost and kept from model a to model b, in problem order.

    B(π) = {p : c_p ≥ 1}; gained = B(b) \\ B(a), lost = B(a) \\ B(b), kept = B(a) ∩ B(b).
    """
    in_a = [c >= 1 for c in correct_a]
    in_b = [c >= 1 for c in correct_b]
    gained = [i for i, a, b in zip(ids, in_a, in_b) if b and not a]
    lost = [i for i, a, b in zip(ids, in_a, in_b) if a and not b]
    kept = [i for i, a, b in zip(ids, in_a, in_b) if a and b]
    return {"gained": gained, "lost": lost, "kept": kept,
            "n_gained": len(gained), "n_lost": len(lost), "n_kept": len(kept)}


# ---------------------------------------------------------------- models: names, sampling, scoring
@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path


def parse_models(values: list[str]) -> list[ModelSpec]:
    """``--model`` values (PATH or NAME=PATH) to named model directories; ModelLoadError for a bad path,
    ConfigError for a name used twice."""
    from .source import resolve_model_dir

    specs = []
    for value in values:
        name, _, rest = value.partition("=")
        if not rest or not name or "/" in name or Path(value).exists():
            name, rest = None, value
        path = resolve_model_dir(rest)
        specs.append(ModelSpec(name or default_name(Path(rest).expanduser(), path), path))
    seen: dict[str, ModelSpec] = {}
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"two --model arguments are both named {s.name!r} ({seen[s.name].path} and {s.path}); "
                              "name them apart with NAME=PATH, e.g. --model base=PATH --model tuned=PATH")
        seen[s.name] = s
    return specs


def default_name(arg: Path, model_dir: Path) -> str:
    """A run directory's name; for RUN/<stage>/final the stage's name; else the model directory's name."""
    arg = arg.resolve()
    if (arg / "config.yaml").exists():
        return arg.name
    if arg.name == "final" and (arg.parent.parent / "config.yaml").exists():
        return arg.parent.name
    return model_dir.resolve().name


def verdict(task, problem, completion: str) -> tuple[bool | None, str | None]:
    """(correct, None), or (None, why) when the score raised or is None/NaN (unscorable)."""
    try:
        score = task.score(problem, completion)
    except Exception as e:  # noqa: BLE001 - a failing verifier marks the row, it must not end the run
        return None, f"{type(e).__name__}: {e}"
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = math.nan
    if score is None or math.isnan(value):
        return None, f"score was {score!r}"
    return value >= CORRECT_THRESHOLD, None


@dataclass(frozen=True)
class Outcome:
    """What one model did on the problems: per problem, correct and unscorable counts and strategies."""

    spec: ModelSpec
    correct_P: list[int]
    unscorable_P: list[int]
    strategies_P: list[int] | None  # distinct strategies among correct completions
    strategies_all_P: list[int] | None  # among all completions
    first_error: str | None
    truncated_frac: float
    tokenizer_differs: str | None
    seconds: float
    correct_PT: list[list[int]] | None = None  # env tasks: episodes solved within T = 1 … max_turns turns


def sample_texts(spec: ModelSpec, cfg, task, problems, *, n: int, seed: int, ref_tokenizer=None):
    """Load one model, sample n completions of each problem, free the model.

    Returns (texts per problem, truncated fraction, tokenizer, how the tokenizer differs from
    ``ref_tokenizer`` or None). Problems are sampled in chunks of about ``sampling.batch_size`` rows;
    each row's seed depends only on (seed, problem index, sample index), so chunking changes nothing.
    """
    from ..sampling import completion_texts, make_sampler, row_seeds, sampling_params
    from .source import encode_prompts, load_eval_model, same_tokenizer

    model, tokenizer, _ = load_eval_model(spec.path, cfg)
    differs = same_tokenizer(ref_tokenizer, tokenizer) if ref_tokenizer is not None else None
    prompt_ids = encode_prompts(cfg, tokenizer, task, model, problems)
    sampler = make_sampler(cfg.sampling, model, tokenizer)
    params = sampling_params(cfg, for_eval=True)
    texts_P: list[list[str]] = [[] for _ in problems]
    per_call, truncated, shown = max(1, cfg.sampling.batch_size // n), 0, 0
    for start in range(0, len(problems), per_call):
        index = list(range(start, min(len(problems), start + per_call)))
        rollouts = sampler.sample([prompt_ids[i] for i in index], n, params,
                                  seeds=row_seeds(f"passk:{seed}", index, n))
        for text, j in zip(completion_texts(tokenizer, rollouts), rollouts.problem_N.tolist()):
            texts_P[index[j]].append(text)
        truncated += int(rollouts.truncated_N.sum())
        done = index[-1] + 1
        if done * 10 // len(problems) > shown or done == len(problems):
            shown = done * 10 // len(problems)
            print(f"[passk] {spec.name}: {done}/{len(problems)} problems sampled", file=sys.stderr, flush=True)
    del sampler, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return texts_P, truncated / (len(problems) * n), tokenizer, differs


def score_texts(task, problems, texts_P) -> tuple[list[int], list[int], list | None, list | None, str | None]:
    """(correct_P, unscorable_P, strategies_P, strategies_all_P, first error) from the sampled texts."""
    strategy = getattr(task, "strategy", None)
    correct_P, unscorable_P, strat_P, strat_all_P, first_error = [], [], [], [], None
    for problem, texts in zip(problems, texts_P):
        verdicts = [verdict(task, problem, t) for t in texts]
        first_error = first_error or next((why for ok, why in verdicts if why), None)
        correct_P.append(sum(ok is True for ok, _ in verdicts))
        unscorable_P.append(sum(ok is None for ok, _ in verdicts))
        if callable(strategy):
            names = [_strategy_of(strategy, problem, t) for t in texts]
            strat_P.append(len({s for s, (ok, _) in zip(names, verdicts) if ok is True}))
            strat_all_P.append(len(set(names)))
    if not callable(strategy):
        return correct_P, unscorable_P, None, None, first_error
    return correct_P, unscorable_P, strat_P, strat_all_P, first_error


def _strategy_of(strategy, problem, text: str) -> str:
    from ..tasks.base import TaskError

    try:
        return str(strategy(text))
    except Exception as e:  # noqa: BLE001 - a user task's bug: say which problem and completion
        raise TaskError(f"task.strategy() raised {type(e).__name__}: {e} on problem {problem.id} "
                        f"for the completion {text[:80]!r}") from e


def run_env_model(spec: ModelSpec, cfg, task, problems, *, n: int, seed: int, ref_tokenizer=None):
    """(Outcome, tokenizer) of one model on an env task: ``n`` episodes of each held-out env seed, each counted
    solved within T turns when ``task.solved_at`` is at most T (PASS@(k,T)); an episode whose environment raised is
    unscorable (counted, not solved)."""
    from ..envs.episodes import make_codec, play
    from ..sampling import make_sampler, row_seeds, sampling_params
    from .source import load_eval_model, same_tokenizer

    t0 = time.time()
    model, tokenizer, _ = load_eval_model(spec.path, cfg)
    differs = same_tokenizer(ref_tokenizer, tokenizer) if ref_tokenizer is not None else None
    sampler = make_sampler(cfg.sampling, model, tokenizer)
    episodes = play(task, sampler, make_codec(task, tokenizer), [p.meta["env_seed"] for p in problems], n,
                    sampling_params(cfg, for_eval=True), seeds=row_seeds(f"passk:{seed}", list(range(len(problems))), n))
    del sampler, model
    gc.collect()
    turns = range(1, task.max_turns + 1)
    correct_PT, unscorable_P = [], []
    for i in range(len(problems)):
        mine = episodes[i * n : (i + 1) * n]
        solved = [task.solved_at(e) for e in mine]
        correct_PT.append([sum(s is not None and s <= t for s in solved) for t in turns])
        unscorable_P.append(sum(e.error is not None for e in mine))
    first_error = next((e.error for e in episodes if e.error is not None), None)
    truncated = sum(e.truncated for e in episodes) / max(len(episodes), 1)
    print(f"[passk] {spec.name}: {len(problems)} env seeds x {n} episodes played", file=sys.stderr, flush=True)
    return Outcome(spec, [row[-1] for row in correct_PT], unscorable_P, None, None, first_error, truncated, differs,
                   time.time() - t0, correct_PT), tokenizer


def run_model(spec: ModelSpec, cfg, task, problems, *, n: int, seed: int, ref_tokenizer=None):
    """(Outcome, tokenizer) of one model: sample (one model in memory at a time), then score."""
    if getattr(task, "multi_turn", False):
        return run_env_model(spec, cfg, task, problems, n=n, seed=seed, ref_tokenizer=ref_tokenizer)
    t0 = time.time()
    texts_P, truncated_frac, tokenizer, differs = sample_texts(spec, cfg, task, problems, n=n, seed=seed,
                                                               ref_tokenizer=ref_tokenizer)
    correct_P, unscorable_P, strat_P, strat_all_P, first_error = score_texts(task, problems, texts_P)
    return Outcome(spec, correct_P, unscorable_P, strat_P, strat_all_P, first_error, truncated_frac, differs,
                   time.time() - t0), tokenizer


# ---------------------------------------------------------------- assembling passk.json
def model_entry(o: Outcome, ids: list[str], n: int, ks: list[int], *, resamples: int, ci: float, seed: int) -> dict:
    values_PK = np.stack([pass_at_k(n, o.correct_P, k) for k in ks], axis=1)
    mean_K, lo_K, hi_K = bootstrap_ci(values_PK, resamples=resamples, ci=ci, seed=seed)
    has_strat = o.strategies_P is not None
    per_problem = [{"id": pid, "correct": c, "strategies": o.strategies_P[i] if has_strat else None,
                    "strategies_all": o.strategies_all_P[i] if has_strat else None, "unscorable": o.unscorable_P[i]}
                   for i, (pid, c) in enumerate(zip(ids, o.correct_P))]
    return {
        "path": str(o.spec.path),
        "pass_at_k": {str(k): {"mean": float(m), "lo": float(lo), "hi": float(hi)}
                      for k, m, lo, hi in zip(ks, mean_K, lo_K, hi_K)},
        "boundary": sum(c >= 1 for c in o.correct_P),
        "diversity_mean": float(np.mean(o.strategies_P)) if has_strat else None,
        "diversity_all_mean": float(np.mean(o.strategies_all_P)) if has_strat else None,
        "unscorable": sum(o.unscorable_P),
        "unscorable_first_error": o.first_error,
        "truncated_frac": o.truncated_frac,
        "tokenizer_differs": o.tokenizer_differs,
        "seconds": o.seconds,
        "per_problem": per_problem,
        # env tasks: PASS@(k,T), by turn budget T then k (the T = max_turns row is pass_at_k)
        **({"pass_at_k_t": {str(t + 1): {str(k): float(np.mean(pass_at_k(n, [row[t] for row in o.correct_PT], k)))
                                         for k in ks} for t in range(len(o.correct_PT[0]))}}
           if o.correct_PT else {}),
    }


def summarize(outcomes: list[Outcome], ids: list[str], *, n: int, seed: int, resamples: int, ci: float) -> dict:
    """The passk.json object (see the module docstring and the contract) from every model's outcome."""
    ks = ks_for(n)
    models = {o.spec.name: model_entry(o, ids, n, ks, resamples=resamples, ci=ci, seed=seed) for o in outcomes}
    names = list(models)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    curve = {m: [models[m]["pass_at_k"][str(k)]["mean"] for k in ks] for m in names}
    by_name = {o.spec.name: o for o in outcomes}
    return {
        "n": n, "ks": ks, "num_problems": len(ids), "seed": seed, "bootstrap": resamples, "ci": ci,
        "correct_threshold": CORRECT_THRESHOLD,
        "models": models,
        "crossings": [{"a": a, "b": b, "between": between}
                      for a, b in pairs for between in crossings(ks, curve[a], curve[b])],
        "pairs": [{"a": a, "b": b, **boundary_sets(ids, by_name[a].correct_P, by_name[b].correct_P)}
                  for a, b in pairs],
    }


def diversity_note(task) -> str:
    if callable(getattr(task, "strategy", None)):
        return ("strategies = distinct task.strategy(completion) values among a problem's correct completions "
                "(0 when none is correct); strategies_all = among all its n completions; diversity_mean and "
                "diversity_all_mean average them over all problems")
    return (f"diversity is null: the task {getattr(task, 'name', type(task).__name__)!r} defines no "
            "strategy(completion) method to canonicalise a completion's solution strategy")


def format_table(result: dict) -> str:
    """pass@k means with CIs (one row per model), then boundary, gained/lost/kept, crossings, diversity."""
    ks, models = result["ks"], result["models"]
    width = max(len("model"), *(len(m) for m in models))
    lines = [f"pass@k over {result['num_problems']} problems, n={result['n']}; "
             f"{result['ci']:.0%} bootstrap CI over problems ({result['bootstrap']} resamples)",
             "  ".join([f"{'model':<{width}}", *(f"{'k=' + str(k):<21}" for k in ks)])]
    for name, m in models.items():
        cells = [f"{c['mean']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]" for c in m["pass_at_k"].values()]
        lines.append("  ".join([f"{name:<{width}}", *(f"{c:<21}" for c in cells)]))
    lines.append("boundary |B| (problems with >= 1 correct): "
                 + ", ".join(f"{name} {m['boundary']}/{result['num_problems']}" for name, m in models.items()))
    for name, m in models.items():
        if "pass_at_k_t" in m:  # env tasks: PASS@(k,T), a row per turn budget
            lines.append(f"PASS@(k,T) {name}: " + "; ".join(
                f"T={t}: " + " ".join(f"{v:.3f}" for v in row.values()) for t, row in m["pass_at_k_t"].items())
                + f"  (k = {', '.join(map(str, ks))})")
    for p in result["pairs"]:
        lines.append(f"{p['a']} -> {p['b']}: gained {p['n_gained']}, lost {p['n_lost']}, kept {p['n_kept']}")
    for c in result["crossings"]:
        lines.append(f"curves cross: {c['a']} vs {c['b']} between k={c['between'][0]} and k={c['between'][1]}")
    if len(models) > 1 and not result["crossings"]:
        lines.append("curves cross: never (ties ignored)")
    for name, m in models.items():
        if m["diversity_mean"] is not None:
            lines.append(f"diversity {name}: {m['diversity_mean']:.2f} strategies per problem among correct, "
                         f"{m['diversity_all_mean']:.2f} among all")
        if m["unscorable"]:
            lines.append(f"unscorable {name}: {m['unscorable']} completions (first: {m['unscorable_first_error']})")
        if m["tokenizer_differs"]:
            lines.append(f"tokenizer {name}: differs from the first model's ({m['tokenizer_differs']})")
    if result["diversity_note"].startswith("diversity is null"):
        lines.append(result["diversity_note"])
    return "\n".join(lines)


# ---------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                        help="a model directory or run directory, optionally named (repeat; the first is the "
                             "reference, usually the base)")
    parser.add_argument("--task", required=True, metavar="CONFIG_OR_RUN",
                        help="YAML config or run directory: its task, sampling and eval sections are used")
    parser.add_argument("--n", type=int, default=64, help="completions per problem (default 64)")
    parser.add_argument("--num-problems", type=int, default=None, help="held-out problems (default eval.num_problems)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    parser.add_argument("--seed", type=int, default=None, help="sampling and bootstrap seed (default: config seed)")
    parser.add_argument("--out", required=True, help="directory for passk.json")


def check_args(args) -> None:
    for flag, value, ok in (("--n", args.n, args.n >= 1), ("--bootstrap", args.bootstrap, args.bootstrap >= 1),
                            ("--num-problems", args.num_problems, args.num_problems is None or args.num_problems >= 1),
                            ("--ci", args.ci, 0.0 < args.ci < 1.0)):
        if not ok:
            raise ConfigError(f"{flag} {value}: must be {'between 0 and 1' if flag == '--ci' else 'at least 1'}")


def main(args) -> int:
    """Run ``forkrl passk``: sample every model, write DIR/passk.json, print the table."""
    from ..checkpoint import atomic_write_text
    from ..sampling import sampling_params
    from .source import heldout_problems, load_task_config

    t0 = time.time()
    check_args(args)
    cfg = load_task_config(args.task)
    specs = parse_models(args.model)  # every path and name is checked before any model loads
    task, problems = heldout_problems(cfg, args.num_problems)
    if not problems:
        raise ConfigError(f"--task {args.task}: the task has no held-out problems to sample")
    seed = cfg.seed if args.seed is None else args.seed
    outcomes, ref_tokenizer = [], None
    for spec in specs:
        outcome, tokenizer = run_model(spec, cfg, task, problems, n=args.n, seed=seed, ref_tokenizer=ref_tokenizer)
        outcomes.append(outcome)
        ref_tokenizer = tokenizer if ref_tokenizer is None else ref_tokenizer
    result = summarize(outcomes, [p.id for p in problems], n=args.n, seed=seed, resamples=args.bootstrap, ci=args.ci)
    result.update(task=getattr(task, "name", type(task).__name__),
                  temperature=sampling_params(cfg, for_eval=True).temperature,
                  diversity_note=diversity_note(task), seconds=time.time() - t0)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "passk.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(format_table(result))
    print(f"wrote {out / 'passk.json'}")
    return 0
