"""Experiment trackers (``report_to``) and the completions log (``completions.jsonl``), on tiny SFT→GRPO runs.

TensorBoard is exercised for real (its event file read back with TensorBoard's own reader); wandb and trackio
through fakes put in ``sys.modules`` that take exactly the parameters of the real ``wandb.init`` / ``Run.log`` /
``Run.finish`` (wandb 0.31) and ``trackio.init`` / ``log`` / ``finish`` (trackio 0.43), and record each call."""

from __future__ import annotations

import errno
import importlib.machinery
import json
import sys
import types
import typing

import pytest

import forkrl.tracking as tracking
import forkrl.trainers.loop as loop_module
import forkrl.trainers.metrics as metrics_module
from forkrl.checkpoint import DiskFullError
from forkrl.config import ConfigError, RunCfg, parse_config
from forkrl.pipeline import run
from forkrl.report import build_report
from forkrl.tasks import build_task

from conftest import tiny_cfg_dict
from test_report import Dom

SFT_STEPS, GRPO_STEPS = 2, 3


# ------------------------------------------------------------------------------------ faithful fakes
class FakeWandbRun:
    def __init__(self, calls: list, kwargs: dict):
        self.calls, self.kwargs, self.last_step = calls, kwargs, -1

    def log(self, data: dict, step: int | None = None, commit: bool | None = None) -> None:
        assert isinstance(data, dict) and isinstance(step, int)
        assert step >= self.last_step, "wandb drops a step below its last one"
        self.last_step = step
        self.calls.append(("log", self.kwargs["id"], dict(data), step))

    def finish(self, exit_code: int | None = None) -> None:
        self.calls.append(("finish", self.kwargs["id"]))


def fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what importlib.util.find_spec reads

    def init(entity=None, project=None, dir=None, id=None, name=None, notes=None, tags=None, config=None,
             config_exclude_keys=None, config_include_keys=None, allow_val_change=None, group=None, job_type=None,
             mode=None, force=None, reinit=None, resume=None, resume_from=None, fork_from=None, save_code=None,
             tensorboard=None, sync_tensorboard=None, monitor_gym=None, settings=None):  # wandb 0.31's, in order
        kwargs = {k: v for k, v in locals().items() if v is not None and k != "calls"}  # `calls`: the closure
        calls.append(("init", kwargs))
        return FakeWandbRun(calls, kwargs)

    module.init = init
    return module


def fake_trackio(calls: list) -> types.ModuleType:
    module = types.ModuleType("trackio")
    module.__spec__ = importlib.machinery.ModuleSpec("trackio", None)

    def init(project, name=None, group=None, space_id=None, server_url=None, dataset_id=None, bucket_id=None,
             config=None, resume="never", settings=None, private=None, embed=True, auto_log_gpu=None,
             gpu_log_interval=10.0, auto_log_cpu=None, cpu_log_interval=10.0, webhook_url=None,
             webhook_min_level=None):  # trackio 0.43's
        assert resume in ("must", "allow", "never")
        calls.append(("init", {"project": project, "name": name, "config": config, "resume": resume}))

    def log(metrics: dict, step: int | None = None) -> None:
        calls.append(("log", dict(metrics), step))

    def finish() -> None:
        calls.append(("finish",))

    module.init, module.log, module.finish = init, log, finish
    return module


@pytest.fixture()
def fakes(monkeypatch):
    calls = {"wandb": [], "trackio": []}
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls["wandb"]))
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(calls["trackio"]))
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "TRACKIO_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    return calls


def config(**over):
    return parse_config(tiny_cfg_dict(**{"stages": ["sft", "grpo"], "sft.steps": SFT_STEPS, "grpo.steps": GRPO_STEPS,
                                         "grpo.rewards": [{"name": "correct"}, {"name": "format", "weight": 0.5}],
                                         **over}))


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One SFT→GRPO run with all three trackers; (run directory, the fakes' calls)."""
    mp = pytest.MonkeyPatch()
    calls = {"wandb": [], "trackio": []}
    mp.setitem(sys.modules, "wandb", fake_wandb(calls["wandb"]))
    mp.setitem(sys.modules, "trackio", fake_trackio(calls["trackio"]))
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "TRACKIO_PROJECT"):
        mp.delenv(var, raising=False)
    out = tmp_path_factory.mktemp("tracked") / "run"
    try:
        run(config(report_to=["tensorboard", "wandb", "trackio"]), out)
    finally:
        mp.undo()
    return out, calls


