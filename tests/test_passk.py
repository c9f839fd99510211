"""forkrl passk: the pass@k estimator, bootstrap, crossings, boundary sets, and the command end to end."""

import argparse
import itertools
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import tiny_cfg_dict
from forkrl.config import ConfigError
from forkrl.diagnostics import passk
from forkrl.models import ModelLoadError
from forkrl.tasks.arithmetic import ArithmeticTask
from forkrl.tasks.base import Problem


# ---------------------------------------------------------------- pass@k estimator
def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return float(np.float64(sum(any(j < c for j in s) for s in subsets)) / np.float64(len(subsets)))


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 9):
        for k in range(1, n + 1):
            got = passk.pass_at_k(n, list(range(n + 1)), k)
            for c in range(n + 1):
                assert abs(got[c] - brute_pass_at_k(n, c, k)) <= 1e-12, (n, c, k)
                assert passk.pass_at_k(n, c, k) == got[c]  # scalar and vector paths agree


def test_pass_at_k_hand_cases():
    assert passk.pass_at_k(64, 0, 64) == 0.0
    assert passk.pass_at_k(64, 64, 1) == 1.0
    assert passk.pass_at_k(64, 1, 64) == 1.0  # n − c < k: every subset holds the correct sample
    for n, c in ((8, 3), (64, 17), (10, 1)):
        assert abs(passk.pass_at_k(n, c, 1) - c / n) <= 1e-15
    assert abs(passk.pass_at_k(4, 2, 2) - 5 / 6) <= 1e-15  # 1 − C(2,2)/C(4,2) = 1 − 1/6
    assert abs(passk.pass_at_k(10, 1, 2) - 0.2) <= 1e-15  # 1 − C(9,2)/C(10,2) = 1 − 36/45
    # large n, where C(n, k) overflows float64: exact rational reference
    exact = 1 - Fraction(math.comb(997, 500), math.comb(1000, 500))
    assert abs(passk.pass_at_k(1000, 3, 500) - float(exact)) <= 1e-12


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        passk.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="correct counts"):
        passk.pass_at_k(4, [5], 1)


def test_ks_powers_of_two_and_n():
    assert passk.ks_for(64) == [1, 2, 4, 8, 16, 32, 64]
    assert passk.ks_for(10) == [1, 2, 4, 8, 10]
    assert passk.ks_for(1) == [1]
    assert passk.ks_for(3) == [1, 2, 3]


# ---------------------------------------------------------------- bootstrap
def test_bootstrap_contains_mean_and_is_reproducible():
    values = np.random.default_rng(1).random(50)
    mean, lo, hi = passk.bootstrap_ci(values, resamples=1000, seed=3)
    assert mean == values.mean()
    assert lo < mean < hi
    assert passk.bootstrap_ci(values, resamples=1000, seed=3) == (mean, lo, hi)
    assert passk.bootstrap_ci(values, resamples=1000, seed=4) != (mean, lo, hi)


def test_bootstrap_degenerate_when_all_equal():
    mean, lo, hi = passk.bootstrap_ci([0.1] * 7, resamples=500, seed=0)
    assert mean == lo == hi == 0.1
    mean_K, lo_K, hi_K = passk.bootstrap_ci(np.tile([0.3, 1.0], (5, 1)), resamples=200, seed=0)
    assert mean_K.tolist() == lo_K.tolist() == hi_K.tolist() == [0.3, 1.0]


def test_bootstrap_hand_case_and_naive_reference():
    # Two problems worth 0 and 1: a resample mean is 0 (p = 1/4), 0.5 or 1 (p = 1/4), so with 1000
    # resamples the 2.5% and 97.5% quantiles are exactly 0 and 1.
    assert passk.bootstrap_ci([0.0, 1.0], resamples=1000, seed=0) == (0.5, 0.0, 1.0)
    # The vectorised resample counts equal a per-resample loop over the same draws (float64).
    values_PK = np.random.default_rng(2).random((13, 3))
    idx = np.random.default_rng(9).integers(0, 13, size=(300, 13))
    means = np.array([[values_PK[idx[r], j].mean() for j in range(3)] for r in range(300)])
    lo_ref, hi_ref = np.quantile(means, [0.05, 0.95], axis=0)
    mean_K, lo_K, hi_K = passk.bootstrap_ci(values_PK, resamples=300, ci=0.9, seed=9)
    assert np.abs(lo_K - lo_ref).max() <= 1e-12 and np.abs(hi_K - hi_ref).max() <= 1e-12
    # one column alone gives that column's interval (the same resampled problem sets for every k)
    assert abs(passk.bootstrap_ci(values_PK[:, 1], resamples=300, ci=0.9, seed=9)[1] - lo_K[1]) <= 1e-12


