"""Episodes, token in and token out (AGENTS.md): one row per episode, built from the ids the sampler drew and the
bridge tokens of each observation; earlier turns are never decoded and re-encoded.

A row is ``[PROMPT instruction+first observation | COMPLETION act₁ … EOS | PROMPT/ENV bridge₁ | COMPLETION act₂ |
… | PROMPT/ENV final observation | PAD]``. The sampler's log-probs are kept at COMPLETION positions only, so the
GRPO loss (which reads only COMPLETION positions) is the trajectory's, and ENV positions are there for ECHO's loss.

A codec turns text into (ids, roles) once per piece:

* ``PlainCodec`` (base models, the built-in tiny ones): ``instruction\\nobservation\\n`` then, after each action's
  EOS, ``\\nobservation\\n``; the observation's own tokens are ENV, the newlines PROMPT.
* ``ChatCodec`` (a tokenizer's chat template): the bridge after an action is found by rendering a conversation with
  and without the next user message and taking the token difference, so the template's own pieces (the newline after
  the end-of-turn token, the next turn's header) are exactly the template's. The ENV span is where the bridges of
  two different observations differ. A template that does not preserve the prefix (one that rewrites earlier turns,
  as templates that strip past reasoning do) is refused when the codec is built.

``run_episodes`` plays a batch of episodes: every turn samples the still-running episodes' next action from their
full histories (the prefix is prefilled again each turn), each row from a seed derived from (row seed, turn), so an
episode does not depend on the batch it was played in, its rank or a resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..types import Role, Rollouts


class CodecError(ValueError):
    """The tokenizer or its chat template cannot carry episodes token-in-token-out (the message says why)."""


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


class PlainCodec:
    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise CodecError("the tokenizer has no EOS token: an action could not end")
        self.tokenizer = tokenizer
        self.newline = _ids(tokenizer, "\n")

    def initial(self, instruction: str, observation: str) -> tuple[list[int], list[int]]:
        ids = self.tokenizer(f"{instruction}\n{observation}\n", add_special_tokens=True).input_ids
        return ids, [int(Role.PROMPT)] * len(ids)

    def bridge(self, observation: str, *, final: bool = False) -> tuple[list[int], list[int]]:
        obs = _ids(self.tokenizer, observation)
        tail = [] if final else self.newline
        ids = self.newline + obs + tail
        return ids, [int(Role.PROMPT)] * len(self.newline) + [int(Role.ENV)] * len(obs) + [int(Role.PROMPT)] * len(tail)

    def action(self, text: str) -> list[int]:
        """A demonstration's action as the policy would have to write it: its tokens, then EOS."""
        return _ids(self.tokenizer, text) + [self.tokenizer.eos_token_id]


class ChatCodec:
    """Episodes through the tokenizer's chat template (``system``: an optional system prompt)."""

    PROBE = ("probe observation one", "another probe, two")

    def __init__(self, tokenizer, *, system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise CodecError("the tokenizer has no chat template: use task.format.style: plain")
        if tokenizer.eos_token_id is None:
            raise CodecError("the tokenizer has no EOS token: an action could not end")
        self.tokenizer, self.head = tokenizer, [{"role": "system", "content": system}] if system else []
        self.eos = tokenizer.eos_token_id
        self._check_prefixes()

    def _render(self, messages, *, prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.head + messages, tokenize=False, add_generation_prompt=prompt)
        return _ids(self.tokenizer, text)

    def initial(self, instruction: str, observation: str) -> tuple[list[int], list[int]]:
        ids = self._render([{"role": "user", "content": f"{instruction}\n{observation}"}], prompt=True)
        return ids, [int(Role.PROMPT)] * len(ids)

    def _bridge_ids(self, observation: str, *, final: bool) -> list[int]:
        """The tokens between an action's EOS and the next action (or the end): the template's, verbatim."""
        turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        before = self._render(turns, prompt=False)
        after = self._render(turns + [{"role": "user", "content": observation}], prompt=not final)
        if after[: len(before)] != before:
            raise CodecError("the chat template renders earlier turns differently once a turn is added (it does not "
                             "preserve prefixes, as templates that strip past reasoning do); token-in-token-out "
                             "episodes need one that does: give task.format.template a template that keeps history")
        if self.eos not in before[len(self._render(turns[:1], prompt=True)):]:
            raise CodecError(f"the chat template does not end an assistant turn with the EOS token "
                             f"{self.tokenizer.eos_token!r}: the sampled action's end could not be matched")
        end = len(before) - before[::-1].index(self.eos)  # just past the assistant turn's EOS
        return before[end:] + after[len(before):]

    def _check_prefixes(self) -> None:
        """Checks the template once (``_bridge_ids`` raises) and finds, per kind of bridge, how many template tokens
        stand before and after the observation: where the bridges of two different observations agree."""
        self.spans = {}
        for final in (False, True):
            a, b = (self._bridge_ids(p, final=final) for p in self.PROBE)
            pre = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            post = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y), min(len(a), len(b)))
            self.spans[final] = (pre, min(post, min(len(a), len(b)) - pre))

    def bridge(self, observation: str, *, final: bool = False) -> tuple[list[int], list[int]]:
        ids = self._bridge_ids(observation, final=final)
        pre, post = self.spans[final]
        roles = [int(Role.PROMPT)] * pre + [int(Role.ENV)] * (len(ids) - pre - post) + [int(Role.PROMPT)] * post
        return ids, roles

    def action(self, text: str) -> list[int]:
        return _ids(self.tokenizer, text) + [self.eos]


