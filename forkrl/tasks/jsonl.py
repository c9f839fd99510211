"""Tasks from your own JSONL files: one JSON object per line, with a prompt, a gold answer and
optionally a worked completion for SFT.

Why eager and strict: the files are read and checked once, when the task is built, so a typo in
line 9,000 fails before any GPU time is spent, with the file and line in the message. A held-out prompt
that also appears in train is an error rather than silently dropped: leaking evaluation data into
training makes every held-out number meaningless, and the user should decide which copy goes.

A completion whose answer cannot be found, or does not parse, scores 0.0: a malformed answer is a
wrong answer, not an unscorable row (otherwise the policy would learn that garbage is never penalised).

Data the way users have it:

* **Sources.** ``train_path``/``heldout_path`` may be JSON Lines (any file not named below, and a ``.json`` file of
  one object per line), read here and named ``file:line``; or, through the ``datasets`` library and offline, a
  ``.parquet``, ``.arrow``, ``.csv`` or JSON-array ``.json`` file or a ``save_to_disk`` directory (a DatasetDict's
  split is chosen with ``train_split``/``heldout_split``), named ``<path>[row N]`` (``hfdata``).
* **Metadata.** Every field of a row that forkrl does not read as the prompt, answer, completion, id or messages
  reaches rewards in ``Problem.meta`` under its own name (a ``rubric``, ``tests``, ``difficulty``...). forkrl's
  location goes beside them as ``path`` and ``line`` (``path`` and ``row`` for datasets rows); a row with its own
  field of either name keeps it, and forkrl's location moves, both keys together, to ``forkrl_path`` and
  ``forkrl_line`` (``forkrl_row``).
* **Chat rows.** A row without the prompt field (or with it null) may give ``messages`` (``messages_field``): the
  OpenAI/HF list of ``{role, content}``, shaped system* user+ assistant?. The user message(s) are the prompt (several
  joined by a blank line), a trailing assistant message is the SFT demonstration (when the row has no completion
  field), and the system message(s) are ``meta["system"]``. forkrl prompts every problem with one system prompt
  (``task.format``): the rows' system message becomes the task's ``system_prompt`` when all rows share it, and
  ``task.format.system_prompt``, when set, replaces it; rows with different system messages need that setting.
  Content is a string or a list of ``{"type": "text", "text": ...}`` parts. Multi-turn rows are refused.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import Field

from .. import userfiles
from ..names import named
from . import hfdata
from .base import Problem, Split, TaskConfig, TaskError
from .formatting import FormatCfg

Verifier = str  # a name of VERIFIERS
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_COLON_RE = re.compile(r"answer:", re.IGNORECASE)


def extract_answer(completion: str, pattern: re.Pattern[str] | None = None) -> str | None:
    """The completion's final answer, or None. Order: the last match of ``pattern`` (group 1); else the
    last ``<answer>...</answer>``; else the text after the last "answer:" (first non-empty line); else
    the last non-empty line."""
    if pattern is not None:
        matches = list(pattern.finditer(completion))
        found = matches[-1].group(1) if matches else None  # None too when the group is optional and unmatched
        return found.strip() if found is not None else None
    tags = _TAG_RE.findall(completion)
    if tags:
        return tags[-1].strip()
    colons = list(_ANSWER_COLON_RE.finditer(completion))
    text = completion[colons[-1].end():] if colons else completion
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    return lines[0] if colons else lines[-1]


def _parse_float(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def _math_verify(gold: str, pred: str) -> float | None:
    """math-verify's equivalence; None (unscorable) when the *gold* does not parse, since that is a data
    problem, not the model's. Its timeouts use SIGALRM, which only works in the main thread."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(gold, parsing_timeout=timeout)
    if not gold_parsed:
        return None
    pred_parsed = parse(pred, parsing_timeout=timeout)
    if not pred_parsed:
        return 0.0
    return float(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _exact(gold: str, pred: str) -> float:
    return float(pred.strip() == gold.strip())


def _numeric(gold: str, pred: str) -> float:
    g, p = _parse_float(gold), _parse_float(pred)
    if g is None or p is None:
        return 0.0
    return float(math.isclose(g, p, rel_tol=1e-6))  # relative only: a gold of 0 needs an exact 0


def _verify(verifier: Verifier, gold: str, pred: str) -> float | None:
    return VERIFIERS[verifier](gold, pred)


class _Row(NamedTuple):
    """One row of a task file: ``where`` it is for messages (``file:line`` or ``path[row N]``), ``at`` for a second
    mention in one message (``line N``, ``row N``), its location as meta keys, and its fields."""

    where: str
    at: str
    location: dict[str, Any]
    data: dict[str, Any]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


def _field(row: dict, key: str, option: str, where: str) -> Any:
    if key not in row:
        present = ", ".join(repr(k) for k in row) or "(none)"
        raise TaskError(
            f"{where}: missing field {key!r} (fields present: {present}). "
            f"Add it, or set {option} to the field that holds it."
        )
    return row[key]


def _text(value: Any, key: str, where: str, *, numbers_ok: bool, max_bytes: int) -> str:
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kind = "a string or a number" if numbers_ok else "a string"
        raise TaskError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__}: {_shown(value)}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise TaskError(f"{where}: field {key!r} is {size:,} bytes, more than task.max_field_bytes "
                        f"({max_bytes:,}); shorten it, or raise task.max_field_bytes if it is meant to be that long")
    return value


