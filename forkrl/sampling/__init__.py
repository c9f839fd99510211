"""Samplers turn prompts into ``Rollouts``. ``hf.HFSampler`` runs Hugging Face ``generate`` (CPU or GPU);
a vLLM sampler for GPU machines is imported lazily so CPU installs never need vLLM."""

from .hf import HFSampler, SamplingParams

__all__ = ["HFSampler", "SamplingParams"]
