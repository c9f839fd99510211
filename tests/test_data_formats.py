"""JsonlTask on data the way users have it: extra fields as meta, chat-format rows, and local Hugging Face datasets
files and directories (Parquet, Arrow, CSV, JSON, save_to_disk) giving the same problems as the equivalent JSONL."""

import json

import pytest

from forkrl.tasks.base import TaskError, describe
from forkrl.tasks.jsonl import JsonlCfg, JsonlTask

datasets = pytest.importorskip("datasets")

ROWS = [
    {"uid": "a", "prompt": "1+1=", "answer": 2, "completion": "Answer: 2", "rubric": ["shows work", "is short"],
     "tests": [{"input": "1", "output": "2"}], "difficulty": 1},
    {"uid": "b", "prompt": "2+3=", "answer": 5, "completion": "<answer>5</answer>", "rubric": ["is right"],
     "tests": [{"input": "2", "output": "5"}], "difficulty": 3},
]
HELDOUT = [{"uid": "h", "prompt": "3+3=", "answer": "6", "completion": "6", "rubric": [], "tests": [], "difficulty": 2}]
LOCATION = {"path", "line", "row"}


def write_jsonl(path, rows):
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    return path


def quiet_dataset(rows):
    datasets.disable_progress_bars()
    return datasets.Dataset.from_list(rows)


def summary(task, split="train"):
    """Everything about a split's problems but where they were read from."""
    return [(p.id, p.prompt, p.answer, {k: v for k, v in p.meta.items() if k not in LOCATION})
            for p in task.problems(split)]


def test_extra_fields_reach_meta_beside_the_location(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    heldout = write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    task = JsonlTask(train, heldout)
    p = task.problems("train")[0]
    assert p.meta == {"uid": "a", "rubric": ["shows work", "is short"], "tests": [{"input": "1", "output": "2"}],
                      "difficulty": 1, "path": str(train), "line": 1}  # prompt, answer, completion are not meta
    assert describe(p) == f"{train}:1"
    assert "uid" not in JsonlTask(train, heldout, id_field="uid").problems("train")[0].meta  # read as the id


def test_a_rows_own_path_or_line_field_is_kept_and_forkrls_location_moves(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "answer": "1", "path": "src/a.py"},
                                                   {"prompt": "r", "answer": "1"}])
    task = JsonlTask(train, write_jsonl(tmp_path / "h.jsonl", HELDOUT))
    moved, plain = task.problems("train")
    assert moved.meta == {"path": "src/a.py", "forkrl_path": str(train), "forkrl_line": 1}
    assert plain.meta == {"path": str(train), "line": 2}
    assert describe(moved) == f"{train}:1"  # forkrl's own location, never the row's path with forkrl's line
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "1", "line": 3, "forkrl_line": 4}])
    with pytest.raises(TaskError, match=r"bad.jsonl:1: fields forkrl_line, forkrl_path are reserved"):
        JsonlTask(bad, tmp_path / "h.jsonl")


def chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_chat_rows_give_prompt_system_and_demonstration(tmp_path):
    sys = ("system", "Think, then answer in <answer> tags.")
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": chat(sys, ("user", "1+1="), ("assistant", "<answer>2</answer>")), "answer": "2", "level": 1},
        {"messages": chat(sys, ("user", "Two lines:"), ("user", "2+2=")), "answer": "4",
         "completion": "<answer>4</answer>"},
        {"messages": [{"role": "system", "content": sys[1]},
                      {"role": "user", "content": [{"type": "text", "text": "3+"}, {"type": "text", "text": "3="}]},
                      {"role": "assistant", "content": "ignored"}], "answer": "6", "completion": "6"},
    ])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"messages": chat(sys, ("user", "9+9=")), "answer": "18"}])
    task = JsonlTask(train, heldout)  # the held-out rows share the system message too (else an error: below)
    problems = task.problems("train")
    assert [p.prompt for p in problems] == ["1+1=", "Two lines:\n\n2+2=", "3+3="]
    assert problems[0].meta == {"level": 1, "system": sys[1], "path": str(train), "line": 1}
    assert task.system_prompt == sys[1]  # all rows share it, so the pipeline prompts with it
    # the completion field wins over a trailing assistant message; otherwise the assistant message is the demo
    assert [d for _, d in task.demonstrations("train")] == ["<answer>2</answer>", "<answer>4</answer>", "6"]
    with pytest.raises(TaskError, match=r"heldout.jsonl:1: missing field 'completion'"):
        task.demonstrations("heldout")
    # a row with a prompt field uses it, and messages never reach meta
    both = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "p", "messages": chat(("user", "m")), "answer": "1"}])
    p = JsonlTask(both, heldout, system_prompt=sys[1]).problems("train")[0]
    assert p.prompt == "p" and "messages" not in p.meta and "system" not in p.meta


