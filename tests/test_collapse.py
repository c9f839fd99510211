"""RAGEN-2's MI estimate: a hand case, a float64 loop, constructed extremes (input-agnostic ≈ 0, perfectly
input-specific = log N), and the cross-scores against one forward per pair."""

import math

import pytest
import torch

from forkrl.diagnostics.collapse import collapse_metrics, cross_scores, mutual_information

F64 = torch.float64


def test_hand_case():
    mi, acc = mutual_information(torch.tensor([[0.0, math.log(1 / 3)]], dtype=F64), torch.tensor([0]))
    assert mi.item() == pytest.approx(math.log(3 / 2), rel=1e-12) and acc.item() == 1.0


def test_float64_loop():
    gen = torch.Generator().manual_seed(0)
    score = torch.randn(13, 5, generator=gen, dtype=F64) * 3
    true = torch.randint(0, 5, (13,), generator=gen)
    terms, hits = [], 0
    for m in range(13):
        marginal = math.log(sum(math.exp(score[m, j].item()) for j in range(5)) / 5)
        terms.append(score[m, true[m]].item() - marginal)
        hits += max(range(5), key=lambda j: score[m, j].item()) == true[m].item()
    mi, acc = mutual_information(score, true)
    assert mi.item() == pytest.approx(sum(terms) / 13, rel=1e-12) and acc.item() == hits / 13


def test_constructed_extremes():
    true = torch.arange(6).repeat_interleave(3)  # 6 prompts, 3 reasonings each
    agnostic = torch.randn(18, 1, dtype=F64).expand(18, 6)  # a reasoning's likelihood does not depend on the prompt
    mi, acc = mutual_information(agnostic, true)
    assert abs(mi.item()) < 1e-12 and acc.item() <= 1 / 6 + 1e-12  # argmax ties go to prompt 0: only its rows hit
    specific = torch.full((18, 6), -1e4, dtype=F64).scatter_(1, true[:, None], 0.0)  # only the true prompt explains z
    mi, acc = mutual_information(specific, true)
    assert mi.item() == pytest.approx(math.log(6), rel=1e-9) and acc.item() == 1.0


def test_cross_scores_equal_one_forward_per_pair(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    reasonings = [[20, 21], [22, 23, 24, 25], [26]]
    total, mean = cross_scores(model, prompts, reasonings, pad_id=0, micro_batch_size=4)
    for m, z in enumerate(reasonings):
        for j, x in enumerate(prompts):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([x + z])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            want = sum(lp[len(x) - 1 + t, tok].item() for t, tok in enumerate(z))
            assert total[m, j].item() == pytest.approx(want, abs=1e-4)
            assert mean[m, j].item() == pytest.approx(want / len(z), abs=1e-4)
    out = collapse_metrics(model, prompts, reasonings, [0, 1, 2], pad_id=0)
    assert 0 <= out["mi_retrieval_acc"] <= 1 and out["mi_retrieval_chance"] == 1 / 3
    assert out["mi_seq"] <= math.log(3) + 1e-9 and out["mi_upper_bound"] == pytest.approx(math.log(3))
    assert collapse_metrics(model, prompts[:1], reasonings, [0, 0, 0], pad_id=0) is None


def test_grpo_logs_the_estimate_every_k_steps_and_the_report_draws_it(tmp_path):
    import json

    from forkrl.config import parse_config
    from forkrl.pipeline import run
    from forkrl.report import build_report

    from conftest import tiny_cfg_dict

    run(parse_config(tiny_cfg_dict(**{"grpo.steps": 2, "grpo.mi_every": 2})), tmp_path / "r")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "mi_token" not in rows[0] and rows[1]["mi_retrieval_chance"] == 1 / 4
    assert -1e-6 <= rows[1]["mi_seq"] <= math.log(4) and 0 <= rows[1]["mi_retrieval_acc"] <= 1
    html = build_report(tmp_path / "r")
    assert "Input–reasoning MI (template collapse)" in html and "In-group reward std" in html
