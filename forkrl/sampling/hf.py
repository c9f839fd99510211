"""The Hugging Face backend: any causal LM, on any device, through its own forward and KV cache.

``HFEngine`` runs the model exactly as ``generate`` does (position ids ``cumsum(mask) - 1``, the mask dropped when
it is all ones, ``logits_to_keep=1``); ``HFSampler`` drives it through the shared decode loop (``decode.py``).
"""

from __future__ import annotations

import inspect

import torch

from .decode import EngineSampler


def cache_kwarg(model) -> str:
    """The forward's name for the cache: ``cache`` since transformers 5.2x, ``past_key_values`` before (still
    accepted, with a warning at every call, until 5.40)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class HFEngine:
    def __init__(self, model):
        self.model, self.device = model, next(model.parameters()).device
        self.cache = self.mask = None
        self.cache_kw = cache_kwarg(model)  # ``cache`` in newer transformers, ``past_key_values`` before

    def prefill(self, ids_BW: torch.Tensor, attn_BW: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        pos = (attn_BW.cumsum(-1) - 1).masked_fill_(attn_BW == 0, 0)
        self.mask = None if bool(attn_BW.all()) else attn_BW  # generate drops an all-ones mask too
        return self._forward(ids_BW, pos)

    def step(self, token_B: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self._forward(token_B[:, None], pos_B[:, None])

    def _forward(self, ids, pos):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self.cache_kw: self.cache})
        self.cache = out.past_key_values
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)


class HFSampler(EngineSampler):
    """Samples from a Hugging Face causal LM through its own forward (``sampling.backend: hf``)."""

    def engine(self, model):
        return HFEngine(model)
