"""Hostile files and an unlucky machine: bytes that are not UTF-8, damaged model files, huge inputs, errors found
when a stage starts. Each is one clear message (exit status 2 from the command line), never a traceback, and
nothing in --out that stops the corrected command from running."""

import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkrl.config import ConfigError, load_config, parse_config
from forkrl.models import ModelLoadError, load_model, load_tokenizer
from forkrl.pipeline import run
from forkrl.tasks.base import TaskError
from forkrl.tasks.jsonl import JsonlTask

from conftest import tiny_cfg_dict

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "forkrl.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def jsonl_files(tmp_path: Path, n: int = 12):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(n)])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": f"{i}+2=", "answer": str(i + 2)} for i in range(4)])
    return train, heldout


# ------------------------------------------------------------------------------------------ not UTF-8
def test_a_config_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    good = yaml.safe_dump(tiny_cfg_dict()).encode()
    (tmp_path / "bad.yaml").write_bytes(good[:40] + b"\xe9" + good[40:])
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not UTF-8 text \(byte 0xe9 at byte offset 40"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbf" + good)  # a byte-order mark is fine
    assert load_config(tmp_path / "bom.yaml").stages == ["grpo"]
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 64)  # a binary file passed as the config
    proc = cli("train", str(tmp_path / "model.bin"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr


def test_a_jsonl_file_with_a_stray_byte_names_file_line_and_offset(tmp_path):
    train, heldout = jsonl_files(tmp_path)
    lines = train.read_bytes().splitlines(keepends=True)
    train.write_bytes(lines[0] + lines[1].replace(b"1", b"\xe9", 1) + b"".join(lines[2:]))
    offset, column = len(lines[0]) + lines[1].index(b"1"), lines[1].index(b"1") + 1
    with pytest.raises(TaskError, match=rf"train.jsonl:2: not UTF-8 text \(byte 0xe9 at byte offset {offset}, "
                                        rf"column {column}\)"):
        JsonlTask(train, heldout)
    train.write_bytes(b"\xef\xbb\xbf" + b"".join(lines))  # a byte-order mark is fine
    assert len(JsonlTask(train, heldout).problems("train")) == 12


def test_the_command_line_gives_exit_2_for_a_bad_task_file(tmp_path):
    train, heldout = jsonl_files(tmp_path)
    train.write_bytes(train.read_bytes() + b'{"prompt": "\xff\xfe", "answer": "1"}\n')
    cfg = tiny_cfg_dict(task={"type": "jsonl", "train_path": str(train), "heldout_path": str(heldout)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli("train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "train.jsonl:13: not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ damaged model files
def damage(kind: str, model_dir: Path) -> str:
    """Damage one file of ``model_dir`` as ``kind`` says; returns the file's name."""
    st_path = model_dir / "model.safetensors"
    if kind == "truncated":
        st_path.write_bytes(st_path.read_bytes()[: st_path.stat().st_size // 3])
    elif kind == "empty":
        st_path.write_bytes(b"")
    elif kind == "garbage header":
        st_path.write_bytes(b"\x07" * 64 + st_path.read_bytes()[64:])
    elif kind == "config.json":
        (model_dir / "config.json").write_text('{"model_type": "qwen2", ')
        return "config.json"
    elif kind == "tokenizer.json":
        (model_dir / "tokenizer.json").write_bytes(b"\x00\xe9garbage")
        return "tokenizer.json"
    return "model.safetensors"


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage header", "config.json", "tokenizer.json"])
def test_a_damaged_model_file_is_named(tiny_model_dir, tmp_path, kind):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    name = damage(kind, broken)
    loader = load_tokenizer if kind == "tokenizer.json" else load_model
    with pytest.raises(ModelLoadError, match=rf"{name}.*(Restore|save_pretrained)"):
        loader(str(broken))


def test_damaged_weights_stop_the_run_and_the_corrected_command_runs_as_new(tiny_model_dir, tmp_path):
    """An error found when a stage starts (its weights do not load) leaves --out so that the same command, once the
    weights are restored, runs without --resume or a new directory."""
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    damage("truncated", broken)
    data = tiny_cfg_dict(model={"path": str(broken)}, **{"grpo.steps": 1})
    data["model"].pop("tiny", None)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    proc = cli("train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    shutil.copy(tiny_model_dir / "model.safetensors", broken / "model.safetensors")
    proc = cli("train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------ huge inputs
def test_a_50mb_jsonl_line_is_refused_quickly_in_bounded_memory(tmp_path):
    train, heldout = jsonl_files(tmp_path)
    with open(train, "a") as f:
        f.write(json.dumps({"prompt": "x" * (50 << 20), "answer": "1"}) + "\n")
    tracemalloc.start()
    t0 = time.time()
    with pytest.raises(TaskError, match=r"train.jsonl:13: a line longer than [\d,]+ bytes.*task.max_field_bytes"):
        JsonlTask(train, heldout)
    took, (_, peak) = time.time() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert took < 5 and peak < 64 << 20, (took, peak)  # read in pieces: never the 50 MB line whole


def test_a_field_over_its_bound_names_the_key(tmp_path):
    train, heldout = jsonl_files(tmp_path)
    with open(train, "a") as f:
        f.write(json.dumps({"prompt": "y" * 3000, "answer": "1"}) + "\n")
    with pytest.raises(TaskError, match=r"train.jsonl:13: field 'prompt' is 3,000 bytes.*max_field_bytes \(1,024\)"):
        JsonlTask(train, heldout, max_field_bytes=1024)


def test_a_prompt_far_longer_than_the_context_is_refused_before_anything_is_written(tmp_path):
    """The tiny model's context is 128 tokens; a 500 kB prompt is refused from a prefix (never tokenized whole), with
    its file and line, before --out is created."""
    train, heldout = jsonl_files(tmp_path)
    with open(train, "a") as f:
        f.write(json.dumps({"prompt": "7+" * 250_000 + "=", "answer": "1"}) + "\n")
    cfg = parse_config(tiny_cfg_dict(task={"type": "jsonl", "train_path": str(train), "heldout_path": str(heldout)}))
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"train.jsonl:13: at least [\d,]+ tokens.*context of 128"):
        run(cfg, tmp_path / "o")
    assert time.time() - t0 < 60 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ fuzz
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 400))
def test_fuzz_config_bytes(tmp_path_factory, junk, cut):
    """Random bytes spliced into a valid config, or a truncation of it: a RunCfg or one ConfigError."""
    good = yaml.safe_dump(tiny_cfg_dict()).encode()
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(good[:cut] + junk + good[cut:] if junk else good[:cut])
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e)


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 300), st.booleans())
def test_fuzz_jsonl_bytes(tmp_path_factory, junk, cut, truncate):
    """Random bytes in, or a truncation of, a task file: a task or one TaskError."""
    d = tmp_path_factory.mktemp("jsonl")
    train, heldout = jsonl_files(d)
    data = train.read_bytes()
    train.write_bytes(data[:cut] if truncate else data[:cut] + junk + data[cut:])
    try:
        JsonlTask(train, heldout)
    except TaskError as e:
        assert str(e)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]),
       st.floats(0.0, 1.0), st.binary(max_size=64))
def test_fuzz_model_files(tiny_model_dir, tmp_path_factory, name, at, junk):
    """A model directory with one file truncated at a random point, or random bytes written into it: the model and
    tokenizer load, or one ModelLoadError."""
    d = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(tiny_model_dir, d)
    path = d / name
    data = path.read_bytes()
    cut = int(at * len(data))
    path.write_bytes(data[:cut] + junk + data[cut + len(junk):] if junk else data[:cut])
    for loader in (load_tokenizer, load_model):
        try:
            loader(str(d))
        except ModelLoadError as e:
            assert str(e)


def test_a_run_with_damaged_inputs_never_writes_a_traceback(tmp_path):
    """The command line's view of the cases above: exit 2 and one line naming the problem."""
    (tmp_path / "empty.yaml").write_bytes(b"")
    proc = cli("train", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("forkrl: error:")
    (tmp_path / "huge.yaml").write_bytes(b"#" * (5 << 20))
    proc = cli("train", str(tmp_path / "huge.yaml"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "more than a YAML config can be" in proc.stderr