def expected_logs(run_dir) -> dict[int, dict]:
    """What every tracker must have got: each metrics line's numeric values, keyed STAGE/KEY, at the run-wide step
    (SFT 1..2, GRPO 3..5), plus each stage's final held-out pass@1 at its last step."""
    out = {}
    offset = {"sft": 0, "grpo": SFT_STEPS}
    for row in lines(run_dir / "metrics.jsonl"):
        stage = row["stage"]
        values = {f"{stage}/{k}": int(v) if isinstance(v, bool) else v for k, v in row.items()
                  if isinstance(v, (int, float)) and k not in ("step", "time")}  # the axis; wall-clock time
        out.setdefault(offset[stage] + row["step"], {}).update(values)
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage, steps in (("sft", SFT_STEPS), ("grpo", GRPO_STEPS)):
        out[offset[stage] + steps][f"{stage}/final_pass_at_1"] = summary["stages"][stage]["pass_at_1"]
    return out


def merged(logs) -> dict[int, dict]:
    """(values, step) calls merged per step, as a tracker shows them."""
    out: dict[int, dict] = {}
    for values, step in logs:
        out.setdefault(step, {}).update(values)
    return out


# --------------------------------------------------------------------------------------------- trackers
def test_wandb_gets_every_metrics_line_at_a_run_wide_step_and_the_config(tracked):
    run_dir, calls = tracked
    inits = [c[1] for c in calls["wandb"] if c[0] == "init"]
    cfg = config(report_to=["tensorboard", "wandb", "trackio"])
    wandb_id = json.loads((run_dir / "tracking.json").read_text())["wandb_id"]
    assert len(inits) == 2  # one per stage, the same wandb run
    for init in inits:
        assert init == {"project": "forkrl", "name": "run", "dir": str(run_dir), "id": wandb_id, "resume": "allow",
                        "config": cfg.model_dump(mode="json")}
    logs = [(c[2], c[3]) for c in calls["wandb"] if c[0] == "log"]
    assert merged(logs) == expected_logs(run_dir)
    assert [c[0] for c in calls["wandb"]].count("finish") == 2 and calls["wandb"][-1][0] == "finish"
    assert calls["wandb"][len(calls["wandb"]) // 2 - 1][0] == "finish"  # the SFT stage's closed before GRPO's


def test_trackio_gets_the_same_and_continues_its_run_in_the_next_stage(tracked):
    run_dir, calls = tracked
    inits = [c[1] for c in calls["trackio"] if c[0] == "init"]
    config_json = config(report_to=["tensorboard", "wandb", "trackio"]).model_dump(mode="json")
    assert inits == [{"project": "forkrl", "name": "run", "config": config_json, "resume": "never"},
                     {"project": "forkrl", "name": "run", "config": config_json, "resume": "allow"}]
    assert merged([(c[1], c[2]) for c in calls["trackio"] if c[0] == "log"]) == expected_logs(run_dir)
    assert [c[0] for c in calls["trackio"]].count("finish") == 2


def test_tensorboard_event_files_hold_every_scalar_and_the_config(tracked):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    run_dir, _ = tracked
    events = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one writer per stage, in the same directory
    mux = EventMultiplexer({"run": str(run_dir / "tensorboard")}).Reload()
    acc = mux.GetAccumulator("run")
    expected = expected_logs(run_dir)
    got: dict[int, dict] = {}
    for key in acc.Tags()["scalars"]:
        for event in acc.Scalars(key):
            got.setdefault(event.step, {})[key] = event.value
    assert got.keys() == expected.keys()
    for step, values in expected.items():
        assert got[step].keys() == values.keys(), step
        for key, value in values.items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-30), (step, key)  # float32 in the file
    text = acc.Tensors("config/text_summary")
    assert len(text) == 1 and b"report_to:" in text[0].tensor_proto.string_val[0]  # logged once, fresh run only