def turn_seed(row_seed: int, turn: int) -> int:
    """The sampling seed of one turn of one episode: a function of the row's seed and the turn only."""
    return int.from_bytes(hashlib.sha256(f"{row_seed}:turn:{turn}".encode()).digest()[:8], "big") >> 1


@dataclass
class Turn:
    action: str
    observation: str | None
    reward: float
    info: dict
    truncated: bool  # the action hit sampling.max_new_tokens without EOS


@dataclass
class Episode:
    """One played episode: its row's ids, roles and sampler log-probs, its turns, return and outcome."""

    env_seed: int
    ids: list[int]
    roles: list[int]
    logp: list[float]
    turns: list[Turn] = field(default_factory=list)
    ret: float = 0.0
    done: bool = False
    error: str | None = None  # the environment raised: the episode is unscorable
    truncated: bool = False  # an action cut at its token limit, or the episode at its token budget

    @property
    def info(self) -> dict:
        return self.turns[-1].info if self.turns else {}

    def extend(self, ids, roles, logp=None) -> None:
        self.ids += ids
        self.roles += roles
        self.logp += logp if logp is not None else [0.0] * len(ids)


def run_episodes(sampler, codec, make_env, instruction: str, env_seeds: list[int], group_size: int, params, *,
                 seeds: list[int], max_turns: int, max_tokens: int) -> list[Episode]:
    """Play ``group_size`` episodes of each env seed (prompt-major, like ``Sampler.sample``), row r's turns sampled
    from ``turn_seed(seeds[r], turn)``. An episode ends when the environment says so, after ``max_turns`` turns (an
    ordinary failure), or when its next bridge and a full action would not fit in ``max_tokens`` (flagged
    truncated). An environment that raises ends its episode unscorable (``error``), never the batch."""
    episodes, envs = [], []
    for s in env_seeds:
        for _ in range(group_size):
            env, episode = make_env(), Episode(env_seed=s, ids=[], roles=[], logp=[])
            try:
                ids, roles = codec.initial(instruction, env.reset(s))
                episode.extend(ids, roles)
            except Exception as e:  # noqa: BLE001 - the user's environment: its episode is unscorable
                episode.error, episode.done = f"reset({s}) raised {type(e).__name__}: {e}", True
            episodes.append(episode)
            envs.append(env)
    eos = codec.tokenizer.eos_token_id
    for turn in range(max_turns):
        live = [r for r, e in enumerate(episodes) if not e.done]
        if not live:
            break
        out = sampler.sample([episodes[r].ids for r in live], 1, params,
                             seeds=[turn_seed(seeds[r], turn) for r in live])
        for i, r in enumerate(live):
            play_turn(episodes[r], envs[r], codec, out, i, eos, last=turn == max_turns - 1, params=params,
                      max_tokens=max_tokens)
    return episodes


def play_turn(episode: Episode, env, codec, out: Rollouts, i: int, eos: int, *, last: bool, params,
              max_tokens: int) -> None:
    """Append row ``i`` of the turn's samples ``out`` to ``episode``, step the environment with its text, and
    append the observation's bridge (final when the episode ends here)."""
    mask = out.completion_mask_NL[i]
    action_ids = out.input_ids_NL[i][mask].tolist()
    episode.extend(action_ids, [int(Role.COMPLETION)] * len(action_ids), out.sampler_logp_NL[i][mask].tolist())
    cut = bool(out.truncated_N[i])
    episode.truncated |= cut
    text = codec.tokenizer.decode([t for t in action_ids if t != eos], skip_special_tokens=True)
    try:
        result = env.step(text)
        reward = float(result.reward)
    except Exception as e:  # noqa: BLE001 - the user's environment: its episode is unscorable
        episode.error, episode.done = f"step({text!r}) raised {type(e).__name__}: {e}", True
        return
    episode.ret += reward
    episode.turns.append(Turn(text, result.observation, reward, dict(result.info), cut))
    episode.done = bool(result.done) or last
    if result.observation is None:
        episode.done = True
        return
    ids, roles = codec.bridge(result.observation, final=episode.done)
    if not episode.done and len(episode.ids) + len(ids) + params.max_new_tokens > max_tokens:
        episode.done, episode.truncated = True, True  # no room for the next turn: end here, marked
        ids, roles = codec.bridge(result.observation, final=True)
    if len(episode.ids) + len(ids) <= max_tokens:
        episode.extend(ids, roles)


