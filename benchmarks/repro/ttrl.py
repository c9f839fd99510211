"""TTRL's majority vote (arXiv 2504.16084) in miniature: it sharpens where the base's majority is right, and a wrong
majority erases a right minority (arXiv 2605.19444).

The base (``common.base``: the tiny model SFT'd on two-digit addition) answers half its samples with the ``guess``
strategy, which rounds both operands to tens: one fixed answer per question, right only where the rounding errors
cancel. So unseen (held-out) questions split by construction: on *agree* questions the guess is right and the
base's majority mostly is too; on *disagree* questions the guess's wrong answer is the majority and the right
answer, from the column and split strategies, a minority. Per seed and split, TTRL (GRPO with ``{name: majority}``,
no gold answer read) trains on the split's questions themselves, as test-time RL does, and each question is then
sampled ``n`` times from the base (twice, with two sampling seeds: the second is the control for sampling noise)
and from the tuned model. Figures: pass@1 (mean share of right samples), maj@n (share of questions whose majority is
right), the questions whose majority was learned (wrong → right) or corrupted (right → wrong), and *erased*: of the
questions whose base majority is wrong with at least one right sample, the share with no right sample left after
TTRL, beside the same share in the base's second sample. The training log's ``ttrl_*`` metrics come along. Beside
them, carrying no verdict (added after the first run), the same GRPO on the gold answers (the ``correct`` reward):
TTRL's own comparison, and what GRPO alone does to these bases (it lowered them in benchmarks/repro/grpo_lr.py), so
that a fall under TTRL can be told from a fall under any GRPO here.

Decided before running:
* premise: the split must hold: the base's maj@n above 0.5 on agree and below 0.5 on disagree (mean over seeds),
  else "not measurable in miniature";
* sharpening: "reproduced" if TTRL raises pass@1 on the agree questions on every seed, by a mean larger than both the
  seeds' std of the rise and the binomial standard error of the pass@1 it is measured from; else "not reproduced";
* erasure: "reproduced" if on the disagree questions the erased share after TTRL exceeds the base-resample control's
  on every seed, by a mean larger than the std of that difference; "not measurable in miniature" if some seed has
  no question with a right minority; else "not reproduced".

    python benchmarks/repro/ttrl.py --bases /tmp/repro/bases --out /tmp/repro/ttrl --json /tmp/ttrl.json
    python benchmarks/repro/ttrl.py --smoke --bases /tmp/s --out /tmp/s --json /tmp/t.json    # the path only
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402

SPLITS = ("agree", "disagree")
CONTROL = "correct"  # the same GRPO on the gold answers: TTRL's own comparison, and what GRPO alone does here
PATTERN = r"ans (-?\d+)"  # the arithmetic task's answer, read by the JSONL task's verifier


def questions(per_split: int) -> dict:
    """{split: held-out problems of two-digit addition}, ``per_split`` each, and 8 others for the stage's own
    held-out file. Agree: the guess strategy's answer round(a, -1) + round(b, -1) is right."""
    from forkrl.tasks.arithmetic import ArithmeticTask

    pool = ArithmeticTask(digits=2, train_size=3000, heldout_size=600).problems("heldout")
    agree = [p for p in pool if round(p.meta["a"], -1) + round(p.meta["b"], -1) == int(p.answer)]
    disagree = [p for p in pool if p not in agree]
    return {"agree": agree[:per_split], "disagree": disagree[:per_split], "other": disagree[-8:]}


def write_task(root: Path, split: str, qs: dict) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    for name, problems in (("train", qs[split]), ("heldout", qs["other"])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer})
                                                    + "\n" for p in problems))
    return {"type": "jsonl", "train_path": str(root / "train.jsonl"), "heldout_path": str(root / "heldout.jsonl"),
            "id_field": "id", "answer_pattern": PATTERN}


def config(seed: int, model: str, task: dict, steps: int, smoke: bool, reward: str = "majority") -> dict:
    grpo = {"steps": steps, "prompts_per_step": 2 if smoke else 8, "group_size": 4 if smoke else 8,
            "micro_batch_size": 8 if smoke else 16, "optim": {"lr": 1e-4}, "rewards": [{"name": reward}]}
    return {"seed": seed, "stages": ["grpo"], "model": {"path": model}, "task": task,
            "sampling": {"temperature": 1.0, "max_new_tokens": 48}, "grpo": grpo,
            "eval": {"num_problems": 8, "samples_per_problem": 1}, "checkpoint": {"every": 0, "keep_last": 1},
            "log_every": 20}


