"""The report's completions section: the rows ``completions.jsonl`` sampled from the last GRPO steps (training
writes it: ``log_completions`` rows per step), with their reward, reward components, advantage and a collapsed
completion; an env task's rows open into the episode viewer (turns, and the row's tokens coloured by role). Model
text is escaped like every user string."""

from __future__ import annotations

from .load import MetricsSource
from .markup import Safe, code, join, muted, num, section, table, tag

PREVIEW = 60  # characters of a completion shown before it is opened


def _steps(rows: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """``rows`` grouped by (stage, step), in file order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((str(row.get("stage", "")), row.get("step")), []).append(row)
    return list(groups.items())


def _completion(text) -> Safe:
    text = "" if text is None else str(text)
    preview = text[:PREVIEW].replace("\n", "↵") + ("…" if len(text) > PREVIEW else "")
    return tag("details", join([tag("summary", preview or "∅"), tag("pre", text)]), cls="completion")


def _episode(episode: dict) -> Safe:
    """The episode viewer: every turn (action, observation, reward), then the row itself, its prompt, action
    (COMPLETION) and observation (ENV) tokens coloured apart, as the loss sees them."""
    turns = episode.get("turns") if isinstance(episode.get("turns"), list) else []
    rows = [[(num(t), "num"), tag("pre", str(x.get("action", ""))), tag("pre", str(x.get("observation") or "")),
             (num(x.get("reward"), 3), "num")] for t, x in enumerate(turns, 1) if isinstance(x, dict)]
    spans = [tag("span", str(text), cls=f"role-{role}") for text, role in episode.get("spans", [])
             if isinstance(role, str) and role.isalpha()]
    error = episode.get("error")
    summary = f"{len(turns)} turns, return {num(episode.get('return'), 3)}" + (f"; {error}" if error else "")
    return tag("details", join([tag("summary", summary), table(["turn", "action", "observation", "reward"], rows),
                                tag("div", join(spans), cls="episode-row")]), cls="completion episode")


def _row_cells(row: dict, labels: list[str]) -> list:
    components = row.get("components") if isinstance(row.get("components"), dict) else {}
    valid = row.get("valid", True)
    reward = (num(row.get("reward"), 3), "num") if valid else (tag("span", "unscorable", cls="bad"), "num")
    return [(num(row.get("row")), "num"), code(row.get("problem_id", "—")), row.get("prompt", ""), reward,
            *((num(components.get(k), 3), "num") for k in labels),
            (num(row.get("advantage"), 3), "num"), "yes" if row.get("truncated") else "no",
            (num(row.get("completion_tokens")), "num"),
            _episode(row["episode"]) if isinstance(row.get("episode"), dict) else _completion(row.get("completion"))]


def _step_table(stage: str, step, rows: list[dict], label: str) -> Safe:
    labels = list(dict.fromkeys(k for r in rows if isinstance(r.get("components"), dict) for k in r["components"]))
    headers = ["row", "problem", "prompt", "reward", *labels, "advantage", "truncated", "tokens", "completion"]
    title = " · ".join(x for x in (label, stage, f"step {step}") if x)
    return tag("div", join([tag("h3", title), table(headers, [_row_cells(r, labels) for r in rows])]),
               cls="completions", data_stage=stage, data_step=str(step))


def completions_section(sources: list[MetricsSource], *, last: int = 3) -> Safe:
    """The last ``last`` steps of each run's ``completions.jsonl`` (every step when ``last`` is 0)."""
    parts = []
    for source in sources:
        steps = _steps(source.completions)
        for (stage, step), rows in steps[-last:] if last else steps:
            parts.append(_step_table(stage, step, rows, source.label))
    if not parts:
        return section("completions", "Completions", muted(
            "No completions.jsonl: a GRPO run writes a sample of each step's rows there (log_completions rows per "
            "step, 4 by default)."))
    shown = f"the last {last} steps" if last else "every step"
    return section("completions", "Completions", join([
        muted(f"Rows sampled from {shown} of training (completions.jsonl: the first rows of the first groups of "
              "each step); reward is the task's, components are each reward's value; open a completion to read "
              "it whole."), *parts]))
