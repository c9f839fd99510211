"""``forkrl rewards check CONFIG``: run each configured reward on a few sampled completions and on the gold answers,
before training on it, and print what it gave: values, components, failures and time per call.

Two sets of completions per problem of the first ``--problems`` training problems:

* *sampled*: ``--samples`` completions of the config's starting model (``model.path``, or the tiny model it builds),
  at the config's sampling settings, scored exactly as a training step scores them (``score_rollouts``);
* *gold*: ``task.gold_completion(problem)`` when the task can write a correct completion, else the task's
  demonstration of the problem (SFT data), else the gold answer's text itself.

Values are the reward's own, before its weight. A reward that leaves any row unscorable (it raised, returned None, NaN, inf or a non-number, or ran past its time
limit) is a failure: the table shows its first message and the command exits 1, so a reward that would silently
fail rows during training is found first. A gold answer that scores below a sampled completion is not a failure,
but is worth a look, and is flagged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import ConfigError, RunCfg


@dataclass
class RewardCheck:
    section: str
    label: str
    mode: str
    isolation: str
    sampled: list[float | None]
    gold: list[float | None]
    components: dict[str, float]
    failures: int
    first_failure: str | None
    seconds_per_call: float

    @property
    def passed(self) -> bool:
        return self.failures == 0


def gold_completions(task, problems) -> list[str]:
    """Per problem: ``task.gold_completion(problem)``, else its demonstration, else its answer's text."""
    write = getattr(task, "gold_completion", None)
    if callable(write):
        return [write(p) for p in problems]
    try:
        demos = {p.id: c for p, c in task.demonstrations("train")}
    except Exception:  # noqa: BLE001 - a task without demonstrations
        demos = {}
    return [demos.get(p.id) or p.answer for p in problems]


def rollouts_of(prompt_ids: list[list[int]], completion_ids: list[list[int]], tokenizer):
    """Rollouts for given completions (one per prompt), right-padded: what scoring needs of a row."""
    from ..types import Role, Rollouts

    N = len(prompt_ids)
    L = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((N, L), pad, dtype=torch.long)
    role = torch.full((N, L), int(Role.PAD), dtype=torch.int8)
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        role[r, : len(p)] = int(Role.PROMPT)
        role[r, len(p): len(p) + len(c)] = int(Role.COMPLETION)
    return Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=torch.zeros(N, L), group_N=torch.arange(N),
                    problem_N=torch.arange(N), truncated_N=torch.zeros(N, dtype=torch.bool))


def check_rewards(cfg: RunCfg, *, problems: int = 4, samples: int = 2, model_path=None) -> list[RewardCheck]:
    from .. import models
    from ..pipeline import base_model_path, encode_prompt, load_rewards
    from ..sampling import completion_texts, make_sampler, row_seeds, sampling_params
    from ..tasks import build_task
    from ..tasks.base import describe
    from . import load, score_rollouts

    task = build_task(cfg.task)
    load_rewards(cfg, task)  # every stage's rewards load and their signatures hold, before any model is built
    chosen = list(task.problems("train"))[:problems]
    if not chosen:
        raise ConfigError("the task has no training problems to check the rewards on")
    path = model_path or base_model_path(cfg, task)
    models.check_source(str(path))
    tokenizer = models.load_tokenizer(str(path), trust_remote_code=cfg.model.trust_remote_code)
    model = models.load_model(str(path), trust_remote_code=cfg.model.trust_remote_code).eval()
    prompt_ids = [encode_prompt(cfg, tokenizer, task, model, p.prompt, where=describe(p)) for p in chosen]
    seeds = row_seeds(f"rewards-check:{cfg.seed}", list(range(len(chosen))), samples)
    sampled = make_sampler(cfg.sampling, model, tokenizer).sample(prompt_ids, samples, sampling_params(cfg),
                                                                  seeds=seeds)
    sampled_texts = completion_texts(tokenizer, sampled)
    gold_texts = gold_completions(task, chosen)
    gold = rollouts_of(prompt_ids, [tokenizer(t, add_special_tokens=False).input_ids for t in gold_texts], tokenizer)
    out = []
    stages = {}  # stage name -> its section; a stage whose rewards an earlier one of its kind has is checked once
    for s in cfg.stage_plan:
        part = getattr(s.cfg, s.kind) if s.kind in ("grpo", "fork", "dpo") else None
        if part is not None and (s.kind, part.rewards) not in [(k, p.rewards) for k, p in stages.values()]:
            stages[s.name] = (s.kind, part)
    for section, (_, part) in (stages or {"grpo": ("grpo", cfg.grpo)}).items():  # no RL stage: grpo's rewards
        for reward in load(part.rewards, task, where=f"{section}.rewards", timeout_s=part.reward_timeout_s):
            t0 = time.time()
            on_samples, f1 = score_rollouts(sampled, sampled_texts, chosen, task, [reward], seeds=seeds,
                                             max_new_tokens=cfg.sampling.max_new_tokens)
            on_gold, f2 = score_rollouts(gold, gold_texts, chosen, task, [reward],
                                         seeds=list(range(len(chosen))), max_new_tokens=cfg.sampling.max_new_tokens)
            calls = (sampled.num_rows + gold.num_rows) if reward.mode == "row" else 2 if reward.mode == "batch" \
                else 2 * len(chosen)
            value = lambda s: [None if v != v else float(v) for v in s.components[reward.label]]  # noqa: E731 (unweighted)
            comps = {k: float(v[~v.isnan()].mean()) for k, v in on_samples.components.items()
                     if k != reward.label and (~v.isnan()).any()}
            out.append(RewardCheck(section, reward.label, reward.mode, reward.isolation, value(on_samples),
                                   value(on_gold), comps, f1.count + f2.count, f1.first_message or f2.first_message,
                                   (time.time() - t0) / max(calls, 1)))
    return out


def _mean(values: list[float | None]) -> str:
    ok = [v for v in values if v is not None]
    return f"{sum(ok) / len(ok):.3f}" if ok else "-"


def table(rows: list[RewardCheck]) -> str:
    width = max([24] + [len(f"{r.section}.{r.label}") for r in rows])
    head = f"{'reward':<{width}} {'mode':<6} {'sampled':>8} {'gold':>8} {'failed':>6} {'ms/call':>8}  components / first failure"
    lines = [head, "-" * len(head)]
    for r in rows:
        note = ", ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in r.components.items())
        if r.first_failure:
            note = f"FAILED: {r.first_failure}"
        flag = ""
        s_ok, g_ok = [v for v in r.sampled if v is not None], [v for v in r.gold if v is not None]
        if s_ok and g_ok and sum(g_ok) / len(g_ok) < sum(s_ok) / len(s_ok):
            flag = "  (gold scores below sampled: check the reward)"
        lines.append(f"{f'{r.section}.{r.label}':<{width}} {r.mode:<6} {_mean(r.sampled):>8} {_mean(r.gold):>8} "
                     f"{r.failures:>6} {1000 * r.seconds_per_call:>8.2f}  {note}{flag}")
    lines.append("all rewards scored every row" if all(r.passed for r in rows) else
                 "some rewards left rows unscorable: fix them before training (their rows would get no signal)")
    return "\n".join(lines)
