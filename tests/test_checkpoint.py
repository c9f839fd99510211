"""Checkpoints: atomic (a half-written save is never picked up), verified by checksums, pruned safely."""

import pytest
import torch

from forkrl import checkpoint
from forkrl.models import load_model
from forkrl.trainers.optim import make_optimizer
from forkrl.config import OptimCfg


@pytest.fixture()
def parts(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    opt, sched = make_optimizer(model.parameters(), OptimCfg(lr=1e-3), 10)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    return model, opt, sched


def test_save_verify_load_and_prune(tmp_path, parts):
    model, opt, sched = parts
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        checkpoint.save(root, step, model, opt, sched, {"cursor": step}, keep_last=2)
    assert [p.name for p in checkpoint.intact(root)] == ["step-000002", "step-000003"]
    opt2, sched2 = make_optimizer(model.parameters(), OptimCfg(lr=1e-3), 10)
    state = checkpoint.load_trainer_state(root / "step-000003", opt2, sched2)
    assert state == {"step": 3, "cursor": 3}
    a, b = opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(a, b)


def test_damaged_or_interrupted_checkpoints_are_skipped(tmp_path, parts):
    model, opt, sched = parts
    root = tmp_path / "ckpt"
    checkpoint.save(root, 1, model, opt, sched, {}, keep_last=5)
    checkpoint.save(root, 2, model, opt, sched, {}, keep_last=5)
    weights = next((root / "step-000002" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # flipped bytes
    (root / ".step-000003.tmp-999").mkdir()  # a save killed before its rename
    with pytest.raises(checkpoint.CheckpointError, match="step-000002.*checksum"):
        checkpoint.verify(root / "step-000002")
    assert checkpoint.latest(root).name == "step-000001"
    # pruning counts intact checkpoints only, so the damaged one never displaces the good one
    checkpoint._prune(root, 1)
    assert (root / "step-000001").exists()


@pytest.mark.parametrize("where", ["model", "trainer_state"])
def test_disk_full_mid_save_keeps_the_previous_checkpoint(tmp_path, parts, monkeypatch, where):
    import errno

    model, opt, sched = parts
    root = tmp_path / "ckpt"
    checkpoint.save(root, 1, model, opt, sched, {}, keep_last=1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "model":
        monkeypatch.setattr(type(model), "save_pretrained", full)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"step 2.*No space left.*step-000001"):
        checkpoint.save(root, 2, model, opt, sched, {}, keep_last=1)
    assert [p.name for p in root.iterdir()] == ["step-000001"]  # no half-written directory left behind
    checkpoint.verify(root / "step-000001")
    assert checkpoint.latest(root).name == "step-000001"
