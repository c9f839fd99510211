"""LLM-judge rewards (``{judge: {...}}``): a local causal LM or an OpenAI-compatible endpoint grades each completion
against weighted criteria (a rubric).

One judgement is one judge prompt: ``template`` filled with the row's ``{prompt}``, ``{completion}``, ``{answer}``
and one ``{criterion}``'s description. Its verdict is a number in [0, 1]:

* ``method: choice`` (``kind: hf`` only, its default): one forward; the probabilities of the ``choices``' first
  tokens at the next position, renormalised over those tokens, weight each choice's value: Σ v_c p_c / Σ p_c
  (with the default ``{Yes: 1, No: 0}``, the probability of Yes). Deterministic, batched, never malformed. The
  position is the one right after the judge prompt (after the chat template's assistant header, with ``chat``); a
  choice's token is the first that ``tokenizer.encode(choice)`` gives, so write ``" Yes"`` for a template that
  ends mid-line;
* ``method: generate`` (``kind: openai`` always): a greedy reply (temperature 0), read by ``parse``: ``choice``,
  the reply's last whole-word choice (case-insensitive) gives its value; ``score``, its last number (``8`` of
  ``8/10`` too), in [0, ``scale``], divided by ``scale``. ``pattern`` overrides the regex (its first group, or the
  whole match, of the last match). A reply with no verdict, or a number out of range, leaves the judgement
  without a value.

A row's value is ``{"score": Σ w_k v_k / Σ w_k, <criterion>: v_k, ...}``: each criterion is logged as
``reward/<label>/<criterion>``. A judgement without a value, or a request that failed after its retries, makes its
row unscorable (None), never 0; when no row of a batch has a value the call raises, so the run's failure count
carries the first reason (an endpoint that is down, a judge that ignores the verdict format).

Criteria come from ``criteria`` (the config), ``criteria_file`` (YAML or JSON: a list, or ``{criteria: [...]}``;
a relative path in a config file is relative to that file's directory), or ``criteria_field`` (each problem's ``meta[field]``: a
list of strings or ``{name, description, weight}`` mappings; a string criterion ``i`` is named ``c<i>``, from 1).
With none, one criterion: ``correct``.

Building is cheap, as ``api.load`` needs when it only validates a config: it checks the model directory, the
template's fields, the criteria (every problem's, for ``criteria_field``), the API key's variable, and probes the
endpoint once (GET ``{base_url}/models``); weights load on the first call.

The response cache (``run_dir/judge-cache/<kind>-<hash of the judge>.jsonl``, append-only) keeps every judgement
received, keyed by the sha256 of the judge's identity, the exact text it was given and the settings that change its
reply; a resumed run reads it at its first call and never asks the same judge the same thing twice. It holds replies
(or choice probabilities), not verdicts, so a changed ``parse`` re-reads them for free. A failed request is not
kept. A torn last line (a crash mid-write) is skipped. The hf judge's identity is its resolved directory, its
config and its weight files' sizes and times, so weights replaced in place are a new judge.

The entry's ``timeout_s``, when set, bounds each whole batch call, the first one's weight loading and every request
of the batch included; unset, a judge's call has no limit but its requests' own (``timeout_s`` of the judge, per
request, and its retries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .judge_backends import Cache, EndpointJudge, LocalJudge, cache_key
from .models import has_chat_template, model_dir, template_fields

log = logging.getLogger(__name__)

FIELDS = ("prompt", "completion", "criterion", "answer")  # of a template
ONLY = {"hf": ("path", "dtype", "batch_size", "chat", "max_length"),
        "openai": ("base_url", "model", "api_key_env", "timeout_s", "retries", "backoff_s", "max_concurrency",
                   "extra_body")}  # the fields of one kind of judge


class CriterionCfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, pattern=r"^[^/\s]+$")]  # logged as reward/<label>/<name>
    description: Annotated[str, Field(min_length=1)]  # what the judge is asked
    weight: Annotated[float, Field(ge=0.0)] = 1.0


DEFAULT_CRITERION = CriterionCfg(name="correct",
                                 description="Is the response a correct and complete answer to the problem?")


class JudgeCfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["hf", "openai"]
    # kind hf: a local causal LM directory
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: Annotated[int, Field(ge=1)] = 8
    chat: bool | None = None  # use the tokenizer's chat template; None: when it has one
    # kind openai: an OpenAI-compatible chat-completions endpoint
    base_url: str | None = None  # e.g. https://api.openai.com/v1 or http://localhost:8000/v1
    model: str | None = None
    api_key_env: str | None = None  # the NAME of the variable holding the key; None: no key is sent
    timeout_s: Annotated[float, Field(gt=0.0)] = 60.0  # per request
    retries: Annotated[int, Field(ge=0)] = 3  # on connection errors, timeouts, 429 and 5xx
    backoff_s: Annotated[float, Field(ge=0.0)] = 1.0  # the first retry's wait, doubled each time
    max_concurrency: Annotated[int, Field(ge=1)] = 8  # requests in flight at once
    extra_body: dict[str, Any] = {}  # merged into every request (e.g. a reasoning effort)
    # the verdict
    method: Literal["choice", "generate"] | None = None  # None: choice for hf, generate for openai
    choices: dict[str, float] = {"Yes": 1.0, "No": 0.0}  # a choice's word and its value
    parse: Literal["choice", "score"] = "choice"  # how a generated reply is read
    scale: Annotated[float, Field(gt=0.0)] = 10.0  # parse score: the reply's number is in [0, scale]
    pattern: str | None = None  # a regex for the verdict in a reply (its last match)
    max_new_tokens: Annotated[int, Field(ge=1)] = 32  # of a generated reply (an endpoint's max_tokens)
    max_length: Annotated[int, Field(ge=1)] | None = None  # hf: a longer judge prompt has no verdict
    # what is judged
    template: str | None = None  # with {prompt} {completion} {criterion} {answer}; None: default_template
    system: str | None = None  # a system message
    criteria: list[CriterionCfg | str] | None = None
    criteria_file: str | None = None
    criteria_field: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        need = {"hf": ("path",), "openai": ("base_url", "model")}[self.kind]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a judge of kind {self.kind} needs {', '.join(missing)}")
        other = "openai" if self.kind == "hf" else "hf"
        stray = [k for k in ONLY[other] if k in self.model_fields_set]
        if stray:
            raise ValueError(f"{', '.join(stray)}: for a judge of kind {other}, not {self.kind}")
        if self.kind == "openai" and self.method == "choice":
            raise ValueError("method choice reads token probabilities of a local model (kind hf); an endpoint's "
                             "reply is generated and parsed (method generate)")
        if len(self.choices) < 2:
            raise ValueError(f"choices needs at least two words with their values, got {self.choices}")
        given = [k for k in ("criteria", "criteria_file", "criteria_field") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of criteria, criteria_file, criteria_field; got {', '.join(given)}")
        try:
            re.compile(self.pattern or "")
        except re.error as e:
            raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {e}") from None
        if self.criteria is not None:
            criteria_of(list(self.criteria), "criteria")
        return self

    @property
    def how(self) -> str:
        return self.method or ("choice" if self.kind == "hf" else "generate")


def default_template(cfg: JudgeCfg) -> str:
    if cfg.how == "generate" and cfg.parse == "score":
        ask = (f"How well does the response meet the criterion, from 0 (not at all) to {cfg.scale:g} (fully)? "
               "Reply with only the number.")
    else:
        ask = f"Does the response meet the criterion? Reply with only {' or '.join(cfg.choices)}."
    ask = ask.replace("{", "{{").replace("}", "}}")
    return ("You are grading a response to a problem.\n\nProblem:\n{prompt}\n\nReference answer: {answer}\n\n"
            "Response:\n{completion}\n\nCriterion: {criterion}\n" + ask)


# ---------------------------------------------------------------------------------------------------- criteria


def criteria_of(value, where: str) -> list[CriterionCfg]:
    """Criteria from a list of strings or mappings (a file's, a problem's); ValueError naming the bad one."""
    if isinstance(value, dict) and "criteria" in value:
        value = value["criteria"]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: criteria must be a non-empty list of strings or {{name, description, weight}} "
                         f"mappings, got {type(value).__name__}")
    out = []
    for i, c in enumerate(value):
        try:
            out.append(c if isinstance(c, CriterionCfg) else
                       CriterionCfg(name=f"c{i + 1}", description=c) if isinstance(c, str) else CriterionCfg(**c))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: criterion {i} ({c!r}) is not a string or a {{name, description, weight}} "
                             f"mapping: {str(e).splitlines()[-1] if str(e) else e}") from None
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: criteria names repeat ({', '.join(names)}); give each its own name")
    if sum(c.weight for c in out) <= 0:
        raise ValueError(f"{where}: the criteria's weights sum to 0")
    return out


def _fixed_criteria(cfg: JudgeCfg, where: str) -> list[CriterionCfg] | None:
    """The criteria of every row (config, file, default), or None when they come from each problem."""
    from .api import RewardError

    if cfg.criteria_field is not None:
        return None
    if cfg.criteria_file is None:
        return criteria_of(list(cfg.criteria), "criteria") if cfg.criteria else [DEFAULT_CRITERION]
    path = Path(cfg.criteria_file).expanduser()
    if not path.is_file():
        raise RewardError(f"{where}.judge.criteria_file: {path.resolve()} does not exist (a relative path is "
                          "relative to the config file's directory)")
    try:
        import yaml

        text = path.read_text()
        value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return criteria_of(value, str(path))
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise RewardError(f"{where}.judge.criteria_file: {e}") from None


def _check_problem_criteria(task, field: str, where: str) -> None:
    """Every problem of the task has usable criteria in ``meta[field]`` (a task whose problems cannot be listed is
    checked row by row instead)."""
    from ..tasks.base import describe
    from .api import RewardError

    for split in ("train", "heldout"):
        try:
            problems = task.problems(split)
        except Exception:  # noqa: BLE001 - no such split, or a generator: each row is checked when judged
            continue
        for p in problems:
            if field not in p.meta:
                raise RewardError(f"{where}.judge.criteria_field: {describe(p)} has no {field!r} field (its fields: "
                                  f"{', '.join(sorted(p.meta)) or 'none'}); give every problem its criteria, or use "
                                  "criteria / criteria_file")
            try:
                criteria_of(p.meta[field], describe(p))
            except ValueError as e:
                raise RewardError(f"{where}.judge.criteria_field: {e}") from None


# ---------------------------------------------------------------------------------------------------- verdicts


def parse_verdict(reply: str | None, cfg: JudgeCfg) -> float | None:
    """The value in [0, 1] of a generated reply, or None when it states none (see the module docstring)."""
    if not reply:
        return None
    if cfg.parse == "score":
        pattern = cfg.pattern or r"(-?\d+(?:\.\d+)?)(?:\s*/\s*\d+(?:\.\d+)?)?"
    else:
        pattern = cfg.pattern or r"\b(" + "|".join(re.escape(c) for c in cfg.choices) + r")\b"
    found = list(re.finditer(pattern, reply, flags=re.IGNORECASE))
    if not found:
        return None
    said = (found[-1].group(1) if found[-1].groups() else found[-1].group(0)).strip()
    if cfg.parse == "choice":
        values = {c.lower(): v for c, v in cfg.choices.items()}
        return values.get(said.lower())
    try:
        x = float(said)
    except ValueError:
        return None
    return x / cfg.scale if 0.0 <= x <= cfg.scale else None


def choice_value(probs: dict[str, float], cfg: JudgeCfg) -> float:
    """Σ v_c p_c / Σ p_c over the choices (the probabilities are already renormalised over them)."""
    return sum(cfg.choices[c] * p for c, p in probs.items()) / sum(probs.values())


# ---------------------------------------------------------------------------------------------------- the reward


class Judge:
    """The batch-mode reward: every (row, criterion) judged once (a cached judgement is not asked again), then each
    row's weighted score and per-criterion values."""

    def __init__(self, cfg: JudgeCfg, backend, criteria: list[CriterionCfg] | None, template: str, cache: Cache):
        self.cfg, self.backend, self.criteria, self.template, self.cache = cfg, backend, criteria, template, cache

    def criteria_for(self, problem) -> list[CriterionCfg]:
        if self.criteria is not None:
            return self.criteria
        from ..tasks.base import describe

        if self.cfg.criteria_field not in problem.meta:
            raise ValueError(f"{describe(problem)} has no {self.cfg.criteria_field!r} field for its criteria")
        return criteria_of(problem.meta[self.cfg.criteria_field], describe(problem))

    def verdict(self, raw) -> float | None:
        if raw is None:
            return None
        return choice_value(raw, self.cfg) if isinstance(raw, dict) else parse_verdict(raw, self.cfg)

    def ask(self, keys: dict[str, Any]) -> dict[str, str]:
        """Judge every key not in the cache; the reasons of those that failed, by key."""
        todo = [k for k in keys if self.cache.get(k) is None]
        failed = {}
        try:
            for i, raw in self.backend.judge([keys[k] for k in todo]):
                if isinstance(raw, Exception):
                    failed[todo[i]] = str(raw)
                elif raw is None:
                    failed[todo[i]] = "the judge prompt is longer than max_length"
                else:
                    self.cache.put(todo[i], raw)
        finally:
            self.cache.flush()
        return failed

    def __call__(self, prompts: list[str], completions: list[str], answers: list, problems: list) -> list:
        plans: list[list[tuple[CriterionCfg, str]] | str] = []
        keys: dict[str, Any] = {}
        settings = self.backend.settings()
        for prompt, completion, answer, problem in zip(prompts, completions, answers, problems):
            try:
                criteria = self.criteria_for(problem)
            except ValueError as e:
                plans.append(str(e))
                continue
            plan = []
            for c in criteria:
                user = self.template.format(prompt=prompt, completion=completion, criterion=c.description,
                                            answer=answer if answer not in (None, "") else "(none given)")
                text = self.backend.text(user)
                key = cache_key(self.backend.identity, text, settings)
                keys[key] = text
                plan.append((c, key))
            plans.append(plan)
        failed = self.ask(keys)
        out, reasons = [], []
        for plan in plans:
            row, why = self.row(plan, failed)
            out.append(row)
            if why:
                reasons.append(why)
        if reasons and all(v is None for v in out):
            raise ValueError(f"the judge scored none of the {len(out)} rows; the first reason: {reasons[0]}")
        if reasons:
            log.warning("judge: %d of %d rows unscorable; the first reason: %s", len(reasons), len(out), reasons[0])
        return out

    def row(self, plan, failed: dict[str, str]) -> tuple[dict | None, str | None]:
        """(the row's value, or None with the reason)."""
        if isinstance(plan, str):
            return None, plan
        values = {}
        for c, key in plan:
            if key in failed:
                return None, f"criterion {c.name!r}: {failed[key]}"
            raw = self.cache.get(key)
            v = self.verdict(raw)
            if v is None or not math.isfinite(v):
                return None, f"criterion {c.name!r}: the reply states no verdict: {str(raw)[:200]!r}"
            values[c.name] = v
        total = sum(c.weight for c, _ in plan)
        return {"score": sum(c.weight * values[c.name] for c, _ in plan) / total, **values}, None


