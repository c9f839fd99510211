"""forkrl's CPU-only fast path: a fused decoder that samples, and a replay of its decode that trains.

Imported only by the sampler factory, ``sampling.make_sampler`` (``FusedSampler``); the policy-forward factory,
``forward.make_forward``, reaches ``ReplayForward`` through the sampler it made (``FusedSampler.policy_forward``).
Nothing else in forkrl imports it.

**Where it applies** (``fused_unsupported`` says why not, and ``sampling.backend: auto`` then takes the Hugging
Face forward): float32 parameters on a CPU; a transformers causal LM of ``model_type`` llama or qwen2 with the
default rotary embedding, SiLU MLP, no sliding window and no MLP bias (attention biases and GQA are fine, tied or
untied heads); peft LoRA adapters on its linear layers (not DoRA or other variants, not on embeddings). The
replayed update further needs no dropout (attention or LoRA) and a record under ``trace.MAX_TRACE_BYTES`` per
chunk; where a call cannot be recorded, the update runs the model's forward and says why (``untraced_why``).
The C kernels (``kernels.c``, built once per machine by the system compiler) are optional: without a compiler the
same operations run as torch operations.

**How it is verified**: the engine's logits equal the Hugging Face forward's to float rounding (about 1e-6), so the
sampled tokens are the same unless a uniform draw falls within that distance of a boundary of the cumulative
distribution (``tests/test_engine.py``, with and without the kernels, the whole step in C against layer by
layer); the replayed log-probs, entropies and every parameter's gradient equal autograd's through the Hugging Face
forward to float rounding, for full fine-tuning and LoRA, any subset and order of rows, across chunks
(``tests/test_trace.py``); each kernel against torch (``tests/test_kernels.py``).

Layout: ``engine.py`` (``FastEngine``, the record's memory ``RecordArena``), ``kernels.py`` + ``kernels.c``,
``sampler.py`` (``FusedSampler``), ``trace.py`` (the record as the update reads it), ``replay.py`` (the
hand-written backward), ``forward.py`` (``ReplayForward``), ``threads.py`` (threads on a shared machine).
"""

from .engine import fast_unsupported as fused_unsupported
from .forward import ReplayForward
from .sampler import FusedSampler

__all__ = ["FusedSampler", "ReplayForward", "fused_unsupported"]
