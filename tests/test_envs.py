"""The built-in environments' rules against hand-played episodes, their generators, and the action parser."""

import pytest

from forkrl.envs.base import HELDOUT_SEED0, parse_actions, split_seeds
from forkrl.envs.frozenlake import FrozenLake, generate_map
from forkrl.envs.grid import demonstrate, mixed_demos
from forkrl.envs.sokoban import Sokoban, generate_room


def lake(holes=((1, 1),), start=(0, 0), goal=(0, 2), **kw):
    env = FrozenLake(**kw)
    env.reset(0)
    env.holes, env.start, env.goal, env.player = frozenset(holes), start, goal, start
    env.seen = set() if env.view is not None else {(r, c) for r in range(4) for c in range(4)}
    env._look()
    return env


def test_frozenlake_hand_played():
    env = lake()
    assert env.render() == "P_G_\n_O__\n____\n____"
    r = env.step("<answer>Up</answer>")  # off the map: stays put, a valid action
    assert (r.reward, r.done, r.info["action_valid"], env.player) == (0.0, False, 1.0, (0, 0))
    r = env.step("the goal is right <answer>right</answer>")
    assert r.observation == "_PG_\n_O__\n____\n____" and r.reward == 0.0 and not r.done
    r = env.step("Right")  # no tags: the last line is the action
    assert r.observation == "__√_\n_O__\n____\n____" and r.reward == 1.0 and r.done and r.info["success"] == 1.0
    assert env.step("Left").done and env.step("Left").reward == 0.0  # a finished episode stays finished


def test_frozenlake_hole_invalid_and_budget():
    env = lake()
    r = env.step("<answer>jump</answer>")
    assert (r.reward, r.done, r.info["action_valid"], env.player, env.actions_taken) == (-0.1, False, 0.0, (0, 0), 0)
    env.step("Right")
    r = env.step("Down")
    assert r.observation == "__G_\n_X__\n____\n____" and r.done and r.reward == 0.0 and r.info["success"] == 0.0
    env = lake(holes=(), goal=(3, 3))
    for i in range(10):
        r = env.step("Up" if i % 2 else "Down")
    assert r.done and r.info["actions"] == 10.0 and r.reward == 0.0  # ten actions is the end
    env = lake(holes=(), goal=(3, 3), actions_per_turn=2)
    r = env.step("<answer>Down || Right</answer>")
    assert env.player == (1, 1) and r.info["actions"] == 2.0
    assert env.step("<answer>Down, Right, Down</answer>").info["action_valid"] == 0.0  # three in a turn of two


def test_frozenlake_slippery_and_partial_view():
    assert lake(slippery=True, success_rate=1.0).step("Right").observation.startswith("_P")
    env = lake(slippery=True, success_rate=0.0, holes=())  # always to a perpendicular side: Up or Down from (0, 0)
    env.step("Right")
    assert env.player in {(0, 0), (1, 0)}
    env = lake(view=1, goal=(3, 3))
    assert env.render() == "P_??\n_O??\n????\n????" and env.info(valid=True)["coverage"] == 4 / 16
    env.step("Down")
    env.step("Down")
    assert env.render() == "__??\n_O??\nP_??\n__??" and env.reason() == "goal unseen"
    env.step("Right")
    env.step("Right")
    assert env.render().endswith("G") and env.reason() == "goal down right"


@pytest.mark.parametrize("size,p", [(4, 0.9), (5, 0.8)])
def test_frozenlake_maps_are_reachable_and_seeded(size, p):
    for seed in range(200):
        holes, start, goal = generate_map(size, p, seed)
        assert start != goal and start not in holes and goal not in holes
        assert generate_map(size, p, seed) == (holes, start, goal)
        env = FrozenLake(size, p, max_actions=100)
        env.reset(seed)
        path = env.optimal()
        for a in path:
            r = env.step(a)
        assert r.done and r.reward == 1.0


