"""Where a GRPO step's rows come from: ``PromptSource`` samples ``group_size`` completions of each problem's prompt
(single-turn tasks); ``EpisodeSource`` plays ``group_size`` episodes of each env seed (``task.multi_turn``), a row
each, token in and token out (``envs.episodes``). Both give ``Rows``, which the step scores, filters and trains on
the same way. ``HeldoutEpisodes`` is an env task's fixed set of base-model episodes whose observations' cross-entropy
is logged at each evaluation (ECHO's held-out figure)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..sampling import completion_texts, row_seeds, sampling_params
from ..tasks.base import describe
from ..types import Role, Rollouts


class PromptSource:
    """A step's rows for a single-turn task: ``group_size`` completions of each problem's prompt (prompts encoded
    once and cached)."""

    def __init__(self, ctx):
        self.ctx, self.cache = ctx, {}
        self.t_max = ctx.cfg.sampling.max_new_tokens

    def prompt(self, i: int, problem) -> list[int]:
        if i not in self.cache:
            self.cache[i] = self.ctx.encode_prompt(problem.prompt, where=describe(problem))
        return self.cache[i]

    def sample(self, sampler, pick, problems, seeds, explore=None) -> Rows:
        ctx = self.ctx
        prompt_ids = [self.prompt(i, p) for i, p in zip(pick, problems)]
        rollouts = sampler.sample(prompt_ids, ctx.cfg.grpo.group_size, sampling_params(ctx.cfg), seeds=seeds)
        reasonings = [ids[m].tolist() for ids, m in zip(rollouts.input_ids_NL, rollouts.completion_mask_NL)]
        return Rows(rollouts, completion_texts(ctx.tokenizer, rollouts), prompt_ids, reasonings)


class EpisodeSource:
    """A step's rows for an env task (``task.multi_turn``): ``group_size`` episodes of each env seed, played turn by
    turn (``envs.episodes``), a row each; the advantage is the trajectory's, grouped by env seed. The loss reads the
    COMPLETION positions (every turn's action) of each row."""

    def __init__(self, ctx):
        from ..envs.episodes import make_codec

        self.ctx, self.codec = ctx, make_codec(ctx.task, ctx.tokenizer)
        self.t_max = ctx.task.max_turns * ctx.cfg.sampling.max_new_tokens  # every turn's action is the "completion"

    def sample(self, sampler, pick, problems, seeds, explore=None) -> Rows:
        """``explore``: per problem, whether its group explores (``grpo.explore``); exploring groups come last."""
        from ..envs.episodes import episode_metrics, episode_rollouts, first_action_ids, play, transcript

        ctx, G = self.ctx, self.ctx.cfg.grpo.group_size
        explore = list(explore) if explore is not None else [False] * len(problems)
        n_task = explore.count(False)
        assert explore == [False] * n_task + [True] * (len(problems) - n_task), "exploring groups come last"
        params, seeds_of = sampling_params(ctx.cfg), lambda a, b: seeds[a * G : b * G]  # noqa: E731
        env_seeds = [p.meta["env_seed"] for p in problems]
        episodes = play(ctx.task, sampler, self.codec, env_seeds[:n_task], G, params, seeds=seeds_of(0, n_task))
        instruction = ctx.cfg.grpo.explore.instruction
        if n_task < len(problems):
            episodes += play(ctx.task, sampler, self.codec, env_seeds[n_task:], G, params,
                             seeds=seeds_of(n_task, len(problems)), instruction=instruction)
        rollouts = episode_rollouts(episodes, pad_id=ctx.tokenizer.pad_token_id, group_size=G)
        prompts = [self.codec.initial(instruction if x else ctx.task.instruction, p.meta["observation"])[0]
                   for p, x in zip(problems, explore)]
        explore_N = torch.tensor(explore).repeat_interleave(G)
        metrics = episode_metrics(ctx.task, episodes[: n_task * G])
        metrics["explore_reward_mean"] = None  # every rank reports the same keys (their sums are all-reduced)
        if n_task < len(problems):
            values = exploration_rewards(episodes[n_task * G :], ctx.cfg.grpo.explore.reward)
            metrics["explore_reward_mean"] = float(values[~values.isnan()].mean()) if (~values.isnan()).any() else None
        return Rows(rollouts, [transcript(e) for e in episodes], prompts, [first_action_ids(e) for e in episodes],
                    episodes, metrics, explore_N)


@dataclass
class Rows:
    """A step's sampled rows: the rollouts, each row's completion text, each problem's prompt ids and each row's
    first reasoning (for the MI estimate), an env task's episodes and their figures."""

    rollouts: Rollouts
    texts: list[str]
    prompt_ids: list[list[int]]
    reasonings: list[list[int]]
    episodes: list | None = None
    metrics: dict = field(default_factory=dict)
    explore_N: torch.Tensor | None = None  # bool per row: an exploration episode (grpo.explore)


def exploration_rewards(episodes, key: str) -> torch.Tensor:
    """Each exploration episode's reward: ``info[key]`` at its end (NaN, unscorable, where the environment raised
    or does not report it)."""
    return torch.tensor([float(e.info[key]) if e.error is None and key in e.info else float("nan")
                         for e in episodes])


def explore_flags(cfg, step: int, n_groups: int) -> list[bool]:
    """Which of a step's ``n_groups`` groups explore under ``grpo.explore`` (``cfg``): all of every
    (ratio + 1)-th step's (``steps``), or the last 1 in (ratio + 1) of every step's, at least one (``groups``).
    A function of the step and the whole step's groups, so every rank and a resume agree."""
    if cfg.mode == "steps":
        return [step % (cfg.ratio + 1) == 0] * n_groups
    if cfg.mode == "groups":
        k = max(1, round(n_groups / (cfg.ratio + 1)))
        return [False] * (n_groups - k) + [True] * k
    return [False] * n_groups


class HeldoutEpisodes:
    """ECHO's held-out figure: episodes the stage's starting model played on the first held-out env seeds (at most
    ``size``), kept in ``STAGE/heldout_episodes.json`` so that a resumed stage scores the same rows, and the
    policy's cross-entropy on their observation (ENV) tokens."""

    def __init__(self, ctx, sampler, codec, *, size: int = 16):
        from ..envs.episodes import episode_rollouts, play

        path = ctx.stage_dir / "heldout_episodes.json"
        if path.is_file():
            rows = json.loads(path.read_text())
        else:
            seeds = list(ctx.task.seeds("heldout"))[:size]
            episodes = play(ctx.task, sampler, codec, seeds, 1, sampling_params(ctx.cfg, for_eval=True),
                            seeds=row_seeds(f"echo-heldout:{ctx.cfg.seed}", seeds, 1))
            rows = [{"ids": e.ids, "roles": e.roles} for e in episodes if e.error is None and e.ids]
            if ctx.dist.is_main:
                from ..checkpoint import atomic_write_text

                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(rows))
        from ..envs.episodes import Episode

        self.batch = episode_rollouts([Episode(0, r["ids"], r["roles"], [0.0] * len(r["ids"])) for r in rows],
                                      pad_id=ctx.tokenizer.pad_token_id, group_size=1) if rows else None
        self.ctx = ctx

    @torch.no_grad()
    def cross_entropy(self) -> float | None:
        from ..forward import ModelForward

        if self.batch is None:
            return None
        logp, _, _ = ModelForward(self.ctx.model).logprobs(self.batch)
        env = (self.batch.role_NL[:, 1:] == Role.ENV)[:, : logp.shape[1]]
        return float(-(logp.double() * env).sum() / env.sum().clamp_min(1))