def test_chat_rows_without_completion_field_and_a_custom_messages_field(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"conv": chat(("user", "q"), ("assistant", "d")), "answer": "1"}])
    heldout = write_jsonl(tmp_path / "h.jsonl", [{"conv": chat(("user", "r")), "answer": "1"}])
    task = JsonlTask(train, heldout, messages_field="conv", completion_field=None)
    assert task.system_prompt is None and task.demonstrations("train")[0][1] == "d"
    with pytest.raises(TaskError, match=r"task\.completion_field is not set"):
        task.demonstrations("heldout")
    with pytest.raises(TaskError, match=r"t.jsonl:1: missing field 'prompt'.*'conv'"):
        JsonlTask(train, heldout, messages_field=None)


def test_different_system_messages_need_the_configured_system_prompt(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": chat(("system", "A"), ("user", "q")), "answer": "1"},
                                               {"messages": chat(("user", "r")), "answer": "1"}])
    heldout = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "s", "answer": "1"}])
    with pytest.raises(TaskError, match=r"t.jsonl:1: system message 'A'; .*t.jsonl:2: no system message.*"
                                        r"task\.format\.system_prompt"):
        JsonlTask(train, heldout)
    cfg = JsonlCfg(type="jsonl", train_path=str(train), heldout_path=str(heldout), format={"system_prompt": "Be."})
    task = cfg.build()
    assert task.system_prompt == "Be." and task.problems("train")[0].meta["system"] == "A"


@pytest.mark.parametrize("messages, expected", [
    ("hello", r"field 'messages' must be a non-empty list of chat messages.*str"),
    ([], r"field 'messages' must be a non-empty list"),
    ([{"role": "user"}], r"messages\[0\] must be an object with 'role' and 'content'"),
    (["hi"], r"messages\[0\] must be an object with 'role' and 'content'"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\] has role 'tool'; valid: system, user, assistant"),
    ([{"role": "user", "content": 5}], r"messages\[0\]'s content must be text"),
    (chat(("system", "s"), ("assistant", "a")), r"messages has no user message"),
    (chat(("user", "q"), ("assistant", "a"), ("user", "q2")),
     r"messages has roles user, assistant, user.*single user turn"),
    (chat(("user", "q"), ("system", "s")), r"messages has roles user, system"),
])
def test_bad_chat_shapes_name_file_and_line(tmp_path, messages, expected):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ok", "answer": "1"}, {"messages": messages, "answer": "1"}])
    with pytest.raises(TaskError, match=r"t\.jsonl:2: " + expected):
        JsonlTask(train, write_jsonl(tmp_path / "h.jsonl", HELDOUT))


def test_a_system_message_and_a_system_field_clash(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": chat(("system", "s"), ("user", "q")), "answer": "1",
                                                "system": "mine"}])
    with pytest.raises(TaskError, match=r"t\.jsonl:1: a system message in 'messages' and a field 'system'"):
        JsonlTask(train, write_jsonl(tmp_path / "h.jsonl", HELDOUT))


def _parquet(ds, d):
    ds.to_parquet(str(d / "train.parquet"))
    return d / "train.parquet", {}


