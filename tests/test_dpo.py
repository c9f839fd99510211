"""The DPO stage: the judge's pick of each pair, a step's gradient independent of its micro-batches, online DPO
(OAIF) with a fake judge and offline DPO on a preference file end to end, and a bad pairs file named by line."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.config import parse_config
from forkrl.pipeline import run
from forkrl.tasks.arithmetic import ArithmeticTask
from forkrl.trainers.accumulate import accumulate, parts
from forkrl.trainers.dpo import DpoLoss, Pairs, pick_pairs, sequence_logprobs
from forkrl.forward import ModelForward
from forkrl.trainers.sft import pack

from conftest import tiny_cfg_dict

SHORTER = "def shorter(completion):\n    return -float(len(completion))\n"  # the fake judge: prefers the shorter


def test_the_higher_reward_is_chosen_and_ties_or_failures_give_no_pair():
    group_N = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    reward_N = torch.tensor([0.2, 0.9, 1.0, 0.0, 0.5, 0.5, 1.0, float("nan")])
    valid_N = torch.tensor([True, True, True, True, True, True, True, False])
    chosen, rejected, ties, unscorable, gaps = pick_pairs(group_N, reward_N, valid_N)
    assert (chosen, rejected, ties, unscorable) == ([1, 2], [0, 3], 1, 1)
    assert gaps == pytest.approx([0.7, 1.0])


def test_a_steps_gradient_does_not_depend_on_its_micro_batches(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    demos = ArithmeticTask(digits=2, train_size=20, heldout_size=2).demonstrations("train")[:6]
    enc = lambda t: tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]  # noqa: E731
    chosen = [(tok(p.prompt, add_special_tokens=False).input_ids, enc(c)) for p, c in demos]
    rejected = [(p, enc(" ans 1" * (1 + i % 3))) for i, (p, _) in enumerate(chosen)]  # uneven lengths
    batch = pack(chosen + rejected, tok.pad_token_id)
    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    with torch.no_grad():
        for p in frozen.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    ref_N = sequence_logprobs(frozen, batch, micro_batch_size=4, adapter_off=False)
    grads = []
    for size in (6, 1, 4):
        model.zero_grad(set_to_none=True)
        loss = DpoLoss(ModelForward(model), Pairs(batch, ref_N), beta=0.3)
        accumulate(parts(torch.arange(6), size), loss, (0, 6))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[1], grads[0], rtol=1e-10, atol=1e-14)
    assert torch.allclose(grads[2], grads[0], rtol=1e-10, atol=1e-14)
    # two ranks of three pairs each, the step's six as the denominator: their gradients sum to one process's
    halves = []
    for rank in (0, 1):
        idx = torch.tensor([0, 1, 2]) + 3 * rank
        shard = batch.select(torch.cat([idx, idx + 6]))
        model.zero_grad(set_to_none=True)
        accumulate(parts(torch.arange(3), 2), DpoLoss(ModelForward(model), Pairs(shard, ref_N[torch.cat([idx, idx + 6])]),
                                                      beta=0.3), (0, 6))
        halves.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(halves[0] + halves[1], grads[0], rtol=1e-10, atol=1e-14)


def test_online_dpo_with_a_fake_judge_trains_toward_its_preference(tmp_path):
    (tmp_path / "judge.py").write_text(SHORTER)
    data = tiny_cfg_dict(**{"stages": ["sft", "dpo"], "sft.steps": 20, "sampling.max_new_tokens": 16,
                            "dpo": {"steps": 6, "pairs_per_step": 8, "micro_batch_size": 4, "beta": 0.5,
                                    "rewards": [{"fn": f"{tmp_path / 'judge.py'}:shorter"}],
                                    "optim": {"lr": 3e-3}}})
    summary = run(parse_config(data), tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in rows if r["stage"] == "dpo"]
    assert len(dpo) == 6 and summary["stages"]["dpo"]["steps"] == 6
    assert all(r["pairs"] > 0 and 0 <= r["pairs_kept_frac"] <= 1 for r in dpo)
    assert all(r["reward_gap_mean"] > 0 for r in dpo)  # a pair is made of two samples the judge told apart
    # the policy moves toward the judge's pick: the pairs' margin grows over the stage
    assert dpo[-1]["margin"] > dpo[0]["margin"]
    assert (tmp_path / "r" / "dpo" / "final" / "DONE").exists()


def write_pairs(path, n=40):
    task = ArithmeticTask(digits=2, train_size=n, heldout_size=2)
    with open(path, "w") as f:
        for p, c in task.demonstrations("train"):
            f.write(json.dumps({"prompt": p.prompt, "chosen": c, "rejected": c.replace("ans", "ans 1")}) + "\n")


def test_offline_dpo_on_a_preference_file_raises_the_margin(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl")
    data = tiny_cfg_dict(**{"stages": ["dpo"], "dpo": {"data": "offline", "pairs_path": "pairs.jsonl", "steps": 5,
                                                         "pairs_per_step": 8, "micro_batch_size": 4,
                                                         "optim": {"lr": 3e-3}}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "train", str(path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=600, cwd="/")  # the path is the config's, not cwd's
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in rows] == [8] * 5
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert rows[-1]["margin"] > 0.1 and rows[-1]["preference_accuracy"] > 0.5
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "1+1=", "chosen": "ans 2"}', "pairs.jsonl:2: field 'rejected' is missing"),
    ("not json", "pairs.jsonl:2: invalid JSON"),
])
def test_a_bad_pairs_file_is_named_by_line(tmp_path, line, needle):
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "1+1=", "chosen": "ans 2", "rejected": "ans 3"}\n' + line + "\n")
    data = tiny_cfg_dict(**{"stages": ["dpo"], "dpo": {"data": "offline", "pairs_path": "pairs.jsonl", "steps": 1,
                                                         "pairs_per_step": 2, "micro_batch_size": 2}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    for cmd in (["train", str(path), "--out", str(tmp_path / "r")], ["validate", str(path)]):
        proc = subprocess.run([sys.executable, "-m", "forkrl.cli", *cmd], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_offline_without_a_file_is_a_config_error():
    with pytest.raises(Exception, match="dpo.data: offline reads its pairs from dpo.pairs_path"):
        parse_config(tiny_cfg_dict(**{"stages": ["dpo"], "dpo": {"data": "offline"}}))
