"""Shared fixtures. Tests run offline: nothing may reach a model hub, and built models go to a temp cache."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("FORKRL_CACHE", tempfile.mkdtemp(prefix="forkrl-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def tiny_cfg_dict(**over):
    """A small, fast run config on the arithmetic task with the built-in tiny model."""
    cfg = {
        "seed": 0,
        "stages": ["grpo"],
        "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                           "intermediate_size": 64, "max_positions": 128}},
        "task": {"type": "arithmetic", "digits": 2, "train_size": 200, "heldout_size": 20},
        "sampling": {"max_new_tokens": 12},
        "sft": {"steps": 3, "batch_size": 8, "micro_batch_size": 4},
        "grpo": {"steps": 2, "prompts_per_step": 4, "group_size": 4, "micro_batch_size": 8},
        "eval": {"num_problems": 8, "samples_per_problem": 2},
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Qwen2 model + BPE tokenizer trained on arithmetic text, saved with save_pretrained."""
    from forkrl import models
    from forkrl.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(digits=2, train_size=200, heldout_size=20)
    texts = [p.prompt + c for p, c in task.demonstrations("train")]
    out = tmp_path_factory.mktemp("tiny") / "model"
    return models.build_tiny(out, texts, arch="qwen2", vocab_size=300, seed=0, hidden_size=32, num_layers=2,
                             num_heads=2, num_kv_heads=1, intermediate_size=64, max_positions=128)


@pytest.fixture(params=["kernels", "torch"])
def kernel_path(request, monkeypatch):
    """Runs a test with the fused C kernels (``cpu/kernels.py``) and again with the torch operations they
    replace; the kernels' run is skipped, with the reason, where they cannot be built."""
    from forkrl.cpu import kernels

    if request.param == "kernels" and kernels.get() is None:
        pytest.skip(f"fused kernels unavailable: {kernels.why}")
    monkeypatch.setattr(kernels, "enabled", request.param == "kernels")
    return request.param
