"""Users' own rewards (rewards.api, rewards.scoring, rewards.isolation): loaded by path, module and entry point;
signatures checked at load; row, batch, group and async modes; mappings logged as components; failures make rows
unscorable; a reward stuck in C code killed by process isolation; reward files recorded and checked on resume."""

import json
import math
import textwrap
import time

import pytest
import torch
import yaml

from forkrl.config import ConfigError, RewardCfg, load_config, parse_config
from forkrl.rewards import RewardError, load, score_rollouts
from forkrl.tasks.arithmetic import ArithmeticTask
from forkrl.types import Role, Rollouts

from conftest import tiny_cfg_dict

TASK = ArithmeticTask(digits=2, train_size=50, heldout_size=10)


def rollouts(texts, group_size, tokens=None):
    """Rollouts of len(texts) rows in groups of ``group_size``: only their bookkeeping matters to scoring."""
    N = len(texts)
    L = 4
    ids = torch.arange(N * L).reshape(N, L) if tokens is None else tokens
    role = torch.full((N, L), int(Role.PROMPT), dtype=torch.int8)
    role[:, 2:] = int(Role.COMPLETION)
    group = torch.arange(N) // group_size
    return Rollouts(input_ids_NL=ids, role_NL=role, sampler_logp_NL=torch.zeros(N, L), group_N=group,
                    problem_N=group.clone(), truncated_N=torch.tensor([i % 3 == 0 for i in range(N)]))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def score(entries, texts, group_size=2, step=3, progress=0.5, task=TASK):
    problems = TASK.problems("train")
    loaded = load([RewardCfg(**e) for e in entries], task, where="grpo.rewards", timeout_s=5.0)
    r = rollouts(texts, group_size)
    return score_rollouts(r, texts, problems, task, loaded, seeds=list(range(len(texts))), step=step,
                          progress=progress)


BREVITY = """
def brevity(completion, target=10):
    return -abs(len(completion) - target) / target

def everything(completion, prompt, answer, problem, meta, task, rng, step, progress, completion_ids, truncated,
               group_index):
    return {"score": 1.0, "step": step, "progress": progress, "n_ids": len(completion_ids),
            "truncated": float(truncated), "group_index": group_index, "has_meta": float(bool(meta)),
            "answer_is_problems": float(answer == problem.answer and prompt == problem.prompt),
            "draw": rng.random()}
"""


def test_a_reward_file_named_in_the_config_is_found_relative_to_it(tmp_path, monkeypatch):
    write(tmp_path / "cfg" / "rewards" / "brevity.py", BREVITY)
    data = tiny_cfg_dict(**{"grpo.rewards": [{"name": "correct"},
                                             {"fn": "rewards/brevity.py:brevity", "weight": 0.1,
                                              "kwargs": {"target": 4}}]})
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)  # not the config's directory: the path is still found
    cfg = load_config(tmp_path / "cfg" / "run.yaml")
    assert cfg.grpo.rewards[1].fn == f"{(tmp_path / 'cfg' / 'rewards' / 'brevity.py').resolve()}:brevity"
    loaded = load(cfg.grpo.rewards, TASK, where="grpo.rewards", timeout_s=1.0)
    assert [r.label for r in loaded] == ["correct", "brevity"] and loaded[1].sha256 and loaded[1].file.is_file()
    scored, failures = score([{"fn": cfg.grpo.rewards[1].fn, "kwargs": {"target": 4}}], ["abcd", "ab"])
    assert failures.count == 0 and scored.components["brevity"].tolist() == [0.0, -0.5]


def test_every_documented_parameter_is_filled(tmp_path):
    path = write(tmp_path / "r.py", BREVITY)
    scored, failures = score([{"fn": f"{path}:everything"}], ["a", "b", "c", "d"], step=7, progress=0.25)
    assert failures.count == 0, failures.first_message
    c = scored.components
    assert c["everything/step"].tolist() == [7] * 4 and c["everything/progress"].tolist() == [0.25] * 4
    assert c["everything/n_ids"].tolist() == [2] * 4 and c["everything/truncated"].tolist() == [1, 0, 0, 1]
    assert c["everything/group_index"].tolist() == [0, 1, 0, 1]
    assert c["everything/has_meta"].tolist() == [1] * 4 and c["everything/answer_is_problems"].tolist() == [1] * 4
    # the row-seeded generator: row r draws from random.Random(seed r), whatever its batch
    import random
    assert c["everything/draw"].tolist() == pytest.approx([random.Random(r).random() for r in range(4)])
    assert scored.reward_N.tolist() == [1.0] * 4  # components are logged, not summed


