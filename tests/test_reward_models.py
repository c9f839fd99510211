"""A sequence-classification model as a reward (``rewards.models``), on tiny classifiers built here: its scores
are the model's own forward of each row alone (batching, padding, row order do not change a score), the label
asked for is the one read, bad directories are config errors, and nothing is loaded before the first call."""

import shutil

import pytest
import torch

from forkrl.config import RewardCfg
from forkrl.rewards import RewardError, load
from forkrl.rewards.models import RewardModelCfg, build_reward_model

TEXTS = [f"{a}+{b}={a + b}" for a in range(10, 40, 3) for b in range(5, 30, 7)]
PROMPTS = ["12+3=", "45+67=", "1+1=", "99+99=", "3+4=", "10+20="]
COMPLETIONS = ["15", " 112 and then some more digits 1234567890", "", "198" * 8, "7", "30 "]


def _classifier(out, num_labels: int, *, id2label=None, seed: int = 0, chat_template: str | None = None):
    """A tiny Qwen2 sequence classifier and its BPE tokenizer, saved with save_pretrained; no pad_token_id in the
    model's config, so the reward must set it."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from forkrl.models import build_tokenizer

    tok = build_tokenizer(TEXTS, vocab_size=300)
    if chat_template:
        tok.chat_template = chat_template
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         num_labels=num_labels, pad_token_id=None, eos_token_id=tok.eos_token_id)
    if id2label:
        config.id2label, config.label2id = id2label, {v: k for k, v in id2label.items()}
    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    return _classifier(tmp_path_factory.mktemp("rm") / "three", 3, id2label={0: "bad", 1: "ok", 2: "good"})


@pytest.fixture(scope="module")
def one_logit(tmp_path_factory):
    return _classifier(tmp_path_factory.mktemp("rm") / "one", 1, seed=1)


def _direct(path, texts, *, keep_last=None):
    """Each text's logits from the model alone: one row, no padding, no attention mask."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    for t in texts:
        ids = tok(t).input_ids
        ids = ids[-keep_last:] if keep_last else ids
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([ids])).logits[0])
    return torch.stack(out)


def test_scores_equal_a_direct_forward_row_by_row(three_labels):
    """Very uneven lengths (1 to ~30 tokens) right-padded in batches of 4: each row's probability of the last
    label equals the softmax of its own unpadded forward."""
    rm = build_reward_model(RewardModelCfg(path=str(three_labels), batch_size=4), device=None, where="t")
    got = torch.tensor(rm(prompts=PROMPTS[:2] + PROMPTS[3:], completions=COMPLETIONS[:2] + COMPLETIONS[3:]))
    texts = [p + c for p, c in zip(PROMPTS[:2] + PROMPTS[3:], COMPLETIONS[:2] + COMPLETIONS[3:])]
    expected = torch.softmax(_direct(three_labels, texts), dim=-1)[:, 2]
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert got.std() > 0  # the rows really differ: a constant would pass the comparison above only by accident


def test_batching_padding_and_order_do_not_change_a_score(three_labels):
    prompts, completions = PROMPTS * 2, COMPLETIONS + COMPLETIONS[::-1]
    ones = build_reward_model(RewardModelCfg(path=str(three_labels), batch_size=1), device=None, where="t")
    many = build_reward_model(RewardModelCfg(path=str(three_labels), batch_size=5), device=None, where="t")
    a = torch.tensor(ones(prompts=prompts, completions=completions))
    b = torch.tensor(many(prompts=prompts, completions=completions))
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    c = torch.tensor(many(prompts=[prompts[i] for i in perm], completions=[completions[i] for i in perm]))
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert torch.allclose(c, a[perm], atol=1e-6, rtol=0)


@pytest.mark.parametrize("label, column", [(None, 2), ("ok", 1), (0, 0), ("good", 2)])
def test_the_label_asked_for_is_read(three_labels, label, column):
    rm = build_reward_model(RewardModelCfg(path=str(three_labels), label=label), device=None, where="t")
    expected = torch.softmax(_direct(three_labels, [p + c for p, c in zip(PROMPTS, COMPLETIONS)]), -1)[:, column]
    assert torch.allclose(torch.tensor(rm(prompts=PROMPTS, completions=COMPLETIONS)), expected, atol=1e-6, rtol=0)


