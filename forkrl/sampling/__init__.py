"""Samplers turn prompts into ``Rollouts``. ``hf.HFSampler`` decodes a Hugging Face causal LM (CPU or GPU)
through a decode engine (``engine.py``: the model's own forward, or a fused Llama/Qwen2 decoder on CPU).
A vLLM sampler belongs here too, imported lazily, so that CPU installs never need vLLM."""

from .hf import HFSampler, SamplingParams

__all__ = ["HFSampler", "SamplingParams"]
