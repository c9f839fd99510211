"""ReasoningGymTask: splits, scoring with reasoning-gym's scorer, and user-facing errors."""

import pytest

from forkrl.tasks.base import Problem, Task, TaskError
from forkrl.tasks.rgym import ReasoningGymTask


@pytest.fixture(scope="module")
def chain_sum() -> ReasoningGymTask:
    return ReasoningGymTask("chain_sum", {}, size=200, seed=3, heldout_size=50)


def test_is_a_task_with_disjoint_splits(chain_sum):
    assert isinstance(chain_sum, Task)
    train, heldout = chain_sum.problems("train"), chain_sum.problems("heldout")
    assert len(train) == 200
    # the seed offset keeps held-out away from train's per-item seeds: almost nothing is dropped
    assert 45 <= len(heldout) <= 50
    assert len(heldout) + chain_sum.heldout_dropped == 50
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert len({p.id for p in train} | {p.id for p in heldout}) == 250


def test_problems_keep_the_reasoning_gym_entry(chain_sum):
    p = chain_sum.problems("train")[0]
    entry = p.meta["entry"]
    assert entry["question"] == p.prompt and entry["answer"] == p.answer
    assert entry["metadata"]["source_dataset"] == "chain_sum"


def test_tiny_problem_space_drops_heldout_copies_of_train():
    # one digit, two terms: at most 10*10*2 distinct questions, so 300 train items cover most of them
    config = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = ReasoningGymTask("chain_sum", config, size=300, seed=0, heldout_size=100)
    heldout = task.problems("heldout")
    assert task.heldout_dropped > 0
    assert len(heldout) == 100 - task.heldout_dropped
    assert not {p.prompt for p in task.problems("train")} & {p.prompt for p in heldout}


def test_gold_answer_in_tags_scores_one_and_wrong_scores_less(chain_sum):
    for p in chain_sum.problems("heldout")[:10]:
        assert chain_sum.score(p, f"<think>adding up</think>\n<answer>{p.answer}</answer>") == 1.0
        wrong = str(int(p.answer) + 1)
        assert chain_sum.score(p, f"<answer>{wrong}</answer>") < 1.0
        assert chain_sum.score(p, p.answer) == 0.0  # no <answer> tag: nothing extracted


def test_last_answer_tag_counts(chain_sum):
    p = chain_sum.problems("train")[0]
    wrong = str(int(p.answer) + 7)
    assert chain_sum.score(p, f"<answer>{wrong}</answer> no wait <answer>{p.answer}</answer>") == 1.0
    assert chain_sum.score(p, f"<answer>{p.answer}</answer> no wait <answer>{wrong}</answer>") < 1.0


def test_basic_arithmetic_also_works():
    task = ReasoningGymTask("basic_arithmetic", {}, size=20, seed=0, heldout_size=10)
    p = task.problems("heldout")[0]
    assert task.score(p, f"<answer>{p.answer}</answer>") == 1.0


def test_scorer_crash_is_a_wrong_answer(chain_sum):
    p = chain_sum.problems("train")[0]
    broken = Problem(id="x", prompt=p.prompt, answer=p.answer, meta={"entry": {"no": "answer key"}})
    assert chain_sum.score(broken, "<answer>5</answer>") == 0.0


def test_system_prompt_teaches_answer_tags(chain_sum):
    assert "<answer>" in chain_sum.system_prompt and "</answer>" in chain_sum.system_prompt


def test_demonstrations_point_to_jsonl(chain_sum):
    with pytest.raises(TaskError, match="JSONL") as e:
        chain_sum.demonstrations("train")
    assert "completion" in str(e.value)


def test_unknown_dataset_lists_names_and_registry():
    with pytest.raises(TaskError) as e:
        ReasoningGymTask("chain_summ", {}, size=5, seed=0, heldout_size=5)
    msg = str(e.value)
    assert "chain_summ" in msg and "chain_sum" in msg
    assert "reasoning_gym.factory.DATASETS" in msg


def test_unknown_config_key_names_dataset_and_key():
    with pytest.raises(TaskError) as e:
        ReasoningGymTask("chain_sum", {"max_term": 3}, size=5, seed=0, heldout_size=5)
    msg = str(e.value)
    assert "chain_sum" in msg and "max_term" in msg and "max_terms" in msg


def test_seed_in_config_is_redirected():
    with pytest.raises(TaskError, match=r"task\.seed"):
        ReasoningGymTask("chain_sum", {"seed": 1}, size=5, seed=0, heldout_size=5)


def test_invalid_config_value_names_dataset_and_reason():
    with pytest.raises(TaskError) as e:
        ReasoningGymTask("chain_sum", {"min_terms": 0}, size=5, seed=0, heldout_size=5)
    assert "chain_sum" in str(e.value) and "min_terms must be positive" in str(e.value)
