"""``forkrl train | check | validate | rewards check | eval | generate | demo | diff | passk | report``: the command
line.

User mistakes exit with status 2 and one clear message."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .models import ModelLoadError
    from .rewards import RewardError
    from .tasks.base import TaskError

    return (ConfigError, TaskError, ModelLoadError, CheckpointError, RewardError)


def _training_errors() -> tuple[type[BaseException], ...]:
    from .trainers.loop import TrainingError

    return (TrainingError,)


def cmd_train(args) -> int:
    from .config import load_config
    from .pipeline import run

    cfg = load_config(args.config, args.set)
    summary = run(cfg, Path(args.out), resume=args.resume, allow_changed_rewards=args.allow_changed_rewards)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for name, s in summary["stages"].items():
        print(f"{name}: held-out pass@1 {s['pass_at_1']:.3f}  wall {s['wall_s']:.1f}s")
    print(f"final model: {summary['final_model']}")
    return 0


def cmd_check(args) -> int:
    from .check import check_config
    from .config import load_config

    cfg = load_config(args.config, args.set)
    inject = args.inject or cfg.debug.inject
    rows, text = check_config(cfg, world=args.world_size, inject=inject)
    print(text)
    return 0 if all(r.passed for r in rows) else 1


def cmd_validate(args) -> int:
    """Load and check a config as a run would before writing anything (keys and values, task data, reward files,
    signatures and endpoints, the trackers' packages, the model source), and run nothing."""
    from . import models, tracking
    from .config import load_config
    from .pipeline import MAX_PAIR_FIELD_BYTES, load_rewards
    from .tasks import build_task
    from .trainers.dpo import read_pairs

    cfg = load_config(args.config, args.set)
    task = build_task(cfg.task)
    record = load_rewards(cfg, task)
    for stage in cfg.stage_plan:  # offline DPO's preference file (its fit to the context needs the model: train)
        if stage.kind == "dpo" and stage.cfg.dpo.data == "offline":
            read_pairs(stage.cfg.dpo.pairs_path, MAX_PAIR_FIELD_BYTES)
    tracking.require(cfg.report_to)
    if cfg.model.path is not None:
        models.check_source(cfg.model.path)
    sizes = ", ".join(f"{len(task.problems(s))} {s}" for s in ("train", "heldout"))
    print(f"{args.config}: valid. stages {' -> '.join(s.name for s in cfg.stage_plan)}; task {getattr(task, 'name', '?')} ({sizes}); "
          f"model {cfg.model.path or 'tiny (built locally)'}")
    for r in record:
        where = f" ({r['file']}, sha256 {r['sha256'][:12]})" if r["file"] else ""
        print(f"  {r['stage']}.rewards: {r['label']}{where}")
    return 0


def cmd_rewards_check(args) -> int:
    from .config import ConfigError, load_config
    from .rewards.debug import check_rewards, table

    if args.problems < 1 or args.samples < 1:
        raise ConfigError("--problems and --samples must be at least 1")
    cfg = load_config(args.config, args.set)
    rows = check_rewards(cfg, problems=args.problems, samples=args.samples, model_path=args.model)
    print(table(rows))
    return 0 if all(r.passed for r in rows) else 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("forkrl")
    except PackageNotFoundError:
        own = "unknown (not installed)"
    import platform

    extras = []
    for name in ("torch", "transformers", "peft"):
        try:
            extras.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"forkrl {own} (python {platform.python_version()}; {', '.join(extras)})"


def cmd_demo(args) -> int:
    if args.which == "agent":
        from .demo_agent import run_agent_demo

        run_agent_demo(Path(args.out), fast=args.fast)
        return 0
    from .demo import run_demo

    run_demo(Path(args.out), fast=args.fast)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forkrl", description="RL post-training for reasoning language models")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = dict(action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, validated like the file (repeat): --set grpo.steps=10")
    p = sub.add_parser("train", help="run the stages of a YAML config (e.g. stages: [sft, grpo])")
    p.add_argument("config", help="path to the YAML config")
    p.add_argument("--out", required=True, help="run directory (created; must not hold another run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--allow-changed-rewards", action="store_true",
                   help="resume although a reward's file changed since the run started")
    p.add_argument("--set", **overrides)
    p.set_defaults(fn=cmd_train)
    c = sub.add_parser("check", help="prove this config's gradient does not depend on micro-batches or ranks")
    c.add_argument("config", help="path to the YAML config")
    c.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "2")),
                   help="data-parallel processes to check (default: $WORLD_SIZE, else 2)")
    c.add_argument("--inject", choices=["first_microbatch_only", "mean_of_means"],
                   help="reproduce a historical accumulation bug: the check must then FAIL")
    c.add_argument("--set", **overrides)
    c.set_defaults(fn=cmd_check)
    v = sub.add_parser("validate", help="load and check a config (keys, task data, rewards, model source); run nothing")
    v.add_argument("config", help="path to the YAML config")
    v.add_argument("--set", **overrides)
    v.set_defaults(fn=cmd_validate)
    r = sub.add_parser("rewards", help="debug the config's rewards").add_subparsers(dest="rewards_command",
                                                                                    required=True)
    rc = r.add_parser("check", help="run each reward on sampled completions and gold answers; exit 1 on a failure")
    rc.add_argument("config", help="path to the YAML config")
    rc.add_argument("--problems", type=int, default=4, help="training problems to check on (default 4)")
    rc.add_argument("--samples", type=int, default=2, help="sampled completions per problem (default 2)")
    rc.add_argument("--model", help="sample from this model directory instead of the config's starting model")
    rc.add_argument("--set", **overrides)
    rc.set_defaults(fn=cmd_rewards_check)
    from .inference import add_eval_arguments, add_generate_arguments, eval_main, generate_main

    e = sub.add_parser("eval", help="pass@1 and pass@k of a model or run on a task, with the config's rewards")
    add_eval_arguments(e)
    e.set_defaults(fn=eval_main)
    g = sub.add_parser("generate", help="sample from a model on prompts or on a task's problems")
    add_generate_arguments(g)
    g.set_defaults(fn=generate_main)
    d = sub.add_parser("demo", help="tiny base → SFT → GRPO on a procedural task, on a laptop CPU in minutes")
    d.add_argument("which", nargs="?", choices=("reasoning", "agent"), default="reasoning",
                   help="reasoning (default): arithmetic, SFT -> GRPO and fork, diagnosed; agent: FrozenLake over "
                        "many turns, SFT -> trajectory GRPO")
    d.add_argument("--out", required=True, help="directory for the demo's runs, summary.json and table")
    d.add_argument("--fast", action="store_true", help="a much shorter demo (smoke test; numbers not meaningful)")
    d.set_defaults(fn=cmd_demo)
    _diagnostic_parsers(sub)
    args = parser.parse_args(argv)
    torch_threads()
    quiet_libraries()
    from .distributed import teardown

    try:
        code = args.fn(args)
        teardown()
        return code
    except _user_errors() as e:
        print(f"forkrl: error: {e}", file=sys.stderr)
        code = 2
    except _training_errors() as e:
        print(f"forkrl: training stopped: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("forkrl: interrupted; resume with --resume", file=sys.stderr)
        code = 130
    teardown(wait=False)
    return code


def _diagnostic_parsers(sub) -> None:
    """``diff``, ``passk`` and ``report``: each module declares its own arguments and runs its command."""
    from .diagnostics import passk, tokendiff
    from . import report

    for name, module, help_text in (
        ("diff", tokendiff, "what training changed, token by token: agreement, fork tokens, oracle substitution"),
        ("passk", passk, "pass@k curves, capability boundaries and strategy diversity of one or more models"),
        ("report", report, "one self-contained offline HTML report of a run directory"),
    ):
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(fn=module.main)


def quiet_libraries() -> None:
    """transformers' per-save progress bars and info logs drown forkrl's own progress lines."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def torch_threads() -> None:
    """Use every core for intra-op parallelism unless the user set OMP_NUM_THREADS."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


if __name__ == "__main__":
    sys.exit(main())