def test_one_output_is_its_logit_or_its_sigmoid(one_logit):
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    logit = _direct(one_logit, texts)[:, 0]
    raw = build_reward_model(RewardModelCfg(path=str(one_logit), batch_size=4), device=None, where="t")
    squashed = build_reward_model(RewardModelCfg(path=str(one_logit), transform="sigmoid"), device=None, where="t")
    assert torch.allclose(torch.tensor(raw(prompts=PROMPTS, completions=COMPLETIONS)), logit, atol=1e-5, rtol=0)
    assert torch.allclose(torch.tensor(squashed(prompts=PROMPTS, completions=COMPLETIONS)), torch.sigmoid(logit),
                          atol=1e-6, rtol=0)


def test_max_length_keeps_the_end_of_each_row(three_labels):
    rm = build_reward_model(RewardModelCfg(path=str(three_labels), max_length=5, batch_size=3), device=None,
                            where="t")
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = torch.softmax(_direct(three_labels, texts, keep_last=5), -1)[:, 2]
    assert torch.allclose(torch.tensor(rm(prompts=PROMPTS, completions=COMPLETIONS)), expected, atol=1e-6, rtol=0)


def test_template_and_chat_template_make_the_scored_text(tmp_path, three_labels):
    sep = build_reward_model(RewardModelCfg(path=str(three_labels), template="{prompt} => {completion}"),
                             device=None, where="t")
    expected = torch.softmax(_direct(three_labels, ["12+3= => 15"]), -1)[:, 2]
    assert sep(prompts=["12+3="], completions=["15"])[0] == pytest.approx(expected.item(), abs=1e-6)

    chat_dir = _classifier(tmp_path / "chat", 3, chat_template="{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                                                "{% endfor %}")
    chat = build_reward_model(RewardModelCfg(path=str(chat_dir), chat=True), device=None, where="t")
    expected = torch.softmax(_direct(chat_dir, ["[user]12+3=[assistant]15"]), -1)[:, 2]
    assert chat(prompts=["12+3="], completions=["15"])[0] == pytest.approx(expected.item(), abs=1e-6)


def test_weights_load_on_the_first_call_only(tmp_path, three_labels):
    """Building needs no weights at all (a directory without them builds); the first call loads them."""
    bare = tmp_path / "bare"
    shutil.copytree(three_labels, bare)
    (bare / "model.safetensors").unlink()
    rm = build_reward_model(RewardModelCfg(path=str(bare)), device=None, where="grpo.rewards[0]")
    assert rm.model is None
    with pytest.raises(Exception):
        rm(prompts=["1+1="], completions=["2"])
    ok = build_reward_model(RewardModelCfg(path=str(three_labels)), device=None, where="t")
    assert ok.model is None
    ok(prompts=["1+1="], completions=["2"])
    assert ok.model is not None


def test_bad_directories_and_labels_are_config_errors(tmp_path, three_labels, one_logit, tiny_model_dir):
    def refused(match, **kw):
        with pytest.raises(RewardError, match=match):
            build_reward_model(RewardModelCfg(**kw), device=None, where="grpo.rewards[2]")

    refused(r"grpo.rewards\[2\].*does-not-exist.*is not a directory", path=str(tmp_path / "does-not-exist"))
    (tmp_path / "empty").mkdir()
    refused("has no config.json", path=str(tmp_path / "empty"))
    refused("Qwen2ForCausalLM, not a \\*ForSequenceClassification", path=str(tiny_model_dir))
    refused("label 3 is out of range: the model has 3 outputs", path=str(three_labels), label=3)
    refused("'great' is not one of the model's labels \\(bad, ok, good\\)", path=str(three_labels), label="great")
    refused("transform 'sigmoid' is for a one-output model", path=str(three_labels), transform="sigmoid")
    refused("one output", path=str(one_logit), label=1)
    refused("no chat template", path=str(three_labels), chat=True)
    refused(r"unknown fields \['answer'\]", path=str(three_labels), template="{prompt}{answer}")
    with pytest.raises(ValueError, match="extra"):
        RewardModelCfg(path="x", lables=1)


def test_loaded_through_the_reward_api_as_a_batch_reward(three_labels):
    from forkrl.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(digits=2, train_size=20, heldout_size=5)
    (reward,) = load([RewardCfg(reward_model={"path": str(three_labels)}, label="rm")], task,
                     where="grpo.rewards", timeout_s=None)
    assert (reward.label, reward.mode) == ("rm", "batch")
    assert set(reward.wants) == {"prompts", "completions"}
    with pytest.raises(RewardError, match=r"grpo.rewards\[0\]: reward_model path"):
        load([RewardCfg(reward_model={"path": "/nonexistent/rm"})], task, where="grpo.rewards", timeout_s=None)