def test_a_reward_by_module_and_by_entry_point(tmp_path, monkeypatch):
    write(tmp_path / "site" / "myrewards" / "__init__.py", "def shout(completion):\n    return float(completion.isupper())\n")
    dist = tmp_path / "site" / "myrewards-1.0.dist-info"
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: myrewards\nVersion: 1.0\n")
    write(dist / "entry_points.txt", "[forkrl.rewards]\nshout = myrewards:shout\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    by_module, _ = score([{"fn": "myrewards:shout"}], ["AB", "ab"])
    by_entry_point, _ = score([{"fn": "shout"}], ["AB", "ab"])
    assert by_module.reward_N.tolist() == by_entry_point.reward_N.tolist() == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"registered: .*shout"):
        score([{"fn": "whisper"}], ["a"])


@pytest.mark.parametrize("source, needle", [
    ("def f(completion, colour):\n    return 1.0\n", r"'colour' that forkrl does not provide; in mode 'row' it provides: "
                                                  r"completion, prompt, answer"),
    ("def f(completion, /):\n    return 1.0\n", "positional-only parameter 'completion'"),
    ("def f(completion):\n    return 1.0\n", r"kwargs \['target'\] are not parameters"),
    ("import nonexistent_package_xyz\n", r"(?s)importing .*r\.py raised ModuleNotFoundError.*line 1.*nonexistent_package_xyz"),
    ("def g(completion):\n    return 1.0\n", r"'f' is not defined in .*r\.py \(its functions: g\)"),
])
def test_a_reward_that_cannot_be_called_as_written_is_a_load_error(tmp_path, source, needle):
    path = write(tmp_path / "r.py", source)
    kwargs = {"target": 1} if "kwargs" in needle else {}
    with pytest.raises(RewardError, match=needle):
        load([RewardCfg(fn=f"{path}:f", kwargs=kwargs)], TASK, where="grpo.rewards", timeout_s=1.0)


def test_a_missing_reward_file_and_a_second_entry_with_the_same_label(tmp_path):
    with pytest.raises(RewardError, match=r"grpo.rewards\[0\]: reward file .*nope\.py does not exist"):
        load([RewardCfg(fn=f"{tmp_path}/nope.py:f")], TASK, where="grpo.rewards", timeout_s=1.0)
    with pytest.raises(RewardError, match="a second reward labelled 'correct'"):
        load([RewardCfg(name="correct"), RewardCfg(name="correct", weight=2)], TASK, where="grpo.rewards",
             timeout_s=1.0)
    with pytest.raises(ConfigError, match="exactly one of name"):
        parse_config(tiny_cfg_dict(**{"grpo.rewards": [{"name": "correct", "fn": "x:y"}]}))


def test_batch_and_group_modes_get_plural_arguments(tmp_path):
    path = write(tmp_path / "r.py", """
        def lengths(completions, step):
            return [len(c) + step for c in completions]

        def majority(completions, answer, group_indices):
            # the group's own answer (singular) and its rows (plural): +1 for the group's most common completion
            top = max(set(completions), key=completions.count)
            return [float(c == top) for c in completions]

        def short(completions):
            return [1.0]  # one value for a batch of four: every row unscorable
    """)
    scored, failures = score([{"fn": f"{path}:lengths", "mode": "batch"}], ["a", "bb", "ccc", "d"], step=1)
    assert failures.count == 0 and scored.reward_N.tolist() == [2, 3, 4, 2]
    scored, _ = score([{"fn": f"{path}:majority", "mode": "group"}], ["x", "x", "y", "z", "z", "z"], group_size=3)
    assert scored.reward_N.tolist() == [1, 1, 0, 1, 1, 1]
    scored, failures = score([{"fn": f"{path}:short", "mode": "batch"}], ["a", "b", "c", "d"])
    assert not scored.valid_N.any() and failures.count == 4 and "returned 1 values for 4 rows" in failures.first_message


def test_what_makes_a_row_unscorable(tmp_path):
    path = write(tmp_path / "r.py", """
        def odd(completion):
            return {"a": None, "b": float("nan"), "c": "1.0", "d": {"no": "score"}, "e": 0.5}[completion]
    """)
    scored, failures = score([{"fn": f"{path}:odd"}], ["a", "b", "c", "d", "e", "e"])
    assert scored.valid_N.tolist() == [False] * 4 + [True] * 2 and failures.count == 4
    assert scored.reward_N.tolist() == [0, 0, 0, 0, 0.5, 0.5]  # zeros only where the row is left out anyway
    assert math.isnan(scored.components["odd"][0])


