"""How fast is forkrl's GRPO step next to TRL's ``GRPOTrainer`` on identical work? (issue 6, points 1 and 3)

Both train the same tiny Qwen2-architecture model (built locally with ``models.build_tiny``, BPE tokenizer
trained on the arithmetic task's text) on forkrl's arithmetic prompts, with the same per-step prompts:
8 prompts × 8 completions, 64 new tokens, temperature 1, β = 0, token-mean reduction (TRL ``loss_type="dapo"``),
μ = 1, one micro-batch of 64 rows, AdamW (lr 1e-4, betas 0.9/0.99, no decay, grad clip 1), fp32 on CPU,
no gradient checkpointing. Each library runs in its own subprocess, alternating (forkrl, TRL, forkrl, TRL …
for ``--rounds``) so drift of the machine hits both.

* forkrl: the real pipeline (``pipeline.run`` on a ``stages: [grpo]`` config); per-step ``sample_s`` and
  ``train_s`` from its metrics.jsonl; the step's wall time is the gap between consecutive metric lines.
* TRL 1.16: ``GRPOTrainer.train``; sampling is the time inside ``_generate`` (wrapped), the step's wall
  time the gap between consecutive ``on_step_end`` callbacks, training the rest (scoring included, as
  forkrl's step also scores between its two timers' spans but outside both; see ``other_s``).
* physical reference: 2048² fp32 matmul GFLOP/s measured in this run (best of 8, in the driver before and
  after the workers and at the end of each worker; the peak is the best of all);
  training MFU = 6 · parameters · completion tokens / train_s / peak (under LoRA the true cost is nearer
  4 · parameters · tokens, no weight gradients, so this overstates it by about 1.5×; prompt and padding
  positions are computed but not counted); sampling efficiency = sampled tokens/s ÷ the tokens/s of one
  batched no-grad forward over the same rows × (prompt + new tokens), the median over every worker.
  Two floors of a step: its matmul FLOPs at that peak, and its matmuls timed at their own shapes
  (``shape_floor``: ``rows``-row decode steps, the unpadded training tokens), the best of every worker's.
* rewards of the timed steps (``--reward``): ``random`` (the default), a Bernoulli(0.5) reward per row in both
  libraries (forkrl's ``random`` reward, seeded per row; in TRL a seeded ``random.Random``), so nearly every
  group has reward variance and every row carries a gradient; ``task``, the arithmetic answer's
  correctness, which the untrained model never earns: every group's rewards are equal, every advantage is 0,
  and forkrl skips those rows' backward (``grpo.skip_zero_advantage``) while TRL computes it. The table's
  ``no-bwd rows`` column is forkrl's median count of such rows per step.
* losses: one subprocess samples forkrl's first-step batch once (``make_sampler``, forkrl's row seeds),
  gives it advantages from a probe reward (the parity of each completion's token-id sum: the untrained
  model never answers correctly, so the task reward is all 0 and both losses would be a trivial 0), and
  computes forkrl's loss (``policy_update``) and TRL's (``GRPOTrainer._compute_loss``) with the real model
  forward on that same batch, plus each one's gradient norm.

* devices (``--device``, ``--dtype``): fp32 on the CPU is the default and the issue's setting; the GPU, if any, is
  hidden from the workers then (forkrl's pipeline would take a visible one by itself). ``--device cuda`` runs
  both on the first GPU in bf16 (TRL: ``use_cpu=False, bf16=True`` with the model loaded in bf16; forkrl:
  ``model.dtype: bfloat16``, which samples through the Hugging Face forward and updates through the model's
  forward, the fused CPU engine being fp32-only), synchronises the device at every timer, measures the peak at
  8192² bf16 and adds each library's peak GPU memory. ``--dtype bfloat16`` on the CPU runs the same precision
  there (slow on CPUs without bf16 matrix units). The table's first line and the JSON's ``setup`` and
  ``machine`` say which device and precision every figure comes from.

    python benchmarks/grpo_step.py --json grpo_step.json                 # default: ~5M params, 64 tokens
    python benchmarks/grpo_step.py --config lora --json grpo_step_lora.json
    python benchmarks/grpo_step.py --tiny --json /tmp/t.json             # a smoke run (tests)
    python benchmarks/grpo_step.py --device cuda --json grpo_step_gpu.json  # on a GPU, bf16
    python benchmarks/grpo_step.py --contend 1 --json grpo_step_busy.json  # one core taken by another process

* contention (``--contend N``): N processes busy for the whole run (the matmul peaks and every worker included), as
  a laptop's or shared machine's other work would take cores: each spins in a Python loop (``--contend-with
  spin``), or multiplies small matrices on torch's own threads (``torch``, another training job).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TASK = dict(type="arithmetic", digits=2, train_size=3000, heldout_size=200)
SIZES = {  # (model size, sampling, batch)
    "default": dict(size=dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768),
                    max_new_tokens=64, prompts=8, group=8),
    "30m": dict(size=dict(hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=4, intermediate_size=1536),
                max_new_tokens=128, prompts=8, group=8),
    "tiny": dict(size=dict(hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96),
                 max_new_tokens=8, prompts=2, group=2),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BUSY = {  # --contend-with: what a busy process runs until it is killed
    "spin": "while True: pass",
    "torch": "import torch\na = torch.randn(256, 256)\nwhile True: a @ a",
}
LORA = dict(r=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LR, BETAS, GRAD_CLIP = 1e-4, (0.9, 0.99), 1.0


# ---------------------------------------------------------------- shared setup
def forkrl_config(spec: dict, model_dir: str, steps: int):
    from forkrl.config import RunCfg

    n = spec["prompts"] * spec["group"]
    return RunCfg.model_validate({
        "seed": 0, "stages": ["grpo"],
        "model": {"path": model_dir, "dtype": spec.get("dtype", "float32"),
                  "lora": {"enabled": spec["lora"], **LORA}},
        "task": TASK,
        "sampling": {"temperature": 1.0, "max_new_tokens": spec["max_new_tokens"], "batch_size": 256},
        "grpo": {"steps": steps, "prompts_per_step": spec["prompts"], "group_size": spec["group"],
                 "rewards": [{"name": {"random": "random", "task": "correct"}[spec.get("reward", "random")]}],
                 "micro_batch_size": n, "reduction": "token_mean", "kl": {"beta": 0.0},
                 "optim": {"lr": LR, "betas": list(BETAS), "weight_decay": 0.0, "grad_clip": GRAD_CLIP}},
        "eval": {"num_problems": 1, "samples_per_problem": 1},
        "checkpoint": {"every": 0, "keep_last": 1}, "log_every": 1000})


def build_model(spec: dict, root: Path) -> Path:
    from forkrl import models
    from forkrl.tasks import build_task

    cfg = forkrl_config(spec, "unused", 1)
    task = build_task(cfg.task)
    texts = [p.prompt + c for p, c in task.demonstrations("train")][:4000]  # as pipeline.base_model_path
    return models.build_tiny(root / "model", texts, arch="qwen2", vocab_size=320, seed=0, max_positions=512,
                             **spec["size"])


def local_setup(spec: dict, root: Path, seed_key: str):
    """For the in-process benchmarks (zero_advantage.py, replay_profile.py): the model ``spec`` sizes, built
    under ``root`` and loaded in training mode, its tokenizer, forkrl's config, the first ``spec["prompts"]``
    training prompts' ids and one seed per row (``seed_key``)."""
    from forkrl import models
    from forkrl.tasks import build_task
    from forkrl.sampling import row_seeds

    model_dir = build_model(spec, root)
    cfg = forkrl_config(spec, str(model_dir), 1)
    model, tok = models.load_model(str(model_dir)), models.load_tokenizer(str(model_dir))
    model.train()
    problems = list(build_task(cfg.task).problems("train"))[: spec["prompts"]]
    seeds = row_seeds(seed_key, list(range(len(problems))), spec["group"])
    return model, tok, cfg, [tok(p.prompt).input_ids for p in problems], seeds


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer read without this measures launches)."""
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: str = "cpu", dtype: str = "float32", repeats: int = 8) -> float:
    """GFLOP/s of an n×n matmul in ``dtype`` on ``device``, the best of ``repeats`` (a peak: the host is shared
    and noisy). n is 2048 for fp32 on a CPU, 8192 on a GPU (2048² is too small to fill one), 1024 for bf16 on
    a CPU (on CPUs without bf16 matrix units its matmuls are many times slower)."""
    n = 8192 if device == "cuda" else 2048 if dtype == "float32" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[dtype]) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def forward_tokens_per_s(model, rows: int, length: int, vocab: int) -> float:
    """tokens/s of one batched no-grad forward over ``rows`` × ``length`` tokens (median of 3)."""
    device = next(model.parameters()).device
    ids = torch.randint(2, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).to(device)
    was = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(4):
            sync(device.type)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            sync(device.type)
            times.append(time.perf_counter() - t0)
    model.train(was)
    return rows * length / statistics.median(times[1:])


def packed_decode(weights: list[list[torch.Tensor]], xs: dict, rows: int):
    """A function running every layer's products of one decode step as forkrl's decoder does where its kernels
    found MKL's packed products (``kernels.pack_weights`` once, then ``kernels.packed_linear`` per product); None
    where they are not there."""
    from forkrl.cpu import kernels

    lib = kernels.get()
    if lib is None or not kernels.packed:
        return None
    flat = [w.t().contiguous() for ws in weights for w in ws]  # [out, in], as the decoder's weights are
    keep, addresses = kernels.pack_weights(lib, flat, rows)
    outs = {w.shape[0]: torch.empty(rows, w.shape[0]) for w in flat}
    calls = [(xs[w.shape[1]], a, outs[w.shape[0]]) for w, a in zip(flat, addresses)]

    def run():
        for x, a, out in calls:
            kernels.packed_linear(lib, x, a, out)

    run.keep = keep  # the packed weights live as long as the function
    return run


def shape_floor(model, rows: int, prompt_len: int, tokens: float, *, weight_grads: bool, repeats: int = 3) -> dict:
    """Seconds of a step's matrix multiplies alone, at the step's own shapes, on this machine (the best of
    ``repeats``): a lower bound for any fp32 implementation of the same work through this BLAS, closer to what
    is reachable than FLOPs ÷ peak because a decode step multiplies ``rows``-row matrices, which run below the
    2048² peak (under LoRA, whose FLOP floor counts weight gradients, it can come out lower).

    Each decoder layer as a fused decoder runs it (x·[q|k|v], o, x·[gate|up], down; distinct random weights per
    layer, so they stream from memory as a real model's do) plus the LM head. Sampling: ceil(tokens / rows)
    one-token steps of all ``rows`` rows, the layers' products through MKL's packed weights where forkrl's kernels
    found them (``packed_decode``, as its decoder multiplies: faster than ``@``, which repacks each weight at
    every call), else ``@``. Training: the forward over every row's prompt and completion tokens (no padding;
    the head on completion tokens only), and the backward's input gradients plus, unless only an
    adapter trains (LoRA: its own matmuls are left out), weight gradients. Attention, norms, activations,
    sampling and the optimizer are left out: the true floor is higher. On the model's device, in its dtype."""
    p = next(model.parameters())
    dev, dt = p.device.type, p.dtype
    cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    H, nq, nk, inter = cfg.hidden_size, cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    layer = [(H, nq + 2 * nk), (nq, H), (H, 2 * inter), (inter, H)]
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dt)

    weights = [[randn(i, o) for i, o in layer] for _ in range(cfg.num_hidden_layers)]
    head = randn(H, cfg.vocab_size)
    widths = {i for i, _ in layer} | {o for _, o in layer}
    steps, seq, comp = math.ceil(tokens / rows), rows * prompt_len + int(tokens), int(tokens)
    xs = {n: randn(rows, n) for n in widths}
    X = {n: randn(seq, n) for n in widths}
    Xc, dYc = randn(comp, H), randn(comp, cfg.vocab_size)

    packed = packed_decode(weights, xs, rows) if (dev, dt) == ("cpu", torch.float32) else None

    def sample():
        for _ in range(steps):
            if packed is not None:
                packed()
            else:
                for ws in weights:
                    for w in ws:
                        xs[w.shape[0]] @ w
            xs[H] @ head

    def train():
        for ws in weights:  # forward
            for w in ws:
                X[w.shape[0]] @ w
        Xc @ head
        dYc @ head.t()
        if weight_grads:
            Xc.t() @ dYc
        for ws in reversed(weights):  # backward: dX = dY·Wᵀ, dW = Xᵀ·dY
            for w in reversed(ws):
                X[w.shape[1]] @ w.t()
                if weight_grads:
                    X[w.shape[0]].t() @ X[w.shape[1]]

    def best(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times.append(time.perf_counter() - t0)
        return min(times)

    return {"sample_s": best(sample), "train_s": best(train)}


def worker_tail(model, spec: dict, prompt_len: int, vocab: int, per_step: list[dict]) -> dict:
    rows, tokens = spec["prompts"] * spec["group"], statistics.median(s["tokens"] for s in per_step)
    gpu = {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if spec["device"] == "cuda" else {}
    first = next(model.parameters())
    return {**gpu, "param_dtype": str(first.dtype).removeprefix("torch."), "param_device": first.device.type,
            "params": sum(p.numel() for p in model.parameters()), "prompt_len": prompt_len,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "forward_tokens_per_s": forward_tokens_per_s(model, rows, prompt_len + spec["max_new_tokens"], vocab),
            "shape_floor": shape_floor(model, rows, prompt_len, tokens, weight_grads=not spec["lora"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "matmul_gflops": matmul_gflops(spec["device"], spec["dtype"])}


# ---------------------------------------------------------------- workers (one library per process)
def run_forkrl(spec: dict, model_dir: str, steps: int, work: Path) -> dict:
    from forkrl import pipeline

    cfg = forkrl_config(spec, model_dir, steps)
    seen = {}
    orig = pipeline.load_stage_model

    def keep_model(*a, **k):  # the trained model, for the parameter count and the forward reference
        out = orig(*a, **k)
        seen["model"], seen["tok"] = out[0], out[1]
        # counted now: save_final merges a LoRA adapter into the base (merge_and_unload) before we see it again
        seen["counts"] = {"params": sum(p.numel() for p in out[0].parameters()),
                          "trainable_params": sum(p.numel() for p in out[0].parameters() if p.requires_grad)}
        return out

    pipeline.load_stage_model = keep_model
    pipeline.run(cfg, work / "run")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    per_step = []
    for prev, row in zip([None, *rows], rows):
        wall = row["time"] - prev["time"] if prev else row["sample_s"] + row["train_s"]
        per_step.append({"s": wall, "sample_s": row["sample_s"], "train_s": row["train_s"],
                         "tokens": row["tokens_sampled"], "loss": row["loss"],
                         "rows_no_backward": row.get("rows_no_backward", 0)})
    from forkrl.tasks import build_task

    prompt = next(iter(build_task(cfg.task).problems("train"))).prompt
    plen = len(seen["tok"](prompt).input_ids)
    return {"steps": per_step, **worker_tail(seen["model"], spec, plen, len(seen["tok"]), per_step), **seen["counts"]}


def trl_args(spec: dict, steps: int, out: Path, **over):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out), use_cpu=spec["device"] == "cpu", bf16=spec["dtype"] == "bfloat16", fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=spec["prompts"] * spec["group"], num_generations=spec["group"],
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0, max_grad_norm=GRAD_CLIP,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to="none", shuffle_dataset=False,
        dataloader_num_workers=0, seed=0, disable_tqdm=True, log_completions=False, **over)


def trl_trainer(spec: dict, model_dir: str, steps: int, work: Path):
    """A GRPOTrainer fed forkrl's prompts in forkrl's per-step order (shuffle off), rewarded as ``spec["reward"]``
    says: the task's correctness, or a seeded Bernoulli(0.5) per completion."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer

    from forkrl import models
    from forkrl.tasks import build_task
    from forkrl.trainers.data import batch_indices

    cfg = forkrl_config(spec, model_dir, steps)
    task = build_task(cfg.task)
    problems = list(task.problems("train"))
    order = [i for s in range(steps) for i in batch_indices(len(problems), spec["prompts"], s, cfg.seed)]
    data = Dataset.from_dict({"prompt": [problems[i].prompt for i in order], "idx": order})

    def correct(prompts, completions, idx, **_):
        return [float(task.score(problems[i], c) or 0.0) for i, c in zip(idx, completions)]

    rng = random.Random(0)

    def bernoulli(prompts, completions, **_):
        return [float(rng.random() < 0.5) for _ in completions]

    model = models.load_model(model_dir, dtype=DTYPES[spec["dtype"]])  # the Trainer moves it to the device
    tok = models.load_tokenizer(model_dir)
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM") if spec["lora"] else None
    reward = correct if spec.get("reward") == "task" else bernoulli
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=trl_args(spec, steps, work / "trl"),
                          train_dataset=data, processing_class=tok, peft_config=peft)
    return trainer, tok, problems[order[0]].prompt


def run_trl(spec: dict, model_dir: str, steps: int, work: Path) -> dict:
    from transformers import TrainerCallback

    trainer, tok, prompt = trl_trainer(spec, model_dir, steps, work)
    marks = {"gen": 0.0, "tokens": 0, "ends": [], "gens": [], "toks": []}
    generate = trainer._generate

    def timed_generate(prompts):
        sync(spec["device"])
        t0 = time.perf_counter()
        out = generate(prompts)
        sync(spec["device"])
        marks["gen"] += time.perf_counter() - t0
        marks["tokens"] += sum(len(c) for c in out[1])
        return out

    trainer._generate = timed_generate

    class Boundaries(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if "begin" not in marks:
                sync(spec["device"])
                marks["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(spec["device"])
            marks["ends"].append(time.perf_counter())
            marks["gens"].append(marks["gen"])
            marks["toks"].append(marks["tokens"])
            marks["gen"], marks["tokens"] = 0.0, 0

    trainer.add_callback(Boundaries())
    trainer.train()
    checkpointing = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    per_step, prev = [], marks["begin"]
    for i, end in enumerate(marks["ends"]):
        wall = end - prev
        per_step.append({"s": wall, "sample_s": marks["gens"][i], "train_s": wall - marks["gens"][i],
                         "tokens": marks["toks"][i], "loss": losses[i] if i < len(losses) else None})
        prev = end
    model = trainer.model
    return {"steps": per_step, "gradient_checkpointing": checkpointing,
            **worker_tail(model, spec, len(tok(prompt).input_ids), len(tok), per_step)}


def run_losscheck(spec: dict, model_dir: str, work: Path) -> dict:
    """forkrl's and TRL's loss (and gradient norm) on forkrl's first-step batch, same model, same advantages."""
    from trl.trainer.utils import pad

    from forkrl.algos.advantages import get_advantage
    from forkrl.forward import ModelForward
    from forkrl.sampling import make_sampler, row_seeds, sampling_params
    from forkrl.trainers.grpo import policy_update
    from forkrl.types import Role

    trainer, tok, _ = trl_trainer(spec, model_dir, 1, work)
    model = trainer.model  # the same object for both (peft-wrapped under --config lora)
    cfg = forkrl_config(spec, model_dir, 1)
    first = trainer.train_dataset[: spec["prompts"]]  # step 1's problems, in train_grpo's order
    pick, prompt_ids = first["idx"], [tok(p).input_ids for p in first["prompt"]]
    seeds = row_seeds(f"grpo:{cfg.seed}:1", pick, spec["group"])
    batch = make_sampler(cfg.sampling, model, tok).sample(prompt_ids, spec["group"], sampling_params(cfg), seeds=seeds)
    comp = batch.role_NL == Role.COMPLETION
    reward_N = torch.tensor([float(int(ids[m].sum()) % 2) for ids, m in zip(batch.input_ids_NL, comp)])
    adv_N = get_advantage("grpo")(reward_N, batch.group_N, torch.ones_like(reward_N, dtype=torch.bool), eps=1e-4)
    model.train()
    tokens = int(comp.sum())
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_norm() -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        model.zero_grad(set_to_none=True)
        return norm

    sums = policy_update(ModelForward(model), batch, adv_N, None, None, cfg.grpo, temperature=1.0,
                         t_max=spec["max_new_tokens"], totals=(tokens, batch.num_rows))
    ours = {"loss": float(sums["loss"]), "grad_norm": grad_norm()}
    rows = [(ids[r == Role.PROMPT], ids[r == Role.COMPLETION]) for ids, r in zip(batch.input_ids_NL, batch.role_NL)]
    p_ids = pad([p for p, _ in rows], padding_value=tok.pad_token_id, padding_side="left")
    c_ids = pad([c for _, c in rows], padding_value=tok.pad_token_id, padding_side="right")
    p_mask = pad([torch.ones_like(p) for p, _ in rows], padding_value=0, padding_side="left")
    c_mask = pad([torch.ones_like(c) for _, c in rows], padding_value=0, padding_side="right")
    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) for k, v in (("prompt_ids", p_ids), ("prompt_mask", p_mask), ("completion_ids", c_ids),
                                        ("completion_mask", c_mask), ("advantages", adv_N),
                                        ("num_items_in_batch", c_mask.sum()))}
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this call bypasses
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    theirs = {"loss": float(loss), "grad_norm": grad_norm()}
    return {"forkrl": ours, "trl": theirs, "rows": batch.num_rows, "completion_tokens": tokens,
            "probe_reward_mean": float(reward_N.mean()), "abs_diff": abs(ours["loss"] - theirs["loss"]),
            "grad_norm_rel_diff": abs(ours["grad_norm"] - theirs["grad_norm"]) / max(theirs["grad_norm"], 1e-30)}


