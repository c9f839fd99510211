"""Data parallelism across processes, the global-denominator way (METHODS §1).

Launch with ``torchrun --nproc_per_node=N -m forkrl.cli train ...`` (or ``accelerate launch``, which sets
the same environment). Each rank takes a contiguous shard of the step's rows; the step's token and
sequence counts are all-reduced *before* the micro-batch loop, each rank divides its masked loss sums by
those global counts, and after accumulation the gradients are all-reduced with SUM, once per optimizer
step. The sum of every rank's gradient is then exactly the one-process gradient of the whole batch. (This
equals DDP's averaging all-reduce with the loss multiplied by the world size; doing it once after
accumulation keeps ranks with different micro-batch counts, or none, in step.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int, what: str) -> slice:
        """This rank's contiguous share of ``n`` items; ``n`` must divide evenly."""
        if n % self.world_size:
            from .config import ConfigError

            raise ConfigError(f"{what} = {n} is not divisible by the world size {self.world_size}; "
                              "choose sizes that split evenly across processes")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def union(self, names: list[str]) -> list[str]:
        """The sorted union of every rank's ``names`` (e.g. reward components, which a reward returning a mapping
        may give on one rank's rows and not another's): what each rank then gathers, in the same order."""
        if not self.enabled:
            return sorted(set(names))
        every = [None] * self.world_size
        tdist.all_gather_object(every, sorted(set(names)))
        return sorted(set().union(*every))

    def gather_objects(self, items: list) -> list:
        """Every rank's ``items`` (picklable objects), concatenated in rank order."""
        if not self.enabled:
            return list(items)
        every = [None] * self.world_size
        tdist.all_gather_object(every, list(items))
        return [x for part in every for x in part]

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (SUM) the accumulated gradients in one flat buffer; missing grads count as 0."""
        if not self.enabled:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()


def setup() -> Dist:
    """Join the process group that torchrun / accelerate launch describe in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not tdist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size())


def teardown(*, wait: bool = True) -> None:
    """Leave the process group cleanly: gloo's threads still alive at interpreter exit abort the process.
    ``wait=False`` on an error path, where the other ranks may never reach the barrier."""
    if tdist.is_available() and tdist.is_initialized():
        if wait:
            tdist.barrier()
        tdist.destroy_process_group()
