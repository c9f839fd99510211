"""JsonlTask: loading, error messages (file:line, field, config key), verifiers, extraction, overlap."""

import json

import pytest

from forkrl.tasks.base import Problem, Task, TaskError
from forkrl.tasks.jsonl import JsonlTask, extract_answer


def write(path, lines):
    """Each item is a dict (dumped as JSON) or a raw string (written as is)."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


@pytest.fixture
def files(tmp_path):
    train = write(tmp_path / "train.jsonl", [
        {"prompt": "1+1=", "answer": "2", "completion": "1+1 is 2. Answer: 2"},
        "",
        {"prompt": "2+2=", "answer": 4, "completion": "<answer>4</answer>"},
    ])
    heldout = write(tmp_path / "heldout.jsonl", [{"prompt": "3+3=", "answer": "6", "completion": "6"}])
    return train, heldout


def errors_of(tmp_path, lines, **kwargs):
    bad = write(tmp_path / "bad.jsonl", lines)
    good = write(tmp_path / "good.jsonl", [{"prompt": "q0", "answer": "a", "completion": "c"}])
    with pytest.raises(TaskError) as e:
        JsonlTask(bad, good, **kwargs)
    return str(e.value)


def test_loads_and_skips_blank_lines(files):
    task = JsonlTask(*files)
    assert isinstance(task, Task)
    train = task.problems("train")
    assert [p.prompt for p in train] == ["1+1=", "2+2="]
    assert [p.answer for p in train] == ["2", "4"]  # numeric answer converted to str
    assert [p.meta["line"] for p in train] == [1, 3]  # 1-based, blank line counted
    assert [p.prompt for p in task.problems("heldout")] == ["3+3="]


def test_custom_fields_and_ids(tmp_path):
    row = {"q": "x?", "a": "y", "uid": 17}
    train = write(tmp_path / "t.jsonl", [row])
    heldout = write(tmp_path / "h.jsonl", [{"q": "z?", "a": "w", "uid": 18}])
    task = JsonlTask(train, heldout, prompt_field="q", answer_field="a", id_field="uid", completion_field=None)
    assert task.problems("train")[0].id == "17"
    with pytest.raises(TaskError, match=r"task\.completion_field"):
        task.demonstrations("train")


def test_duplicate_id_names_both_lines(tmp_path):
    msg = errors_of(tmp_path, [{"prompt": "a", "answer": "1", "i": 1}, {"prompt": "b", "answer": "1", "i": 1}],
                    id_field="i")
    assert "bad.jsonl:2" in msg and "line 1" in msg


def test_invalid_json_names_file_line_and_json_error(tmp_path):
    msg = errors_of(tmp_path, [{"prompt": "a", "answer": "1"}, "", '{"prompt": "b", "answer": }'])
    assert "bad.jsonl:3" in msg and "invalid JSON" in msg and "Expecting value" in msg


def test_non_object_line(tmp_path):
    msg = errors_of(tmp_path, ['["prompt", "answer"]'])
    assert "bad.jsonl:1" in msg and "list" in msg


def test_missing_field_lists_present_fields_and_config_key(tmp_path):
    msg = errors_of(tmp_path, [{"prompt": "a", "answer": "1"}, {"question": "b", "answer": "2"}])
    assert "bad.jsonl:2" in msg and "'prompt'" in msg and "'question'" in msg and "task.prompt_field" in msg
    msg = errors_of(tmp_path, [{"prompt": "a", "solution": "1"}])
    assert "bad.jsonl:1" in msg and "'answer'" in msg and "'solution'" in msg and "task.answer_field" in msg


def test_non_string_prompt_or_answer(tmp_path):
    msg = errors_of(tmp_path, [{"prompt": 5, "answer": "1"}])
    assert "bad.jsonl:1" in msg and "'prompt'" in msg and "int" in msg
    msg = errors_of(tmp_path, [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": [1]}])
    assert "bad.jsonl:2" in msg and "'answer'" in msg and "list" in msg
    msg = errors_of(tmp_path, [{"prompt": "a", "answer": True}])
    assert "bad.jsonl:1" in msg and "bool" in msg


def test_empty_file(tmp_path):
    msg = errors_of(tmp_path, ["", "   "])
    assert "bad.jsonl" in msg and "empty" in msg


def test_missing_file(tmp_path):
    good = write(tmp_path / "good.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(TaskError) as e:
        JsonlTask(good, tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(e.value) and "does not exist" in str(e.value)


def test_overlap_names_both_files_and_lines(tmp_path):
    train = write(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"},
                                                {"prompt": "What is  2+2?", "answer": "4"}])
    heldout = write(tmp_path / "heldout.jsonl", [{"prompt": "c", "answer": "1"}, "",
                                                  {"prompt": "What is 2+2?\n", "answer": "4"}])
    with pytest.raises(TaskError) as e:
        JsonlTask(train, heldout)
    msg = str(e.value)
    assert "train.jsonl:2" in msg and "heldout.jsonl:3" in msg and "1 held-out" in msg


def test_demonstrations(files, tmp_path):
    task = JsonlTask(*files)
    demos = task.demonstrations("train")
    assert [(p.prompt, c) for p, c in demos] == [("1+1=", "1+1 is 2. Answer: 2"), ("2+2=", "<answer>4</answer>")]
    train = write(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "1", "completion": "x"},
                                        {"prompt": "b", "answer": "2"}])
    with pytest.raises(TaskError) as e:
        JsonlTask(train, files[1]).demonstrations("train")
    assert "t.jsonl:2" in str(e.value) and "'completion'" in str(e.value) and "task.completion_field" in str(e.value)


@pytest.mark.parametrize("completion, expected", [
    ("think <answer> 42 </answer> more <answer>43</answer>", "43"),
    ("blah\nThe ANSWER: 17\nbye", "17"),
    ("answer: 1 then final answer:\n  9\n", "9"),
    ("first line\n\nlast line\n\n", "last line"),
    ("", None),
    ("   \n ", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_answer_pattern_uses_last_match_and_is_validated(files):
    task = JsonlTask(*files, answer_pattern=r"ans (-?\d+)")
    p = task.problems("train")[0]
    assert task.score(p, "ans 3 ; ans 2") == 1.0
    assert task.score(p, "ans 2 ; ans 3") == 0.0
    assert task.score(p, "<answer>2</answer>") == 0.0  # the pattern replaces the default rules
    with pytest.raises(TaskError, match="one"):
        JsonlTask(*files, answer_pattern=r"(a)(b)")
    with pytest.raises(TaskError, match=r"task\.answer_pattern"):
        JsonlTask(*files, answer_pattern=r"(unclosed")


def prob(answer):
    return Problem(id="p", prompt="q", answer=answer)


def test_exact_verifier(files):
    task = JsonlTask(*files, verifier="exact")
    assert task.score(prob("2"), "<answer> 2 </answer>") == 1.0
    assert task.score(prob("2"), "<answer>2.0</answer>") == 0.0
    assert task.score(prob("2"), "<answer></answer>") == 0.0


def test_numeric_verifier(files):
    task = JsonlTask(*files, verifier="numeric")
    assert task.score(prob("2"), "Answer: 2.0") == 1.0
    assert task.score(prob("1000000"), "Answer: 1000000.5") == 1.0  # 5e-7 relative
    assert task.score(prob("1000000"), "Answer: 1000002") == 0.0  # 2e-6 relative
    assert task.score(prob("0.5"), "Answer: 1/2") == 0.0  # not a float literal
    assert task.score(prob("2"), "Answer: two") == 0.0


def test_math_verify_verifier(files):
    task = JsonlTask(*files, verifier="math_verify")
    assert task.score(prob("\\frac{1}{2}"), "<answer>0.5</answer>") == 1.0
    assert task.score(prob("0.5"), "<answer>$\\frac{2}{4}$</answer>") == 1.0
    assert task.score(prob("\\frac{1}{2}"), "<answer>0.25</answer>") == 0.0
    assert task.score(prob("3"), "<answer>no idea</answer>") == 0.0
    assert task.score(prob("3"), "") == 0.0


def test_bad_verifier_name(files):
    with pytest.raises(TaskError, match="exact, numeric, math_verify"):
        JsonlTask(*files, verifier="fuzzy")
