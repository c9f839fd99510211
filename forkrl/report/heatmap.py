"""The token heat map of ``diff.json``'s sample trajectories (METHODS §3).

Each completion token is a span coloured by the base model's entropy H_t = −Σ_v π_b(v) log π_b(v) on a
sequential scale (pale = the base is sure, dark red = a fork). RERANKED tokens (the tuned argmax is in the
base top-k but not first) have a solid blue outline, SHIFTED ones (outside the base top-k) a dashed purple
one. Hovering a token shows both models' top alternatives with their probabilities (a CSS tooltip, no script).
"""

from __future__ import annotations

from ..config import ConfigError
from .markup import Safe, alternatives, join, show_tok, tag
from .svg import nice_ticks, tick_label

# ColorBrewer YlOrRd, 9 classes: a sequential scale readable in grey and by most colour-blind readers.
YLORRD = ("#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026")
CLASS_NAMES = {"U": "UNSHIFTED", "R": "RERANKED", "S": "SHIFTED"}
PER_TOKEN = ("base_entropy", "class", "base_top", "tuned_top")


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def colour(t: float) -> str:
    """The scale at ``t`` in [0, 1] (clamped), linear in RGB between the YlOrRd anchors."""
    t = min(max(t, 0.0), 1.0) * (len(YLORRD) - 1)
    i = min(int(t), len(YLORRD) - 2)
    a, b = _rgb(YLORRD[i]), _rgb(YLORRD[i + 1])
    return "#" + "".join(f"{round(x + (y - x) * (t - i)):02x}" for x, y in zip(a, b))


def text_colour(background: str) -> str:
    """White text on dark backgrounds (WCAG relative luminance below 0.3), near-black otherwise."""
    lin = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in _rgb(background)]
    return "#ffffff" if 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] < 0.3 else "#1a1a1a"


def check_trajectory(traj: dict, i: int, where: str) -> None:
    n = len(traj["tokens"])
    for key in PER_TOKEN:
        if len(traj[key]) != n:
            raise ConfigError(f"{where}: trajectories[{i}] has {n} tokens but {len(traj[key])} {key} entries; "
                              "re-run forkrl diff to rewrite the file")


def _tip(pos: int, h: float, cls: str, base_top, tuned_top) -> str:
    head = f"#{pos} · base entropy {h:.2f} nats · {CLASS_NAMES.get(cls, cls)}"
    if cls in ("R", "S") and tuned_top:
        ranks = [str(t) for t, _ in base_top]
        promoted = str(tuned_top[0][0])
        where = f"base rank {ranks.index(promoted) + 1}" if promoted in ranks else f"outside base top-{len(ranks)}"
        head += f" (tuned argmax {show_tok(promoted)} is {where})"
    return f"{head}\nbase:  {alternatives(base_top)}\ntuned: {alternatives(tuned_top)}"


def token_span(pos: int, token: str, h, cls: str, base_top, tuned_top, hmax: float) -> Safe:
    h = float(h) if h is not None else 0.0
    bg = colour(h / hmax)
    text = show_tok(token) if token.strip() == "" and "\n" not in token else token.replace("\n", "↵\n")
    css = {"R": "tok tok-r", "S": "tok tok-s"}.get(cls, "tok")
    return tag("span", text, cls=css, style=f"background:{bg};color:{text_colour(bg)}",
               data_tip=_tip(pos, h, cls, base_top, tuned_top))


def scale_max(trajectories: list[dict]) -> float:
    """The legend's upper end: a round number at or above the largest entropy shown."""
    top = max((float(h) for t in trajectories for h in t["base_entropy"] if h is not None), default=1.0)
    return nice_ticks(0.0, max(top, 1e-6), 8)[-1]


def legend(hmax: float) -> Safe:
    stops = ", ".join(YLORRD)
    ticks = join(tag("span", tick_label(v)) for v in (0, hmax / 2, hmax))
    scale = tag("div", join([tag("div", "", cls="ramp", style=f"background:linear-gradient(to right, {stops})"),
                             tag("div", ticks, cls="ramp-ticks")]), cls="scale")
    keys = join([tag("span", "base entropy (nats)", cls="muted"), scale,
                 tag("span", "RERANKED", cls="tok tok-r key"), tag("span", "SHIFTED", cls="tok tok-s key"),
                 tag("span", "hover a token for both models' top alternatives", cls="muted")])
    return tag("div", keys, cls="heat-legend")


def trajectory_block(i: int, traj: dict, hmax: float) -> Safe:
    classes = [str(c) for c in traj["class"]]
    spans = [token_span(j + 1, str(tok), h, c, bt, tt, hmax) for j, (tok, h, c, bt, tt) in
             enumerate(zip(traj["tokens"], traj["base_entropy"], classes, traj["base_top"], traj["tuned_top"]))]
    ok = traj.get("correct")
    verdict = tag("span", "✓ correct" if ok else "✗ wrong", cls="ok" if ok else "bad")
    counts = f"{classes.count('R')} RERANKED · {classes.count('S')} SHIFTED · {len(classes)} tokens"
    head = join([tag("b", f"#{i + 1}"), " ", verdict, " · ", counts, " · prompt ",
                 tag("code", traj.get("prompt", ""))])
    return tag("div", join([tag("div", head, cls="traj-head"), tag("div", join(spans), cls="toks")]), cls="traj")


def heatmap(trajectories: list[dict], where: str) -> Safe:
    """The heat map block (``id="heatmap"``); ``where`` names the file in error messages."""
    if not trajectories:
        return tag("div", tag("p", "diff.json holds no sample trajectories", cls="muted"), id="heatmap")
    for i, traj in enumerate(trajectories):
        check_trajectory(traj, i, where)
    hmax = scale_max(trajectories)
    blocks = [trajectory_block(i, t, hmax) for i, t in enumerate(trajectories)]
    return tag("div", join([tag("h3", "Token heat map"), legend(hmax)] + blocks), id="heatmap")