def _backend(cfg: JudgeCfg, device, where: str):
    from .api import RewardError

    if cfg.kind == "hf":
        local, _ = model_dir(cfg.path, f"{where}.judge", kind="judge", expect="ForCausalLM")
        if cfg.chat and not has_chat_template(local):
            raise RewardError(f"{where}.judge.chat is true but the tokenizer at {cfg.path!r} has no chat template; "
                              "set chat: false, or leave it unset to use one only where there is one")
        backend = LocalJudge(cfg, local, str(device) if device is not None else "cpu")
        if cfg.how == "choice":
            try:
                backend.choice_ids()
            except (ValueError, IndexError) as e:
                raise RewardError(f"{where}.judge.choices: {e or 'a choice has no tokens'}") from None
        return backend
    key = None
    if cfg.api_key_env is not None:
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise RewardError(f"{where}.judge.api_key_env: the environment variable {cfg.api_key_env} is not set; "
                              f"export {cfg.api_key_env}=<your key> before the run (the key never goes in the "
                              "config)")
    backend = EndpointJudge(cfg, key)
    backend.probe(where, cfg.api_key_env)
    return backend


def build_judge(cfg: JudgeCfg, *, task, device, where: str, run_dir) -> Judge:
    """The reward of a ``judge`` entry, checked (and an endpoint probed) without loading weights; its response cache
    lives in ``run_dir`` (None: no cache, as when a config is only validated)."""
    from .api import RewardError

    template = cfg.template if cfg.template is not None else default_template(cfg)
    unknown = template_fields(template) - set(FIELDS)
    if unknown:
        raise RewardError(f"{where}.judge.template has unknown fields {sorted(unknown)}; it may use "
                          f"{', '.join('{' + f + '}' for f in FIELDS)} (write {{{{ and }}}} for literal braces)")
    if "completion" not in template_fields(template):
        raise RewardError(f"{where}.judge.template never shows the judge the {{completion}}; add it")
    criteria = _fixed_criteria(cfg, where)
    if cfg.criteria_field is not None:
        _check_problem_criteria(task, cfg.criteria_field, where)
    backend = _backend(cfg, device, where)
    name = hashlib.sha256(json.dumps(backend.identity, sort_keys=True).encode()).hexdigest()[:12]
    cache = Cache(Path(run_dir) / "judge-cache" / f"{cfg.kind}-{name}.jsonl" if run_dir is not None else None)
    return Judge(cfg, backend, criteria, template, cache)
