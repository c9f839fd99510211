"""``forkrl eval`` and ``forkrl generate``: a model (or a run directory's final model) on a task, outside training.

``eval`` samples ``n`` completions of each problem of a split at the config's evaluation settings and scores them
with the config's rewards exactly as training does (``rewards.score_rollouts``: the same parameters, time limits and
isolation; an unscorable row is counted, never a silent 0). A completion *passes* when it is scorable and its
weighted reward is at least ``--threshold`` (default 1.0: with the default ``[correct]`` rewards, the task's
verifier says it is right). From the per-problem pass counts it reports unbiased pass@k for k = 1, 2, 4, … n with
bootstrap intervals (``diagnostics.passk``), each reward's and component's mean, and writes ``eval.json``.

``generate`` samples from a model on prompts given on the command line, in a file (one per line, or JSONL with a
``prompt`` field), or on a task's problems (formatted as training formats them), and prints or writes JSONL.
Every row's seed depends only on (seed, prompt index, sample index), so a rerun prints the same completions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from .config import ConfigError, REWARD_SECTIONS, RunCfg


def sample_chunks(sampling, model, tokenizer, prompt_ids: list[list[int]], n: int, params, *, key: str):
    """(index of the chunk's prompts, its rollouts) for every chunk of about ``sampling.batch_size`` rows
    (``sampling``: a config's sampling section)."""
    from .sampling import make_sampler, row_seeds

    sampler = make_sampler(sampling, model, tokenizer)
    per_call = max(1, sampling.batch_size // n)
    for start in range(0, len(prompt_ids), per_call):
        index = list(range(start, min(len(prompt_ids), start + per_call)))
        yield index, sampler.sample([prompt_ids[i] for i in index], n, params, seeds=row_seeds(key, index, n))


def stage_rewards(cfg: RunCfg, which: str | None):
    """(its name, its section: ``.rewards``, ``.reward_timeout_s``) of the stage ``which`` names (a stage's name, e.g. ``refined``, or a kind, ``grpo``
    or ``fork``: that kind's first stage, else its section), by default the run's first stage that has rewards."""
    rl = [s for s in cfg.stage_plan if s.kind in REWARD_SECTIONS]
    if which is None:
        which = rl[0].name if rl else "grpo"
    stage = next((s for s in rl if s.name == which), None) or next((s for s in rl if s.kind == which), None)
    if stage is not None:
        return stage.name, getattr(stage.cfg, stage.kind)
    if which in REWARD_SECTIONS:
        return which, getattr(cfg, which)
    raise ConfigError(f"--rewards {which!r}: the config has no such stage with rewards; its stages with rewards are "
                      f"{', '.join(s.name for s in rl) or 'none'} (or name a kind: {', '.join(REWARD_SECTIONS)})")


# ---------------------------------------------------------------- forkrl eval
def evaluate_model(model_dir: Path, cfg: RunCfg, *, n: int, num_problems: int | None, split: str, threshold: float,
                   seed: int, rewards_of: str | None = None, bootstrap: int = 1000, ci: float = 0.95,
                   self_critique: bool = False) -> dict:
    from .diagnostics.passk import bootstrap_ci, ks_for, pass_at_k
    from .diagnostics.source import encode_prompts, load_eval_model
    from .rewards import RewardError, load, score_rollouts
    from .sampling import completion_texts, row_seeds, sampling_params
    from .tasks import build_task

    t0 = time.time()
    task = build_task(cfg.task)
    if self_critique and getattr(task, "multi_turn", False):
        raise ConfigError("--self-critique: the loop checks single completions; an env task's episodes have none")
    problems = list(task.problems(split))[: num_problems or cfg.eval.num_problems]
    if not problems:
        raise ConfigError(f"the task has no {split} problems to evaluate")
    section, part = stage_rewards(cfg, rewards_of)
    try:
        rewards = load(part.rewards, task, where=f"{section}.rewards", timeout_s=part.reward_timeout_s)
    except RewardError as e:
        raise ConfigError(str(e)) from None
    model, tokenizer, device = load_eval_model(model_dir, cfg)
    prompt_ids = encode_prompts(cfg, tokenizer, task, model, problems)
    params = sampling_params(cfg, for_eval=True)
    passed_P, unscorable_P = np.zeros(len(problems), dtype=int), np.zeros(len(problems), dtype=int)
    sums: dict[str, list[float]] = {}
    first_error, truncated, rows = None, 0, 0
    for index, rollouts in sample_chunks(cfg.sampling, model, tokenizer, prompt_ids, n, params, key=f"eval:{seed}"):
        texts = completion_texts(tokenizer, rollouts)
        scored, failures = score_rollouts(rollouts, texts, [problems[i] for i in index], task, rewards,
                                          seeds=row_seeds(f"eval-reward:{seed}", index, n),
                                          max_new_tokens=params.max_new_tokens)
        first_error = first_error or failures.first_message
        for r, j in enumerate(rollouts.problem_N.tolist()):
            p = index[j]
            if not scored.valid_N[r]:
                unscorable_P[p] += 1
            elif float(scored.reward_N[r]) >= threshold:
                passed_P[p] += 1
        for name, values in {"reward": scored.reward_N[scored.valid_N], **{
                f"reward/{k}": v[~v.isnan()] for k, v in scored.components.items()}}.items():
            sums.setdefault(name, []).extend(values.tolist())
        truncated += int(rollouts.truncated_N.sum())
        rows += rollouts.num_rows
    ks = ks_for(n)
    values_PK = np.stack([pass_at_k(n, passed_P, k) for k in ks], axis=1)
    mean_K, lo_K, hi_K = bootstrap_ci(values_PK, resamples=bootstrap, ci=ci, seed=seed)
    critique = None
    if self_critique:
        critique = self_critique_figures(model, tokenizer, cfg, task, problems, prompt_ids, rewards, params,
                                         threshold=threshold, seed=seed, plain_P=values_PK[:, 0], bootstrap=bootstrap,
                                         ci=ci)
    return {
        "model": str(model_dir), "task": getattr(task, "name", type(task).__name__), "split": split,
        "problems": len(problems), "n": n, "threshold": threshold, "rewards": f"{section}.rewards",
        "reward_labels": [r.label for r in rewards], "temperature": params.temperature,
        "pass_at_k": {str(k): {"mean": float(m), "lo": float(lo), "hi": float(hi)}
                      for k, m, lo, hi in zip(ks, mean_K, lo_K, hi_K)},
        "means": {k: (float(np.mean(v)) if v else None) for k, v in sums.items()},
        "unscorable": int(unscorable_P.sum()), "unscorable_first_error": first_error,
        "truncation_rate": truncated / max(rows, 1),
        "per_problem": [{"id": p.id, "passed": int(c), "unscorable": int(u)}
                        for p, c, u in zip(problems, passed_P, unscorable_P)],
        **({"self_critique": critique} if critique is not None else {}),
        "seconds": round(time.time() - t0, 2),
    }


def self_critique_figures(model, tokenizer, cfg: RunCfg, task, problems, prompt_ids, rewards, params, *,
                          threshold: float, seed: int, plain_P, bootstrap: int, ci: float) -> dict:
    """The self-critique loop's pass@1 (``critique.self_critique``) beside plain sampling's, on the same problems,
    paired: both intervals from the same resampled problem sets, and their difference's."""
    from .critique import self_critique
    from .diagnostics.passk import bootstrap_ci
    from .rewards import score_rollouts
    from .rewards.debug import rollouts_of
    from .sampling import make_sampler, row_seeds

    sc = cfg.eval.self_critique
    sampler = make_sampler(cfg.sampling, model, tokenizer)
    answers, verdicts = self_critique(model, tokenizer, sampler, params, prompt_ids, sc, key=f"critique:{seed}")
    rows = rollouts_of(prompt_ids, answers, tokenizer)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    scored, _ = score_rollouts(rows, texts, problems, task, rewards, seeds=row_seeds(f"critique-reward:{seed}",
                                                                                       list(range(len(problems))), 1),
                               max_new_tokens=params.max_new_tokens)
    passed_P = (scored.valid_N & (scored.reward_N >= threshold)).numpy().astype(float)
    both = np.stack([passed_P, plain_P, passed_P - plain_P], axis=1)
    mean, lo, hi = bootstrap_ci(both, resamples=bootstrap, ci=ci, seed=seed)
    accepted = np.array([v.accepted for v in verdicts])
    interval = lambda i: {"mean": float(mean[i]), "lo": float(lo[i]), "hi": float(hi[i])}  # noqa: E731
    return {"pass_at_1": interval(0), "plain_pass_at_1": interval(1), "difference": interval(2),
            "accepted_frac": float(accepted.mean()), "given_up_frac": float(1 - accepted.mean()),
            "accepted_pass_at_1": float(passed_P[accepted].mean()) if accepted.any() else None,
            "candidates_mean": float(np.mean([v.candidates for v in verdicts])),
            "checks_mean": float(np.mean([v.checks for v in verdicts])),
            "settings": sc.model_dump()}


def eval_table(result: dict) -> str:
    lines = [f"{result['model']} on {result['task']} ({result['split']}, {result['problems']} problems x "
             f"{result['n']} samples, T={result['temperature']:g}; pass = {result['rewards']} >= "
             f"{result['threshold']:g})", f"{'k':>6}  {'pass@k':>7}  interval"]
    for k, v in result["pass_at_k"].items():
        lines.append(f"{k:>6}  {v['mean']:7.3f}  [{v['lo']:.3f}, {v['hi']:.3f}]")
    lines += [f"{name:<32} {('-' if v is None else f'{v:.4f}'):>8}" for name, v in result["means"].items()]
    if "self_critique" in result:
        s = result["self_critique"]
        iv = lambda v: f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"  # noqa: E731
        lines += [f"self-critique pass@1 {iv(s['pass_at_1'])} vs plain {iv(s['plain_pass_at_1'])} (difference "
                  f"{iv(s['difference'])}); accepted {s['accepted_frac']:.1%}, given up {s['given_up_frac']:.1%}, "
                  f"{s['candidates_mean']:.1f} candidates and {s['checks_mean']:.1f} checks a problem"]
    if result["unscorable"]:
        lines.append(f"unscorable completions: {result['unscorable']} (first: {result['unscorable_first_error']})")
    return "\n".join(lines)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="a model directory, or a run directory (its final model)")
    p.add_argument("--task", required=True, metavar="CONFIG_OR_RUN",
                   help="YAML config or run directory: its task, sampling, eval and rewards sections are used")
    p.add_argument("--n", type=int, default=8, help="completions per problem (default 8)")
    p.add_argument("--num-problems", type=int, default=None, help="problems (default eval.num_problems)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout")
    p.add_argument("--threshold", type=float, default=1.0,
                   help="a completion passes when its weighted reward is at least this (default 1.0)")
    p.add_argument("--rewards", default=None, metavar="STAGE",
                   help="whose rewards score it: a stage's name, or grpo / fork (default: the config's first stage "
                        "that has rewards, else grpo)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's)")
    p.add_argument("--self-critique", action="store_true",
                   help="also run the self-critique loop (eval.self_critique) and report its pass@1 beside plain "
                        "sampling's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="directory for eval.json")


def eval_main(args) -> int:
    from .checkpoint import atomic_write_text
    from .diagnostics.source import resolve_model_dir

    if args.n < 1 or (args.num_problems is not None and args.num_problems < 1):
        raise ConfigError("--n and --num-problems must be at least 1")
    cfg = task_config(args.task, args.set)
    model_dir = resolve_model_dir(args.model)
    result = evaluate_model(model_dir, cfg, n=args.n, num_problems=args.num_problems, split=args.split,
                            threshold=args.threshold, seed=cfg.seed if args.seed is None else args.seed,
                            rewards_of=args.rewards, self_critique=args.self_critique)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
    print(eval_table(result))
    print(f"wrote {out / 'eval.json'}")
    return 0


def task_config(arg: str, overrides: list[str]) -> RunCfg:
    """A config file or a run directory's config.yaml, with ``--set`` overrides."""
    from .config import load_config

    path = Path(arg).expanduser()
    if path.is_dir():
        if not (path / "config.yaml").exists():
            raise ConfigError(f"--task {arg}: a directory without config.yaml; give a YAML config or a run directory")
        path = path / "config.yaml"
    return load_config(path, overrides)


# ---------------------------------------------------------------- forkrl generate
def read_prompts(path: Path) -> list[str]:
    """One prompt per line of a text file, or the ``prompt`` field of each line of a ``.jsonl`` file."""
    from .userfiles import lines

    out = []
    for no, line in lines(path, "a prompts file", ConfigError, max_line_bytes=1 << 20):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{no}: not valid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"{path}:{no}: expected an object with a string 'prompt' field")
            out.append(row["prompt"])
        else:
            out.append(line.rstrip("\n"))
    if not out:
        raise ConfigError(f"{path} holds no prompts")
    return out


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="a model directory, or a run directory (its final model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="a file of prompts: one per line, or JSONL with a 'prompt' field")
    p.add_argument("--task", metavar="CONFIG_OR_RUN",
                   help="a config or run directory: its sampling settings and prompt format; without --prompt or "
                        "--prompts, its problems are the prompts")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout")
    p.add_argument("--num-problems", type=int, default=4, help="task problems to sample (default 4)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=None, help="default: the config's eval temperature, else 1")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--self-critique", action="store_true",
                   help="one answer a prompt through the self-critique loop (eval.self_critique; --n is ignored)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="write JSONL here instead of printing")


def generate_main(args) -> int:
    from .diagnostics.source import load_eval_model, resolve_model_dir
    from .pipeline import encode_prompt
    from .config import SamplingCfg
    from .sampling import SamplingParams, completion_texts, sampling_params
    from .tasks import build_task

    if args.task is None and args.set:
        raise ConfigError("--set needs --task (the config it overrides)")
    if not (args.prompt or args.prompts or args.task):
        raise ConfigError("give --prompt TEXT, --prompts FILE or --task CONFIG")
    if args.n < 1:
        raise ConfigError("--n must be at least 1")
    cfg = task_config(args.task, args.set) if args.task else None
    model, tokenizer, _ = load_eval_model(resolve_model_dir(args.model), cfg)
    task = build_task(cfg.task) if cfg is not None else None
    prompts = list(args.prompt) + (read_prompts(Path(args.prompts).expanduser()) if args.prompts else [])
    problems = None
    if not prompts:
        problems = list(task.problems(args.split))[: args.num_problems]
        prompts = [p.prompt for p in problems]
    if task is not None:  # formatted as training formats them, and checked against the context
        ids = [encode_prompt(cfg, tokenizer, task, model, text, where=f"prompt {i}") for i, text in enumerate(prompts)]
    else:
        ids = [tokenizer(text).input_ids for text in prompts]
    sampling = cfg.sampling if cfg is not None else SamplingCfg()
    params = sampling_params(cfg, for_eval=True) if cfg is not None else SamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        max_new_tokens=sampling.max_new_tokens)
    params = dataclasses.replace(params, **{k: v for k, v in (("temperature", args.temperature),
                                                              ("max_new_tokens", args.max_new_tokens))
                                            if v is not None})
    rows = []
    if args.self_critique:  # one answer a prompt: the loop's accepted candidate, or its last when it gave up
        from .config import SelfCritiqueCfg
        from .critique import self_critique
        from .sampling import make_sampler

        sc = cfg.eval.self_critique if cfg is not None else SelfCritiqueCfg()
        answers, verdicts = self_critique(model, tokenizer, make_sampler(sampling, model, tokenizer), params, ids, sc,
                                          key=f"critique:{args.seed}")
        rows = [{"index": i, "prompt": prompts[i], "completion": tokenizer.decode(a, skip_special_tokens=True),
                 "accepted": v.accepted, "candidates": v.candidates, "checks": v.checks,
                 **({"id": problems[i].id, "answer": problems[i].answer} if problems else {})}
                for i, (a, v) in enumerate(zip(answers, verdicts))]
    for index, rollouts in [] if args.self_critique else sample_chunks(sampling, model, tokenizer, ids, args.n, params,
                                                                         key=f"generate:{args.seed}"):
        for text, j, cut in zip(completion_texts(tokenizer, rollouts), rollouts.problem_N.tolist(),
                                rollouts.truncated_N.tolist()):
            i = index[j]
            rows.append({"index": i, "prompt": prompts[i], "completion": text, "truncated": bool(cut),
                         **({"id": problems[i].id, "answer": problems[i].answer} if problems else {})})
    if args.out:
        from .checkpoint import atomic_write_text

        atomic_write_text(Path(args.out).expanduser(), "".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} completions to {args.out}", file=sys.stderr)
    else:
        for r in rows:
            print(json.dumps(r))
    return 0
