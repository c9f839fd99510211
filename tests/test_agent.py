"""Env tasks end to end: an environment from the config (built-in or the user's class), demonstrations replayed
token by token for SFT with observations masked or trained on, episode rewards, the multi-turn GRPO step, and the
bad input of each."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from forkrl.config import load_config, parse_config
from forkrl.envs.base import Demo, HELDOUT_SEED0
from forkrl.envs.episodes import PlainCodec, replay
from forkrl.rewards import load as load_rewards
from forkrl.rewards import score_rollouts
from forkrl.tasks import build_task
from forkrl.tasks.base import TaskError
from forkrl.trainers.sft import pack_episodes
from forkrl.types import Role

from conftest import tiny_cfg_dict

COUNTER = '''
from forkrl.envs.base import StepResult


class Counter:
    """Say "up" until the count reaches the seed's target (1 to 3); anything else ends the episode."""

    INSTRUCTION = "Count up to the target."

    def reset(self, seed):
        self.count, self.target = 0, 1 + seed % 3
        return f"count {self.count} target {self.target}"

    def step(self, action):
        if action.strip() != "up":
            return StepResult("wrong", 0.0, True, {"success": 0.0, "action_valid": 0.0})
        self.count += 1
        done = self.count == self.target
        return StepResult(f"count {self.count} target {self.target}", 1.0 if done else 0.0, done,
                          {"success": float(done)})


class Broken:
    def reset(self, seed):
        return "no step method"


class Raising(Counter):
    def step(self, action):
        raise RuntimeError("the simulator crashed")