def _content(value: Any, where: str, name: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise TaskError(f"{where}: {name}'s content must be text (a string, or a list of {{\"type\": \"text\", "
                    f"\"text\": ...}} parts), got {type(value).__name__}: {_shown(value)}")


def _chat(value: Any, key: str, where: str, max_bytes: int) -> tuple[str, str | None, str | None]:
    """(prompt, system or None, demonstration or None) of a chat row's messages, shaped system* user+ assistant?
    (the module docstring)."""
    shape = ("optional system message(s), then user message(s), then at most one assistant message "
             "(the SFT demonstration)")
    if not isinstance(value, list) or not value:
        raise TaskError(f"{where}: field {key!r} must be a non-empty list of chat messages "
                        f"[{{\"role\": ..., \"content\": ...}}, ...], got {type(value).__name__}: {_shown(value)}")
    turns = []
    for i, m in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TaskError(f"{where}: {name} must be an object with 'role' and 'content', got {_shown(m)}")
        if m["role"] not in ("system", "user", "assistant"):
            raise TaskError(f"{where}: {name} has role {m['role']!r}; valid: system, user, assistant "
                            f"(expected {shape})")
        turns.append((m["role"], _content(m["content"], where, name)))
    roles = [r for r, _ in turns]
    n_system = next((i for i, r in enumerate(roles) if r != "system"), len(roles))
    n_user = next((i for i, r in enumerate(roles[n_system:]) if r != "user"), len(roles) - n_system)
    if n_user == 0:
        raise TaskError(f"{where}: {key} has no user message right after its system message(s) (roles: "
                        f"{', '.join(roles)}); the user message is the prompt, so add one (expected {shape})")
    rest = roles[n_system + n_user:]
    if rest not in ([], ["assistant"]):
        raise TaskError(f"{where}: {key} has roles {', '.join(roles)}, but forkrl prompts with a single user turn: "
                        f"expected {shape}. Make one row per turn, or keep only the last exchange.")
    system = "\n\n".join(c for _, c in turns[:n_system]) if n_system else None
    prompt = "\n\n".join(c for _, c in turns[n_system:n_system + n_user])
    demo = turns[-1][1] if rest else None
    for text, what in ((prompt, "user message(s)"), (system, "system message(s)"), (demo, "assistant message")):
        if text is not None:
            _text(text, f"{key} ({what})", where, numbers_ok=False, max_bytes=max_bytes)
    return prompt, system, demo


def _read_rows(path: Path, max_field_bytes: int) -> list[_Row]:
    """Every non-blank line, as a row. Lines are read in pieces of at most a few fields' bound, so a huge line is
    refused before it is read whole, let alone parsed."""
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise TaskError(f"task data file {path} {what}. Check the path "
                        f"(relative paths are from the working directory).")
    rows = []
    # a line holds a few fields, and JSON's escapes can make a field's text up to 6x its bytes
    max_line = 8 * max_field_bytes + (64 << 10)
    advice = f"lines are bounded by task.max_field_bytes ({max_field_bytes:,} a field): is it the right file?"
    for where, row in userfiles.json_objects(path, "a JSONL task file", TaskError, max_line_bytes=max_line,
                                             advice=advice):
        line_no = int(where.rpartition(":")[2])
        rows.append(_Row(where, f"line {line_no}", {"path": str(path), "line": line_no}, row))
    if not rows:
        raise TaskError(f"task data file {path} is empty (no JSON lines). Put one JSON object per line in it.")
    return rows


def _load_rows(path: Path, split_name: str | None, split: Split, max_field_bytes: int) -> list[_Row]:
    """The rows of one split's file: JSON Lines here, anything else through ``hfdata``."""
    if not hfdata.is_dataset_source(path):
        if split_name is not None:
            raise TaskError(f"task.{split}_split={split_name!r} is set, but {path} is read as JSON Lines, which has "
                            f"no splits: leave task.{split}_split unset (it selects a split of a DatasetDict "
                            f"saved with save_to_disk).")
        return _read_rows(path, max_field_bytes)
    return [_Row(f"{shown}[row {n}]", f"row {n}", {"path": shown, "row": n}, data)
            for shown, n, data in hfdata.read_rows(path, split_name, f"task.{split}_path", f"task.{split}_split")]


class JsonlTask:
    """Problems, gold answers and optional demonstrations from a train and a held-out file (JSON Lines, or local
    datasets data: the module docstring)."""

    def __init__(
        self,
        train_path: str | Path,
        heldout_path: str | Path,
        *,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        completion_field: str | None = "completion",
        id_field: str | None = None,
        messages_field: str | None = "messages",
        train_split: str | None = None,
        heldout_split: str | None = None,
        system_prompt: str | None = None,
        verifier: Verifier = "exact",
        answer_pattern: str | None = None,
        max_field_bytes: int = 1 << 20,
    ) -> None:
        """``system_prompt``: the configured one (``task.format.system_prompt``), which replaces the rows' system
        messages; rows may then have different ones."""
        if verifier not in VERIFIERS:
            raise TaskError(f"task.verifier={verifier!r} is not a verifier; valid: {', '.join(VERIFIERS)}.")
        self.verifier: Verifier = verifier
        self.answer_pattern = _compile_pattern(answer_pattern)
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.completion_field, self.id_field = completion_field, id_field
        self.messages_field = messages_field
        self.paths = {"train": Path(train_path), "heldout": Path(heldout_path)}
        self.name = f"jsonl:{self.paths['train'].stem}"
        self.max_field_bytes = max_field_bytes
        splits = {"train": train_split, "heldout": heldout_split}
        self._rows = {s: _load_rows(p, splits[s], s, max_field_bytes) for s, p in self.paths.items()}
        self._demos: dict[str, list[str | None]] = {}
        self._systems: dict[str, list[str | None]] = {}
        self._problems = {split: self._build(split) for split in self.paths}
        self.system_prompt: str | None = system_prompt if system_prompt is not None else self._common_system()
        self._check_overlap()

    def _prompt(self, row: _Row) -> tuple[str, str | None, str | None]:
        """(prompt, system message, assistant message) of a row: its prompt field, else its chat messages."""
        data, where = row.data, row.where
        chat = self.messages_field is not None and data.get(self.messages_field) is not None
        if data.get(self.prompt_field) is None and chat:
            return _chat(data[self.messages_field], self.messages_field, where, self.max_field_bytes)
        if self.prompt_field not in data and self.messages_field is not None:
            present = ", ".join(repr(k) for k in data) or "(none)"
            raise TaskError(f"{where}: missing field {self.prompt_field!r} and no {self.messages_field!r} chat "
                            f"messages (fields present: {present}). Add one, or set task.prompt_field "
                            f"(task.messages_field) to the field that holds it.")
        value = _field(data, self.prompt_field, "task.prompt_field", where)
        return _text(value, self.prompt_field, where, numbers_ok=False, max_bytes=self.max_field_bytes), None, None

    def _meta(self, row: _Row, system: str | None) -> dict[str, Any]:
        """The row's own fields but those read as prompt, answer, completion, id and messages; its system message
        as ``system``; forkrl's location under its keys when the row has no field of those names (the module
        docstring)."""
        read = {self.prompt_field, self.answer_field, self.completion_field, self.id_field, self.messages_field}
        meta = {k: v for k, v in row.data.items() if k not in read}
        if system is not None:
            if "system" in meta:
                raise TaskError(f"{row.where}: a system message in {self.messages_field!r} and a field 'system' "
                                f"too; forkrl keeps the system message as meta['system'], so rename the field.")
            meta["system"] = system
        location = row.location
        if any(k in meta for k in location):
            location = {f"forkrl_{k}": v for k, v in location.items()}
            if any(k in meta for k in location):
                raise TaskError(f"{row.where}: fields {', '.join(sorted(location))} are reserved for forkrl (where "
                                f"the row is read from); rename them.")
        return {**meta, **location}

    def _build(self, split: Split) -> list[Problem]:
        problems, ids, demos, systems = [], {}, [], []
        for row in self._rows[split]:
            prompt, system, demo = self._prompt(row)
            answer = _text(_field(row.data, self.answer_field, "task.answer_field", row.where),
                           self.answer_field, row.where, numbers_ok=True, max_bytes=self.max_field_bytes)
            pid = f"{split}-{row.at.split()[1]}"
            if self.id_field is not None:
                pid = str(_field(row.data, self.id_field, "task.id_field", row.where))
                if pid in ids:
                    raise TaskError(f"{row.where}: id {pid!r} already used at {ids[pid]}; "
                                    f"ids in {self.id_field!r} must be unique.")
                ids[pid] = row.at
            problems.append(Problem(id=pid, prompt=prompt, answer=answer, meta=self._meta(row, system)))
            demos.append(demo)
            systems.append(system)
        self._demos[split], self._systems[split] = demos, systems
        return problems

    def _common_system(self) -> str | None:
        """The rows' one system message (None when no row has one); an error when rows differ."""
        seen = [(row.where, s) for split in self.paths for row, s in zip(self._rows[split], self._systems[split])]
        def said(s: str | None) -> str:
            return "no system message" if s is None else f"system message {_shown(s)}"

        first_where, first = seen[0]
        for where, system in seen:
            if system != first:
                raise TaskError(f"rows have different system messages ({first_where}: {said(first)}; {where}: "
                                f"{said(system)}), but forkrl prompts every problem with one system prompt. Give "
                                f"all rows the same one, or set task.format.system_prompt to the one to use (each "
                                f"row's own stays in meta['system']).")
        return first

    def _check_overlap(self) -> None:
        def key(prompt: str) -> str:  # whitespace-insensitive: a re-wrapped copy is still a copy
            return " ".join(prompt.split())

        train = {key(p.prompt): row.where for p, row in zip(self._problems["train"], self._rows["train"])}
        clashes = [(train[key(p.prompt)], row.where)
                   for p, row in zip(self._problems["heldout"], self._rows["heldout"]) if key(p.prompt) in train]
        if clashes:
            shown = "; ".join(f"{t} = {h}" for t, h in clashes[:5])
            raise TaskError(
                f"{len(clashes)} held-out prompt(s) also appear in train: {shown}"
                f"{' ...' if len(clashes) > 5 else ''}. Remove them from one of the two files: "
                f"training on held-out problems makes held-out scores meaningless."
            )

    def problems(self, split: Split) -> list[Problem]:
        if split not in self._problems:
            raise TaskError(f"unknown split {split!r}; valid: train, heldout.")
        return self._problems[split]

    def score(self, problem: Problem, completion: str) -> float | None:
        """1.0 if the extracted answer matches the gold under ``verifier``; 0.0 if wrong or absent;
        None only when the gold itself cannot be parsed by math-verify (a data problem)."""
        pred = extract_answer(completion, self.answer_pattern)
        if not pred:
            return 0.0
        return _verify(self.verifier, problem.answer, pred)

    def has_answer(self, completion: str) -> bool:
        """Whether ``score`` finds an answer in the completion at all, right or wrong (the ``format`` reward)."""
        return bool(extract_answer(completion, self.answer_pattern))

    def extract(self, completion: str) -> str | None:
        """The answer ``score`` would verify (stripped), or None when there is none: what the majority vote counts."""
        return extract_answer(completion, self.answer_pattern) or None

    def demonstrations(self, split: Split) -> list[tuple[Problem, str]]:
        """Each problem with its completion field, else its chat row's trailing assistant message."""
        if split not in self.paths:
            raise TaskError(f"unknown split {split!r}; valid: train, heldout.")
        if self.completion_field is None and not any(d is not None for d in self._demos[split]):
            raise TaskError(f"task.completion_field is not set, so {self.paths[split]} has no demonstrations for "
                            f"SFT. Set it to the field holding worked completions (or end each row's "
                            f"{self.messages_field or 'messages'} with an assistant message).")
        return [(problem, self._demonstration(row, demo))
                for problem, row, demo in zip(self._problems[split], self._rows[split], self._demos[split])]

    def _demonstration(self, row: _Row, demo: str | None) -> str:
        field = self.completion_field
        if field is not None and row.data.get(field) is not None:
            return _text(row.data[field], field, row.where, numbers_ok=False, max_bytes=self.max_field_bytes)
        if demo is not None:
            return demo
        if field is None:
            raise TaskError(f"{row.where}: no demonstration for SFT: task.completion_field is not set and the row's "
                            f"messages end without an assistant message. Add one, or set task.completion_field.")
        value = _field(row.data, field, "task.completion_field", row.where)
        return _text(value, field, row.where, numbers_ok=False, max_bytes=self.max_field_bytes)


def _compile_pattern(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise TaskError(f"task.answer_pattern={pattern!r} is not a valid regex: {e}.") from e
    if compiled.groups != 1:
        raise TaskError(f"task.answer_pattern={pattern!r} has {compiled.groups} groups; it needs exactly one "
                        f"capturing group around the answer, e.g. 'The answer is (\\S+)'.")
    return compiled


# gold answer, extracted prediction -> 1.0 / 0.0, or None where the gold itself cannot be read
VERIFIERS = {
    "exact": _exact,
    "numeric": _numeric,
    "math_verify": _math_verify,
}


class JsonlCfg(TaskConfig):
    """``task: {type: jsonl, train_path: ..., heldout_path: ...}``: problems from your own data (the module
    docstring): JSON Lines files, or local ``datasets`` data (``.parquet``, ``.arrow``, ``.csv``, a JSON-array
    ``.json``, a ``save_to_disk`` directory). Fields of a row that are not read as below reach rewards in ``meta``.

    ``prompt_field``: the question; a row without it may give ``messages_field`` (chat messages) instead (null
    disables). ``completion_field``: the SFT demonstration (else a chat row's trailing assistant message).
    ``train_split``/``heldout_split``: the split to read when the path is a DatasetDict directory."""

    type: Literal["jsonl"]
    train_path: str
    heldout_path: str
    train_split: str | None = None
    heldout_split: str | None = None
    prompt_field: str = "prompt"
    messages_field: str | None = "messages"
    answer_field: str = "answer"
    completion_field: str | None = "completion"
    id_field: str | None = None
    verifier: named(VERIFIERS, "verifier") = "exact"
    answer_pattern: str | None = None
    max_field_bytes: Annotated[int, Field(ge=1)] = 1 << 20  # a longer prompt, answer or completion is refused
    format: FormatCfg = FormatCfg()

    def build(self) -> JsonlTask:
        return JsonlTask(self.train_path, self.heldout_path, prompt_field=self.prompt_field,
                         answer_field=self.answer_field, completion_field=self.completion_field,
                         id_field=self.id_field, messages_field=self.messages_field, train_split=self.train_split,
                         heldout_split=self.heldout_split, system_prompt=self.format.system_prompt,
                         verifier=self.verifier, answer_pattern=self.answer_pattern,
                         max_field_bytes=self.max_field_bytes)