def sample(model_dir: Path, data: dict, n: int, seed: int) -> list[dict]:
    """Each training question's right-sample count and whether its majority (ties: first) is right, from ``n``
    samples of ``model_dir`` at the run's sampling settings."""
    from forkrl.config import parse_config
    from forkrl.diagnostics.passk import ModelSpec, sample_texts
    from forkrl.rewards.majority import group_vote

    cfg = parse_config(data, source="benchmarks/repro")
    task = cfg.task.build()
    problems = task.problems("train")
    texts_P, *_ = sample_texts(ModelSpec("m", model_dir), cfg, task, problems, n=n, seed=seed)
    out = []
    for p, texts in zip(problems, texts_P):
        v = group_vote(task, p, texts)
        out.append({"id": p.id, "right": sum(v.correct), "n": n, "majority_right": bool(v.label_correct)})
    return out


def figures(base: list[dict], again: list[dict], tuned: list[dict]) -> dict:
    """The split's figures from the base's two samples and the tuned model's, question by question."""
    n = base[0]["n"]
    minority = [i for i, q in enumerate(base) if not q["majority_right"] and q["right"] > 0]
    share = lambda qs, key: statistics.fmean(float(q[key]) for q in qs)  # noqa: E731
    return {"pass_base": share(base, "right") / n, "pass_tuned": share(tuned, "right") / n,
            "maj_base": share(base, "majority_right"), "maj_tuned": share(tuned, "majority_right"),
            "learned": sum(not b["majority_right"] and t["majority_right"] for b, t in zip(base, tuned)),
            "corrupted": sum(b["majority_right"] and not t["majority_right"] for b, t in zip(base, tuned)),
            "resample_learned": sum(not b["majority_right"] and t["majority_right"] for b, t in zip(base, again)),
            "resample_corrupted": sum(b["majority_right"] and not t["majority_right"] for b, t in zip(base, again)),
            "right_minority": len(minority),
            "erased": statistics.fmean(tuned[i]["right"] == 0 for i in minority) if minority else None,
            "erased_resample": statistics.fmean(again[i]["right"] == 0 for i in minority) if minority else None}