# ---------------------------------------------------------------- the driver
def summarize(runs: list[dict], warmup: int, peak_gflops: float, forward_tps: float, spec_rows: int) -> dict:
    steps = [s for r in runs for s in r["steps"][warmup:]]
    med = lambda k: statistics.median(s[k] for s in steps)  # noqa: E731
    first = runs[0]
    s_step, sample_s, train_s = med("s"), med("sample_s"), med("train_s")
    tokens = statistics.median(s["tokens"] for s in steps)
    sample_tps = tokens / sample_s
    other_s = statistics.median(s["s"] - s["sample_s"] - s["train_s"] for s in steps)
    # the physical floor of a step on this machine: every matmul at the measured peak, nothing else. Sampling
    # runs each row's prompt and completion tokens through the model once (2·P FLOPs per token), training
    # forward and backward (6·P); attention and the optimizer are left out, so the true floor is higher
    seq_tokens = spec_rows * first["prompt_len"] + tokens
    floor_sample, floor_train = (2 * first["params"] * seq_tokens / (peak_gflops * 1e9),
                                 6 * first["params"] * seq_tokens / (peak_gflops * 1e9))
    # the other floor: the same matmuls timed at the step's own shapes (``shape_floor``), the best worker's
    shape_sample = min(r["shape_floor"]["sample_s"] for r in runs)
    shape_train = min(r["shape_floor"]["train_s"] for r in runs)
    return {"s_per_step": s_step, "sample_s": sample_s, "train_s": train_s, "other_s": other_s,
            "floor_s": floor_sample + floor_train, "floor_sample_s": floor_sample, "floor_train_s": floor_train,
            "shape_floor_s": shape_sample + shape_train, "shape_floor_sample_s": shape_sample,
            "shape_floor_train_s": shape_train,
            "s_per_step_all": [s["s"] for s in steps], "steps_timed": len(steps),
            "tokens_per_step": tokens, "tokens_per_s": tokens / s_step, "sample_tokens_per_s": sample_tps,
            "train_tokens_per_s": tokens / train_s,
            "mfu_train": 6 * first["params"] * tokens / train_s / (peak_gflops * 1e9),
            "forward_tokens_per_s_own": statistics.median(r["forward_tokens_per_s"] for r in runs),
            "forward_tokens_per_s": forward_tps, "sampling_efficiency": sample_tps / forward_tps,
            "params": first["params"], "trainable_params": first["trainable_params"],
            "param_dtype": first["param_dtype"], "param_device": first["param_device"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            **({"peak_gpu_mb": max(r["peak_gpu_mb"] for r in runs)} if "peak_gpu_mb" in first else {}),
            "first_step_loss_logged": first["steps"][0]["loss"], "rows_per_step": spec_rows,
            "rows_no_backward": statistics.median(s.get("rows_no_backward", 0) for s in steps),
            "gradient_checkpointing": any(r.get("gradient_checkpointing", False) for r in runs)}


def spawn(mode: str, spec: dict, spec_path: Path, work: Path) -> dict:
    out = work / f"{mode}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--worker", mode, "--spec", str(spec_path), "--result", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if spec["device"] == "cpu":  # forkrl's pipeline takes a visible GPU by itself; TRL is told use_cpu
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {mode} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = time.perf_counter() - t0
    return result


def worker_main(args) -> None:
    spec = json.loads(Path(args.spec).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(dir=spec["work"]))
    fn = {"forkrl": lambda: run_forkrl(spec, spec["model_dir"], spec["steps"], work),
          "trl": lambda: run_trl(spec, spec["model_dir"], spec["steps"], work),
          "losscheck": lambda: run_losscheck(spec, spec["model_dir"], work)}[args.worker]
    if spec.get("profile"):
        import cProfile
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(fn)
        with open(Path(spec["profile"]) / f"{args.worker}.txt", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)
    else:
        result = fn()
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("default", "30m", "lora"), default="default")
    ap.add_argument("--tiny", action="store_true", help="a ~50k-parameter smoke run: 2 prompts × 2, 8 tokens")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run, after --warmup")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="alternating (forkrl, TRL) process pairs")
    ap.add_argument("--reward", choices=("random", "task"), default="random",
                    help="the timed steps' reward: random (every row has a gradient) or task (none has: all wrong)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where both libraries run (cpu: the GPU, if any, is hidden from the workers)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the model's weights and compute (auto: float32 on cpu, bfloat16 on cuda; TRL with bf16=True)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in each worker (0: torch's)")
    ap.add_argument("--contend", type=int, default=0,
                    help="N busy processes running beside both libraries for the whole run: a laptop or shared "
                         "machine whose cores are not all free")
    ap.add_argument("--contend-with", choices=tuple(BUSY), default="spin",
                    help="what each busy process runs: a Python spin loop, or small torch matmuls on torch's "
                         "threads (another training job)")
    ap.add_argument("--profile", help="write a cProfile of each worker's whole run into this directory")
    ap.add_argument("--skip-losscheck", action="store_true")
    ap.add_argument("--libs", choices=("forkrl,trl", "forkrl"), default="forkrl,trl",
                    help="forkrl alone where TRL is not installed (a GPU machine without a package registry): its "
                         "step, MFU and floors, no ratio")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", choices=("forkrl", "trl", "losscheck"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if args.steps < 1 or args.warmup < 0:
        sys.exit("--steps must be at least 1 and --warmup at least 0")
    device = args.device
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device == "cuda" else "float32"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no CUDA device; "
                 "install the CUDA build of torch that matches the driver, or run with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = SIZES["tiny" if args.tiny else ("30m" if args.config == "30m" else "default")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = {**base, "lora": args.config == "lora", "threads": args.threads, "steps": args.warmup + args.steps,
                "work": str(work), "profile": args.profile, "reward": args.reward, "device": device, "dtype": dtype}
        spec["model_dir"] = str(build_model(spec, work))
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        busy = [subprocess.Popen([sys.executable, "-c", BUSY[args.contend_with]]) for _ in range(args.contend)]
        try:
            gflops_before = matmul_gflops(device, dtype)
            runs = {lib: [] for lib in args.libs.split(",")}
            for _ in range(args.rounds):
                for lib in runs:
                    runs[lib].append(spawn(lib, spec, spec_path, work))
            losses = None if args.skip_losscheck or "trl" not in runs else spawn("losscheck", spec, spec_path, work)
            gflops_after = matmul_gflops(device, dtype)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
    peak = max([gflops_before, gflops_after] + [r["matmul_gflops"] for rs in runs.values() for r in rs])
    rows = base["prompts"] * base["group"]
    # one reference for both: the same model's batched forward, the median over every worker's measurement
    forward_tps = statistics.median(r["forward_tokens_per_s"] for rs in runs.values() for r in rs)
    results = {lib: summarize(r, args.warmup, peak, forward_tps, rows) for lib, r in runs.items()}
    results["ratio"] = results["trl"]["s_per_step"] / results["forkrl"]["s_per_step"] if "trl" in results else None
    results["first_step_losses_same_batch"] = losses
    results["setup"] = {"config": "tiny" if args.tiny else args.config, "prompts": base["prompts"],
                        "group": base["group"], "max_new_tokens": base["max_new_tokens"], "steps": args.steps,
                        "warmup": args.warmup, "rounds": args.rounds, "reward": args.reward, "lr": LR,
                        "contend": args.contend, "contend_with": args.contend_with,
                        "device": device, "dtype": dtype,
                        "model": base["size"], "lora": LORA if args.config == "lora" else None}
    results["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine(),
                          "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                          "matmul_gflops_before": gflops_before, "matmul_gflops_after": gflops_after,
                          "matmul_gflops_workers": [r["matmul_gflops"] for rs in runs.values() for r in rs],
                          "matmul_gflops_peak": peak, "loadavg": os.getloadavg()}
    try:
        import transformers
        import trl

        results["machine"]["trl"], results["machine"]["transformers"] = trl.__version__, transformers.__version__
    except ImportError:
        pass
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_table(r: dict) -> None:
    s, m = r["setup"], r["machine"]
    busy = f"; {s['contend']} busy process(es) beside it ({s.get('contend_with', 'spin')})" if s.get("contend") else ""
    print(f"GRPO step, {s['config']}: {r['forkrl']['params'] / 1e6:.2f}M params "
          f"({r['forkrl']['trainable_params'] / 1e6:.3f}M trainable), {s['prompts']}×{s['group']} rows, "
          f"{s['max_new_tokens']} new tokens, median of {r['forkrl']['steps_timed']} steps; "
          f"{s['dtype']} on {m['gpu'] or 'cpu'}; {m['torch_threads']} CPU threads, {s['dtype']} matmul "
          f"{m['matmul_gflops_peak']:.0f} GFLOP/s, {s['reward']} reward{busy}")
    cols = [("s/step", "s_per_step", ".3f"), ("sample s", "sample_s", ".3f"), ("train s", "train_s", ".3f"),
            ("other s", "other_s", ".3f"), ("tok/s", "tokens_per_s", ".0f"),
            ("sample tok/s", "sample_tokens_per_s", ".0f"), ("samp eff", "sampling_efficiency", ".3f"),
            ("train MFU", "mfu_train", ".3f"), ("RSS MB", "peak_rss_mb", ".0f"),
            ("no-bwd rows", "rows_no_backward", ".0f")]
    if "peak_gpu_mb" in r["forkrl"]:
        cols.insert(-1, ("GPU MB", "peak_gpu_mb", ".0f"))
    print(f"  {'':<8}" + "".join(f"{c:>13}" for c, _, _ in cols))
    libs = [lib for lib in ("forkrl", "trl") if lib in r]
    for lib in libs:
        print(f"  {lib:<8}" + "".join(f"{r[lib][k]:>13{f}}" for _, k, f in cols))
    f, trl = r["forkrl"], r.get("trl")
    print(f"  TRL s/step ÷ forkrl s/step = {r['ratio']:.2f}" if trl else "  TRL not run (--libs forkrl): no ratio")
    print(f"  floor at the matmul peak (2·P·tokens sampling + 6·P·tokens training, no attention or optimizer): "
          f"{f['floor_s']:.3f} s/step ({f['floor_sample_s']:.3f} + {f['floor_train_s']:.3f})"
          + (f"; TRL's step ÷ floor = {trl['s_per_step'] / f['floor_s']:.2f}" if trl else ""))
    print(f"  floor at the step's own shapes (its matmuls alone, timed: {s['prompts'] * s['group']}-row decode steps, "
          f"unpadded training tokens): {f['shape_floor_s']:.3f} s/step ({f['shape_floor_sample_s']:.3f} + "
          f"{f['shape_floor_train_s']:.3f})" + (f"; half of TRL's step: {trl['s_per_step'] / 2:.3f}" if trl else ""))
    lc = r["first_step_losses_same_batch"]
    if lc:
        print(f"  first-step loss on the same batch (probe reward): forkrl {lc['forkrl']['loss']:.8g} "
              f"(grad norm {lc['forkrl']['grad_norm']:.8g}), TRL {lc['trl']['loss']:.8g} "
              f"(grad norm {lc['trl']['grad_norm']:.8g}); |Δ loss| {lc['abs_diff']:.2e}, "
              f"grad norm rel. diff {lc['grad_norm_rel_diff']:.2e}")
    print(f"  first-step loss as logged ({s['reward']} reward, each library's own samples): "
          + ", ".join(f"{lib} {r[lib]['first_step_loss_logged']}" for lib in libs))


if __name__ == "__main__":
    main()
