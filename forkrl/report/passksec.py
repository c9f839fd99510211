"""The ``passk.json`` section: pass@k curves with bootstrap bands, crossings, capability boundaries
B(π) = {problems with at least one correct sample}, the gained / lost / kept sets and strategy diversity
(METHODS §5, arXiv 2604.14877)."""

from __future__ import annotations

from .markup import Safe, code, join, muted, num, section, table, tag
from .svg import PALETTE, Series, line_chart

HOWTO = "forkrl passk --model base=BASE_MODEL --model tuned=RUN_DIR --task RUN_DIR --out RUN_DIR"


def _model_series(name: str, m: dict, ks: list[int], color: str) -> Series:
    cells = [m["pass_at_k"].get(str(k)) or {} for k in ks]
    return Series(name, ks, [c.get("mean") for c in cells], color, [c.get("lo") for c in cells],
                  [c.get("hi") for c in cells], markers=True)


def curves(p: dict) -> Safe:
    ks = [int(k) for k in p["ks"]]
    models = p["models"]
    series = [_model_series(str(name), m, ks, PALETTE[i % len(PALETTE)]) for i, (name, m) in enumerate(models.items())]
    spans = [(c["between"][0], c["between"][1], "cross") for c in p.get("crossings") or []]
    chart = line_chart(series, xlabel="k (samples per problem, log₂ axis)", ylabel="pass@k", log2x=True, xticks=ks,
                       y_range=(0, 1), width=640, height=300, vspans=spans)
    ci = p.get("ci", 0.95)
    legend = join(tag("span", join([tag("i", "", style=f"background:{s.color}"), s.name])) for s in series)
    legend = join([legend, tag("span", join([tag("i", "", cls="bandkey", style="background:#888"),
                                             f"{ci:.0%} bootstrap interval"]))])
    return tag("figure", join([tag("figcaption", "Unbiased pass@k = 1 − C(n−c, k) / C(n, k), mean over problems"),
                               chart, tag("div", legend, cls="legend")]), cls="panel wide", id="passk-curves")


def crossings(p: dict) -> Safe:
    items = [tag("li", f"{c['a']} and {c['b']} change order between k = {c['between'][0]} and k = "
                       f"{c['between'][1]}") for c in p.get("crossings") or []]
    if not items and len(p["models"]) < 2:
        return muted("One model: no curves to compare.")
    if not items:
        return muted("The curves do not cross: the models keep the same order at every k.")
    return tag("ul", join(items), cls="crossings")


def boundary_table(p: dict) -> Safe:
    n, total = p.get("n"), p.get("num_problems")
    last = str(p["ks"][-1])
    rows = []
    for name, m in p["models"].items():
        pk = m["pass_at_k"]
        rows.append([tag("b", name), code(m.get("path", "—")),
                     (f"{num(m.get('boundary'))} / {num(total)}", "num"),
                     (num((pk.get("1") or {}).get("mean"), 3), "num"),
                     (num((pk.get(last) or {}).get("mean"), 3), "num"),
                     (num(m.get("diversity_mean"), 3), "num")])
    heads = ["model", "path", "boundary |B| (solved at least once)", "pass@1", f"pass@{last}",
             "strategy diversity (distinct strategies / problem)"]
    note = muted(f"n = {num(n)} samples per problem on {num(total)} held-out problems; {num(p.get('bootstrap'))} "
                 f"bootstrap resamples, seed {num(p.get('seed'))}"
                 + (f"; {float(p['seconds']):.1f} s" if isinstance(p.get("seconds"), (int, float)) else ""))
    explain = [muted(p["diversity_note"])] if p.get("diversity_note") else []
    return join([table(heads, rows, cls="boundary"), note] + explain + warnings(p))


def warnings(p: dict) -> list[Safe]:
    """Models whose numbers need a caveat: unscorable completions, a different tokenizer."""
    out = []
    for name, m in p["models"].items():
        if m.get("unscorable"):
            first = m.get("unscorable_first_error")
            out.append(tag("p", f"{name}: {m['unscorable']} completions could not be scored (counted as wrong)"
                                + (f"; first error: {first}" if first else ""), cls="warn"))
        if m.get("tokenizer_differs"):
            out.append(tag("p", f"{name}: its tokenizer differs from the first model's ({m['tokenizer_differs']})",
                           cls="warn"))
    return out


def _ids(ids, limit: int = 60) -> Safe:
    if not ids:
        return Safe("")
    shown = ", ".join(str(i) for i in ids[:limit]) + (f", … ({len(ids) - limit} more)" if len(ids) > limit else "")
    return tag("details", join([tag("summary", "ids"), tag("p", shown, cls="ids")]))


def pairs_table(p: dict) -> Safe:
    rows = []
    for pair in p.get("pairs") or []:
        cells = [(join([num(pair.get(f"n_{k}", len(pair.get(k) or []))), _ids(pair.get(k))]), "num")
                 for k in ("gained", "lost", "kept")]
        rows.append([join([tag("b", pair["a"]), " → ", tag("b", pair["b"])])] + cells)
    if not rows:
        return muted("one model only: no gained / lost / kept sets")
    return join([tag("h3", "Solved sets: what the second model gained, lost and kept"),
                 muted("gained = in B(second) but not B(first); lost = the reverse; kept = in both."),
                 table(["pair", "gained", "lost", "kept"], rows, cls="pairs")])


def passk_section(p: dict | None) -> Safe:
    if p is None:
        return section("passk", "Capability boundary: pass@k", tag("p", join([
            "No passk.json in the run directory. Produce it with ", code(HOWTO), " (see ", code("forkrl passk --help"),
            "), then run ", code("forkrl report"), " again."]), cls="howto"))
    intro = muted("Does RL expand what the model can solve, or sharpen what it already could? Where the curves "
                  "cross, the model ahead at pass@1 falls behind at large k (METHODS §5, arXiv 2604.14877).")
    return section("passk", "Capability boundary: pass@k",
                   join([intro, curves(p), crossings(p), boundary_table(p), pairs_table(p)]))