'''


def env_cfg(tmp_path, **over):
    (tmp_path / "counter.py").write_text(COUNTER)
    (tmp_path / "counter.jsonl").write_text("".join(json.dumps({"seed": s, "turns": ["up"] * (1 + s % 3)}) + "\n"
                                                    for s in range(30)))
    data = tiny_cfg_dict(**{"task": {"type": "env", "env": "counter.py:Counter", "max_turns": 4,
                                     "max_episode_tokens": 120, "train_size": 30, "heldout_size": 6,
                                     "demos_file": "counter.jsonl"},
                            "stages": ["sft", "grpo"], "model.tiny.max_positions": 256, "sampling.max_new_tokens": 6,
                            **over})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "forkrl.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_a_users_environment_class_loads_relative_to_the_config_and_a_broken_one_is_named(tmp_path):
    path = env_cfg(tmp_path)
    task = build_task(load_config(path).task)  # counter.py found beside the config, wherever we run from
    assert task.problems("train")[4].meta == {"env_seed": 4, "observation": "count 0 target 2"}
    assert {p.meta["env_seed"] for p in task.problems("heldout")} == set(range(HELDOUT_SEED0, HELDOUT_SEED0 + 6))
    broken = cli("validate", env_cfg(tmp_path, **{"task.env": "counter.py:Broken"}))
    assert broken.returncode == 2
    assert "counter.py:Broken' does not follow the environment protocol: it lacks a method step()" in broken.stderr
    missing = cli("validate", env_cfg(tmp_path, **{"task.env": "nowhere.py:Env"}))
    assert missing.returncode == 2 and "environment file" in missing.stderr and "nowhere.py" in missing.stderr
    unknown = cli("validate", env_cfg(tmp_path, **{"task.env": "chess"}))
    assert unknown.returncode == 2 and "unknown environment 'chess'" in unknown.stderr
    fork = cli("validate", env_cfg(tmp_path, stages=["sft", "fork"]))
    assert fork.returncode == 2 and "the fork stage is single-turn" in fork.stderr


def test_demonstrations_file_rows_are_checked_and_held_out_seeds_refused(tmp_path):
    demos = tmp_path / "demos.jsonl"
    demos.write_text('{"seed": 1, "turns": ["up", "up"]}\n\n{"seed": 1000002, "turns": ["up"]}\n')
    task = build_task(load_config(env_cfg(tmp_path, **{"task.demos_file": "demos.jsonl"})).task)
    with pytest.raises(TaskError, match=r"demos.jsonl:3: seed 1000002 is not a train seed"):
        task.episode_demos("train")
    demos.write_text('{"seed": 1, "turns": "up"}\n')
    task = build_task(load_config(env_cfg(tmp_path, **{"task.demos_file": str(demos)})).task)
    with pytest.raises(TaskError, match=r"demos.jsonl:1: a demonstration is"):
        task.episode_demos("train")
    demos.write_text('{"seed": 1, "turns": ["up", "up"]}\n')
    task = build_task(load_config(env_cfg(tmp_path, **{"task.demos_file": str(demos)})).task)
    (demo,) = task.episode_demos("train")
    assert demo == Demo(1, ("up", "up"), "file")


def test_sft_rows_of_replayed_demonstrations_mask_observations_unless_told(tmp_path, tiny_model_dir):
    from forkrl.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    task = build_task(load_config(env_cfg(tmp_path)).task)
    episode = replay(task, PlainCodec(tok), Demo(2, ("up", "up", "up"), "optimal"))  # target 3
    assert episode.ret == 1.0 and task.success(episode) and len(episode.turns) == 3
    masked = pack_episodes([episode], tok.pad_token_id, observations="mask")
    trained = pack_episodes([episode], tok.pad_token_id, observations="train")
    ids, role = masked.input_ids_NL[0], masked.role_NL[0]
    # each action's tokens are COMPLETION and end with EOS; the observations are ENV, masked out of the loss
    actions = tok.decode(ids[role == Role.COMPLETION]).replace(tok.eos_token, "|")
    assert actions.replace(" ", "") == "up|up|up|"
    env_text = tok.decode(ids[role == Role.ENV]).replace(" ", "")
    assert env_text == "count1target3count2target3count3target3"
    n_env = int((role == Role.ENV).sum())
    assert int(trained.completion_mask_NL.sum()) == int(masked.completion_mask_NL.sum()) + n_env
    assert not (trained.role_NL == Role.ENV).any()


def test_episode_rewards_success_return_and_a_raising_environment_is_unscorable(tmp_path, tiny_model_dir):
    from forkrl.envs.episodes import episode_rollouts
    from forkrl.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    task = build_task(load_config(env_cfg(tmp_path)).task)
    codec = PlainCodec(tok)
    good = replay(task, codec, Demo(0, ("up",), "optimal"))  # target 1: solved
    bad = replay(task, codec, Demo(1, ("down",), "random"))  # wrong action: failed
    broken = replay(task, codec, Demo(2, ("up",), "optimal"))
    broken.error = "step('up') raised RuntimeError: the simulator crashed"
    rollouts = episode_rollouts([good, bad, broken], pad_id=tok.pad_token_id, group_size=3)
    rewards = load_rewards(parse_config(tiny_cfg_dict(**{"grpo.rewards": [
        {"name": "correct"}, {"name": "env_return", "weight": 0.5}]})).grpo.rewards, task, where="grpo.rewards",
        timeout_s=5)
    problems = task.problems("train")[:1]
    scored, failures = score_rollouts(rollouts, ["up", "down", "up"], problems, task, rewards, seeds=[0, 1, 2],
                                      episodes=[good, bad, broken])
    assert scored.reward_N[:2].tolist() == [1.5, 0.0] and scored.valid_N.tolist() == [True, True, False]
    assert "the simulator crashed" in failures.first_message


def test_env_task_trains_sft_then_grpo_and_logs_episode_figures(tmp_path):
    path = env_cfg(tmp_path, **{"sft.steps": 4, "grpo.steps": 2, "grpo.mi_every": 1, "grpo.filter": "snr"})
    proc = cli("train", path, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert len(grpo) == 2
    for r in grpo:
        assert 0 <= r["episode_success"] <= 1 and 1 <= r["episode_turns"] <= 4 and r["env_errors"] == 0
        assert r["mi_upper_bound"] == pytest.approx(__import__("math").log(4))  # 4 distinct maps a step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["stages"]["grpo"]["pass_at_1"] <= 1
    sample = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert sample and sample[0]["prompt"].startswith("Count up to the target.\ncount 0 target")
    # PASS@(k,T): base vs trained, n episodes of each held-out seed, solved within T turns
    run = tmp_path / "run"
    proc = cli("passk", "--task", run, "--model", f"base={run / 'sft' / 'final'}", "--model",
               f"grpo={run / 'grpo' / 'final'}", "--n", 4, "--out", tmp_path / "pk")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pk = json.loads((tmp_path / "pk" / "passk.json").read_text())
    for m in pk["models"].values():
        grid = m["pass_at_k_t"]
        assert list(grid) == ["1", "2", "3", "4"] and list(grid["1"]) == ["1", "2", "4"]
        for k in ("1", "2", "4"):  # a larger turn budget never solves less
            assert all(grid[str(t)][k] <= grid[str(t + 1)][k] + 1e-12 for t in range(1, 4))
            assert grid["4"][k] == pytest.approx(m["pass_at_k"][k]["mean"])
    assert pk["pairs"][0]["a"] == "base" and "PASS@(k,T) grpo" in proc.stdout
    # the episode viewer: each sampled row's turns, and its tokens coloured by role
    first = sample[0]["episode"]
    assert first["turns"] and {"action", "observation", "reward"} <= set(first["turns"][0])
    assert [role for _, role in first["spans"]][:2] == ["prompt", "completion"]
    env_text = "".join(text for text, role in first["spans"] if role == "env").replace(" ", "")
    assert env_text == "".join(t["observation"] for t in first["turns"]).replace(" ", "")
    from forkrl.report import write_report

    page = write_report(run).read_text()
    assert 'class="episode-row"' in page and 'class="role-env"' in page and 'class="role-completion"' in page


def test_a_raising_environment_is_counted_never_a_crash(tmp_path):
    path = env_cfg(tmp_path, **{"task.env": "counter.py:Raising", "stages": ["grpo"], "grpo.steps": 1})
    proc = cli("train", path, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["env_errors"] == 16 and "the simulator crashed" in row["env_first_error"]
    assert row["unscorable_rows"] == 16 and row["episode_success"] == 0


def test_demo_agent_fast_writes_summary(tmp_path):
    proc = cli("demo", "agent", "--out", tmp_path, "--fast")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= s["base"]["success"] <= 1 and 0 <= s["grpo"]["success"] <= 1
    assert s["stages"]["sft"]["wall_s"] > 0 and s["stages"]["grpo"]["wall_s"] > 0
    assert 0 <= s["grpo_figures"]["groups_kept_frac"] <= 1
    assert "held-out success" in proc.stdout and "SNR filter" in proc.stdout


def test_exploration_flags_read_five_to_one_both_ways():
    from forkrl.config import ExploreCfg
    from forkrl.trainers.sources import explore_flags

    steps = ExploreCfg(mode="steps", ratio=5)
    assert [any(explore_flags(steps, s, 8)) for s in range(1, 13)] == [s % 6 == 0 for s in range(1, 13)]
    assert all(explore_flags(steps, 6, 8))
    groups = ExploreCfg(mode="groups", ratio=5)
    assert explore_flags(groups, 1, 12) == [False] * 10 + [True] * 2  # 1 in 6 of every step's groups
    assert explore_flags(groups, 1, 4) == [False] * 3 + [True]  # at least one
    assert not any(explore_flags(ExploreCfg(), 6, 8))


def test_exploration_rows_are_rewarded_by_coverage_and_normalised_apart():
    from forkrl.envs.episodes import Episode, Turn
    from forkrl.trainers.grpo import advantages, with_exploration
    from forkrl.trainers.sources import Rows
    from forkrl.types import Scored

    def episode(coverage):
        e = Episode(0, [1], [1], [0.0])
        e.turns.append(Turn("a", "o", 0.0, {"coverage": coverage, "success": 0.0}, False))
        return e

    eps = [episode(0.1), episode(0.2), episode(0.5), episode(0.75)]
    explore = torch.tensor([False, False, True, True])
    scored = Scored(None, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.ones(4, dtype=torch.bool),
                    {"correct": torch.tensor([1.0, 0.0, 1.0, 0.0])})
    rows = Rows(None, [""] * 4, [], [], eps, {}, explore)
    out = with_exploration(scored, rows, "coverage")
    assert out.reward_N.tolist() == [1.0, 0.0, 0.5, 0.75]
    assert out.components["correct"][2:].isnan().all() and out.components["explore"][2:].tolist() == [0.5, 0.75]
    missing = with_exploration(scored, rows, "rooms_seen")  # a key the environment does not report: unscorable
    assert missing.valid_N.tolist() == [True, True, False, False]
    cfg = parse_config(tiny_cfg_dict(**{"grpo.advantage": "grpo_batch_std"})).grpo
    group = torch.tensor([0, 0, 1, 1])
    adv = advantages(cfg, out.reward_N, group, out.valid_N, explore)
    from forkrl.algos.advantages import get_advantage

    est = get_advantage("grpo_batch_std")
    for part in (~explore, explore):  # each kind's batch statistics are its own
        want = est(out.reward_N[part], group[part], out.valid_N[part], eps=cfg.adv_eps)
        assert torch.allclose(adv[part], want)


def test_exploration_interleaved_on_a_partially_observable_lake(tmp_path):
    path = env_cfg(tmp_path, **{"task": {"type": "env", "env": "frozenlake", "kwargs": {"view": 1},
                                         "max_turns": 3, "max_episode_tokens": 200, "train_size": 40,
                                         "heldout_size": 4, "demos": {"wander": 1}},
                                "grpo.explore": {"mode": "groups", "ratio": 1}, "sft.steps": 2, "grpo.steps": 2,
                                "sampling.max_new_tokens": 10})
    proc = cli("train", path, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in [r for r in rows if r["stage"] == "grpo"]:
        assert r["explore_rows"] == 8  # 2 of the step's 4 maps, 4 episodes each
        assert 0 < r["explore_reward_mean"] <= 1  # coverage: the start's 3x3 view is seen already
        assert r["reward/explore"] == pytest.approx(r["explore_reward_mean"])


def test_tool_environment_trains_end_to_end(tmp_path):
    data = tiny_cfg_dict(**{"task": {"type": "env", "env": "python_tool", "max_turns": 3, "max_episode_tokens": 200,
                                     "kwargs": {"task": {"type": "arithmetic", "digits": 2, "train_size": 60,
                                                         "heldout_size": 8}},
                                     "train_size": 60, "heldout_size": 8},
                            "stages": ["sft", "grpo"], "model.tiny.max_positions": 256, "sampling.max_new_tokens": 16,
                            "sft.steps": 3, "grpo.steps": 1})
    path = tmp_path / "tool.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = cli("train", path, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["stage"] == "grpo"]
    assert row["env_errors"] == 0 and 0 <= row["episode_success"] <= 1
    too_many = dict(data, task={**data["task"], "train_size": 61})  # more seeds than the wrapped task's problems
    path.write_text(yaml.safe_dump(too_many))
    proc = cli("validate", path)
    assert proc.returncode == 2 and "reset(60) raised ValueError" in proc.stderr


def test_a_seeded_run_on_a_tiny_environment_improves_success(tmp_path):
    # a base that counts right about 40% of the time (18 SFT steps), then 10 GRPO steps: held-out success over
    # 6 unseen targets x 8 episodes rises by 37 points here (seeds 1 and 2: +17, +27); the test asks for 15
    path = env_cfg(tmp_path, **{"seed": 0, "sft.steps": 18, "sft.optim": {"lr": 1e-2, "warmup_steps": 0,
                                                                          "schedule": "constant"},
                                "grpo.steps": 10, "grpo.optim": {"lr": 3e-3}, "grpo.group_size": 8,
                                "grpo.prompts_per_step": 4, "grpo.micro_batch_size": 32,
                                "eval": {"num_problems": 6, "samples_per_problem": 8}})
    proc = cli("train", path, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert 0.2 <= stages["sft"]["pass_at_1"] <= 0.8  # room to improve
    assert stages["grpo"]["pass_at_1"] >= stages["sft"]["pass_at_1"] + 0.15, stages


def test_a_gymnasium_environment_trains_as_an_env_task(tmp_path):
    pytest.importorskip("gymnasium")
    data = tiny_cfg_dict(**{"task": {"type": "env", "env": "gym", "max_turns": 4, "max_episode_tokens": 200,
                                     "kwargs": {"id": "FrozenLake-v1", "actions": ["Left", "Down", "Right", "Up"],
                                                "make": {"is_slippery": False}},
                                     "instruction": "Reach G, avoid H. Answer with one action, e.g. "
                                                    "<answer>Left</answer>.",
                                     "train_size": 20, "heldout_size": 4},
                            "stages": ["grpo"], "model.tiny.max_positions": 256, "sampling.max_new_tokens": 8,
                            "grpo.steps": 1})
    path = tmp_path / "gym.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = cli("train", path, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["env_errors"] == 0 and 1 <= row["episode_turns"] <= 4
    sample = json.loads((tmp_path / "run" / "completions.jsonl").read_text().splitlines()[0])
    assert "[S]FFF" in sample["prompt"]
    bad = dict(data, task={**data["task"], "kwargs": {"id": "NoSuchEnv-v0"}})
    path.write_text(yaml.safe_dump(bad))
    proc = cli("validate", path)
    assert proc.returncode == 2 and "gymnasium.make('NoSuchEnv-v0'" in proc.stderr
