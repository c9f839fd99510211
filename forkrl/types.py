"""The data that flows through a training step, defined once.

Shape-suffix key, used in every tensor name across forkrl:
    N  rows (completions) in a batch, N = B * G
    B  prompts (problems)
    G  completions per prompt (a group)
    L  full sequence length (prompt + completion, right-padded)
    T  completion tokens (positions that can carry a loss)
    V  vocabulary
A name like ``logp_NL`` is a float tensor of shape [N, L]; ``group_N`` is an int tensor of shape [N].

Layout of a rollout row: ``[prompt tokens | completion tokens | pad]``, right-padded and left-aligned,
so position ids are plain ``arange`` and the loss of the token at position ``t`` is predicted by the
logits at position ``t - 1``. ``role_NL`` tells, per position, whose token it is (``Role``); loss masks
are derived from roles, never stored beside them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

import torch


class Role(IntEnum):
    """Who wrote a token. Stored as int8 in ``role_NL``."""

    PAD = 0
    PROMPT = 1
    COMPLETION = 2  # written by the policy: the tokens RL and SFT put a loss on
    ENV = 3  # environment observation in a multi-turn episode
    TOOL = 4  # tool output in an agent episode


@dataclass(frozen=True)
class Rollouts:
    """A batch of sampled rows, as the sampler returns it.

    ``sampler_logp_NL`` holds, at each COMPLETION position, log π(y_t | y_<t) under the sampling
    temperature (log_softmax(logits / T)), *before* top-k / top-p truncation: the same quantity the
    trainer recomputes, so the two can be compared. It is 0 at every other position.
    """

    input_ids_NL: torch.Tensor  # long
    role_NL: torch.Tensor  # int8, values of Role
    sampler_logp_NL: torch.Tensor  # float32
    group_N: torch.Tensor  # long: rows with the same id were sampled from the same prompt
    problem_N: torch.Tensor  # long: index of the row's problem in the list given to the sampler
    truncated_N: torch.Tensor  # bool: hit max_new_tokens without EOS

    @property
    def num_rows(self) -> int:
        return self.input_ids_NL.shape[0]

    @property
    def attention_mask_NL(self) -> torch.Tensor:
        return (self.role_NL != Role.PAD).long()

    @property
    def completion_mask_NL(self) -> torch.Tensor:
        return self.role_NL == Role.COMPLETION

    @property
    def completion_len_N(self) -> torch.Tensor:
        return self.completion_mask_NL.sum(dim=1)

    def select(self, index_N: torch.Tensor) -> "Rollouts":
        """Rows ``index_N`` (an index or bool mask), trimmed to the longest kept row."""
        fields = {f.name: getattr(self, f.name)[index_N] for f in dataclasses.fields(self)}
        width = int((fields["role_NL"] != Role.PAD).sum(dim=1).max().item()) if len(fields["group_N"]) else 0
        for name in ("input_ids_NL", "role_NL", "sampler_logp_NL"):
            fields[name] = fields[name][:, : max(width, 1)]
        return Rollouts(**fields)


@dataclass(frozen=True)
class Scored:
    """Rollouts with their rewards.

    ``valid_N`` is False for an unscorable row (its reward raised, returned None or NaN): such a row
    is excluded from its group's baseline and gets advantage 0. ``reward_N`` is 0 there, and only
    there, by convention; it is never read without ``valid_N``.
    """

    rollouts: Rollouts
    reward_N: torch.Tensor  # float32, weighted sum of components
    valid_N: torch.Tensor  # bool
    components: dict[str, torch.Tensor]  # name -> float32 [N], NaN where that component failed
