"""``forkrl report RUN_DIR``: one self-contained, offline HTML page about a run.

The page holds the run's stages and config, its training curves (one grid per stage, from
``metrics.jsonl``), and, when present, ``diff.json`` (``forkrl diff``: token agreement next to the paper's
figures, the causal substitution test, fork contexts, a token heat map), ``passk.json`` (``forkrl
passk``: pass@k curves, boundaries) and ``completions.jsonl`` (training's sample of each GRPO step's rows: the last
few steps', ``--completion-steps``). Everything is inline: CSS, SVG charts drawn in Python, no script, no
fonts, no URLs; user strings are HTML-escaped.

Python API: ``build_report(run_dir, completion_steps=3) -> str`` and ``write_report(run_dir, out=None,
completion_steps=3) -> Path``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError
from .completions import completions_section
from .curves import curves_section, header
from .diffsec import diff_section
from .load import load_run
from .markup import join
from .passksec import passk_section
from .style import page


def _guarded(render, data, path: Path, writer: str):
    """Render a JSON file's section; a file that parses but does not follow its format is a user error."""
    try:
        return render(data)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: does not follow the format `{writer}` writes ({type(e).__name__}: {e}); "
                          "re-run it to rewrite the file") from None


def build_report(run_dir: str | Path, completion_steps: int = 3) -> str:
    """The HTML page for ``run_dir``; ConfigError when it is missing, malformed, or holds nothing to report.
    ``completion_steps``: how many of the last steps of completions.jsonl to show (0: every step)."""
    from .. import __version__

    run = load_run(Path(run_dir))
    diff_path, passk_path = run.run_dir / "diff.json", run.run_dir / "passk.json"
    body = join([
        header(run),
        curves_section(run),
        _guarded(lambda d: diff_section(d, str(diff_path)), run.diff, diff_path, "forkrl diff"),
        _guarded(passk_section, run.passk, passk_path, "forkrl passk"),
        _guarded(lambda sources: completions_section(sources, last=completion_steps), run.sources,
                 run.run_dir / "completions.jsonl", "forkrl train"),
    ])
    title = f"forkrl report · {run.run_dir.resolve().name}"
    return page(title, body, version=__version__, has_heatmap=run.diff is not None)


def write_report(run_dir: str | Path, out: str | Path | None = None, completion_steps: int = 3) -> Path:
    """Write the page to ``out`` (default ``run_dir/report.html``) atomically; returns its path."""
    text = build_report(run_dir, completion_steps)
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..checkpoint import atomic_write_text

    atomic_write_text(out, text, what="the report")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run directory (forkrl train --out / forkrl demo --out), with diff.json and "
                             "passk.json when forkrl diff / forkrl passk wrote them there")
    parser.add_argument("--out", metavar="FILE", help="where to write the HTML (default: RUN_DIR/report.html)")
    parser.add_argument("--completion-steps", metavar="N", type=int, default=3,
                        help="show the sampled completions of the last N training steps (completions.jsonl; "
                             "0: every step; default 3)")


def main(args) -> int:
    if args.completion_steps < 0:
        raise ConfigError(f"--completion-steps {args.completion_steps}: give 0 (every step) or more")
    out = write_report(args.run_dir, args.out, args.completion_steps)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): open it in any browser, no network needed")
    return 0


__all__ = ["add_arguments", "build_report", "main", "write_report"]
