"""The loop every trainer runs around its step: the optimizer and its schedule, resume, the guards, held-out
evaluation, the metrics line and checkpoints. A trainer makes one ``StageLoop`` and writes only its step::

    loop = StageLoop(ctx, steps=cfg.steps, optim=cfg.optim, eval_every=cfg.eval_every)
    for step in loop.steps():
        ...                                   # sample, score, accumulate the step's gradient
        metrics["grad_norm"] = loop.optimizer_step()
        loop.end_step(step, metrics)
    return loop.finish()

``optimizer_step`` also tells every sampler of the stage that the weights changed (``Sampler.sync_weights``). The loop
also sends each metrics line to the trackers the config's ``report_to`` lists (``forkrl.tracking``), and writes the
sample of a step's rows a trainer gives ``log_completions`` to ``RUN/completions.jsonl``. Files are rank 0's.
"""

from __future__ import annotations

import math

from .. import checkpoint, tracking
from ..evaluation import EvalResult, evaluate, evaluate_episodes
from ..sampling import make_sampler, sampling_params
from ..tasks.base import describe
from .metrics import COMPLETIONS, MetricsLog, append_jsonl, completion_rows, truncate_metrics
from .optim import clip_and_step, make_optimizer


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated NaN/inf gradients); the message says what to try."""


class Guards:
    """Counts consecutive skipped (NaN/inf) updates, mostly-unscorable batches, batches a filter emptied
    (``empty_batch``) and steps of collapsed reward spread (``reward_std_collapse_ratio``; ``guards`` in the config),
    and watches the sampler/trainer mismatch (``logp_mismatch``) for a jump; once one reaches its limit, ``check``
    returns the message that stops the run (with what to try)."""

    def __init__(self, cfg, stage: str):
        self.cfg, self.stage = cfg, stage
        self.nonfinite = 0  # consecutive skipped (NaN/inf) updates
        self.unscorable = 0  # consecutive steps with most rows unscorable
        self.empty = 0  # consecutive steps whose filters left no row to train
        self.collapsed = 0  # consecutive steps with the in-group reward std collapsed
        self.mismatch: list[float] = []  # the stage's logp_mismatch so far, for the jump rule

    def check(self, step: int, metrics: dict) -> str | None:
        """Update the streaks from the step's ``metrics`` (marking a skipped update there); the stop message or None."""
        norm = metrics.get("grad_norm")
        skipped = norm is not None and not math.isfinite(norm)
        metrics["update_skipped"] = skipped
        if skipped:
            metrics["grad_norm"] = None  # JSON has no NaN; update_skipped says why it is missing
        self.nonfinite = self.nonfinite + 1 if skipped else 0
        self.unscorable = self.unscorable + 1 if metrics.get("unscorable_frac", 0.0) > 0.5 else 0
        self.empty = self.empty + 1 if metrics.get("empty_batch") else 0
        ratio = metrics.get("reward_std_collapse_ratio")
        self.collapsed = self.collapsed + 1 if ratio is not None and ratio < self.cfg.std_collapse_ratio else 0
        stage = self.stage
        jump = self.mismatch_jump(step, metrics.get("logp_mismatch"))
        if jump:
            return jump
        if self.nonfinite >= self.cfg.max_consecutive_nonfinite:
            return (f"{stage} step {step}: the loss or gradient was NaN/inf for {self.nonfinite} consecutive "
                    f"steps, so those updates were skipped and the run stopped (the last checkpoint is intact). Try: a "
                    f"lower {stage}.optim.lr, {stage}.optim.grad_clip on, float32 instead of float16 (model.dtype), "
                    f"and rewards that stay finite and bounded; raise guards.max_consecutive_nonfinite to tolerate "
                    f"more.")
        if self.unscorable >= self.cfg.max_unscorable_steps:
            return (f"{stage} step {step}: more than half of the rows were unscorable for {self.unscorable} "
                    f"consecutive steps (first error this step: {metrics.get('unscorable_first_error')}). Fix the "
                    f"reward or verifier, or raise guards.max_unscorable_steps.")
        if self.empty >= self.cfg.max_empty_steps:
            return (f"{stage} step {step}: the filters ({stage}.filter, {stage}.mask_truncated) left no row to train for "
                    f"{self.empty} consecutive steps, so no update was made: every group's rewards were equal (all "
                    f"solved or all failed). Try an easier or harder task split, a larger {stage}.group_size, "
                    f"{stage}.filter: none, or raise guards.max_empty_steps.")
        if self.cfg.max_std_collapse_steps and self.collapsed >= self.cfg.max_std_collapse_steps:
            return (f"{stage} step {step}: the mean in-group reward std stayed below {self.cfg.std_collapse_ratio} × "
                    f"its mean over the stage's first 10 steps for {self.collapsed} consecutive steps (RAGEN-2's "
                    f"collapse stop): the groups no longer carry a learning signal. The last checkpoint is intact; "
                    f"set guards.max_std_collapse_steps: 0 to train on.")
        return None

    def mismatch_jump(self, step: int, mismatch: float | None) -> str | None:
        """The stop message when this step's mismatch is above ``guards.mismatch_floor`` and ``guards.mismatch_jump``
        × the median of the stage's earlier steps (at least 3), else None. A sampler that holds its own weights and
        misses a push samples from an older policy: its log-probs part from the trainer's at once, by far more than
        the steady gap of kernels and precision."""
        if mismatch is None or not self.cfg.mismatch_jump:
            return None
        history, self.mismatch = self.mismatch, self.mismatch + [mismatch]
        if len(history) < 3 or mismatch <= self.cfg.mismatch_floor:
            return None
        median = sorted(history)[(len(history) - 1) // 2]
        if mismatch <= self.cfg.mismatch_jump * median:
            return None
        return (f"{self.stage} step {step}: the sampler/trainer log-prob mismatch jumped to {mismatch:.4g} nats a token, "
                f"{mismatch / max(median, 1e-30):.3g}× the median of the stage's earlier steps ({median:.3g}): the "
                f"sampler is most likely drawing from stale weights (a weight push that did not happen or did not "
                f"reach the engine), so the update would train on another policy's samples. The run stopped; the last "
                f"checkpoint is intact. Check the sampler backend's weight sync (sampling.backend), or raise "
                f"guards.mismatch_floor if the gap is expected (guards.mismatch_jump: 0 turns the guard off).")


def maybe_checkpoint(ctx, step: int, total: int, opt, sched) -> None:
    every = ctx.cfg.checkpoint.every
    if (every and step % every == 0) or step == total:
        if ctx.sharded is not None:  # the optimizer's shards gathered (a collective: every rank); rank 0 writes them
            opt = ctx.sharded.optimizer(opt).gather()
        if ctx.dist.is_main:  # ranks hold identical weights and optimizer state: one copy is the checkpoint
            checkpoint.save(ctx.stage_dir / "checkpoints", step, ctx.model, opt, sched, {},
                            keep_last=ctx.cfg.checkpoint.keep_last)
        ctx.dist.barrier()


def want_eval(every: int, step: int, total: int) -> bool:
    return bool(every and step % every == 0) and step != total


class StageLoop:
    """One stage's loop state: the optimizer over the trainable parameters (its schedule spans
    ``schedule_steps``, default ``steps``), the step to start from (restored with the optimizer, scheduler and RNG
    from ``ctx.resume_from``), the guards, the metrics log, the held-out evaluation's sampler and time. ``samplers``:
    the stage's other samplers, told after each optimizer step that the weights changed."""

    def __init__(self, ctx, *, steps: int, optim, eval_every: int, schedule_steps: int | None = None,
                 samplers: tuple = ()):
        self.ctx, self.total, self.eval_every, self.grad_clip = ctx, steps, eval_every, optim.grad_clip
        self.params = [p for p in ctx.train_model.parameters() if p.requires_grad]
        self.opt, self.sched = make_optimizer(self.params, optim, schedule_steps or steps)
        opt = self.opt if ctx.sharded is None else ctx.sharded.optimizer(self.opt)
        state = checkpoint.load_trainer_state(ctx.resume_from, opt, self.sched) if ctx.resume_from else {"step": 0}
        self.start = state["step"]
        main, stage = ctx.dist.is_main, ctx.stage_dir.name
        if main:  # a missing tracker package is an error before this stage writes anything
            tracking.require(ctx.cfg.report_to)
            # no duplicate steps: drop this stage's lines past the checkpoint
            truncate_metrics(ctx.run_dir / "metrics.jsonl", stage, self.start)
            truncate_metrics(ctx.run_dir / COMPLETIONS, stage, self.start)
        self.trackers = tracking.open_trackers(ctx.cfg.report_to, run_dir=ctx.run_dir, stage=stage, enabled=main,
                                               config=ctx.cfg.model_dump(mode="json"))
        self.eval_sampler = make_sampler(ctx.cfg.sampling, ctx.model, ctx.tokenizer, ctx.device)
        self.samplers = (self.eval_sampler, *samplers)
        self.log = MetricsLog(ctx.run_dir / "metrics.jsonl", stage=ctx.stage_dir.name, total=steps, start=self.start,
                              log_every=ctx.cfg.log_every, enabled=ctx.dist.is_main)
        self.guards = Guards(ctx.cfg.guards, ctx.stage_dir.name)
        self.eval_s = 0.0  # seconds in held-out evaluation this stage (interim and final)

    def steps(self) -> range:
        return range(self.start + 1, self.total + 1)

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def optimizer_step(self) -> float:
        """Sum the ranks' gradients, clip, step (skipped on a NaN/inf gradient), tell the samplers; returns the
        gradient norm before clipping. Under FSDP2 the sharded step's weights are gathered into the full copy the
        samplers read first."""
        sharded = self.ctx.sharded
        if sharded is None:
            self.ctx.dist.sum_gradients(self.params)
        else:
            sharded.finish_gradients(self.params)
        norm = clip_and_step(self.ctx.train_model, self.opt, self.sched, self.grad_clip)
        if sharded is not None:
            sharded.pull()
        for sampler in self.samplers:
            sampler.sync_weights()
        return norm

    def heldout_eval(self) -> EvalResult:
        ctx = self.ctx
        if getattr(ctx.task, "multi_turn", False):  # held-out success over episodes
            from ..envs.episodes import make_codec

            result = evaluate_episodes(self.eval_sampler, ctx.task, make_codec(ctx.task, ctx.tokenizer),
                                       sampling_params(ctx.cfg, for_eval=True), ctx.cfg.eval.samples_per_problem,
                                       num_seeds=ctx.cfg.eval.num_problems, seed=ctx.cfg.seed)
            self.eval_s += result.seconds
            return result
        problems = list(ctx.task.problems("heldout"))[: ctx.cfg.eval.num_problems]
        ids = [ctx.encode_prompt(p.prompt, where=describe(p)) for p in problems]
        result = evaluate(self.eval_sampler, ctx.task, problems, ids, sampling_params(ctx.cfg, for_eval=True),
                          ctx.cfg.eval.samples_per_problem, seed=ctx.cfg.seed)
        self.eval_s += result.seconds
        return result

    def end_step(self, step: int, metrics: dict) -> None:
        """The guards, held-out pass@1 when due, the metrics line, and a checkpoint when due; raises
        ``TrainingError`` when a guard stops the run."""
        stop = self.guards.check(step, metrics)
        if want_eval(self.eval_every, step, self.total) and self.ctx.dist.is_main and not stop:
            metrics["pass_at_1"] = self.heldout_eval().pass_at_1
        self.log.write(step, metrics)
        self.trackers.log(step, metrics)
        maybe_checkpoint(self.ctx, step, self.total, self.opt, self.sched)
        if stop:
            self.log.close()
            self.trackers.close()
            raise TrainingError(stop)

    def log_completions(self, step: int, problems, texts: list[str], scored, adv_N, episodes=None) -> None:
        """Append the first ``log_completions`` rows of the step (``metrics.completion_rows``) to
        ``RUN/completions.jsonl``, on rank 0 from its own rows (its shard of the step's prompts)."""
        n = self.ctx.cfg.log_completions
        if n and self.ctx.dist.is_main:
            rows = completion_rows(self.ctx.stage_dir.name, step, problems, texts, scored, adv_N, n,
                                   episodes=episodes, decode=self.ctx.tokenizer.decode)
            append_jsonl(self.ctx.run_dir / COMPLETIONS, rows, what="the completions sample")

    def finish(self) -> dict:
        """Held-out evaluation on rank 0 (the others wait at the next barrier). ``eval_s`` is the stage's time in
        held-out evaluation, so wall_s − eval_s is the training cost."""
        self.log.close()
        trainable = sum(p.numel() for p in self.params)
        if not self.ctx.dist.is_main:
            return {"steps": self.total, "trainable_params": trainable}
        final = self.heldout_eval()
        self.trackers.log(self.total, {"final_pass_at_1": final.pass_at_1})
        self.trackers.close()
        return {"pass_at_1": final.pass_at_1, "strategies": final.per_strategy, "steps": self.total,
                "trainable_params": trainable, "eval_s": round(self.eval_s, 2)}