def test_async_rewards_run_concurrently(tmp_path):
    path = write(tmp_path / "r.py", """
        import asyncio

        async def slow(completion):
            await asyncio.sleep(0.3)
            if completion == "hang":
                await asyncio.sleep(60)
            return float(len(completion))
    """)
    t0 = time.time()
    scored, failures = score([{"fn": f"{path}:slow", "timeout_s": 1.0}], ["a", "bb", "hang", "ccc"] * 2)
    assert time.time() - t0 < 5  # 8 calls of 0.3 s and two past the limit, awaited together
    assert scored.valid_N.tolist() == [True, True, False, True] * 2 and "RewardTimeout" in failures.first_message
    assert scored.reward_N.tolist() == [1, 2, 0, 3] * 2


STUCK = """
import os
import signal


def stuck(completion):
    if completion == "stuck":
        # a call that never returns to the interpreter and that SIGALRM cannot reach: a blocking read with the
        # alarm signal blocked, as C code that masks signals does
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        r, w = os.pipe()
        os.read(r, 1)
    return float(len(completion))
"""


def test_a_reward_stuck_in_a_system_call_is_killed_in_its_worker_and_the_next_call_goes_on(tmp_path):
    path = write(tmp_path / "stuck.py", STUCK)
    t0 = time.time()
    scored, failures = score([{"fn": f"{path}:stuck", "isolation": "process", "timeout_s": 2.0}],
                             ["a", "stuck", "bb", "ccc"])
    assert time.time() - t0 < 60
    assert scored.valid_N.tolist() == [True, False, True, True]  # a fresh worker scored the rows after it
    assert scored.reward_N.tolist() == [1, 0, 2, 3] and "worker process was killed" in failures.first_message


def test_process_isolation_reports_the_workers_traceback_and_refuses_the_task_parameter(tmp_path):
    path = write(tmp_path / "r.py", "def boom(completion):\n    raise KeyError('deep inside')\n\n"
                                    "def needs_task(task, completion):\n    return 1.0\n")
    scored, failures = score([{"fn": f"{path}:boom", "isolation": "process"}], ["a", "b"])
    assert not scored.valid_N.any() and "KeyError: 'deep inside'" in failures.first_message
    with pytest.raises(RewardError, match="not with isolation: process"):
        score([{"fn": f"{path}:needs_task", "isolation": "process"}], ["a"])


def test_format_works_for_every_task_that_can_find_an_answer(tmp_path):
    from forkrl.tasks.rgym import ReasoningGymTask

    rg = ReasoningGymTask("basic_arithmetic", size=4, heldout_size=2, seed=0)
    loaded = load([RewardCfg(name="format")], rg, where="grpo.rewards", timeout_s=1.0)
    texts = ["<answer>3</answer>", "no tags"]
    scored, _ = score_rollouts(rollouts(texts, 2), texts, rg.problems("train"), rg, loaded, seeds=[0, 1])
    assert scored.reward_N.tolist() == [1.0, 0.0]

    class Bare:
        name = "bare"
    with pytest.raises(RewardError, match="'format' reward needs a task"):
        load([RewardCfg(name="format")], Bare(), where="grpo.rewards", timeout_s=1.0)


def _grpo_run_cfg(tmp_path, reward_src: str):
    write(tmp_path / "cfg" / "my_reward.py", reward_src)
    data = tiny_cfg_dict(**{"grpo.rewards": [{"name": "correct"}, {"fn": "my_reward.py:parts", "weight": 0.5}]})
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(data))
    return tmp_path / "cfg" / "run.yaml"


PARTS = """
def parts(completion):
    return {"score": len(completion) / 100, "digits": float(sum(ch.isdigit() for ch in completion))}
"""


def test_a_run_logs_components_records_the_file_and_refuses_a_changed_one_on_resume(tmp_path):
    from forkrl.pipeline import run

    cfg_path = _grpo_run_cfg(tmp_path, PARTS)
    out = tmp_path / "out"
    run(load_config(cfg_path), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["reward/parts"], float) and isinstance(r["reward/parts/digits"], float) for r in rows)
    record = json.loads((out / "rewards.json").read_text())
    mine = [r for r in record if r["label"] == "parts"][0]
    assert mine["file"] == str((tmp_path / "cfg" / "my_reward.py").resolve())
    assert (out / "rewards" / mine["copy"]).read_text() == (tmp_path / "cfg" / "my_reward.py").read_text()
    (tmp_path / "cfg" / "my_reward.py").write_text(PARTS + "\n# edited\n")
    with pytest.raises(ConfigError, match=r"my_reward\.py changed since this run started.*--allow-changed-rewards"):
        run(load_config(cfg_path), out, resume=True)
    run(load_config(cfg_path), out, resume=True, allow_changed_rewards=True)  # finished: nothing left to do


