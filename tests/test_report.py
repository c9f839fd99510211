"""``forkrl report``: every section from a hand-built run directory, escaping, no network, user errors,
and a real-browser render (skipped where no Chromium is installed).

The fixture (``make_run``) is a run directory written by hand to the JSON contracts of ``diff.json`` and
``passk.json``. ``python tests/test_report.py DIR`` writes it to DIR (used to make docs/report.png).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from forkrl.config import ConfigError
from forkrl.report import add_arguments, build_report, main
from forkrl.report.heatmap import YLORRD, colour, text_colour
from forkrl.report.markup import esc
from forkrl.report.svg import Series, line_chart, nice_ticks

ROOT = Path(__file__).resolve().parents[1]
EVIL_PROMPT = "<script>alert('forkrl')</script> 38+47="
STRATS = [" col", " split", " guess", " direct", " ans"]


# ------------------------------------------------------------------------------------------ the fixture
def metrics_rows() -> list[dict]:
    rows = [{"stage": "sft", "step": s, "loss": 2.4 * math.exp(-s / 10) + 0.35, "grad_norm": 1.5 * math.exp(-s / 15)
             + 0.3, "lr": 3e-3, "tokens": 2100, "update_skipped": False} for s in range(1, 31)]
    for s in range(1, 21):
        rows.append({"stage": "grpo", "step": s, "reward_mean": 0.45 + 0.015 * s + 0.03 * math.sin(s),
                     "entropy": 0.9 - 0.015 * s, "kl": None, "clip_frac_low": 0.002 * (s % 3),
                     "clip_frac_high": 0.01 + 0.001 * s, "completion_len_mean": 14 - 0.1 * s,
                     "completion_len_min": 6, "completion_len_max": 30 - s % 4,
                     "grad_norm": None if s == 7 else 0.4 + 0.05 * math.cos(s), "update_skipped": s == 7,
                     "loss": 0.02 * math.cos(s)} | ({"pass_at_1": 0.52} if s == 10 else {}))
    return rows


def _tops(token: str, h: float) -> list:
    """A base/tuned top-5 with ``token`` first, sharper for lower entropy."""
    p0 = round(max(0.3, 1 - h / 2.5), 2)
    rest = [t for t in STRATS + [" 1", " 2", " 3"] if t != token][:4]
    return [[token, p0]] + [[t, round((1 - p0) / (2 ** (i + 1)), 3)] for i, t in enumerate(rest)]


def trajectory(prompt: str, correct: bool, tokens: list[str], special: dict) -> dict:
    """``special``: index → (class, entropy, base_top, tuned_top); other tokens are UNSHIFTED, H = 0.05 … 0.5."""
    traj = {"prompt": prompt, "correct": correct, "tokens": tokens, "base_entropy": [], "class": [],
            "base_top": [], "tuned_top": []}
    for i, tok in enumerate(tokens):
        h = 0.05 + 0.15 * (i % 4)
        cls, h, bt, tt = special.get(i, ("U", h, _tops(tok, h), _tops(tok, h / 2)))
        for key, v in zip(("class", "base_entropy", "base_top", "tuned_top"), (cls, h, bt, tt)):
            traj[key].append(v)
    return traj


def diff_json() -> dict:
    fork = ("R", 1.92, [[" guess", 0.38], [" col", 0.31], [" split", 0.18], [" direct", 0.11], [" ans", 0.01]],
            [[" col", 0.81], [" split", 0.1], [" guess", 0.06], [" direct", 0.02], [" ans", 0.01]])
    t1 = trajectory("57+69=", True, [" col", " 7", "+", "9", "=", "16", " c1", " ;", " 5", "+", "6", "+", "1",
                                     "=", "12", " c1", " ;", " ans", " 126", "<|endoftext|>"], {0: fork})
    t2 = trajectory(EVIL_PROMPT, False, [" guess", " 40", "+", "50", "=", "90", " ;", " ans", " 90"], {
        0: ("U", 1.75, _tops(" guess", 1.75), _tops(" guess", 1.5)),
        3: ("R", 1.1, [["50", 0.46], ["45", 0.40], ["40", 0.1], ["55", 0.03], ["5", 0.01]],
            [["45", 0.7], ["50", 0.25], ["40", 0.03], ["55", 0.01], ["5", 0.01]])})
    t3 = trajectory("12+85=", True, [" split", " 10", "+", "80", "=", "90", " ;", " 2", "+", "5", "=", "7", " ;",
                                     " 90", "+", "7", "=", "97", " ;", " ans", " 97"], {
        0: ("R", 2.05, [[" col", 0.34], [" split", 0.30], [" guess", 0.2], [" direct", 0.15], [" ans", 0.01]],
            [[" split", 0.74], [" col", 0.2], [" guess", 0.03], [" direct", 0.02], [" ans", 0.01]]),
        11: ("S", 0.9, [["7", 0.6], ["8", 0.2], ["6", 0.1], ["9", 0.05], ["5", 0.03]],
             [["<b>&", 0.55], ["7", 0.3], ["8", 0.1], ["6", 0.03], ["9", 0.02]])})
    causal = {"tau": 1.2, "tau_rule": "90th percentile of base entropy", "samples_per_problem": 4, "num_problems": 50,
              "base": {"pass_at_1": 0.412}, "tuned": {"pass_at_1": 0.566},
              "oracle": {"pass_at_1": 0.532, "recovery": 0.779, "substitutions_per_traj": 0.61},
              "random": {"pass_at_1": 0.421, "recovery": 0.058, "substitutions_per_traj": 0.61},
              "entropy_gate": {"pass_at_1": 0.506, "recovery": 0.610, "substitutions_per_traj": 1.4}}
    forks = [{"context": "57+69=", "token": " col", "base_entropy": 1.92, "base_top": fork[2][:3],
              "tuned_top": fork[3][:3], "count": 14},
             {"context": "38+47= guess 40+", "token": "45", "base_entropy": 1.1, "base_top": t2["base_top"][3][:3],
              "tuned_top": t2["tuned_top"][3][:3], "count": 6}]
    return {"base": "/runs/base/sft/final", "tuned": "/runs/rl/grpo/final", "samples_from": "tuned", "top_k": 5,
            "temperature": 1.0, "num_trajectories": 64, "num_positions": 1280,
            "summary": {"agreement": 1235 / 1280, "reranked": 44 / 1280, "shifted": 1 / 1280, "entropy_ratio": 6.61,
                        "oracle_recovery": 0.779, "random_recovery": 0.058, "entropy_gate_recovery": 0.61,
                        "promoted_rank_mean": 104 / 44},
            "fractions": {"unshifted": 1235 / 1280, "reranked": 44 / 1280, "shifted": 1 / 1280},
            "promoted_rank_hist": {"2": 32, "3": 9, "4": 2, "5": 1, ">5": 1},
            "entropy": {"mean": 0.31, "reranked_mean": 2.05, "ratio": 6.61, "unshifted_mean": 0.24},
            "forks": forks, "causal": causal, "trajectories": [t1, t2, t3],
            "seconds": {"sample": 12.5, "teacher_force": 3.1, "causal": 40.2}}


def passk_json() -> dict:
    ks = [1, 2, 4, 8, 16, 32, 64]
    means = {"base": [0.412, 0.58, 0.72, 0.83, 0.9, 0.94, 0.96], "grpo": [0.566, 0.66, 0.74, 0.8, 0.85, 0.88, 0.9]}
    lost, gained = ["h3", "h9", "h21", "h44"], ["h17"]
    unsolved = {"base": ["h17", "h30"], "grpo": ["h3", "h9", "h21", "h30", "h44"]}
    models = {}
    for name, ms in means.items():
        cells = {str(k): {"mean": m, "lo": round(m - 0.06 / (1 + i), 4), "hi": round(min(1.0, m + 0.06 / (1 + i)), 4)}
                 for i, (k, m) in enumerate(zip(ks, ms))}
        per = [{"id": f"h{i}", "correct": 0 if f"h{i}" in unsolved[name] else 1 + (i * 7) % 60, "strategies": 1 + i % 3}
               for i in range(50)]
        models[name] = {"path": f"/runs/{name}/final", "pass_at_k": cells, "boundary": 50 - len(unsolved[name]),
                        "diversity_mean": 2.6 if name == "base" else 1.8, "per_problem": per}
    models["grpo"] |= {"unscorable": 3, "unscorable_first_error": "<timeout> after 5 s"}
    kept = [f"h{i}" for i in range(50) if f"h{i}" not in lost + gained + ["h30"]]
    return {"n": 64, "ks": ks, "num_problems": 50, "seed": 0, "bootstrap": 1000, "ci": 0.95, "models": models,
            "crossings": [{"a": "base", "b": "grpo", "between": [4, 8]}],
            "pairs": [{"a": "base", "b": "grpo", "gained": gained, "lost": lost, "kept": kept, "n_gained": 1,
                       "n_lost": 4, "n_kept": len(kept)}], "seconds": 311.0}


def make_run(root: Path, *, diff: bool = True, passk: bool = True, torn: bool = True, name: str = 'run-<i>&"x') -> Path:
    run = root / name  # the default is a directory name that must be escaped too
    run.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in metrics_rows())
    (run / "metrics.jsonl").write_text(lines + ('{"stage": "grpo", "step": 21, "rew' if torn else ""))
    strategies = {"col": [0.4, 0.6], "split": [0.35, 0.55], "guess": [0.25, 0.1]}
    (run / "summary.json").write_text(json.dumps({"stages": {
        "sft": {"wall_s": 41.3, "pass_at_1": 0.412, "strategies": strategies, "steps": 30},
        "grpo": {"wall_s": 196.2, "pass_at_1": 0.566, "strategies": strategies, "steps": 20}},
        "final_model": str(run / "grpo" / "final")}))
    (run / "config.yaml").write_text("seed: 0\nstages: [sft, grpo]\ntask:\n  type: arithmetic\n  format:\n"
                                     "    system_prompt: 'Answer </pre><b>now</b>'\n")
    if diff:
        (run / "diff.json").write_text(json.dumps(diff_json()))
    if passk:
        (run / "passk.json").write_text(json.dumps(passk_json()))
    return run


# -------------------------------------------------------------------------------- a small DOM for checks
class Node:
    def __init__(self, tag: str, attrs: dict, parent):
        self.tag, self.attrs, self.parent, self.children, self.data = tag, attrs, parent, [], []

    def text(self) -> str:
        return "".join(self.data) + "".join(c.text() for c in self.children)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class Dom(HTMLParser):
    VOID = {"meta", "br", "img", "link", "input", "hr", "area", "base", "col", "embed", "source", "track", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)
        self.nodes: list[Node] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        self.nodes.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        self.nodes.append(node)

    def handle_endtag(self, tag):
        node = self.cur
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.data.append(data)

    def by_id(self, sid: str) -> Node:
        return next(n for n in self.nodes if n.attrs.get("id") == sid)

    def find(self, tag: str, cls: str | None = None, within: Node | None = None) -> list[Node]:
        pool = self.nodes if within is None else [n for n in self.nodes if _inside(n, within)]
        return [n for n in pool if n.tag == tag and (cls is None or cls in n.classes())]


def _inside(node: Node, ancestor: Node) -> bool:
    while node is not None:
        if node is ancestor:
            return True
        node = node.parent
    return False


@pytest.fixture
def report(tmp_path):
    run = make_run(tmp_path)
    return build_report(run)


# --------------------------------------------------------------------------------------------- tests
def test_every_section_is_there(report):
    dom = Dom(report)
    ids = {n.attrs.get("id") for n in dom.nodes}
    assert {"run", "curves", "diff", "heatmap", "passk", "causal", "forks", "promoted-rank", "passk-curves"} <= ids
    stages = {n.attrs["data-stage"]: n for n in dom.find("div", "stage")}
    assert list(stages) == ["sft", "grpo"]
    # 8 panels per stage: SFT charts loss, grad norm and its final pass@1 (summary.json); GRPO all but KL (null)
    charted = {name: {f.attrs["data-metric"] for f in dom.find("figure", "panel", st) if "empty" not in f.classes()}
               for name, st in stages.items()}
    assert charted == {"sft": {"grad_norm", "loss", "pass_at_1"},
                       "grpo": {"reward", "pass_at_1", "entropy", "clip", "length", "grad_norm", "loss"}}
    empty = [f for f in dom.find("figure", "empty", stages["grpo"])]
    assert [f.attrs["data-metric"] for f in empty] == ["kl"] and "not logged" in empty[0].text()
    assert len(dom.find("svg")) == 3 + 7 + 1 + 1  # stage charts, rank histogram, pass@k curves
    header = dom.by_id("run")
    assert "0.566" in header.text() and "3 min 16 s" in header.text()  # grpo pass@1 and 196.2 s
    assert "skipped a torn last line" in header.text()
    assert "agreement" in dom.by_id("diff").text().lower() and "96–99%" in dom.by_id("diff").text()


def test_cards_tables_and_histogram_values(report):
    dom = Dom(report)
    cards = [c.text() for c in dom.find("div", "card")]
    assert cards[0].startswith("Agreement96.5%")  # 1235 / 1280 = 0.96484
    assert "3.4%" in cards[1] and "0.1%" in cards[2] and "6.6×" in cards[3] and "2.36" in cards[4]
    assert "within the paper's range" in cards[0] and "outside the paper's range" in cards[2]
    hist = dom.by_id("promoted-rank")
    titles = [n.text() for n in dom.find("title", within=hist)]
    assert titles == ["2: 32", "3: 9", "4: 2", "5: 1", ">5: 1"]
    causal = [[td.text() for td in dom.find("td", within=tr)] for tr in dom.find("tr", within=dom.by_id("causal"))]
    assert [row[0] for row in causal[1:]] == ["base", "tuned", "oracle", "random", "entropy gate"]
    assert causal[3][2:4] == ["0.532", "78%"] and causal[4][3] == "6%"
    assert "base and grpo change order between k = 4 and k = 8" in dom.by_id("passk").text()
    assert "48 / 50" in dom.by_id("passk").text() and "45 / 50" in dom.by_id("passk").text()
    warn = [n.text() for n in dom.find("p", "warn", dom.by_id("passk"))]
    assert warn == ["grpo: 3 completions could not be scored (counted as wrong); first error: <timeout> after 5 s"]


def test_heat_map_marks_reranked_and_shifted_tokens_with_alternatives(report):
    dom = Dom(report)
    heat = dom.by_id("heatmap")
    tokens = dom.find("span", "tok", heat)
    tokens = [t for t in tokens if "key" not in t.classes()]  # the legend's samples
    assert len(tokens) == 20 + 9 + 21
    reranked = [t for t in tokens if "tok-r" in t.classes()]
    shifted = [t for t in tokens if "tok-s" in t.classes()]
    assert [t.text() for t in reranked] == [" col", "50", " split"] and [t.text() for t in shifted] == ["7"]
    tip = reranked[0].attrs["data-tip"]
    assert tip.splitlines() == [
        "#1 · base entropy 1.92 nats · RERANKED (tuned argmax ␣col is base rank 2)",
        "base:  ␣guess 0.38 · ␣col 0.31 · ␣split 0.18 · ␣direct 0.11 · ␣ans 0.01",
        "tuned: ␣col 0.81 · ␣split 0.10 · ␣guess 0.06 · ␣direct 0.02 · ␣ans 0.01"]
    assert "tuned argmax <b>& is outside base top-5" in shifted[0].attrs["data-tip"]
    # colour: the scale runs 0 → 2.5 nats (the round number above the largest entropy, 2.05)
    low = next(t for t in tokens if t.text() == " 7")
    assert "background:#fff3b0;color:#1a1a1a" in low.attrs["style"]  # H 0.2, t = 0.08: 0.64 of ffffcc → ffeda0
    assert f"background:{colour(2.05 / 2.5)};color:#ffffff" in reranked[2].attrs["style"]


def test_colour_scale_and_ticks_by_hand():
    assert colour(0.0) == YLORRD[0] and colour(1.0) == YLORRD[-1] and colour(7.0) == YLORRD[-1]
    assert colour(0.0625) == "#fff6b6"  # halfway ffffcc → ffeda0: (255, 246, 182)
    assert text_colour("#ffffcc") == "#1a1a1a" and text_colour("#800026") == "#ffffff"
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.13, 0.87, 4) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1, 60, 5, integer=True) == [0, 20, 40, 60]
    assert nice_ticks(3, 3) == [2.6, 2.8, 3.0, 3.2, 3.4]
    assert nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_control_characters_become_visible():
    assert esc("a\x06b\x7f<\n") == "a␆b␡&lt;\n"  # a tiny model's byte tokens; newline kept


def test_line_chart_maps_points_and_breaks_at_gaps():
    # plot box x 56..346, y 164..12 (360 × 200, margins top 12 right 14 bottom 36 left 56); x ticks 0..10
    svg = line_chart([Series("a", [0, 5, 10], [0.0, None, 1.0])], xlabel="step", ylabel="v", y_range=(0, 1))
    assert "<polyline" not in svg  # a None splits the line into two single points, drawn as dots
    dots = re.findall(r'class="dot" cx="([\d.]+)" cy="([\d.]+)"', svg)
    assert dots == [("56.0", "164.0"), ("346.0", "12.0")]
    svg = line_chart([Series("a", [0, 10], [0.0, 1.0])], xlabel="step", ylabel="v", y_range=(0, 1))
    assert 'points="56.0,164.0 346.0,12.0"' in svg


def test_every_user_string_is_escaped(report):
    assert "<script" not in report.lower()
    assert "&lt;script&gt;alert(&#x27;forkrl&#x27;)&lt;/script&gt;" in report
    dom = Dom(report)
    heads = [n.text() for n in dom.find("div", "traj-head")]
    assert any(EVIL_PROMPT in h for h in heads)  # shown as text, not markup
    assert not dom.find("b", within=dom.find("pre")[0])  # the config's </pre><b> stays text
    assert 'run-<i>&"x' in dom.by_id("run").text() and "run-<i>&\"x" in dom.find("title")[0].text()
    assert not dom.find("i", within=dom.find("h1")[0])  # the run directory's "<i>" stays text
    eos = [t for t in dom.find("span", "tok") if t.text() == "<|endoftext|>"]
    assert len(eos) == 1


def test_the_page_makes_no_network_request(report):
    dom = Dom(report)
    for node in dom.nodes:
        assert node.tag not in {"script", "link", "iframe", "object", "embed", "img", "base", "audio", "video"}
        for attr in ("src", "href", "srcset", "action", "poster", "data", "xlink:href", "formaction"):
            value = node.attrs.get(attr)
            assert value is None or value.startswith("#"), (node.tag, attr, value)
        assert not any(a.startswith("on") for a in node.attrs), node.attrs  # no inline handlers
    low = report.lower()
    for needle in ("@import", "url(", "fetch(", "xmlhttprequest", "@font-face", "http://", "https://", "//cdn"):
        assert needle not in low, needle
    csp = next(n for n in dom.find("meta") if n.attrs.get("http-equiv") == "Content-Security-Policy")
    assert csp.attrs["content"].startswith("default-src 'none'")


def test_without_diff_and_passk_it_says_how_to_make_them(tmp_path):
    dom = Dom(build_report(make_run(tmp_path, diff=False, passk=False, torn=False)))
    assert "forkrl diff" in dom.by_id("diff").text() and "No diff.json" in dom.by_id("diff").text()
    assert "forkrl passk" in dom.by_id("passk").text() and "No passk.json" in dom.by_id("passk").text()
    assert not [n for n in dom.nodes if n.attrs.get("id") == "heatmap"]
    assert "torn" not in dom.by_id("run").text()
    assert len(dom.find("svg")) == 3 + 7


def test_demo_layout_reads_runs_in_subdirectories(tmp_path):
    demo = tmp_path / "demo"
    sub = demo / "grpo-run"
    sub.mkdir(parents=True)
    (sub / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows() if r["stage"] == "grpo"))
    (sub / "config.yaml").write_text("stages: [grpo]\n")
    (demo / "summary.json").write_text(json.dumps({
        "base": {"pass_at_1": 0.412, "strategies": {}, "path": "/cache/demo-base/sft/final"},
        "grpo": {"pass_at_1": 0.566, "strategies": {}, "path": str(sub / "grpo" / "final")},
        "stages": {"sft": {"wall_s": 300.0, "cached": True}, "grpo": {"wall_s": 95.0}}, "total_wall_s": 97.0}))
    dom = Dom(build_report(demo))
    assert [n.attrs["data-stage"] for n in dom.find("div", "stage")] == ["grpo-run/grpo"]
    header = dom.by_id("run").text()
    assert "(cached)" in header and "/cache/demo-base/sft/final" in header and "grpo-run/config.yaml" in header


def test_user_errors_name_the_file_and_line(tmp_path):
    run = make_run(tmp_path, torn=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1] + ['{"stage": "sft", "st'] + lines[1:]) + "\n")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        build_report(run)
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + ["[1, 2]"]) + "\n")
    with pytest.raises(ConfigError, match=r"line 4: expected a JSON object"):
        build_report(run)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "diff.json").write_text('{"fractions": {\n  "unshifted": 0.9,\n}')
    with pytest.raises(ConfigError, match=r"diff\.json, line 3 column 1: not valid JSON"):
        build_report(run)
    (run / "diff.json").write_text(json.dumps({"fractions": {}, "top_k": 5}))
    with pytest.raises(ConfigError, match=r"diff\.json: missing promoted_rank_hist, trajectories"):
        build_report(run)
    bad = diff_json()
    bad["trajectories"][1]["class"].pop()
    (run / "diff.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"trajectories\[1\] has 9 tokens but 8 class entries"):
        build_report(run)
    bad = passk_json()
    del bad["models"]["base"]["pass_at_k"]
    (run / "diff.json").unlink()
    (run / "passk.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"passk\.json: does not follow the format `forkrl passk` writes"):
        build_report(run)


def test_nothing_to_report_and_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="nothing to report"):
        build_report(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such directory"):
        build_report(tmp_path / "absent")


def test_command_line_writes_the_file(tmp_path, capsys):
    run = make_run(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args([str(run)])) == 0
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    out = tmp_path / "elsewhere" / "r.html"
    assert main(parser.parse_args([str(run), "--out", str(out)])) == 0
    assert out.read_text() == (run / "report.html").read_text()
    assert "report.html" in capsys.readouterr().out


def test_forkrl_cli_reports_a_user_error(tmp_path, capsys):
    try:
        from forkrl.cli import main as cli_main
        from forkrl.diagnostics import passk, tokendiff  # noqa: F401 - the CLI imports them to build its parser
    except ImportError as e:
        pytest.skip(f"forkrl.cli cannot build its parser yet ({e})")
    assert cli_main(["report", str(tmp_path / "absent")]) == 2
    assert "forkrl: error:" in capsys.readouterr().err


def test_renders_in_headless_chromium(tmp_path):
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")):
        pytest.skip("no chromium binary on PATH (install the `chromium` package to run the browser check)")
    run = make_run(tmp_path)
    report = run / "report.html"
    report.write_text(build_report(run))
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "render_report.py"), str(report),
                           "--screenshot", str(shot)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sections ok" in proc.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


if __name__ == "__main__":  # write the fixture run directory, e.g. to render docs/report.png
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "report-fixture")
    print(make_run(target, name="example-run"))