def room(text):
    env = Sokoban()
    env.reset(0)
    cells = {(r, c): ch for r, line in enumerate(text.split()) for c, ch in enumerate(line)}
    env.floor = frozenset(k for k, v in cells.items() if v != "#")
    env.target = next(k for k, v in cells.items() if v in "OS√")
    env.box = next(k for k, v in cells.items() if v in "X√")
    env.player = next(k for k, v in cells.items() if v in "PS")
    assert env.render() == "\n".join(text.split())
    return env


def test_sokoban_hand_played():
    env = room("###### #P___# #_X_O# #____# #____# ######")
    r = env.step("<answer>Down || Right</answer>")  # move down, then push the box right
    assert r.observation == "######\n#____#\n#_PXO#\n#____#\n#____#\n######" and r.reward == pytest.approx(-0.2)
    r = env.step("<answer>Right</answer>")  # onto the target: -0.1 + 1 + 10, solved
    assert r.observation.splitlines()[2] == "#__P√#" and r.reward == pytest.approx(10.9) and r.done
    assert r.info["success"] == 1.0
    env = room("###### #P___# #_X_O# #____# #____# ######")
    env.step("Up")  # into a wall: no move, still an action
    assert env.player == (1, 1) and env.actions_taken == 1
    env = room("###### #P√__# #____# #____# #____# ######")  # box on its target: pushing it off costs 1
    env.done = False
    r = env.step("Right")
    assert r.reward == pytest.approx(-1.1) and not r.done and env.render().splitlines()[1] == "#_SX_#"  # the player on the target
    env = room("###### #PX#O# #__#_# #____# #____# ######")
    r = env.step("Right")  # the box against a wall does not move
    assert env.box == (1, 2) and env.player == (1, 1) and r.reward == pytest.approx(-0.1)
    assert env.step("<answer>fly</answer>").info["action_valid"] == 0.0


def test_sokoban_rooms_are_solvable_within_the_budget():
    lens = []
    for seed in range(200):
        floor, target, player, box = generate_room(6, seed)
        assert box != target and player not in (box,) and {target, player, box} <= floor
        assert all(0 < r < 5 and 0 < c < 5 for r, c in floor)  # the border is wall
        env = Sokoban()
        env.reset(seed)
        path = env.optimal()
        assert path and len(path) <= 10
        lens.append(len(path))
        for i in range(0, len(path), 2):
            r = env.step(" || ".join(path[i:i + 2]))
        assert r.done and r.info["success"] == 1.0
    assert 0.6 < sum(n <= 5 for n in lens) / len(lens) < 0.95  # AGENTS.md: about 77% need at most 5 moves


def test_parse_actions():
    names = ("Left", "Down", "Right", "Up")
    assert parse_actions("I go right. <answer>Right || down</answer>", names, 2) == ["Right", "Down"]
    assert parse_actions("<answer>Up</answer> then <answer>Left</answer>", names, 1) == ["Left"]
    assert parse_actions("thinking...\nLeft", names, 1) == ["Left"]
    assert parse_actions("<answer></answer>", names, 1) is None
    assert parse_actions("<answer>Left Jump</answer>", names, 2) is None
    assert parse_actions("<answer>Left Left</answer>", names, 1) is None


def test_splits_never_overlap_and_demonstrations_replay():
    train, held = split_seeds("train", 500, 100), split_seeds("heldout", 500, 100)
    assert not set(train) & set(held) and held[0] == HELDOUT_SEED0
    with pytest.raises(ValueError, match="overlap"):
        split_seeds("train", HELDOUT_SEED0 + 1, 1)
    for make, apt in ((FrozenLake, 1), (Sokoban, 2)):
        demos = mixed_demos(make, range(40), {"optimal": 1.0}, max_turns=10, actions_per_turn=apt)
        for d in demos:
            env = make()
            env.reset(d.seed)
            for turn in d.turns:
                r = env.step(turn)
                assert r.info["action_valid"] == 1.0
            assert r.info["success"] == 1.0 or make is FrozenLake and len(d.turns) == 10
        assert demonstrate(make, 3, "wander", max_turns=10, actions_per_turn=apt) == \
            demonstrate(make, 3, "wander", max_turns=10, actions_per_turn=apt)  # a function of seed and kind
    kinds = {d.kind for d in mixed_demos(FrozenLake, range(60), {"optimal": 1, "greedy": 1, "wander": 1},
                                         max_turns=10, actions_per_turn=1)}
    assert kinds == {"optimal", "greedy", "wander"}


