"""The ``diff.json`` section: what training changed token by token, next to the paper's figures (METHODS §3,
Sparse Policy Selection, arXiv 2605.06241), the causal substitution test, fork contexts and the heat map."""

from __future__ import annotations

from .heatmap import heatmap
from .markup import Safe, alternatives, code, join, muted, num, pct, section, show_tok, table, tag
from .svg import PALETTE, bar_chart

PAPER = "Sparse Policy Selection (arXiv 2605.06241)"
HOWTO = "forkrl diff --base BASE_MODEL --tuned RUN_DIR --task RUN_DIR --out RUN_DIR"
CAUSAL_ROWS = (
    ("base", "base", "decode with the base model"),
    ("tuned", "tuned", "decode with the tuned model"),
    ("oracle", "oracle", "base, but the tuned argmax at RERANKED positions"),
    ("random", "random", "base, the same number of substitutions at random positions"),
    ("entropy_gate", "entropy gate", "base, the tuned argmax where H_t > τ (no labels needed)"),
)


def _figures(d: dict) -> list[tuple]:
    """(label, what it measures, value, formatted, paper range, paper text) for the cards."""
    s, f, k = d.get("summary") or {}, d["fractions"], d.get("top_k", 5)
    ratio = s.get("entropy_ratio", (d.get("entropy") or {}).get("ratio"))
    rank = s.get("promoted_rank_mean")
    times = "—" if ratio is None else f"{ratio:.1f}×"
    return [
        ("Agreement", "UNSHIFTED: same argmax", f["unshifted"], pct(f["unshifted"]), (0.96, 0.99), "96–99%"),
        ("RERANKED", f"tuned argmax in base top-{k}", f["reranked"], pct(f["reranked"]), (0.01, 0.04), "1–4%"),
        ("SHIFTED", f"tuned argmax outside base top-{k}", f["shifted"], pct(f["shifted"]), (0.0, 0.0), "0%"),
        ("Entropy ratio", "base entropy at RERANKED ÷ mean", ratio, times, (5.0, 12.0), "5–12×"),
        ("Promoted rank", "mean base rank of the tuned argmax", rank, num(rank, 3), (2.1, 2.4), "2.1–2.4"),
    ]


def cards(d: dict) -> Safe:
    out = []
    for label, what, value, shown, (lo, hi), paper in _figures(d):
        if value is None:
            verdict = tag("span", "not measured", cls="badge")
        elif lo - 1e-12 <= value <= hi + 1e-12:
            verdict = tag("span", "within the paper's range", cls="badge in")
        else:
            verdict = tag("span", "outside the paper's range", cls="badge out")
        out.append(tag("div", join([tag("div", label, cls="card-label"), tag("div", shown, cls="card-value"),
                                    tag("div", what, cls="muted small"), tag("div", f"paper: {paper}", cls="paper"),
                                    verdict]), cls="card"))
    return tag("div", join(out), cls="cards")


def meta(d: dict) -> Safe:
    secs = d.get("seconds") or {}
    timing = ", ".join(f"{k} {float(v):.1f} s" for k, v in secs.items() if isinstance(v, (int, float)))
    parts = ["base ", code(d.get("base", "?")), " · tuned ", code(d.get("tuned", "?")),
             f" · trajectories sampled from {d.get('samples_from', '?')} at temperature {num(d.get('temperature'))}"
             f" · {num(d.get('num_trajectories'))} trajectories, {num(d.get('num_positions'))} positions · "
             f"top-{d.get('top_k', 5)}" + (f" · {timing}" if timing else "")]
    return muted(join(parts))


def _hist_order(key: str) -> tuple:
    return (1, 0) if not key.isdigit() else (0, int(key))


def histogram(d: dict) -> Safe:
    hist = d["promoted_rank_hist"] or {}
    keys = sorted(hist, key=_hist_order)
    chart = bar_chart(keys, [float(hist[k]) for k in keys], xlabel="base rank of the tuned argmax",
                      ylabel="positions", color=PALETTE[0])
    total = sum(float(v) for v in hist.values())
    cap = join(["Promoted-rank histogram", tag("span", f"{num(total)} changed positions", cls="latest")])
    return tag("figure", join([tag("figcaption", cap), chart]), cls="panel", id="promoted-rank")