def _arrow_shard(ds, d):
    ds.save_to_disk(str(d / "saved"))
    return d / "saved" / "data-00000-of-00001.arrow", {}


def _arrow_ipc_file(ds, d):
    import pyarrow.feather as feather

    feather.write_feather(ds.data.table, str(d / "train.arrow"))
    return d / "train.arrow", {}


def _saved_dataset(ds, d):
    ds.save_to_disk(str(d / "saved"))
    return d / "saved", {}


def _saved_dict(ds, d):
    datasets.DatasetDict({"train": ds, "test": quiet_dataset(HELDOUT)}).save_to_disk(str(d / "dd"))
    return d / "dd", {"train_split": "train"}


def _json_array(ds, d):
    ds.to_json(str(d / "train.json"), lines=False)
    return d / "train.json", {}


def _json_lines(ds, d):  # datasets' default JSON output is JSON lines: read as JSONL, with line numbers
    ds.to_json(str(d / "train.json"))
    return d / "train.json", {}


@pytest.mark.parametrize("write", [_parquet, _arrow_shard, _arrow_ipc_file, _saved_dataset, _saved_dict,
                                   _json_array, _json_lines])
def test_datasets_sources_give_the_same_problems_as_jsonl(tmp_path, write):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
    reference = JsonlTask(write_jsonl(tmp_path / "train.jsonl", ROWS), heldout, id_field="uid")
    path, split = write(quiet_dataset(ROWS), tmp_path)
    task = JsonlTask(path, heldout, id_field="uid", **split)
    assert summary(task) == summary(reference)
    assert [d for _, d in task.demonstrations("train")] == [d for _, d in reference.demonstrations("train")]
    meta = task.problems("train")[0].meta
    assert type(meta["difficulty"]) is int and type(meta["rubric"]) is list and type(meta["tests"][0]) is dict
    shown = str(path / "train") if split else str(path)
    if write is _json_lines:
        assert (meta["path"], meta["line"]) == (shown, 1)
    else:
        assert (meta["path"], meta["row"]) == (shown, 0) and "line" not in meta
        assert JsonlTask(path, heldout, **split).problems("train")[1].id == "train-1"  # row numbers from 0


def test_csv_and_a_datasetdict_for_both_splits(tmp_path):
    flat = [{k: r[k] for k in ("prompt", "answer", "difficulty")} for r in ROWS]
    reference = JsonlTask(write_jsonl(tmp_path / "t.jsonl", flat), write_jsonl(tmp_path / "h.jsonl", HELDOUT))
    quiet_dataset(flat).to_csv(str(tmp_path / "train.csv"), index=False)
    task = JsonlTask(tmp_path / "train.csv", tmp_path / "h.jsonl")
    assert [s[1:] for s in summary(task)] == [s[1:] for s in summary(reference)]  # ids: row 0 vs line 1
    datasets.DatasetDict({"train": quiet_dataset(ROWS), "test": quiet_dataset(HELDOUT)}).save_to_disk(
        str(tmp_path / "dd"))
    cfg = JsonlCfg(type="jsonl", train_path=str(tmp_path / "dd"), heldout_path=str(tmp_path / "dd"),
                   train_split="train", heldout_split="test")
    both = cfg.build()
    assert [p.prompt for p in both.problems("heldout")] == ["3+3="]
    assert both.problems("heldout")[0].meta["path"] == str(tmp_path / "dd" / "test")


def test_datasets_rows_with_chat_messages(tmp_path):
    rows = [{"messages": chat(("system", "S"), ("user", "1+1="), ("assistant", "2")), "answer": 2},
            {"messages": chat(("system", "S"), ("user", "2+2="), ("assistant", "4")), "answer": 4}]
    quiet_dataset(rows).to_parquet(str(tmp_path / "chat.parquet"))
    heldout = write_jsonl(tmp_path / "h.jsonl", [{"messages": chat(("system", "S"), ("user", "9+9=")), "answer": 18}])
    task = JsonlTask(tmp_path / "chat.parquet", heldout)
    assert [(p.prompt, p.answer, p.meta["system"]) for p in task.problems("train")] == [("1+1=", "2", "S"),
                                                                                       ("2+2=", "4", "S")]
    assert [d for _, d in task.demonstrations("train")] == ["2", "4"] and task.system_prompt == "S"