def test_python_tool_runs_in_the_sandbox_and_the_wrapped_verifier_scores_the_answer():
    from forkrl.envs.base import HELDOUT_SEED0
    from forkrl.envs.tool import PythonTool
    from forkrl.tasks.base import TaskError

    env = PythonTool({"type": "arithmetic", "digits": 2, "train_size": 50, "heldout_size": 5}, max_calls=2,
                     wall_s=1.0)
    prompt = env.reset(3)
    a, b = map(int, prompt.rstrip("=").split("+"))
    r = env.step(f"let me compute <python>print({a} * 0 + {a} + {b})</python>")
    assert r.observation == f"output: {a + b}" and r.reward == 0 and not r.done and r.info["tool_calls"] == 1
    r = env.step(f"ans {a + b}")  # no call: the answer, scored by the arithmetic verifier
    assert r.reward == 1.0 and r.done and r.info["success"] == 1.0
    env.reset(3)
    assert env.step(f"ans {a + b + 1}").reward == 0.0  # a wrong answer
    env.reset(3)
    r = env.step("<python>while True: pass</python>")  # the sandbox's wall limit, not a hang
    assert "[stopped: wall limit]" in r.observation or "[stopped: cpu limit]" in r.observation
    r = env.step("<python>import os; os.system('ls')</python>")  # the audit hook refuses it; the output says so
    assert r.done and "output:" in r.observation  # max_calls = 2 reached: unanswered, ended
    assert env.reset(HELDOUT_SEED0 + 1) == env.task.problems("heldout")[1].prompt  # the wrapped task's split
    demo = env.demonstration(4)
    env.reset(4)
    assert env.step(demo[0]).observation.startswith("output: ") and env.step(demo[1]).reward == 1.0
    with pytest.raises(TaskError, match="wraps a single-turn task"):
        PythonTool({"type": "env"})


def test_gymnasium_frozenlake_through_the_text_adapter():
    pytest.importorskip("gymnasium")  # a dev dependency: installed wherever the suite runs from setup.sh
    from forkrl.envs.gym import GymText
    from forkrl.tasks.base import TaskError

    env = GymText("FrozenLake-v1", actions=["Left", "Down", "Right", "Up"], make={"is_slippery": False})
    first = env.reset(3)
    assert first.splitlines()[0] == "[S]FFF" and "\x1b" not in first  # the agent's cell, no colour codes
    r = env.step("go <answer>jump</answer>")
    assert r.info["action_valid"] == 0 and not r.done and r.observation == first  # invalid: the state unchanged
    for a in ["Down", "Down", "Right", "Right", "Down"]:
        r = env.step(f"<answer>{a}</answer>")
        assert r.reward == 0 and not r.done
    r = env.step("<answer>Right</answer>")
    assert r.done and r.reward == 1.0 and r.info["success"] == 1.0 and r.observation.endswith("HFF[G]")
    env.reset(3)
    r = env.step("<answer>Right</answer>")
    r = env.step("<answer>Down</answer>")  # into the hole at (1, 1): ends, no success
    assert r.done and r.info["success"] == 0.0
    with pytest.raises(TaskError, match="has 4 actions; 2 names were given"):
        GymText("FrozenLake-v1", actions=["a", "b"])
    with pytest.raises(TaskError, match="Box action space"):
        GymText("MountainCarContinuous-v0")
