"""Turning a problem's question into the exact text the model is prompted with.

Two styles, because the two kinds of model need different things:

* ``chat``: instruct models were trained on their own chat template; prompted without it (no role
  markers, no generation prompt) they see text unlike anything they were tuned on. The tokenizer's
  template is applied with ``add_generation_prompt=True`` so the text ends where the reply begins.
* ``plain``: base models and forkrl's built-in tiny models have no chat template and were trained on raw
  text, so the text is just ``template`` (default ``"{prompt}"``) filled with the question. A system
  prompt, if given, goes first, followed by a blank line, because a plain model has no other place for
  it (that is how reasoning-gym's ``<answer>`` convention reaches such a model).
"""

from __future__ import annotations

import string
from typing import Any, Literal

from .base import TaskConfig, TaskError

Style = Literal["plain", "chat"]


class FormatCfg(TaskConfig):
    """``task.format``: how a problem's question becomes the prompt text (the module docstring)."""

    style: Style = "plain"  # real instruct models need "chat"
    template: str = "{prompt}"
    system_prompt: str | None = None


def _template_fields(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise TaskError(f"task.format.template={template!r} is not a valid format string ({e}). "
                         f"Write literal braces as '{{{{' and '}}}}'.") from e


def _fill(problem_prompt: str, template: str) -> str:
    fields = _template_fields(template)
    if "prompt" not in fields:
        raise TaskError(f"task.format.template={template!r} has no '{{prompt}}' placeholder, so the question "
                         f"would be dropped. Include '{{prompt}}' where the question goes.")
    if fields - {"prompt"}:
        raise TaskError(f"task.format.template={template!r} has placeholders other than '{{prompt}}': "
                         f"{', '.join(sorted(fields - {'prompt'}))}. Write literal braces as '{{{{' and '}}}}'.")
    return template.format(prompt=problem_prompt)


def _chat(problem_prompt: str, tokenizer: Any, system_prompt: str | None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TaskError(f"the tokenizer {name!r} has no chat template, so task.format.style: chat cannot be "
                         f"applied. Set task.format.style: plain (base and built-in tiny models), or use an "
                         f"instruct model's tokenizer.")
    messages = [{"role": "user", "content": problem_prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2 raises TemplateError from inside the template, e.g. "System role not supported"
        if system_prompt and "system" in str(e).lower():
            raise TaskError(f"this tokenizer's chat template rejects a system message ({e}). Leave the system "
                             f"prompt out, or write its text into task.format.template.") from e
        raise


def format_prompt(
    problem_prompt: str,
    tokenizer: Any,
    *,
    style: Style,
    template: str = "{prompt}",
    system_prompt: str | None = None,
) -> str:
    """The prompt text for one problem. Real instruct models need ``style="chat"``; the built-in tiny
    models (no chat template) use ``style="plain"``. ``template`` wraps the question in both styles (in
    ``chat`` it becomes the user message)."""
    if style not in ("plain", "chat"):
        raise TaskError(f"task.format.style={style!r} is not a style; valid: plain, chat.")
    text = _fill(problem_prompt, template)
    if style == "chat":
        return _chat(text, tokenizer, system_prompt)
    return f"{system_prompt}\n\n{text}" if system_prompt else text
