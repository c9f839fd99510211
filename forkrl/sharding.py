"""``distributed.strategy: fsdp2``: the training state sharded across ranks with torch's ``fully_shard`` (FSDP2).

What is sharded is what grows with training: the trained parameters (in float32 under ``distributed.mixed_precision:
bf16``), their gradients and the optimizer's moments, 1/W of each per rank. Every rank also keeps the stage's model
whole (``ctx.model``): samplers, evaluation, reference and old-policy passes and checkpoints read it, with no
collective, so a rank's sampling loop may stop at its own EOS while another decodes on. (A colocated inference engine
holds such a copy anyway; SCALE.md.) After each optimizer step ``pull`` gathers the new weights into it, one
all-gather per parameter.

The gradient keeps METHODS §1's global-denominator rule: each rank's loss divides by the whole step's counts, so the
full gradient is the *sum* of the ranks' gradients; FSDP2's reduce-scatter averages, so ``finish_gradients``
multiplies by W (exact for W a power of two; SCALE.md found forcing a divide factor of 1 crashing on gloo).

FSDP2 runs a collective in every forward and backward of the sharded model, so ranks must run the same number of
them, in the same order: ``Lockstep`` (the accumulation plan under fsdp2) gives every micro-batch a backward and pads
a rank's micro-batches with zero-weight ones up to the most any rank has (``trainers.accumulate``).
"""

from __future__ import annotations

import copy

import torch

from .trainers.accumulate import Plan


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules each sharded on their own: the classes a Hugging Face model names in ``_no_split_modules`` (its
    decoder layers), found at any depth (under a peft wrapper too)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class Sharded:
    """The stage's trained model under FSDP2 (``module``) beside the full copy every rank keeps (``full``)."""

    def __init__(self, model: torch.nn.Module, dist, *, mixed_precision: str = "none"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.full, self.dist = model, dist
        self.module = copy.deepcopy(model)
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if mixed_precision == "bf16" else MixedPrecisionPolicy())
        for block in decoder_blocks(self.module):
            fully_shard(block, mp_policy=policy)
        fully_shard(self.module, mp_policy=policy)
        full = dict(model.named_parameters())
        self.pairs = [(full[name], p) for name, p in self.module.named_parameters() if p.requires_grad]

    def finish_gradients(self, params) -> None:
        """FSDP2 averaged the ranks' gradients; the step's gradient is their sum (module docstring)."""
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.dist.world_size)

    @torch.no_grad()
    def pull(self) -> None:
        """The trained weights into the full copy (every rank: each gather is a collective)."""
        for full, shard in self.pairs:
            full.copy_(shard.full_tensor())

    def optimizer(self, opt) -> "ShardedOptimizerState":
        return ShardedOptimizerState(self.module, opt)


class ShardedOptimizerState:
    """The sharded optimizer's state as a checkpoint sees it: ``state_dict`` is the full state keyed by parameter
    names, gathered (a collective: every rank calls ``gather``) into rank 0's CPU memory, the rank that writes it;
    ``load_state_dict`` shards rank 0's copy of a saved one back out to every rank. Full, not per-rank, so a
    checkpoint is one file, and no GPU ever holds the whole optimizer state."""

    def __init__(self, module, opt):
        self.module, self.opt, self._full = module, opt, None

    def gather(self) -> "ShardedOptimizerState":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the other ranks get {}
        self._full = get_optimizer_state_dict(self.module, self.opt, options=options)
        return self

    def state_dict(self) -> dict:
        return self._full

    def load_state_dict(self, state: dict) -> None:
        import torch.distributed as tdist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = state if tdist.get_rank() == 0 else {}  # rank 0's copy is the one sent
        set_optimizer_state_dict(self.module, self.opt, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


class Lockstep(Plan):
    """The exact plan, with every rank running as many forward/backward passes as the busiest (module docstring)."""

    def __init__(self, dist):
        self.lockstep = dist
