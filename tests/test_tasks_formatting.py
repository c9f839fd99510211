"""format_prompt: plain templates and chat templates on a tokenizer built in the test (no hub)."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from forkrl.tasks.formatting import format_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tokenizer():
    vocab = {"[UNK]": 0, "[PAD]": 1, "what": 2, "is": 3, "2+2": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_plain_default_is_the_prompt(tokenizer):
    assert format_prompt("what is 2+2", tokenizer, style="plain") == "what is 2+2"


def test_plain_template_and_system_prompt():
    out = format_prompt("2+2", None, style="plain", template="Q: {prompt}\nA:", system_prompt="Be brief.")
    assert out == "Be brief.\n\nQ: 2+2\nA:"


def test_plain_template_without_placeholder_is_rejected():
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        format_prompt("2+2", None, style="plain", template="Question:")


def test_plain_template_with_other_placeholder_is_rejected():
    with pytest.raises(ValueError, match="question"):
        format_prompt("2+2", None, style="plain", template="{question} {prompt}")
    # escaped braces are literal text, not placeholders
    assert format_prompt("x", None, style="plain", template="{{json}} {prompt}") == "{json} x"


def test_chat_applies_template_with_generation_prompt(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    out = format_prompt("what is 2+2", tokenizer, style="chat")
    assert out == "<|user|>what is 2+2<|end|><|assistant|>"


def test_chat_with_system_prompt_and_template(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    out = format_prompt("2+2", tokenizer, style="chat", template="Solve: {prompt}", system_prompt="Use tags.")
    assert out == "<|system|>Use tags.<|end|><|user|>Solve: 2+2<|end|><|assistant|>"


def test_chat_without_chat_template_says_what_to_do(tokenizer):
    assert not tokenizer.chat_template
    with pytest.raises(ValueError) as e:
        format_prompt("2+2", tokenizer, style="chat")
    assert "no chat template" in str(e.value) and "task.format.style: plain" in str(e.value)


def test_chat_template_rejecting_system_role(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ValueError, match="rejects a system message"):
        format_prompt("2+2", tokenizer, style="chat", system_prompt="sys")


def test_unknown_style():
    with pytest.raises(ValueError, match="plain, chat"):
        format_prompt("2+2", None, style="markdown")
