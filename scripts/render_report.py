#!/usr/bin/env python3
"""Render a ``forkrl report`` page in headless Chromium, offline: check the DOM, optionally take a screenshot.

    python scripts/render_report.py RUN/report.html                        # DOM check only
    python scripts/render_report.py RUN/report.html --screenshot docs/report.png

The DOM check loads the file:// page with every network path blocked (a dead proxy, a host resolver that
resolves nothing) and checks that the browser's DOM holds every section of the source page, every SVG chart
(each with its marks) and every RERANKED token. The screenshot is taken with a tall window, trimmed to the
page's content and, when Pillow is installed, reduced to ``--max-kb`` (palette, then scale). Exit status 1
when a check fails, 2 when no Chromium is found.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome", "headless_shell")
OFFLINE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--disable-default-apps", "--no-pings", "--mute-audio"]
SECTIONS = ("run", "curves", "diff", "passk")
MARKS = {"polyline", "circle", "rect", "polygon"}


class Census(HTMLParser):
    """Ids, SVG charts (and whether each holds any marks), and RERANKED / SHIFTED token spans of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: list[str] = []
        self.svg_marks: list[int] = []
        self.reranked = self.shifted = 0
        self.depth = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"])
        classes = (a.get("class") or "").split()
        self.reranked += "tok-r" in classes and "key" not in classes
        self.shifted += "tok-s" in classes and "key" not in classes
        if tag == "svg":
            self.svg_marks.append(0)
        elif tag in MARKS and self.svg_marks:
            self.svg_marks[-1] += 1

    handle_startendtag = handle_starttag


def find_browser(given: str | None) -> str | None:
    if given:
        return given
    return os.environ.get("CHROMIUM") or next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def run_browser(browser: str, args: list[str], profile: str, timeout: int) -> subprocess.CompletedProcess:
    cmd = [browser, *OFFLINE_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"render_report: {' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc


def check_dom(source: Census, dom: Census) -> list[str]:
    """What the browser's DOM lacks compared with the page's source (empty when all is there)."""
    problems = [f"section #{s} missing" for s in SECTIONS if s not in dom.ids]
    problems += [f"#{i} missing from the rendered DOM" for i in source.ids if i not in dom.ids]
    if not dom.svg_marks:
        problems.append("no SVG chart in the rendered DOM")
    if len(dom.svg_marks) != len(source.svg_marks):
        problems.append(f"{len(dom.svg_marks)} SVG charts rendered, {len(source.svg_marks)} in the file")
    problems += [f"SVG chart {i + 1} has no marks" for i, n in enumerate(dom.svg_marks) if n == 0]
    if (dom.reranked, dom.shifted) != (source.reranked, source.shifted):
        problems.append(f"RERANKED/SHIFTED tokens: {dom.reranked}/{dom.shifted} rendered, "
                        f"{source.reranked}/{source.shifted} in the file")
    return problems


def shrink(png: Path, out: Path, height: int, max_kb: int) -> str:
    """Trim the page's trailing background, then fit under ``max_kb``; a note on what was done."""
    try:
        from PIL import Image, ImageChops
    except ImportError:
        shutil.copyfile(png, out)
        return "Pillow not installed: screenshot kept at full window height, untrimmed"
    img = Image.open(png).convert("RGB")
    bg = Image.new("RGB", img.size, img.getpixel((img.width - 1, img.height - 1)))
    box = ImageChops.difference(img, bg).getbbox()
    bottom = min(img.height, (box[3] if box else img.height) + 24)
    note = "" if bottom < height else " (the page may be taller than --height: raise it)"
    img = img.crop((0, 0, img.width, bottom))
    img.save(out, optimize=True)  # full colour when it fits, else a 256-colour palette, then smaller
    scale = 1.0
    while out.stat().st_size > max_kb * 1024:
        small = img if scale == 1.0 else img.resize((round(img.width * scale), round(img.height * scale)),
                                                   Image.LANCZOS)
        small.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
        if scale < 0.5:
            break
        scale *= 0.9
    size = Image.open(out).size
    return f"{size[0]}×{size[1]}, {out.stat().st_size / 1024:.0f} KiB{note}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the HTML file forkrl report wrote")
    ap.add_argument("--screenshot", type=Path, help="also write a PNG of the whole page here")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=12000, help="window height; the PNG is trimmed to the content")
    ap.add_argument("--max-kb", type=int, default=300, help="shrink the PNG below this size (needs Pillow)")
    ap.add_argument("--chromium", help="the browser binary (default: $CHROMIUM, else chromium on PATH)")
    ap.add_argument("--timeout", type=int, default=120)
    args = ap.parse_args(argv)
    browser = find_browser(args.chromium)
    if browser is None:
        print("render_report: no chromium on PATH (apt-get install chromium, or pass --chromium)", file=sys.stderr)
        return 2
    url = args.report.resolve().as_uri()
    source = Census(args.report.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="forkrl-chromium-") as profile:
        dom = Census(run_browser(browser, ["--dump-dom", url], profile, args.timeout).stdout)
        problems = check_dom(source, dom)
        for p in problems:
            print(f"FAIL: {p}")
        if problems:
            return 1
        print(f"sections ok: {', '.join(i for i in dom.ids if i in SECTIONS + ('heatmap',))}; "
              f"{len(dom.svg_marks)} SVG charts; {dom.reranked} RERANKED and {dom.shifted} SHIFTED tokens")
        if args.screenshot:
            raw = Path(profile) / "raw.png"
            run_browser(browser, ["--hide-scrollbars", f"--window-size={args.width},{args.height}",
                                  f"--screenshot={raw}", url], profile, args.timeout)
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            print(f"screenshot {args.screenshot}: {shrink(raw, args.screenshot, args.height, args.max_kb)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
