"""Batched sampling with Hugging Face ``generate`` (KV cache), returning typed ``Rollouts``.

Sampler log-probs are recorded inside ``generate`` by a logits processor that transformers runs
*before* its temperature / top-k / top-p warpers, so each is log_softmax(raw_logits / T) at the sampled
token: the tempered, untruncated policy the trainer recomputes. One [rows, V] buffer is held at a time,
never the whole [rows, steps, V] score history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..types import Role, Rollouts


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class _LogprobRecorder(LogitsProcessor):
    """At step t, gathers step t-1's tempered log-prob of the token that was sampled there."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.prev_logp_BV: torch.Tensor | None = None
        self.logp: list[torch.Tensor] = []

    def gather_last(self, token_B: torch.Tensor) -> None:
        if self.prev_logp_BV is not None:
            self.logp.append(self.prev_logp_BV.gather(1, token_B[:, None]).squeeze(1))

    def __call__(self, input_ids, scores):
        if self.prev_logp_BV is not None:
            self.gather_last(input_ids[:, -1])
        self.prev_logp_BV = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


class HFSampler:
    """Samples ``group_size`` completions for each prompt with ``model.generate``."""

    def __init__(self, model, tokenizer, *, batch_size: int = 256):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], group_size: int, params: SamplingParams) -> Rollouts:
        rows = [(p, i) for i, p in enumerate(prompt_ids) for _ in range(group_size)]
        chunks = [self._generate([p for p, _ in rows[s : s + self.batch_size]], params)
                  for s in range(0, len(rows), self.batch_size)]
        problem_N = torch.tensor([i for _, i in rows], dtype=torch.long)
        return _assemble(chunks, problem_N, pad_id=self.tokenizer.pad_token_id)

    def _generate(self, prompts: list[list[int]], params: SamplingParams):
        pad_id, eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, p in enumerate(prompts):  # left padding: generation continues from the right edge
            ids[r, width - len(p) :] = torch.tensor(p)
            attn[r, width - len(p) :] = 1
        device = next(self.model.parameters()).device
        recorder = _LogprobRecorder(params.temperature)
        gen = GenerationConfig(
            do_sample=not params.greedy, temperature=params.temperature if not params.greedy else None,
            top_k=params.top_k if not params.greedy else None, top_p=params.top_p if not params.greedy else None,
            max_new_tokens=params.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen,
                                  logits_processor=LogitsProcessorList([recorder]))
        self.model.train(was_training)
        new = out[:, width:].cpu()
        recorder.gather_last(new[:, -1].to(device))
        logp = torch.stack(recorder.logp, dim=1).cpu() if recorder.logp else torch.zeros(len(prompts), 0)
        return prompts, new, logp, eos_id


def _assemble(chunks, problem_N: torch.Tensor, *, pad_id: int) -> Rollouts:
    """Re-lay generated rows as ``[prompt | completion up to and including EOS | pad]``, right-padded."""
    rows = []
    for prompts, new, logp, eos_id in chunks:
        for r, prompt in enumerate(prompts):
            is_eos = (new[r] == eos_id).nonzero()
            n = int(is_eos[0]) + 1 if len(is_eos) else new.shape[1]
            rows.append((prompt, new[r, :n].tolist(), logp[r, :n], not len(is_eos)))
    width = max(len(p) + len(c) for p, c, _, _ in rows)
    N = len(rows)
    ids = torch.full((N, width), pad_id, dtype=torch.long)
    role = torch.full((N, width), int(Role.PAD), dtype=torch.int8)
    slogp = torch.zeros(N, width)
    for r, (p, c, lp, _) in enumerate(rows):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        role[r, : len(p)] = Role.PROMPT
        role[r, len(p) : len(p) + len(c)] = Role.COMPLETION
        slogp[r, len(p) : len(p) + len(c)] = lp
    return Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=slogp, group_N=problem_N.clone(),
                    problem_N=problem_N, truncated_N=torch.tensor([t for *_, t in rows]))