def test_wandb_honours_its_environment(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    monkeypatch.setenv("WANDB_NAME", "my-run")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # wandb reads it itself: forkrl never passes a mode
    t = tracking.open_trackers(["wandb"], run_dir=tmp_path, stage="grpo", config={"seed": 1})
    t.log(2, {"loss": 0.5, "update_skipped": True, "denominator": "tokens", "kl": None, "x": float("nan")})
    t.close()
    t.close()  # idempotent
    init = fakes["wandb"][0][1]
    assert (init["project"], init["name"], init["dir"]) == ("proj", "my-run", str(tmp_path / "elsewhere"))
    assert "mode" not in init and (tmp_path / "elsewhere").is_dir()
    assert fakes["wandb"][1][2:] == ({"grpo/loss": 0.5, "grpo/update_skipped": 1}, 2)
    assert [c[0] for c in fakes["wandb"]] == ["init", "log", "finish"]


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard"])
def test_a_missing_extra_is_one_config_error_before_the_run_writes_anything(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    cfg = config(report_to=[name])
    with pytest.raises(ConfigError, match=rf"pip install 'forkrl\[{name}\]'"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # found before anything is written
    import yaml

    from forkrl.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(path), "--out", str(tmp_path / "cli")]) == 2
    assert f"forkrl[{name}]" in capsys.readouterr().err


def test_report_to_names_the_registry_and_refuses_others():
    allowed = typing.get_args(typing.get_args(RunCfg.model_fields["report_to"].annotation)[0])
    assert set(allowed) == set(tracking.TRACKERS)  # the config's choices are the adapters
    assert parse_config(tiny_cfg_dict()).report_to == []
    with pytest.raises(ConfigError, match="report_to.0.*'tensorboard', 'wandb' or 'trackio'"):
        parse_config(tiny_cfg_dict(report_to=["mlflow"]))


# ------------------------------------------------------------------------------------------ completions
def test_completions_are_the_first_rows_of_each_step_with_their_scores(tracked):
    run_dir, _ = tracked
    rows = lines(run_dir / "completions.jsonl")
    cfg = config()
    n, G = cfg.log_completions, cfg.grpo.group_size
    assert n == G == 4  # the default sample is the first group whole
    assert [(r["stage"], r["step"], r["row"], r["group"]) for r in rows] == \
        [("grpo", s, i, 0) for s in range(1, GRPO_STEPS + 1) for i in range(n)]
    metrics = {r["step"]: r for r in lines(run_dir / "metrics.jsonl") if r["stage"] == "grpo"}
    train = {p.id: p for p in build_task(cfg.task).problems("train")}
    for r in rows:
        assert set(r) == {"stage", "step", "row", "group", "problem_id", "prompt", "completion", "reward", "valid",
                          "components", "advantage", "truncated", "completion_tokens"}
        assert train[r["problem_id"]].prompt == r["prompt"]
        assert r["valid"] and set(r["components"]) == {"correct", "format"}
        assert r["reward"] == pytest.approx(r["components"]["correct"] + 0.5 * r["components"]["format"], abs=1e-6)
        assert isinstance(r["completion"], str) and 0 < r["completion_tokens"] <= cfg.sampling.max_new_tokens
        if r["truncated"]:  # hit max_new_tokens without EOS
            assert r["completion_tokens"] == cfg.sampling.max_new_tokens
        assert abs(r["advantage"]) <= metrics[r["step"]]["adv_abs_max"] + 1e-6
    for step in range(1, GRPO_STEPS + 1):  # a whole group: GRPO's advantages are centred within it
        group = [r for r in rows if r["step"] == step]
        assert len({r["problem_id"] for r in group}) == 1
        assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-5)
        rewards = [r["reward"] for r in group]
        if len(set(rewards)) == 1:
            assert all(r["advantage"] == 0 for r in group)


def test_log_completions_zero_writes_no_file(tmp_path):
    run(parse_config(tiny_cfg_dict(**{"grpo.steps": 1, "log_completions": 0})), tmp_path / "run")
    assert not (tmp_path / "run" / "completions.jsonl").exists()


