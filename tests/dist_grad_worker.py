"""Run under torchrun: one rank's share of a float64 step gradient, all-reduced; rank 0 saves it.

Usage: torchrun --nproc_per_node=2 tests/dist_grad_worker.py MODEL_DIR OUT.pt TRAINER REDUCTION MICRO INJECT
[STRATEGY [UNEVEN]]  (STRATEGY ddp or fsdp2; UNEVEN 1: rank 0 takes two thirds of the rows)
"""

import sys

import torch

from forkrl.check import distributed_step_gradient, synthetic_batch
from forkrl.config import parse_config
from forkrl.distributed import setup, teardown
from forkrl.models import load_model

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import tiny_cfg_dict  # noqa: E402

model_dir, out, trainer, reduction, micro, inject = sys.argv[1:7]
strategy = sys.argv[7] if len(sys.argv) > 7 else "ddp"
uneven = len(sys.argv) > 8 and sys.argv[8] == "1"
torch.set_num_threads(1)
dist = setup()
cfg = parse_config(tiny_cfg_dict(**{"sft.reduction": reduction, "grpo.reduction": reduction}))
model = load_model(model_dir, dtype=torch.float64)
n = 12
batch = synthetic_batch(model.config.vocab_size, n, seed=5)
g = torch.Generator().manual_seed(1)
adv = torch.randn(n, generator=g, dtype=torch.float64)
old = -2.0 + 0.1 * torch.randn(n, batch.input_ids_NL.shape[1] - 1, generator=g, dtype=torch.float64)
grad = distributed_step_gradient(model, batch, trainer, cfg, dist, micro=int(micro), inject=inject,
                                 adv_N=adv, old_NT=old, ref_NT=None, strategy=strategy, uneven=uneven)
if dist.is_main:
    torch.save(grad, out)
teardown()