def entropy_table(d: dict) -> Safe:
    e = d.get("entropy") or {}
    rows = [["all positions", (num(e.get("mean"), 3), "num")],
            ["UNSHIFTED positions", (num(e.get("unshifted_mean"), 3), "num")],
            ["RERANKED positions", (num(e.get("reranked_mean"), 3), "num")],
            ["ratio RERANKED ÷ all", (num(e.get("ratio"), 3), "num")]]
    return tag("figure", join([tag("figcaption", "Base entropy (nats)"), table(["where", "mean H_t"], rows)]),
               cls="panel")


def _bar(p) -> Safe:
    if p is None:
        return Safe("")
    return tag("div", tag("i", "", style=f"width:{100 * min(max(float(p), 0.0), 1.0):.1f}%"), cls="hbar")


def causal_table(d: dict) -> Safe:
    c = d.get("causal")
    if not c:
        return muted("causal substitution test: not run (diff.json has no causal results)")
    rows = []
    for key, label, how in CAUSAL_ROWS:
        r = c.get(key) or {}
        p1 = r.get("pass_at_1")
        rows.append([tag("b", label), how, (join([num(p1, 3), _bar(p1)]), "num"),
                     (pct(r.get("recovery"), 0) if key not in ("base", "tuned") else "", "num"),
                     (num(r.get("substitutions_per_traj"), 3) if "substitutions_per_traj" in r else "", "num")])
    cap = (f"Causal test: τ = {num(c.get('tau'), 3)} ({c.get('tau_rule', '?')}), {num(c.get('num_problems'))} "
           f"problems × {num(c.get('samples_per_problem'))} samples. "
           "Recovery = (pass@1 − base) ÷ (tuned − base).")
    return tag("div", join([tag("h3", "Causal substitution test"), muted(cap),
                            table(["decoding", "how", "pass@1", "recovery of the RL gain", "substitutions / traj."],
                                  rows, cls="causal")]), id="causal")


def _context(text: str, width: int = 48) -> str:
    text = show_tok(text)
    return text if len(text) <= width else "…" + text[-width:]


def forks_table(d: dict, limit: int = 12) -> Safe:
    forks = (d.get("forks") or [])[:limit]
    if not forks:
        return muted("no fork contexts in diff.json")
    rows = [[(code(_context(str(f.get("context", "")))), "ctx"), code(show_tok(str(f.get("token", "")))),
             (num(f.get("base_entropy"), 3), "num"), alternatives(f.get("base_top") or []),
             alternatives(f.get("tuned_top") or []), (num(f.get("count")), "num")] for f in forks]
    return tag("div", join([tag("h3", "Top fork contexts"),
                            muted("Where the tuned model most often picks a different token than the base, most "
                                  "frequent first; ␣ is a space."),
                            table(["context", "fork token", "base H", "base top", "tuned top", "count"], rows,
                                  cls="forks")]), id="forks")


def diff_section(d: dict | None, where: str) -> Safe:
    if d is None:
        return section("diff", "What training changed, token by token", join([
            tag("p", join(["No diff.json in the run directory. Produce it with ", code(HOWTO),
                           " (see ", code("forkrl diff --help"), "), then run ", code("forkrl report"),
                           " again."]), cls="howto")]))
    intro = muted(f"Base and tuned models teacher-forced on the same trajectories; each completion position is "
                  f"UNSHIFTED, RERANKED or SHIFTED. Reference figures: {PAPER}.")
    row = tag("div", join([histogram(d), entropy_table(d)]), cls="grid two")
    body = [intro, cards(d), meta(d), row, causal_table(d), forks_table(d), heatmap(d["trajectories"], where)]
    return section("diff", "What training changed, token by token", join(body))
