"""The report's inline stylesheet and the page skeleton. System fonts only; no script; a Content Security
Policy that forbids every network load, so even a missed escape cannot make the page fetch anything."""

from __future__ import annotations

from .markup import esc, join, tag

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1d2330;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
 "Helvetica Neue",Arial,sans-serif}
nav{position:sticky;top:0;z-index:30;background:#1d2330;padding:8px 24px;display:flex;gap:20px}
nav a{color:#dfe5f2;text-decoration:none;font-weight:600;font-size:13px}
nav a:hover{color:#fff;text-decoration:underline}
main,header{max-width:1240px;margin:0 auto}
header,section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:18px 24px;margin:16px auto}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:18px;margin:0 0 6px;border-bottom:1px solid #e8eaef;padding-bottom:6px}
h3{font-size:15px;margin:18px 0 6px}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:12.5px}
code{background:#f0f2f5;border-radius:3px;padding:0 4px}
pre{background:#f6f8fa;border:1px solid #e6e8ec;border-radius:6px;padding:10px;overflow:auto;max-height:420px}
.muted{color:#5d6575;margin:4px 0 10px}
.small{font-size:12px}
.warn{background:#fff6df;border:1px solid #f0d68a;border-radius:6px;padding:6px 10px}
.howto{background:#eef4ff;border:1px solid #c9dafc;border-radius:6px;padding:10px 14px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border-bottom:1px solid #e8eaef;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f6f7f9;font-weight:600;color:#3b4252}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.ctx{text-align:right;white-space:nowrap}
details.config summary{cursor:pointer;font-weight:600;margin:6px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.grid.two{grid-template-columns:repeat(auto-fill,minmax(360px,420px))}
.stage{margin-top:10px}
.panel{margin:0;border:1px solid #e6e8ec;border-radius:6px;padding:8px 10px 6px;background:#fff}
.panel.wide{max-width:820px}
.panel figcaption{font-weight:600;font-size:13px;display:flex;justify-content:space-between;gap:8px}
.latest{font-weight:400;color:#5d6575;font-size:12px}
.absent{display:flex;flex-wrap:wrap;align-items:center;gap:6px 8px;margin:10px 0 4px;font-size:12.5px}
.absent .muted{margin:0}
.panel.empty{display:inline-flex;gap:6px;align-items:baseline;background:#f6f7f9;border-style:dashed;padding:3px 10px;
 border-radius:14px;cursor:help}
.panel.empty figcaption{font-weight:600;font-size:12.5px}
.notlogged{color:#8a93a3;font-style:italic}
.legend{font-size:12px;color:#3b4252;display:flex;flex-wrap:wrap;gap:4px 14px;margin:2px 0 2px 40px}
.legend i{display:inline-block;width:16px;height:3px;vertical-align:middle;margin-right:5px;border-radius:2px}
.legend i.bandkey{height:10px;opacity:.3}
svg.chart{width:100%;height:auto;display:block;overflow:visible}
svg text{font:10px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#555d6b}
svg text.label{fill:#2b3140;font-size:10.5px}
svg .grid{stroke:#eceef2;stroke-width:1}
svg .axis{stroke:#9aa1ad;stroke-width:1}
svg .line{fill:none;stroke-width:1.8;stroke-linejoin:round;stroke-linecap:round}
svg .band{opacity:.18;stroke:none}
svg .hit{fill:transparent}
svg .hit:hover{fill:rgba(0,0,0,.2)}
svg .vspan{fill:#f6e7bd;opacity:.75}
svg text.vlabel{fill:#8a6a12}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{flex:1 1 180px;border:1px solid #e1e4ea;border-radius:8px;padding:10px 12px;background:#fbfcfd}
.card-label{font-size:12px;font-weight:700;text-transform:uppercase;letter-spacing:.04em;color:#4a5263}
.card-value{font-size:26px;font-weight:700;font-variant-numeric:tabular-nums}
.paper{font-size:12.5px;color:#1d2330;margin:2px 0 4px}
.badge{display:inline-block;font-size:11px;border-radius:10px;padding:1px 8px;background:#eceef2;color:#4a5263}
.badge.in{background:#e1f4e7;color:#1e6b3a}
.badge.out{background:#fcebdc;color:#94470f}
.hbar{display:inline-block;width:90px;height:8px;margin-left:8px;background:#e8eaef;border-radius:4px;
 vertical-align:middle;overflow:hidden}
.hbar i{display:block;height:100%;background:#1f6fd1}
.heat-legend{display:flex;flex-wrap:wrap;align-items:center;gap:10px 18px;margin:6px 0 10px;font-size:12.5px}
.heat-legend .muted{margin:0}
.scale{width:220px}
.ramp{height:12px;border-radius:3px;border:1px solid #d7dbe2}
.ramp-ticks{display:flex;justify-content:space-between;font-size:11px;color:#5d6575}
.traj{border-top:1px solid #eceef2;padding:8px 0}
.traj-head{font-size:12.5px;color:#3b4252;margin-bottom:4px}
.ok{color:#1e6b3a;font-weight:600}
.bad{color:#a3281b;font-weight:600}
.toks{font:14px/2 ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;white-space:pre-wrap;
 word-break:break-word}
.tok{position:relative;padding:2px 0;cursor:default;box-shadow:inset -1px 0 0 rgba(255,255,255,.85)}
.tok-r{outline:2px solid #1f4fd1;outline-offset:-1px;font-weight:700}
.tok-s{outline:2px dashed #8a1fb0;outline-offset:-1px;font-weight:700}
.tok.key{padding:2px 6px;background:#fff}
.tok[data-tip]:hover{outline:2px solid #111;z-index:21}
.tok[data-tip]:hover::after{content:attr(data-tip);position:absolute;left:0;top:calc(100% + 6px);z-index:40;
 white-space:pre;
 background:#1d2330;color:#f4f6fb;font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 font-weight:400;padding:7px 10px;border-radius:6px;box-shadow:0 6px 18px rgba(0,0,0,.28);pointer-events:none}
.crossings{margin:6px 0 10px}
.ids{font-family:ui-monospace,monospace;font-size:12px;max-width:520px;white-space:normal;text-align:left}
details.completion summary{cursor:pointer;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
 font-size:12.5px;white-space:pre}
details.completion pre{white-space:pre-wrap;word-break:break-word;max-width:560px;margin:4px 0}
.episode-row{font:12.5px/1.6 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
 max-width:720px;border:1px solid #e6e8ec;border-radius:6px;padding:8px;margin:6px 0}
.role-prompt{color:#6a737d}.role-completion{background:#dbeafe;color:#1e3a8a}.role-env{background:#dcfce7;color:#14532d}
.role-tool{background:#fef3c7}
footer{max-width:1240px;margin:0 auto 24px;color:#7a8291;font-size:12px;text-align:center}
"""

NAV = (("run", "Run"), ("curves", "Training curves"), ("diff", "Token diff"), ("heatmap", "Heat map"),
       ("passk", "pass@k"), ("completions", "Completions"))


def page(title: str, body, *, version: str, has_heatmap: bool) -> str:
    """The whole document: head (charset, CSP, inline CSS), navigation, the sections, a footer."""
    links = join(tag("a", label, href=f"#{sid}") for sid, label in NAV if sid != "heatmap" or has_heatmap)
    head = (f'<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style>")
    foot = tag("footer", f"forkrl {version} · a self-contained offline page: inline CSS and SVG, no script, "
                         "no network requests")
    return (f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body>{tag("nav", links)}'
            f"<main>{esc(body)}</main>{foot}</body></html>\n")


__all__ = ["CSS", "CSP", "page"]