# ---------------------------------------------------------------- crossings and boundary sets
def test_crossings_hand_built():
    ks = [1, 2, 4, 8]
    # a − b: −0.1, 0 (tie, skipped), +0.1, −0.1
    assert passk.crossings(ks, [0.1, 0.3, 0.5, 0.6], [0.2, 0.3, 0.4, 0.7]) == [[1, 4], [4, 8]]
    assert passk.crossings(ks, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]) == []
    assert passk.crossings(ks, [0.1, 0.2, 0.3, 0.4], [0.0, 0.2, 0.1, 0.3]) == []  # a never below b
    assert passk.crossings(ks, [0.5, 0.6, 0.7, 0.8], [0.4, 0.7, 0.8, 0.9]) == [[1, 2]]


def test_boundary_sets_hand_built():
    ids = ["p0", "p1", "p2", "p3", "p4"]
    got = passk.boundary_sets(ids, [0, 3, 1, 0, 2], [1, 0, 4, 0, 8])
    assert got == {"gained": ["p0"], "lost": ["p1"], "kept": ["p2", "p4"], "n_gained": 1, "n_lost": 1, "n_kept": 2}


# ---------------------------------------------------------------- scoring and diversity
class ToyTask:
    name = "toy"

    def score(self, problem, completion):
        return {"right": 1.0, "almost": 0.999, "close": 1 - 1e-10, "none": None, "nan": float("nan")}.get(
            completion, 0.0) if completion != "boom" else 1 / 0


class ToyTaskWithStrategy(ToyTask):
    def strategy(self, completion):
        return completion[:2]


def test_verdict_threshold_and_unscorable():
    task, p = ToyTask(), Problem(id="p", prompt="", answer="")
    assert passk.verdict(task, p, "right") == (True, None)
    assert passk.verdict(task, p, "close") == (True, None)  # >= 1 − 1e-9
    assert passk.verdict(task, p, "almost") == (False, None)
    assert passk.verdict(task, p, "wrong") == (False, None)
    for text in ("none", "nan", "boom"):
        ok, why = passk.verdict(task, p, text)
        assert ok is None and why
    assert "ZeroDivisionError" in passk.verdict(task, p, "boom")[1]


def test_score_texts_counts_and_diversity():
    problems = [Problem(id=f"p{i}", prompt="", answer="") for i in range(2)]
    texts = [["right", "close", "rixx", "boom", "nan"], ["wrong", "wrong", "none", "almost"]]
    correct, unscorable, strat, strat_all, err = passk.score_texts(ToyTaskWithStrategy(), problems, texts)
    assert correct == [2, 0] and unscorable == [2, 1]
    assert strat == [2, 0]  # "ri", "cl" among correct; nothing correct in p1
    assert strat_all == [4, 3]  # ri, cl, bo, na | wr, no, al
    assert err.startswith("ZeroDivisionError")
    correct2, _, strat2, strat_all2, _ = passk.score_texts(ToyTask(), problems, texts)
    assert correct2 == correct and strat2 is None and strat_all2 is None
    assert passk.diversity_note(ToyTask()).startswith("diversity is null")
    assert "correct completions" in passk.diversity_note(ToyTaskWithStrategy())


# ---------------------------------------------------------------- model names
def make_run_dir(root: Path, model_dir: Path, cfg_path: Path) -> Path:
    run = root / "myrun"
    shutil.copytree(model_dir, run / "grpo" / "final")
    (run / "grpo" / "final" / "DONE").write_text("")
    shutil.copy(cfg_path, run / "config.yaml")
    return run


