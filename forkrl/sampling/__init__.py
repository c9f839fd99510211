"""Samplers turn prompts into ``Rollouts``. ``hf.HFSampler`` runs Hugging Face ``generate`` (CPU or GPU).
A vLLM sampler belongs here too, imported lazily, so that CPU installs never need vLLM."""

from .hf import HFSampler, SamplingParams

__all__ = ["HFSampler", "SamplingParams"]