def episode_rollouts(episodes: list[Episode], *, pad_id: int, group_size: int) -> Rollouts:
    """The episodes as one ``Rollouts``: a row each, right-padded, grouped by env seed (rows of one seed share a
    group id, their index in the seeds' order)."""
    width = max(len(e.ids) for e in episodes) or 1
    N = len(episodes)
    ids = torch.full((N, width), pad_id, dtype=torch.long)
    role = torch.full((N, width), int(Role.PAD), dtype=torch.int8)
    logp = torch.zeros(N, width)
    for r, e in enumerate(episodes):
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids, dtype=torch.long)
        role[r, :n] = torch.tensor(e.roles, dtype=torch.int8)
        logp[r, :n] = torch.tensor(e.logp)
    group = torch.arange(N) // group_size
    return Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=logp, group_N=group, problem_N=group.clone(),
                    truncated_N=torch.tensor([e.truncated for e in episodes]))


def make_codec(task, tokenizer):
    """The codec of an env task's format (``task.format.style``): plain text, or the tokenizer's chat template
    (checked here: a template that does not preserve prefixes is refused before anything runs)."""
    if getattr(task, "style", "plain") == "chat":
        return ChatCodec(tokenizer, system=getattr(task, "system_prompt", None))
    return PlainCodec(tokenizer)


def replay(task, codec, demo) -> Episode:
    """A demonstration as the episode a policy writing its actions would have played: the same row layout as
    ``run_episodes`` (the actions' tokens COMPLETION, each ending with EOS; the observations' bridges), so SFT and RL
    see the same renderings. Turns past the environment's end are dropped."""
    env = task.make()
    episode = Episode(env_seed=demo.seed, ids=[], roles=[], logp=[])
    episode.extend(*codec.initial(task.instruction, env.reset(demo.seed)))
    for n, action in enumerate(demo.turns):
        ids = codec.action(action)
        episode.extend(ids, [int(Role.COMPLETION)] * len(ids))
        result = env.step(action)
        episode.ret += float(result.reward)
        episode.turns.append(Turn(action, result.observation, float(result.reward), dict(result.info), False))
        episode.done = bool(result.done) or n == len(demo.turns) - 1
        if result.observation is not None:
            episode.extend(*codec.bridge(result.observation, final=episode.done))
        if episode.done:
            break
    return episode


def transcript(episode: Episode) -> str:
    """The episode's actions, a line each (a row's "completion" text for rewards and logs)."""
    return "\n".join(t.action for t in episode.turns)


def first_action_ids(episode: Episode) -> list[int]:
    """The tokens of the episode's first action (the first COMPLETION span): RAGEN-2's reasoning Z for the MI
    estimate."""
    roles = episode.roles
    start = next((i for i, r in enumerate(roles) if r == int(Role.COMPLETION)), len(roles))
    end = next((i for i in range(start, len(roles)) if roles[i] != int(Role.COMPLETION)), len(roles))
    return episode.ids[start:end]


def play(task, sampler, codec, env_seeds: list[int], group_size: int, params, *, seeds: list[int],
         instruction: str | None = None) -> list[Episode]:
    """``run_episodes`` with an env task's instruction (or ``instruction``: an exploration episode's) and budgets."""
    return run_episodes(sampler, codec, task.make, instruction or task.instruction, env_seeds, group_size, params,
                        seeds=seeds, max_turns=task.max_turns, max_tokens=task.max_episode_tokens)


def episode_metrics(task, episodes: list[Episode]) -> dict:
    """A batch of episodes in figures: success rate, return, turns, valid-action share, environment errors."""
    ok = [e for e in episodes if e.error is None]
    turns = [t for e in ok for t in e.turns]
    errors = [e.error for e in episodes if e.error is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"episode_success": mean([float(task.success(e)) for e in episodes]),
            "episode_return": mean([e.ret for e in ok]), "episode_turns": mean([len(e.turns) for e in ok]),
            "action_valid_frac": mean([float(t.info.get("action_valid", 1.0)) for t in turns]),
            "episode_truncated_frac": mean([float(e.truncated) for e in episodes]),
            "env_errors": len(errors), "env_first_error": errors[0] if errors else None}