def test_model_names_defaults_and_duplicates(tiny_model_dir, tmp_path):
    cfg_path = write_config(tmp_path, tiny_model_dir)
    run = make_run_dir(tmp_path, tiny_model_dir, cfg_path)
    specs = passk.parse_models([str(run), str(run / "grpo" / "final"), f"base={tiny_model_dir}"])
    assert [s.name for s in specs] == ["myrun", "grpo", "base"]
    assert specs[0].path == specs[1].path == run / "grpo" / "final" and specs[2].path == tiny_model_dir
    assert passk.parse_models([str(tiny_model_dir)])[0].name == tiny_model_dir.name
    with pytest.raises(ConfigError, match="both named 'x'.*NAME=PATH"):
        passk.parse_models([f"x={tiny_model_dir}", f"x={run}"])
    with pytest.raises(ConfigError, match="both named"):
        passk.parse_models([str(tiny_model_dir), str(tiny_model_dir)])
    with pytest.raises(ModelLoadError, match="neither a model directory"):
        passk.parse_models([f"a={tmp_path / 'missing'}"])


# ---------------------------------------------------------------- end to end
def write_config(tmp_path: Path, model_dir: Path) -> Path:
    cfg = tiny_cfg_dict(model={"path": str(model_dir)}, **{"sampling.batch_size": 16, "eval.num_problems": 4})
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    passk.add_arguments(parser)
    return parser.parse_args(argv)


def check_schema(result: dict, names: list[str], n: int, num_problems: int) -> None:
    ks = passk.ks_for(n)
    assert result["n"] == n and result["ks"] == ks and result["num_problems"] == num_problems
    assert isinstance(result["seed"], int) and result["bootstrap"] == 50 and result["ci"] == 0.95
    assert list(result["models"]) == names and isinstance(result["seconds"], float)
    for m in result["models"].values():
        assert isinstance(m["path"], str) and list(m["pass_at_k"]) == [str(k) for k in ks]
        for cell in m["pass_at_k"].values():
            assert set(cell) == {"mean", "lo", "hi"} and 0.0 <= cell["lo"] <= cell["mean"] <= cell["hi"] <= 1.0
        assert m["boundary"] == sum(p["correct"] >= 1 for p in m["per_problem"])
        assert isinstance(m["diversity_mean"], float) and len(m["per_problem"]) == num_problems
        for p in m["per_problem"]:
            assert isinstance(p["id"], str) and 0 <= p["correct"] <= n and isinstance(p["strategies"], int)
    for c in result["crossings"]:
        assert set(c) == {"a", "b", "between"} and c["between"][0] < c["between"][1]
    assert [(p["a"], p["b"]) for p in result["pairs"]] == list(itertools.combinations(names, 2))
    for p in result["pairs"]:
        assert {"gained", "lost", "kept", "n_gained", "n_lost", "n_kept"} <= set(p)