def training_log(rows: list[dict]) -> dict:
    """The ttrl_* metrics over the first and the last third of the steps (flips need a question seen before)."""
    third = max(1, len(rows) // 3)

    def mean(part, key):
        xs = [r[key] for r in part if r.get(key) is not None]
        return statistics.fmean(xs) if xs else None

    return {f"{key}_{where}": mean(part, key) for where, part in (("first", rows[:third]), ("last", rows[-third:]))
            for key in ("ttrl_label_accuracy", "ttrl_reward_accuracy", "ttrl_flip_rate", "ttrl_punished_minority")}


def cell(t: dict) -> str:
    """One table cell of a ``common.spread``: mean ± std (each seed)."""
    return f"{t['mean']:.3f} ± {t['std']:.3f} ({', '.join(f'{x:.3f}' for x in t['each'])})"


def verdicts(table: dict, n_samples: int, smoke: bool) -> dict:
    if smoke:
        return {"sharpening": "not measurable in miniature", "erasure": "not measurable in miniature"}
    premise = table["agree"]["maj_base"]["mean"] > 0.5 > table["disagree"]["maj_base"]["mean"]
    if not premise:
        return {"sharpening": "not measurable in miniature", "erasure": "not measurable in miniature"}
    rise = table["agree"]["pass_rise"]
    margin = max(rise["std"], common.binomial_se(table["agree"]["pass_base"]["mean"], n_samples))
    sharp = "reproduced" if min(rise["each"]) > 0 and rise["mean"] > margin else "not reproduced"
    gap = table["disagree"].get("erased_gap")
    if gap is None:
        erasure = "not measurable in miniature"
    else:
        erasure = "reproduced" if min(gap["each"]) > 0 and gap["mean"] > gap["std"] else "not reproduced"
    return {"sharpening": sharp, "erasure": erasure}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--questions", type=int, default=24, help="questions per split")
    ap.add_argument("--samples", type=int, default=32, help="samples per question in the evaluations")
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    per, n, steps = (4, 4, 2) if args.smoke else (args.questions, args.samples, args.steps)
    t0, runs, controls, qs = time.time(), [], [], questions(per)
    for seed in args.seeds:
        base_dir, base_pass = common.base(seed, args.bases or args.out, args.smoke)
        for split in SPLITS:
            run_dir = args.out / f"{split}-s{seed}"
            data = config(seed, str(base_dir), write_task(args.out / f"{split}-task", split, qs), steps, args.smoke)
            _, rows = common.run_one(data, run_dir)
            base, again = sample(base_dir, data, n, seed), sample(base_dir, data, n, seed + 1000)
            f = figures(base, again, sample(run_dir / "grpo" / "final", data, n, seed))
            runs.append({"seed": seed, "split": split, "base_heldout_pass_at_1": base_pass, **f,
                         **training_log(rows)})
            gold = config(seed, str(base_dir), data["task"], steps, args.smoke, reward=CONTROL)
            common.run_one(gold, args.out / f"{split}-gold-s{seed}")
            controls.append({"seed": seed, "split": split, **figures(
                base, again, sample(args.out / f"{split}-gold-s{seed}" / "grpo" / "final", gold, n, seed))})
    table = {}
    for split in SPLITS:
        mine = [r for r in runs if r["split"] == split]
        t = {k: common.spread([r[k] for r in mine]) for k in ("pass_base", "pass_tuned", "maj_base", "maj_tuned")}
        t["pass_rise"] = common.spread([r["pass_tuned"] - r["pass_base"] for r in mine])
        if all(r["erased"] is not None for r in mine):
            t["erased"] = common.spread([r["erased"] for r in mine])
            t["erased_resample"] = common.spread([r["erased_resample"] for r in mine])
            t["erased_gap"] = common.spread([r["erased"] - r["erased_resample"] for r in mine])
        for k in ("learned", "corrupted", "resample_learned", "resample_corrupted", "right_minority"):
            t[k] = sum(r[k] for r in mine)
        table[split] = t
    gold = {}
    for split in SPLITS:
        mine = [r for r in controls if r["split"] == split]
        gold[split] = {k: common.spread([r[k] for r in mine]) for k in ("pass_tuned", "maj_tuned")}
        if all(r["erased"] is not None for r in mine):
            gold[split]["erased"] = common.spread([r["erased"] for r in mine])
        gold[split].update({k: sum(r[k] for r in mine) for k in ("learned", "corrupted")})
    verdict = verdicts(table, len(args.seeds) * per * n, args.smoke)
    smoke = " (smoke run: no result)" if args.smoke else ""
    lines = [f"TTRL (majority-vote reward, no gold) on {per} held-out 2-digit questions a split, {steps} steps, "
             f"{n} samples a question, {len(args.seeds)} seeds; mean ± std | each seed",
             "split | base maj@n | base pass@1 | TTRL pass@1 | TTRL maj@n | majority learned / corrupted (resample)",
             "---|---|---|---|---|---"]
    for split, t in table.items():
        lines.append(f"{split} | {cell(t['maj_base'])} | {cell(t['pass_base'])} | {cell(t['pass_tuned'])} | "
                     f"{cell(t['maj_tuned'])} | {t['learned']} / "
                     f"{t['corrupted']} ({t['resample_learned']} / {t['resample_corrupted']})")
    for split, t in gold.items():
        lines.append(f"{split}, control: GRPO on the gold answers | | | {cell(t['pass_tuned'])} | {cell(t['maj_tuned'])} "
                     f"| {t['learned']} / {t['corrupted']}")
    d = table["disagree"]
    if "erased" in d:
        lines.append(f"disagree, {d['right_minority']} questions with a right minority under a wrong majority: erased "
                     f"after TTRL {cell(d['erased'])}; in the base's second sample {cell(d['erased_resample'])}"
                     + (f"; after GRPO on the gold answers {cell(gold['disagree']['erased'])}"
                        if "erased" in gold["disagree"] else ""))
    for split in SPLITS:
        mine = [r for r in runs if r["split"] == split]
        shown = ", ".join(f"{k.removeprefix('ttrl_')} {statistics.fmean(r[k] for r in mine if r[k] is not None):.3f}"
                          for k in mine[0] if k.startswith("ttrl_") and any(r[k] is not None for r in mine))
        lines.append(f"{split} training log (mean over seeds): {shown}")
    lines.append("paper (arXiv 2504.16084): Qwen2.5-Math-7B AIME 2024 pass@1 about +211% relative, past the base's maj@n; "
                 f"miniature sharpening on agree: {verdict['sharpening']}{smoke}")
    lines.append("paper (arXiv 2605.19444): a wrong majority suppresses a right minority for good, corrupted problems "
                 f"outnumber learned ones; miniature erasure on disagree: {verdict['erasure']}{smoke}")
    print("\n".join(lines))
    common.write_json(args.json, {"table": table, "gold_control": gold, "runs": runs, "controls": controls,
                                  "verdict": verdict, "smoke": args.smoke,
                                  "steps": steps, "questions": per, "samples": n, "wall_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