def test_a_start_that_fails_on_its_rewards_writes_nothing_and_the_corrected_command_runs(tmp_path):
    import subprocess
    import sys

    cfg_path = _grpo_run_cfg(tmp_path, "def parts(completion, colour):\n    return 1.0\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "forkrl.cli", "train", str(cfg_path), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "grpo.rewards[1]: reward 'parts' takes a parameter 'colour'" in proc.stderr and not out.exists()
    (tmp_path / "cfg" / "my_reward.py").write_text(PARTS)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_caches_key_follows_the_reward_files_content_and_keeps_old_keys(tmp_path):
    from forkrl.rewards import fingerprint

    # the fork stage's cached base rollouts were keyed by {"name", "weight"} before rewards had more fields
    assert fingerprint(RewardCfg(name="correct")) == {"name": "correct", "weight": 1.0}
    path = write(tmp_path / "r.py", "def f(completion):\n    return 1.0\n")
    before = fingerprint(RewardCfg(fn=f"{path}:f"))
    path.write_text("def f(completion):\n    return 0.0\n")
    assert fingerprint(RewardCfg(fn=f"{path}:f"))["sha256"] != before["sha256"]


def test_a_reward_models_and_a_judges_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    data = tiny_cfg_dict(**{"grpo.rewards": [
        {"reward_model": {"path": "models/rm"}},
        {"judge": {"kind": "hf", "path": "../judge", "criteria_file": "rubric.yaml"}}]})
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    rewards = load_config(tmp_path / "cfg" / "run.yaml").grpo.rewards
    assert rewards[0].reward_model.path == str((tmp_path / "cfg" / "models" / "rm").resolve())
    assert rewards[1].judge.path == str((tmp_path / "judge").resolve())
    assert rewards[1].judge.criteria_file == str((tmp_path / "cfg" / "rubric.yaml").resolve())


def test_code_answers_are_run_in_the_sandbox_against_the_problems_tests():
    from forkrl.tasks.base import Problem

    tests = [["2", "4"], {"input": "5", "output": "10"}]
    problems = [Problem(id="p0", prompt="double it", answer="", meta={"tests": tests}),
                Problem(id="p1", prompt="no tests", answer="", meta={})]
    texts = ["```python\nprint(int(input()) * 2)\n```", "```python\nprint(4)\n```",
             "print(int(input()) * 2)", "import os\nos.fork()"]
    r = rollouts(texts, 2)
    r.problem_N[:] = torch.tensor([0, 0, 0, 1])
    loaded = load([RewardCfg(name="code_tests")], TASK, where="grpo.rewards", timeout_s=30.0)
    scored, failures = score_rollouts(r, texts, problems, TASK, loaded, seeds=[0, 1, 2, 3])
    assert scored.components["code_tests"][:3].tolist() == [1.0, 0.5, 1.0]
    assert not scored.valid_N[3] and "no test cases in meta['tests']" in failures.first_message


def test_a_pool_of_workers_goes_on_while_one_is_stuck(tmp_path):
    path = write(tmp_path / "stuck.py", STUCK)
    texts = ["stuck", "a", "bb", "ccc", "dddd", "stuck"]
    t0 = time.time()
    scored, failures = score([{"fn": f"{path}:stuck", "isolation": "process", "workers": 2, "timeout_s": 3.0}],
                             texts)
    elapsed = time.time() - t0
    assert scored.valid_N.tolist() == [False, True, True, True, True, False]
    assert scored.reward_N.tolist() == [0, 1, 2, 3, 4, 0] and failures.count == 2
    # the two stuck calls overlap the others' and each other's waiting: well under 6 calls x 3 s in a row
    assert elapsed < 60


ONCE_STUCK = """
import os
import signal
from pathlib import Path

MARK = Path(__file__).with_name("stuck-once")


def once(completion, step, group_index):
    if step == 1 and group_index == 0 and not MARK.exists():
        MARK.write_text("x")
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        r, w = os.pipe()
        os.read(r, 1)  # never returns
    return float(len(completion) % 2)
"""


def test_a_run_goes_on_past_a_reward_stuck_in_a_system_call(tmp_path):
    from forkrl.pipeline import run

    path = write(tmp_path / "once.py", ONCE_STUCK)
    cfg = parse_config(tiny_cfg_dict(**{"grpo.rewards": [{"fn": f"{path}:once", "isolation": "process",
                                                          "timeout_s": 3.0}]}))
    summary = run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["stages"]["grpo"]["steps"] == 2 and [r["unscorable_rows"] for r in rows] == [1, 0]
    assert "worker process was killed" in rows[0]["unscorable_first_error"]