def test_cli_same_model_twice(tiny_model_dir, tmp_path, capsys):
    cfg_path = write_config(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    args = parse(["--model", f"base={tiny_model_dir}", "--model", f"again={tiny_model_dir}", "--task", str(cfg_path),
                  "--n", "8", "--bootstrap", "50", "--out", str(out)])
    assert passk.main(args) == 0
    result = json.loads((out / "passk.json").read_text())
    check_schema(result, ["base", "again"], 8, 4)
    base, again = result["models"]["base"], result["models"]["again"]
    assert base["pass_at_k"] == again["pass_at_k"] and base["per_problem"] == again["per_problem"]
    assert result["crossings"] == []
    pair = result["pairs"][0]
    assert pair["gained"] == pair["lost"] == [] and pair["n_kept"] == base["boundary"]
    assert base["tokenizer_differs"] is None and result["diversity_note"].startswith("strategies =")
    shown = capsys.readouterr().out
    assert "k=8" in shown and "base -> again: gained 0, lost 0" in shown and "passk.json" in shown


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """The tiny model of ``tiny_model_dir`` (same tokenizer) with other random weights."""
    from forkrl import models

    task = ArithmeticTask(digits=2, train_size=200, heldout_size=20)
    texts = [p.prompt + c for p, c in task.demonstrations("train")]
    return models.build_tiny(tmp_path_factory.mktemp("other") / "model", texts, arch="qwen2", vocab_size=300, seed=1,
                             hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             max_positions=128)


def fake_score(self, problem, completion):
    """A text-determined verdict so that a random-weight model has middling pass@k; some rows fail."""
    h = sum(map(ord, completion)) + int(problem.answer)
    if h % 7 == 0:
        raise ValueError("unparseable")
    return float(h % 5 == 0)


def test_cli_two_models_counts_match_independent_sampling(tiny_model_dir, other_model_dir, tmp_path, monkeypatch):
    from forkrl.diagnostics.source import encode_prompts, heldout_problems, load_eval_model, load_task_config
    from forkrl.sampling import completion_texts as decode_completions
    from forkrl.sampling import make_sampler, row_seeds, sampling_params

    monkeypatch.setattr(ArithmeticTask, "score", fake_score)
    cfg_path = write_config(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    args = parse(["--model", f"a={tiny_model_dir}", "--model", f"b={other_model_dir}", "--task", str(cfg_path),
                  "--n", "8", "--num-problems", "5", "--bootstrap", "50", "--seed", "7", "--out", str(out)])
    assert passk.main(args) == 0
    result = json.loads((out / "passk.json").read_text())
    check_schema(result, ["a", "b"], 8, 5)
    # every row sampled at once, outside the module: the same completions, so the same counts
    cfg = load_task_config(cfg_path)
    task, problems = heldout_problems(cfg, 5)
    for name, path in (("a", tiny_model_dir), ("b", other_model_dir)):
        model, tok, _ = load_eval_model(path, cfg)
        rollouts = make_sampler(cfg.sampling.model_copy(update={"batch_size": 64}), model, tok).sample(
            encode_prompts(cfg, tok, task, model, problems), 8, sampling_params(cfg, for_eval=True),
            seeds=row_seeds("passk:7", list(range(5)), 8))
        verdicts = [passk.verdict(task, problems[pi], t)[0]
                    for t, pi in zip(decode_completions(tok, rollouts), rollouts.problem_N.tolist())]
        per = result["models"][name]["per_problem"]
        assert [p["correct"] for p in per] == [sum(v is True for v in verdicts[8 * i : 8 * i + 8]) for i in range(5)]
        assert result["models"][name]["unscorable"] == sum(v is None for v in verdicts)
        for k in result["ks"]:  # mean pass@k from the counts, with exact binomials
            exact = sum(1 - Fraction(math.comb(8 - p["correct"], k), math.comb(8, k)) for p in per) / 5
            assert abs(result["models"][name]["pass_at_k"][str(k)]["mean"] - float(exact)) <= 1e-12
    ca = [p["correct"] for p in result["models"]["a"]["per_problem"]]
    cb = [p["correct"] for p in result["models"]["b"]["per_problem"]]
    ids = [p.id for p in problems]
    assert result["pairs"][0] == {"a": "a", "b": "b", **passk.boundary_sets(ids, ca, cb)}
    assert ca != cb and min(ca + cb) == 0  # the models differ and some problem is unsolved: not vacuous
    assert result["models"]["a"]["unscorable"] + result["models"]["b"]["unscorable"] > 0


def test_cli_bad_model_path_and_duplicate_names(tiny_model_dir, tmp_path):
    cfg_path = write_config(tmp_path, tiny_model_dir)
    common = ["--task", str(cfg_path), "--n", "4", "--out", str(tmp_path / "out")]
    with pytest.raises(ModelLoadError, match="nowhere: neither a model directory"):
        passk.main(parse(["--model", str(tmp_path / "nowhere"), *common]))
    with pytest.raises(ConfigError, match="both named 'm'"):
        passk.main(parse(["--model", f"m={tiny_model_dir}", "--model", f"m={tiny_model_dir}", *common]))
    with pytest.raises(ConfigError, match="--n 0: must be at least 1"):
        passk.main(parse(["--model", str(tiny_model_dir), *common[:2], "--n", "0", "--out", str(tmp_path / "o")]))
    assert not (tmp_path / "out").exists()


def test_forkrl_cli_exit_status_for_a_bad_model(tiny_model_dir, tmp_path, capsys):
    from forkrl.cli import main as forkrl_main

    cfg_path = write_config(tmp_path, tiny_model_dir)
    code = forkrl_main(["passk", "--model", f"base={tiny_model_dir}", "--model", str(tmp_path / "nowhere"),
                        "--task", str(cfg_path), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "forkrl: error:" in capsys.readouterr().err and not (tmp_path / "out").exists()
