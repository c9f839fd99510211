"""The report's header (the run, its stages, its config) and its training curves (one grid per stage)."""

from __future__ import annotations

from .load import MetricsSource, RunData
from .markup import Safe, code, join, muted, num, section, table, tag
from .svg import PALETTE, Series, line_chart

# (panel id, title, y label, metric keys, chart options); a key's legend name is in SERIES_NAMES.
PANELS = (
    ("reward", "Reward", "mean reward", ("reward_mean",), {}),
    ("pass_at_1", "Held-out pass@1", "pass@1", ("pass_at_1",), {"y_range": (0, 1)}),
    ("entropy", "Policy entropy", "nats / token", ("entropy",), {"y_zero": True}),
    # RAGEN-2: entropy sees H(Z|X) only; the MI estimate sees template collapse (grpo.mi_every)
    ("mi", "Input–reasoning MI (template collapse)", "nats", ("mi_token", "mi_seq"), {"y_zero": True}),
    ("spread", "In-group reward std", "std", ("group_reward_std", "group_reward_std_kept"), {"y_zero": True}),
    ("kl", "KL to the reference", "nats / token", ("kl",), {"y_zero": True}),
    ("clip", "Clip fractions", "share of tokens", ("clip_frac_low", "clip_frac_high"), {"y_zero": True}),
    ("length", "Completion length", "tokens", ("completion_len_mean",), {"y_zero": True}),
    ("grad_norm", "Gradient norm", "L2 norm", ("grad_norm",), {"y_zero": True}),
    ("loss", "Loss", "loss", ("loss",), {}),
)
OPTIONAL = {"mi", "spread"}  # drawn where logged, no "not logged" chip elsewhere (opt-in, or newer than the run)
SERIES_NAMES = {"clip_frac_low": "low side", "clip_frac_high": "high side", "completion_len_mean": "mean",
                "pass_at_1": "during training", "mi_token": "per token", "mi_seq": "per sequence",
                "group_reward_std": "all groups", "group_reward_std_kept": "groups kept"}


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def strategy_mix(strategies) -> str:
    """``{name: [share, accuracy]}`` as ``split 40%: 95% · col 35%: 90%``."""
    try:
        return " · ".join(f"{k} {v[0]:.0%}: {v[1]:.0%}" for k, v in strategies.items()) or "—"
    except (AttributeError, TypeError, IndexError, ValueError):
        return "—"


def _stage_rows(summary: dict) -> list[list]:
    rows, stages = [], summary.get("stages")
    for name, st in (stages.items() if isinstance(stages, dict) else ()):
        st = st if isinstance(st, dict) else {}
        top = summary.get(name)  # forkrl demo keeps a stage's pass@1 under the model's name
        p1 = st.get("pass_at_1", top.get("pass_at_1") if isinstance(top, dict) else None)
        wall = duration(st.get("wall_s")) + (" (cached)" if st.get("cached") else "")
        rows.append([name, num(st.get("steps")), wall, (num(p1, 3), "num"), strategy_mix(st.get("strategies"))])
    return rows


def _model_rows(summary: dict) -> list[list]:
    """Top-level entries with a pass@1 (``forkrl demo``'s ``base`` and ``grpo``)."""
    return [[name, (num(m["pass_at_1"], 3), "num"), strategy_mix(m.get("strategies")), code(m.get("path", "—"))]
            for name, m in summary.items()
            if name != "stages" and isinstance(m, dict) and "pass_at_1" in m]


def header(run: RunData) -> Safe:
    parts = [tag("h1", join(["forkrl report · ", tag("span", run.run_dir.resolve().name, cls="run-name")])),
             muted(join(["run directory ", code(run.run_dir.resolve())]))]
    summaries = [("summary.json", run.summary)] if run.summary else [
        (f"{s.label}/summary.json", s.summary) for s in run.sources if s.summary]
    for name, summary in summaries:
        stages, models = _stage_rows(summary), _model_rows(summary)
        if stages:
            parts.append(table(["stage", "steps", "wall time", "held-out pass@1", "strategy mix (share: accuracy)"],
                               stages, cls="stages"))
        if models:
            parts.append(table(["model", "held-out pass@1", "strategy mix (share: accuracy)", "path"], models))
        extra = [f"{k}: {summary[k]}" for k in ("final_model", "total_wall_s", "fast") if k in summary]
        parts.append(muted(f"from {name}" + ("; " + "; ".join(extra) if extra else "")))
    if not summaries:
        parts.append(muted("no summary.json: the run has not finished a stage yet"))
    for rel, text in run.configs:
        parts.append(tag("details", join([tag("summary", join(["Resolved config (", code(rel), ")"])),
                                          tag("pre", text)]), cls="config"))
    for s in run.sources:
        if s.torn_last_line:
            parts.append(tag("p", f"{s.path.name} in {s.label or 'the run directory'}: skipped a torn last line "
                                  "(the run was killed while writing it)", cls="warn"))
    return tag("header", join(parts), id="run")


