"""A Hugging Face sequence-classification model as a reward (``{reward_model: {path: ...}}``).

``build_reward_model`` checks what it can without loading weights (the directory, its ``config.json``, the label
asked for, the chat template when ``chat: true``) and returns a batch-mode reward whose first call loads the model
on the trainer's device. Building is therefore cheap, as ``api.load`` needs when it only validates a config.

How a row is scored:

* text: ``template`` with ``{prompt}`` and ``{completion}`` (plain concatenation by default), or, with
  ``chat: true``, the tokenizer's chat template over ``[user: prompt, assistant: completion]``;
* tokens: the last ``max_length`` tokens are kept (the left is cut), because the model reads its score at the last
  token, where the completion ends;
* batches of ``batch_size`` rows, right-padded with the model's own ``pad_token_id`` (set from the tokenizer, or
  EOS, when the checkpoint has none): the model pools at the rightmost non-pad token, and under causal attention a
  real token never sees the pads after it, so a row's score does not depend on its batch. A text whose own last
  tokens are the pad token (a tokenizer whose pad is EOS, and a completion ending in EOS) is read at the token
  before them, in a batch or alone alike;
* value: with one output, the raw logit (``transform: sigmoid`` maps it to (0, 1)); with two or more, the
  probability (softmax) of ``label``: an index, a name from the checkpoint's ``id2label``, by default the last one.

An empty row (no tokens) is unscorable (None). The entry's ``timeout_s``, when set, bounds each whole batch call, the
first one's weight loading included; unset, a reward model's call has no time limit (a forward always returns).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field



class RewardModelCfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(min_length=1)]  # a local directory written by save_pretrained
    batch_size: Annotated[int, Field(ge=1)] = 16
    max_length: Annotated[int, Field(ge=1)] | None = None  # tokens kept from the end of each row; None: all
    label: int | str | None = None  # which output: an index or an id2label name; default the last (1 output: it)
    transform: Literal["none", "sigmoid"] = "none"  # for a one-output model: its logit as is, or its sigmoid
    template: str = "{prompt}{completion}"  # how prompt and completion are joined when chat is false
    chat: bool = False  # true: the tokenizer's chat template, user = prompt, assistant = completion
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def _error(where: str, message: str):
    from .api import RewardError

    return RewardError(f"{where}: {message}")


def model_dir(path: str, where: str, *, kind: str, expect: str) -> tuple[Path, dict]:
    """(the directory, its config.json) of a local Hugging Face model whose architecture ends with ``expect``."""
    local = Path(path).expanduser()
    if not local.is_dir():
        raise _error(where, f"{kind} path {path!r} is not a directory (resolved: {local.resolve()}); give a local "
                            "model directory written by save_pretrained (download a hub model first)")
    if not (local / "config.json").is_file():
        raise _error(where, f"{kind} path {path!r} has no config.json; point it at a directory written by "
                            "save_pretrained")
    try:
        config = json.loads((local / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _error(where, f"{local / 'config.json'} cannot be read ({e}); save the model again") from None
    archs = config.get("architectures") or []
    if archs and not any(a.endswith(expect) for a in archs):
        raise _error(where, f"{kind} path {path!r} holds a {', '.join(archs)}, not a *{expect} model; "
                            f"give a model saved as a {expect} (AutoModelFor{expect.removeprefix('For')})")
    if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise _error(where, f"{kind} path {path!r} has no tokenizer (tokenizer.json or tokenizer_config.json); "
                            "save the tokenizer into the same directory")
    return local, config


def has_chat_template(local: Path) -> bool:
    if (local / "chat_template.jinja").is_file() or (local / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((local / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _label_index(cfg: RewardModelCfg, config: dict, where: str) -> int:
    """The output that is the reward, checked against the checkpoint's labels."""
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    num_labels = len(id2label) or int(config.get("num_labels", 2))
    at = f"{where}.reward_model"
    if num_labels == 1:
        if cfg.label not in (None, 0, id2label.get(0)):
            raise _error(at, f"label {cfg.label!r}: the model has one output (its logit is the reward); drop label")
        return 0
    if cfg.transform != "none":
        raise _error(at, f"transform {cfg.transform!r} is for a one-output model; this one has {num_labels} outputs, "
                         "whose softmax probability of `label` is the reward")
    if cfg.label is None:
        return num_labels - 1
    if isinstance(cfg.label, int):
        if not 0 <= cfg.label < num_labels:
            raise _error(at, f"label {cfg.label} is out of range: the model has {num_labels} outputs (0 … "
                             f"{num_labels - 1})")
        return cfg.label
    names = {v: k for k, v in id2label.items()}
    if cfg.label not in names:
        raise _error(at, f"label {cfg.label!r} is not one of the model's labels ({', '.join(map(str, names))})")
    return names[cfg.label]


