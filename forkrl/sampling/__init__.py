"""Samplers turn prompts into ``Rollouts`` behind one interface (``base.Sampler``), built by one factory
(``make_sampler``, from ``sampling.backend``). ``hf.HFSampler`` decodes any Hugging Face causal LM through its own
forward; the fused CPU decoder lives in ``forkrl.cpu`` and is reached only through the factory. A GPU engine is
one more entry of ``base.SAMPLERS``, imported lazily there, so CPU installs never need it: ``static.StaticSampler``
(the same forward over a static KV cache, its step compiled on CUDA) and ``vllm.VllmSampler`` (``sampling.backend:
vllm``, the optional extra ``forkrl[vllm]``)."""

from .base import (SAMPLERS, EntropySampler, LockstepSampler, Sampler, SamplingParams, completion_texts,
                   make_sampler, row_seeds, sampling_params)

__all__ = ["SAMPLERS", "EntropySampler", "LockstepSampler", "Sampler", "SamplingParams", "completion_texts",
           "make_sampler", "row_seeds", "sampling_params"]