def _stages(source: MetricsSource) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in source.rows:
        out.setdefault(str(row.get("stage", "train")), []).append(row)
    return out


def _values(rows: list[dict], key: str) -> list:
    return [row.get(key) if isinstance(row.get(key), (int, float)) else None for row in rows]


def _series(pid: str, keys, rows, xs, summary_stage: dict | None) -> list[Series]:
    out = []
    for i, key in enumerate(keys):
        ys = _values(rows, key)
        if any(y is not None for y in ys):
            lo = _values(rows, "completion_len_min") if pid == "length" else None
            hi = _values(rows, "completion_len_max") if pid == "length" else None
            out.append(Series(SERIES_NAMES.get(key, key), xs, ys, PALETTE[i], lo, hi))
    final = (summary_stage or {}).get("pass_at_1")
    if pid == "pass_at_1" and isinstance(final, (int, float)):
        x = summary_stage.get("steps") or (xs[-1] if xs else 0)
        out.append(Series("final (summary.json)", [x], [final], PALETTE[1], markers=True))
    return out


def _legend(series: list[Series], pid: str) -> Safe:
    items = [tag("span", join([tag("i", "", style=f"background:{s.color}"), s.name])) for s in series]
    if pid == "length" and series and series[0].lo is not None:
        items.append(tag("span", join([tag("i", "", cls="bandkey", style=f"background:{series[0].color}"),
                                       "min–max"])))
    return tag("div", join(items), cls="legend") if len(items) > 1 else Safe("")


def absent_chip(pid: str, title: str, keys) -> Safe:
    """A metric the stage did not record: a compact "not logged" chip instead of an empty chart."""
    why = f"{' / '.join(keys)}: absent or null at every step of this stage"
    return tag("figure", join([tag("figcaption", title), tag("span", "not logged", cls="notlogged")]),
               cls="panel empty", data_metric=pid, title=why)


def chart_panel(pid: str, title: str, ylabel: str, opts: dict, series: list[Series], xs: list) -> Safe:
    last = next((y for y in reversed(series[0].ys) if y is not None), None)
    cap = join([title, tag("span", f"last {num(last, 3)}", cls="latest")])
    chart = line_chart(series, xlabel="step", ylabel=ylabel, x_extent=(xs[0], xs[-1]), **opts)
    return tag("figure", join([tag("figcaption", cap), chart, _legend(series, pid)]), cls="panel", data_metric=pid)


def stage_block(source: MetricsSource, stage: str, rows: list[dict]) -> Safe:
    xs = [r["step"] if isinstance(r.get("step"), (int, float)) else i + 1 for i, r in enumerate(rows)]
    summary_stage = ((source.summary or {}).get("stages") or {}).get(stage)
    summary_stage = summary_stage if isinstance(summary_stage, dict) else None
    charted, absent = [], []
    for pid, title, ylabel, keys, opts in PANELS:
        series = _series(pid, keys, rows, xs, summary_stage)
        if series:
            charted.append(chart_panel(pid, title, ylabel, opts, series, xs))
        elif pid not in OPTIONAL:
            absent.append(absent_chip(pid, title, keys))
    name = f"{source.label}/{stage}" if source.label else stage
    skipped = sum(1 for r in rows if r.get("update_skipped"))
    head = f"stage {name} · steps {xs[0]}–{xs[-1]} · {len(rows)} logged"
    head += f" · {skipped} update{'s' * (skipped != 1)} skipped (non-finite gradient)" if skipped else ""
    parts = [tag("h3", head), tag("div", join(charted), cls="grid")]
    if absent:
        parts.append(tag("div", join([tag("span", "Not logged in this stage:", cls="muted")] + absent), cls="absent"))
    return tag("div", join(parts), cls="stage", data_stage=name)


def curves_section(run: RunData) -> Safe:
    blocks = []
    for source in run.sources:
        stages = _stages(source)
        if not stages:
            blocks.append(muted(f"{source.path}: no complete line yet"))
        blocks += [stage_block(source, stage, rows) for stage, rows in stages.items()]
    if not run.sources:
        blocks.append(muted(join(["no metrics.jsonl in this directory or its subdirectories; ",
                                  code("forkrl train CONFIG --out RUN_DIR"), " writes one line per step"])))
    intro = muted("One grid per stage; hover a point for its value. Metrics a stage did not record (KL with the KL "
                  "term off, rewards during SFT) are listed under its grid as “not logged”.")
    return section("curves", "Training curves", join([intro] + blocks))
