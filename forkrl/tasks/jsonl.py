"""Tasks from your own JSONL files: one JSON object per line, with a prompt, a gold answer and
optionally a worked completion for SFT.

Why eager and strict: the files are read and checked once, when the task is built, so a typo in
line 9,000 fails before any GPU time is spent, with the file and line in the message. A held-out prompt
that also appears in train is an error rather than silently dropped: leaking evaluation data into
training makes every held-out number meaningless, and the user should decide which copy goes.

A completion whose answer cannot be found, or does not parse, scores 0.0: a malformed answer is a
wrong answer, not an unscorable row (otherwise the policy would learn that garbage is never penalised).
"""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from .. import userfiles
from ..names import named
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


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _field(row: dict, key: str, option: str, path: Path, line: int) -> Any:
    if key not in row:
        present = ", ".join(repr(k) for k in row) or "(none)"
        raise TaskError(
            f"{_where(path, line)}: missing field {key!r} (fields present: {present}). "
            f"Add it, or set {option} to the field that holds it."
        )
    return row[key]


def _text(value: Any, key: str, path: Path, line: int, *, numbers_ok: bool, max_bytes: int) -> str:
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kind = "a string or a number" if numbers_ok else "a string"
        shown = repr(value) if len(repr(value)) < 200 else repr(value)[:200] + "..."
        raise TaskError(f"{_where(path, line)}: field {key!r} must be {kind}, got {type(value).__name__}: {shown}")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise TaskError(f"{_where(path, line)}: field {key!r} is {size:,} bytes, more than task.max_field_bytes "
                        f"({max_bytes:,}); shorten it, or raise task.max_field_bytes if it is meant to be that long")
    return value


def _read_rows(path: Path, max_field_bytes: int) -> list[tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line. Lines are read in pieces of at most a few fields'
    bound, so a huge line is refused before it is read whole, let alone parsed."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise TaskError(f"task data file {path} {what}. Check the path "
                        f"(relative paths are from the working directory).")
    rows = []
    # a line holds a few fields, and JSON's escapes can make a field's text up to 6x its bytes
    max_line = 8 * max_field_bytes + (64 << 10)
    advice = f"lines are bounded by task.max_field_bytes ({max_field_bytes:,} a field): is it the right file?"
    for line_no, line in userfiles.lines(path, "a JSONL task file", TaskError, max_line_bytes=max_line,
                                         advice=advice):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{_where(path, line_no)}: invalid JSON ({e.msg} at column {e.colno}). "
                            f"Each line must be one complete JSON object.") from None
        except RecursionError:
            raise TaskError(f"{_where(path, line_no)}: JSON nested too deeply to read.") from None
        if not isinstance(row, dict):
            raise TaskError(f"{_where(path, line_no)}: expected a JSON object ({{...}}), got {type(row).__name__}.")
        rows.append((line_no, row))
    if not rows:
        raise TaskError(f"task data file {path} is empty (no JSON lines). Put one JSON object per line in it.")
    return rows


class JsonlTask:
    """Problems, gold answers and optional demonstrations from a train and a held-out JSONL file."""

    def __init__(
        self,
        train_path: str | Path,
        heldout_path: str | Path,
        *,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        completion_field: str | None = "completion",
        id_field: str | None = None,
        verifier: Verifier = "exact",
        answer_pattern: str | None = None,
        max_field_bytes: int = 1 << 20,
    ) -> None:
        if verifier not in VERIFIERS:
            raise TaskError(f"task.verifier={verifier!r} is not a verifier; valid: {', '.join(VERIFIERS)}.")
        self.verifier: Verifier = verifier
        self.answer_pattern = _compile_pattern(answer_pattern)
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.completion_field, self.id_field = completion_field, id_field
        self.paths = {"train": Path(train_path), "heldout": Path(heldout_path)}
        self.name = f"jsonl:{self.paths['train'].stem}"
        self.max_field_bytes = max_field_bytes
        self._rows = {split: _read_rows(p, max_field_bytes) for split, p in self.paths.items()}
        self._problems = {split: self._build(split) for split in self.paths}
        self._check_overlap()

    def _build(self, split: Split) -> list[Problem]:
        path, problems, ids = self.paths[split], [], {}
        for line, row in self._rows[split]:
            prompt = _text(_field(row, self.prompt_field, "task.prompt_field", path, line),
                           self.prompt_field, path, line, numbers_ok=False, max_bytes=self.max_field_bytes)
            answer = _text(_field(row, self.answer_field, "task.answer_field", path, line),
                           self.answer_field, path, line, numbers_ok=True, max_bytes=self.max_field_bytes)
            pid = f"{split}-{line}"
            if self.id_field is not None:
                pid = str(_field(row, self.id_field, "task.id_field", path, line))
                if pid in ids:
                    raise TaskError(f"{_where(path, line)}: id {pid!r} already used at line {ids[pid]}; "
                                    f"ids in {self.id_field!r} must be unique.")
                ids[pid] = line
            problems.append(Problem(id=pid, prompt=prompt, answer=answer,
                                    meta={"path": str(path), "line": line}))
        return problems

    def _check_overlap(self) -> None:
        def key(prompt: str) -> str:  # whitespace-insensitive: a re-wrapped copy is still a copy
            return " ".join(prompt.split())

        train_lines = {key(p.prompt): p.meta["line"] for p in self._problems["train"]}
        clashes = [(train_lines[key(p.prompt)], p.meta["line"])
                   for p in self._problems["heldout"] if key(p.prompt) in train_lines]
        if clashes:
            shown = "; ".join(f"{self.paths['train']}:{t} = {self.paths['heldout']}:{h}" for t, h in clashes[:5])
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

    def demonstrations(self, split: Split) -> list[tuple[Problem, str]]:
        path = self.paths[split] if split in self.paths else None
        if path is None:
            raise TaskError(f"unknown split {split!r}; valid: train, heldout.")
        if self.completion_field is None:
            raise TaskError(f"task.completion_field is not set, so {path} has no demonstrations for SFT. "
                            f"Set it to the field holding worked completions.")
        out = []
        for problem, (line, row) in zip(self._problems[split], self._rows[split]):
            value = _field(row, self.completion_field, "task.completion_field", path, line)
            out.append((problem, _text(value, self.completion_field, path, line, numbers_ok=False,
                                       max_bytes=self.max_field_bytes)))
        return out


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
    """``task: {type: jsonl, train_path: ..., heldout_path: ...}``: problems from JSON Lines files."""

    type: Literal["jsonl"]
    train_path: str
    heldout_path: str
    prompt_field: str = "prompt"
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
                         id_field=self.id_field, verifier=self.verifier, answer_pattern=self.answer_pattern,
                         max_field_bytes=self.max_field_bytes)
