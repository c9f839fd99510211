"""The built-in arithmetic task: disjoint splits, correct demonstrations, real branching, a verifier
that reads the last answer, and difficulty as a parameter."""

import random
from collections import Counter

import pytest

from forkrl.tasks.arithmetic import STRATEGIES, ArithmeticTask, TaskError, demonstration, extract_answer


def test_splits_never_share_a_problem_even_commuted():
    task = ArithmeticTask(digits=2, train_size=2000, heldout_size=200)
    train = {tuple(sorted((p.meta["a"], p.meta["b"]))) for p in task.problems("train")}
    held = {tuple(sorted((p.meta["a"], p.meta["b"]))) for p in task.problems("heldout")}
    assert len(held) > 150 and not train & held


def test_demonstrations_follow_the_mix_and_careful_ones_are_right():
    task = ArithmeticTask(digits=3, train_size=2000, heldout_size=50)
    demos = task.demonstrations("train")
    by = Counter(task.strategy(c) for _, c in demos)
    assert set(by) == set(STRATEGIES)
    assert 0.45 < by["guess"] / len(demos) < 0.55  # default weights (0.2, 0.2, 0.1, 0.5)
    for p, c in demos:
        s = task.score(p, c)
        if task.strategy(c) != "guess":
            assert s == 1.0, (p, c)
    guess = [task.score(p, c) for p, c in demos if task.strategy(c) == "guess"]
    assert sum(guess) / len(guess) < 0.3  # the shortcut is mostly wrong


def test_hand_written_demonstrations():
    rng = random.Random(0)
    assert demonstration(47, 85, "col", rng, 0.0) == "col 7+5=12 c1 ; 4+8+1=13 c1 ; ans 132"
    assert demonstration(47, 85, "split", rng, 0.0) == "split 40+80=120 ; 7+5=12 ; 120+12=132 ; ans 132"
    assert demonstration(47, 85, "direct", rng, 0.0) == "direct ans 132"
    assert demonstration(47, 85, "guess", rng, 0.0) == "guess 50+80=130 ; ans 130"
    wrong = demonstration(47, 85, "col", random.Random(1), 1.0)  # every column takes a wrong turn first
    assert wrong.count(" no ") == 2 and wrong.endswith("ans 132")


def test_verifier_reads_the_last_answer():
    task = ArithmeticTask(digits=2, train_size=10, heldout_size=5)
    p = task.problems("train")[0]
    assert task.score(p, f" col ... ans 1 ; ans {p.answer}") == 1.0
    assert task.score(p, f" ans {p.answer} ; ans 1") == 0.0
    assert task.score(p, "no answer here") == 0.0
    assert extract_answer("ans -3") == "-3"


@pytest.mark.parametrize("digits", [1, 3, 5])
def test_difficulty_sets_operand_length(digits):
    task = ArithmeticTask(digits=digits, train_size=20, heldout_size=4)
    for p in task.problems("train"):
        assert len(str(p.meta["a"])) == digits and len(str(p.meta["b"])) == digits


def test_impossible_sizes_and_weights_are_clear_errors():
    with pytest.raises(TaskError, match="task.train_size"):
        ArithmeticTask(digits=1, train_size=500)
    with pytest.raises(TaskError, match="strategy_weights"):
        ArithmeticTask(digits=2, train_size=10, strategy_weights=(1.0, 0.0))