class RewardModel:
    """The batch-mode reward: one score per (prompt, completion), from a model loaded on the first call."""

    def __init__(self, cfg: RewardModelCfg, local: Path, index: int, device: str):
        self.cfg, self.local, self.index, self.device = cfg, local, index, device
        self.model = self.tokenizer = None

    def _load(self):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.local)
        model = AutoModelForSequenceClassification.from_pretrained(self.local, dtype=getattr(torch, self.cfg.dtype))
        pad = model.config.pad_token_id
        if pad is None:  # the model pools at the rightmost non-pad token, so it must know the pad
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            model.config.pad_token_id = pad
        self.tokenizer, self.pad_id = tok, pad
        self.model = model.to(self.device).eval()

    def text(self, prompt: str, completion: str) -> str:
        if self.cfg.chat:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.cfg.template.format(prompt=prompt, completion=completion)

    def token_ids(self, prompt: str, completion: str) -> list[int]:
        ids = self.tokenizer(self.text(prompt, completion), add_special_tokens=not self.cfg.chat).input_ids
        return ids[-self.cfg.max_length:] if self.cfg.max_length else ids

    def forward(self, rows: list[list[int]]) -> list[float]:
        """The scores of tokenized rows, in one right-padded forward."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float()
        if logits.shape[-1] == 1:
            out = logits[:, 0]
            out = torch.sigmoid(out) if self.cfg.transform == "sigmoid" else out
        else:
            out = torch.softmax(logits, dim=-1)[:, self.index]
        return out.cpu().tolist()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float | None]:
        if self.model is None:
            self._load()
        rows = [self.token_ids(p, c) for p, c in zip(prompts, completions)]
        scores: list[float | None] = [None] * len(rows)  # an empty row has nothing to read a score at
        order = sorted((i for i, r in enumerate(rows) if r), key=lambda i: len(rows[i]))  # less padding
        for start in range(0, len(order), self.cfg.batch_size):
            chunk = order[start:start + self.cfg.batch_size]
            for i, s in zip(chunk, self.forward([rows[i] for i in chunk])):
                scores[i] = s
        return scores


def build_reward_model(cfg: RewardModelCfg, *, device, where: str) -> RewardModel:
    """The reward of a ``reward_model`` entry, checked without loading its weights (they load on its first call,
    on ``device``; None: cpu)."""
    local, config = model_dir(cfg.path, where, kind="reward_model", expect="ForSequenceClassification")
    index = _label_index(cfg, config, where)
    if cfg.chat and not has_chat_template(local):
        raise _error(where, f"reward_model.chat is true but the tokenizer at {cfg.path!r} has no chat template; "
                            "set chat: false (and a template) or save a tokenizer with one")
    unknown = template_fields(cfg.template) - {"prompt", "completion"}
    if unknown:
        raise _error(where, f"reward_model.template has unknown fields {sorted(unknown)}; it may use {{prompt}} and "
                            "{completion} (write {{ and }} for literal braces)")
    return RewardModel(cfg, local, index, str(device) if device is not None else "cpu")