def test_resume_truncates_completions_like_metrics_and_continues_the_tracker_runs(tmp_path, fakes, monkeypatch):
    cfg = config(**{"stages": ["grpo"], "grpo.steps": 4, "checkpoint.every": 2, "report_to": ["wandb"]})
    run(cfg, tmp_path / "a")
    first = list(fakes["wandb"])
    fakes["wandb"].clear()
    real = loop_module.maybe_checkpoint

    def crash_after_step_3(ctx, step, *args, **kw):
        real(ctx, step, *args, **kw)
        if step == 3:
            raise KeyboardInterrupt  # step 3's lines are written, its checkpoint is not

    monkeypatch.setattr(loop_module, "maybe_checkpoint", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "b")
    monkeypatch.setattr(loop_module, "maybe_checkpoint", real)
    assert [r["step"] for r in lines(tmp_path / "b" / "completions.jsonl")][-1] == 3
    run(cfg, tmp_path / "b", resume=True)
    a, b = (lines(tmp_path / d / "completions.jsonl") for d in "ab")
    assert [r["step"] for r in b] == [s for s in (1, 2, 3, 4) for _ in range(4)]  # step 3 redone, not duplicated
    assert a == b
    # the resumed run continued the same wandb run; the interrupted stage's run was finished first
    ids = [c[1]["id"] for c in fakes["wandb"] if c[0] == "init"]
    assert len(ids) == 2 and ids[0] == ids[1] == json.loads((tmp_path / "b" / "tracking.json").read_text())["wandb_id"]
    assert [c[0] for c in fakes["wandb"]].index("finish") < [i for i, c in enumerate(fakes["wandb"])
                                                              if c[0] == "init"][1]
    assert [c[3] for c in fakes["wandb"] if c[0] == "log"] == [1, 2, 3, 3, 4, 4]  # 3 again; 4 with final pass@1
    assert len([c for c in first if c[0] == "log"]) == 5


def test_a_full_disk_on_the_completions_write_is_a_disk_full_error(tmp_path, monkeypatch):
    def full(path, mode="r", *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics_module, "open", full, raising=False)
    with pytest.raises(DiskFullError, match="the completions sample .*completions.jsonl"):
        metrics_module.append_jsonl(tmp_path / "completions.jsonl", [{"a": 1}], what="the completions sample")
    assert not (tmp_path / "completions.jsonl").exists()


# --------------------------------------------------------------------------------------------- report
EVIL = "x </script><b>bold</b> <!-- & \"q\""


def write_run(root, completions: list[dict] | None):
    run_dir = root / "run"
    run_dir.mkdir()
    rows = [{"stage": "grpo", "step": s, "reward_mean": 0.1 * s, "loss": 0.0} for s in range(1, 6)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if completions is not None:
        (run_dir / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in completions))
    return run_dir


def completion(step: int, row: int, text: str = "12", **over) -> dict:
    return {"stage": "grpo", "step": step, "row": row, "group": 0, "problem_id": f"train-{step}",
            "prompt": "5+7=", "completion": text, "reward": 1.0, "valid": True,
            "components": {"correct": 1.0, "format": None}, "advantage": 0.5, "truncated": False,
            "completion_tokens": 3, **over}


def test_the_report_shows_the_last_steps_completions_escaped(tmp_path):
    rows = [completion(s, i) for s in range(1, 6) for i in range(2)]
    rows[-1] = completion(5, 1, EVIL, prompt="<i>p</i>", problem_id="<u>id</u>", valid=False, reward=None)
    html = build_report(write_run(tmp_path, rows))
    dom = Dom(html)
    section = dom.by_id("completions")
    tables = dom.find("div", "completions", section)
    assert [(t.attrs["data-stage"], t.attrs["data-step"]) for t in tables] == [("grpo", "3"), ("grpo", "4"),
                                                                               ("grpo", "5")]
    assert "</script><b>" not in html and "&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in html
    assert not [n for n in dom.nodes if n.tag in ("b", "i", "u", "script")]  # model and task text stays text
    details = dom.find("details", "completion", tables[-1])
    assert len(details) == 2 and "open" not in details[1].attrs  # collapsed
    assert EVIL in dom.find("pre", within=details[1])[0].text()
    cells = [td.text() for td in dom.find("td", within=dom.find("tr", within=tables[-1])[-1])]
    assert cells[:7] == ["1", "<u>id</u>", "<i>p</i>", "unscorable", "1", "—", "0.5"]
    assert [th.text() for th in dom.find("th", within=tables[0])] == [
        "row", "problem", "prompt", "reward", "correct", "format", "advantage", "truncated", "tokens", "completion"]
    every = Dom(build_report(tmp_path / "run", completion_steps=0))
    assert len(every.find("div", "completions", every.by_id("completions"))) == 5


def test_a_run_without_completions_still_reports(tmp_path):
    dom = Dom(build_report(write_run(tmp_path, None)))
    assert "No completions.jsonl" in dom.by_id("completions").text()
    assert dom.by_id("curves") is not None


def test_the_report_of_a_real_run(tracked):
    run_dir, _ = tracked
    dom = Dom(build_report(run_dir))
    tables = dom.find("div", "completions", dom.by_id("completions"))
    assert [t.attrs["data-step"] for t in tables] == ["1", "2", "3"]
    assert len(dom.find("details", "completion", tables[0])) == 4