def test_datasets_rows_are_named_path_row_n_in_errors(tmp_path):
    heldout = write_jsonl(tmp_path / "h.jsonl", HELDOUT)
    quiet_dataset([{"prompt": "a", "answer": [1]}, {"prompt": "b", "answer": [1, 2]}]).to_parquet(
        str(tmp_path / "bad.parquet"))
    with pytest.raises(TaskError, match=r"bad\.parquet\[row 0\]: field 'answer' must be a string or a number, "
                                        r"got list: \[1\]"):
        JsonlTask(tmp_path / "bad.parquet", heldout)
    quiet_dataset([{"messages": chat(("assistant", "a")), "answer": "1"}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(TaskError, match=r"saved\[row 0\]: messages has no user message"):
        JsonlTask(tmp_path / "saved", heldout)
    quiet_dataset([{"prompt": "a", "answer": "1", "blob": b"\x00"}]).to_parquet(str(tmp_path / "blob.parquet"))
    with pytest.raises(TaskError, match=r"blob\.parquet\[row 0\]: field 'blob' holds bytes data.*remove_columns"):
        JsonlTask(tmp_path / "blob.parquet", heldout)
    quiet_dataset([{"prompt": "3+3=", "answer": "6"}]).to_parquet(str(tmp_path / "leak.parquet"))
    with pytest.raises(TaskError, match=r"leak\.parquet\[row 0\] = .*h\.jsonl:1"):
        JsonlTask(tmp_path / "leak.parquet", heldout)


def test_splits_and_unreadable_sources_are_user_errors(tmp_path):
    heldout = write_jsonl(tmp_path / "h.jsonl", HELDOUT)
    datasets.DatasetDict({"train": quiet_dataset(ROWS), "test": quiet_dataset(HELDOUT)}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(TaskError, match=r"task\.train_path=.*DatasetDict with splits test, train; choose one with "
                                        r"task\.train_split"):
        JsonlTask(tmp_path / "dd", heldout)
    with pytest.raises(TaskError, match=r"task\.train_split='dev' is not a split of .*: test, train"):
        JsonlTask(tmp_path / "dd", heldout, train_split="dev")
    with pytest.raises(TaskError, match=r"task\.heldout_split='test' is set, but .*h\.jsonl is read as JSON Lines"):
        JsonlTask(tmp_path / "dd", heldout, train_split="train", heldout_split="test")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TaskError, match=r"is a directory but not one written by datasets' save_to_disk"):
        JsonlTask(tmp_path / "empty_dir", heldout)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(TaskError, match=r"junk\.parquet: cannot be read as a Parquet file \(.*task\.train_path"):
        JsonlTask(tmp_path / "junk.parquet", heldout)
    with pytest.raises(TaskError, match=r"missing\.parquet does not exist"):
        JsonlTask(tmp_path / "missing.parquet", heldout)
    quiet_dataset([{"prompt": "a", "answer": "1"}]).select([]).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(TaskError, match=r"none\.parquet \(a Parquet file\) has no rows"):
        JsonlTask(tmp_path / "none.parquet", heldout)


def test_has_answer_follows_the_answer_pattern(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    heldout = write_jsonl(tmp_path / "h.jsonl", HELDOUT)
    task = JsonlTask(train, heldout)
    assert task.has_answer("so <answer>7</answer>") and task.has_answer("Answer: 3")
    assert not task.has_answer("") and not task.has_answer("  \n ") and not task.has_answer("<answer> </answer>")
    strict = JsonlTask(train, heldout, answer_pattern=r"#### (\S+)")
    assert strict.has_answer("work\n#### 12") and not strict.has_answer("Answer: 12")
    assert task.score(task.problems("train")[1], "<answer>5</answer>") == 1.0
