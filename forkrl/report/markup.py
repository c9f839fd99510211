"""Small HTML helpers: every user string passes through ``esc`` unless it is already ``Safe`` markup."""

from __future__ import annotations

import html
import math


# C0 controls (but tab, newline, carriage return) and DEL are not allowed in HTML text: show them as the
# Unicode "control pictures" (U+2400 + code, e.g. \x06 → ␆), as a tiny model's tokens often hold them.
CONTROLS = {c: 0x2400 + c for c in range(32) if c not in (9, 10, 13)} | {0x7F: 0x2421}


class Safe(str):
    """Markup built by this package (its pieces already escaped); ``esc`` leaves it as is."""


def esc(value) -> Safe:
    """``value`` as HTML text: ``Safe`` markup unchanged, anything else ``html.escape``d (quotes included)."""
    if isinstance(value, Safe):
        return value
    return Safe(html.escape(str(value).translate(CONTROLS), quote=True))


def join(parts) -> Safe:
    return Safe("".join(esc(p) for p in parts))


def tag(name: str, body="", **attrs) -> Safe:
    """``<name attr="...">body</name>``; attribute values are escaped, ``cls`` becomes ``class``."""
    text = "".join(f' {_attr_name(k)}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Safe(f"<{name}{text}>{esc(body)}</{name}>")


def _attr_name(key: str) -> str:
    return "class" if key == "cls" else key.replace("_", "-")  # data_tip → data-tip


def num(value, digits: int = 4) -> str:
    """A number for people: ``—`` when missing, ints as ints, floats to ``digits`` significant figures."""
    if value is None or isinstance(value, bool):
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def pct(value, decimals: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{decimals}f}%"


def show_tok(token: str) -> str:
    """A token with its whitespace made visible (``␣`` space, ``↵`` newline, ``⇥`` tab), ``∅`` if empty."""
    if token == "":
        return "∅"
    return token.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def alternatives(top) -> str:
    """``[[tok, p], ...]`` as ``␣col 0.41 · ␣split 0.32``."""
    return " · ".join(f"{show_tok(str(t))} {float(p):.2f}" for t, p in top)


def table(headers, rows, cls: str | None = None) -> Safe:
    """A table; cells are escaped unless ``Safe`` (a tuple cell ``(value, css_class)`` sets the class)."""
    head = join(tag("th", h) for h in headers)
    body = []
    for row in rows:
        cells = [tag("td", c[0], cls=c[1]) if isinstance(c, tuple) else tag("td", c) for c in row]
        body.append(tag("tr", join(cells)))
    return tag("table", join([tag("thead", tag("tr", head)), tag("tbody", join(body))]), cls=cls)


def section(sid: str, title: str, body) -> Safe:
    return tag("section", join([tag("h2", title), body]), id=sid)


def code(text) -> Safe:
    return tag("code", text)


def muted(text) -> Safe:
    return tag("p", text, cls="muted")
