"""The self-critique loop: its accept / give-up rule on hand cases, the check's probabilities against one unpadded
forward per row, and `forkrl eval --self-critique` reporting its pass@1 beside plain sampling's."""

import json
import random
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.critique import Verdict, critique_loop, pass_probabilities, run_checks

from conftest import tiny_cfg_dict

RULE = dict(accept_after=5, give_up_after=10)


def test_the_rule_on_hand_cases():
    always, never = (lambda c: 1.0), (lambda c: 0.0)
    assert critique_loop(always, **RULE, max_candidates=32, seed=0) == Verdict(0, True, 1, 5)
    assert critique_loop(never, **RULE, max_candidates=32, seed=0) == Verdict(9, False, 10, 10)  # 10 failures
    assert critique_loop(lambda c: [0.0, 0.0, 1.0][c], **RULE, max_candidates=32, seed=0) == Verdict(2, True, 3, 7)
    assert critique_loop(never, **RULE, max_candidates=3, seed=0) == Verdict(2, False, 3, 3)  # the bound
    # a passing check resets the failure count: 4 passes then a failure is 1 failure in a row, not 5
    rng = random.Random(0)
    assert run_checks(1.0, rng, accept_after=5, failures=9) == (True, 0, 5)
    assert run_checks(0.0, rng, accept_after=5, failures=9) == (False, 10, 1)


def test_acceptance_follows_the_check_probability():
    # a first candidate is accepted with probability q^5; over many seeds the share is near it
    q, n = 0.9, 4000
    first = sum(critique_loop(lambda c: q, **RULE, max_candidates=1, seed=s).accepted for s in range(n)) / n
    assert first == pytest.approx(q ** 5, abs=4 * (q ** 5 * (1 - q ** 5) / n) ** 0.5)


def test_check_probabilities_equal_an_unpadded_forward(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double().eval()
    rows = [tok("12+34=", add_special_tokens=False).input_ids + tok(" ans 46", add_special_tokens=False).input_ids,
            tok("7+5=", add_special_tokens=False).input_ids]
    check = tok(" ok?", add_special_tokens=False).input_ids
    yes, no = tok(" 1", add_special_tokens=False).input_ids[0], tok(" 2", add_special_tokens=False).input_ids[0]
    got = pass_probabilities(model, rows, check, yes, no)
    for r, q in zip(rows, got):
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([r + check])).logits[0, -1], -1)
        assert q == pytest.approx(float(p[yes] / (p[yes] + p[no])), rel=1e-9)


def test_eval_reports_self_critique_beside_plain_sampling(tmp_path, tiny_model_dir):
    path = tmp_path / "c.yaml"
    data = tiny_cfg_dict(**{"model": {"path": str(tiny_model_dir)},
                            "eval.self_critique": {"accept_after": 2, "give_up_after": 3, "max_candidates": 4}})
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "eval", str(tiny_model_dir), "--task", str(path),
                           "--n", "2", "--num-problems", "6", "--self-critique", "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    s = result["self_critique"]
    assert s["plain_pass_at_1"]["mean"] == pytest.approx(result["pass_at_k"]["1"]["mean"])
    assert s["accepted_frac"] + s["given_up_frac"] == pytest.approx(1.0)
    assert 1 <= s["candidates_mean"] <= 4 and s["checks_mean"] >= 1
    assert s["difference"]["mean"] == pytest.approx(s["pass_at_1"]["mean"] - s["plain_pass_at_1"]["mean"])
    assert "self-critique pass@1" in proc.stdout


def test_generate_answers_through_the_loop(tmp_path, tiny_model_dir):
    proc = subprocess.run([sys.executable, "-m", "forkrl.cli", "generate", str(tiny_model_dir), "--prompt", "12+34=",
                           "--prompt", "7+5=", "--self-critique", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert all(isinstance(r["accepted"], bool) and 1 <= r["candidates"] <= 32 and r["checks"] >= 1 for r in rows)
