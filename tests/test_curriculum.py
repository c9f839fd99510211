"""The reverse-perplexity curriculum (sft.order): perplexities against a hand loop over the model's logits, the
order and its ablations, the ranks' shares, and an SFT stage that takes its examples highest-perplexity first,
caches the starting model's perplexities and resumes to the same run."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from forkrl.config import parse_config
from forkrl.pipeline import run
from forkrl.tasks.arithmetic import ArithmeticTask
from forkrl.trainers import curriculum
from forkrl.trainers.sft import pack

from conftest import tiny_cfg_dict


def examples_of(tok, n=12):
    demos = ArithmeticTask(digits=2, train_size=50, heldout_size=5).demonstrations("train")[:n]
    return [(tok(p.prompt, add_special_tokens=False).input_ids, tok(c, add_special_tokens=False).input_ids
             + [tok.eos_token_id]) for p, c in demos]


def test_perplexities_equal_a_hand_loop_and_order_them(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double()
    examples = examples_of(tok)
    # vary the completions' difficulty: a few with a wrong answer appended, which the model finds unlikely
    examples = [(p, c[:-1] + tok(" 7 9 3", add_special_tokens=False).input_ids + c[-1:]) if i % 4 == 1 else (p, c)
                for i, (p, c) in enumerate(examples)]
    batch_of = lambda idx: pack([examples[i] for i in idx], tok.pad_token_id)  # noqa: E731
    got = curriculum.example_perplexities(model, batch_of, len(examples), micro_batch_size=5)
    want = []
    for p, c in examples:  # one unpadded row at a time: mean −log p of each completion token, exponentiated
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        nll = [-float(logp[len(p) + j - 1, c[j]]) for j in range(len(c))]
        want.append(math.exp(sum(nll) / len(nll)))
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    desc = curriculum.curriculum_order(want, "perplexity_desc")
    assert [want[i] for i in desc] == sorted(want, reverse=True)
    assert curriculum.curriculum_order(want, "perplexity_asc") == desc[::-1]  # no ties here
    # two ranks, every other example each: their vectors sum to one process's
    parts = [curriculum.example_perplexities(model, batch_of, len(examples), micro_batch_size=5, rank=r, world_size=2)
             for r in (0, 1)]
    assert (parts[0] + parts[1]).tolist() == pytest.approx(got.tolist(), rel=1e-12)


def test_order_hand_cases():
    assert curriculum.curriculum_order([2.0, 5.0, 2.0, 9.0], "perplexity_desc") == [3, 1, 0, 2]  # ties: own order
    assert curriculum.curriculum_order([2.0, 5.0, 2.0, 9.0], "perplexity_asc") == [0, 2, 1, 3]
    order = [3, 1, 0, 2]
    assert [curriculum.ordered_indices(order, 3, s) for s in range(3)] == [[3, 1, 0], [2, 3, 1], [0, 2, 3]]


def test_sft_takes_the_curriculum_caches_it_and_resumes_exactly(tmp_path, monkeypatch):
    data = tiny_cfg_dict(**{"stages": ["sft"], "sft": {"steps": 4, "batch_size": 8, "micro_batch_size": 4,
                                                        "order": "perplexity_desc"},
                            "task.train_size": 40, "checkpoint": {"every": 1, "keep_last": 2}})
    cfg = parse_config(data)
    whole = run(cfg, tmp_path / "whole")
    rows = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    ppl = json.loads((tmp_path / "whole" / "sft" / "perplexity.json").read_text())["perplexity"]
    assert len(ppl) == 40
    top = sorted(ppl, reverse=True)
    want = [sum(top[8 * s : 8 * s + 8]) / 8 for s in range(4)]  # step s takes the s-th eight, highest first
    assert [r["batch_start_ppl"] for r in rows] == pytest.approx(want, rel=1e-12)
    assert whole["stages"]["sft"]["order"] == "perplexity_desc"
    assert whole["stages"]["sft"]["start_ppl"]["ppl_max"] == pytest.approx(top[0])

    import forkrl.trainers.loop as loop

    real = loop.maybe_checkpoint

    def crash(ctx, step, *args, **kw):
        real(ctx, step, *args, **kw)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "maybe_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "killed")
    monkeypatch.setattr(loop, "maybe_checkpoint", real)

    def no_rescoring(*a, **k):
        raise AssertionError("a resumed stage must read the starting model's perplexities back, not score again")

    monkeypatch.setattr(curriculum, "example_perplexities", no_rescoring)
    run(cfg, tmp_path / "killed", resume=True)
    again = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    drop = ("time", "train_s", "train_tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.parametrize("order", ["shuffle", "perplexity_asc"])
def test_the_ablations_train(tmp_path, order):
    data = tiny_cfg_dict(**{"stages": ["sft"], "sft": {"steps": 2, "batch_size": 8, "micro_batch_size": 8,
                                                        "order": order}, "task.train_size": 24})
    run(parse_config(data), tmp_path / "r")
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    if order == "shuffle":
        assert all(r["batch_start_ppl"] is None for r in rows) and not (tmp_path / "r" / "sft" / "perplexity.json").exists()
    else:
        assert rows[0]["batch_start_ppl"] <= rows[1]["batch_start_ppl"]
