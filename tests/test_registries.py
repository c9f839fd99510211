"""One source of truth for names: every config key that names a registered thing accepts exactly its registry's
names (a name registered later included), refuses others with the list and the key path, and no registry's names
are repeated in the config as a fixed list of choices. Old key names still load."""

import typing

import pytest
from pydantic import BaseModel

from forkrl import config
from forkrl.config import NAMED, ConfigError, RunCfg, parse_config

from conftest import tiny_cfg_dict

JSONL = {"type": "jsonl", "train_path": "train.jsonl", "heldout_path": "heldout.jsonl"}


def with_name(path: str, value: str) -> dict:
    """The tiny config with the key ``path`` (``[]``: a list's only entry) set to ``value``."""
    head, _, rest = path.partition("[]")
    if path == "stages[]":
        return tiny_cfg_dict(stages=[value])
    if rest:  # grpo.rewards[].name
        return tiny_cfg_dict(**{head: [{rest.lstrip("."): value}]})
    if path.startswith("task."):
        return tiny_cfg_dict(task={**JSONL, path.split(".", 1)[1]: value})
    return tiny_cfg_dict(**{path: value})


@pytest.mark.parametrize("path", sorted(NAMED))
def test_a_named_key_accepts_its_registry_and_lists_it_when_wrong(path):
    registry, extra = NAMED[path]
    assert len(registry) > 0
    for name in (*extra, *registry):
        parse_config(with_name(path, name))
    with pytest.raises(ConfigError) as e:
        parse_config(with_name(path, "no_such_name"))
    msg = str(e.value)
    shown = path.replace("[]", ".0")
    assert shown in msg and "'no_such_name'" in msg
    assert all(repr(name) in msg for name in (*extra, *registry)), msg


def test_a_name_registered_later_is_a_valid_value(monkeypatch):
    from forkrl.algos import advantages

    with pytest.raises(ConfigError, match="unknown advantage estimator 'mine'"):
        parse_config(tiny_cfg_dict(**{"grpo.advantage": "mine"}))
    monkeypatch.setitem(advantages.ADVANTAGES, "mine", advantages.dr_grpo)
    assert parse_config(tiny_cfg_dict(**{"grpo.advantage": "mine"})).grpo.advantage == "mine"


def _models(cls=RunCfg, seen=None):
    """Every config section class reachable from ``cls``."""
    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for field in cls.model_fields.values():
        for arg in _walk(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)
    return seen


def _walk(annotation):
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _walk(arg)


def test_no_registry_is_repeated_as_a_literal_in_the_config():
    """A fixed list of choices that shares two or more names with a registry is a copy of it (one name in common,
    like model.dtype's and sampling.backend's "auto", is a coincidence)."""
    literals = {(cls.__name__, field_name): set(typing.get_args(arg))
                for cls in _models() for field_name, field in cls.model_fields.items()
                for arg in _walk(field.annotation) if typing.get_origin(arg) is typing.Literal}
    assert ("ModelCfg", "dtype") in literals  # the walk sees the config's fixed choices
    copies = [(key, path) for key, values in literals.items() for path, (registry, extra) in NAMED.items()
              if len(values & {*registry, *extra}) >= 2]
    assert not copies


def _is_named(field) -> bool:
    """Whether a field's value (or a list's entries) is checked by ``names.named``."""
    metadata = [*field.metadata, *(m for arg in _walk(field.annotation) for m in getattr(arg, "__metadata__", ()))]
    return any(getattr(getattr(m, "func", None), "__qualname__", "").startswith("named.") for m in metadata)


def _owner(path: str) -> tuple[type, str]:
    """(the section class, the field name) a NAMED key path ends at."""
    *parents, last = path.replace("[]", "").split(".")
    cls = RunCfg
    for i, key in enumerate(parents):
        nxt = (parents + [last])[i + 1]
        options = [a for a in _walk(cls.model_fields[key].annotation)
                   if isinstance(a, type) and issubclass(a, BaseModel)]
        cls = next(o for o in options if nxt in o.model_fields)
    return cls, last


def test_every_key_that_checks_a_name_is_listed():
    """A field validated by ``names.named`` that ``NAMED`` does not list would escape the tests above."""
    checked = {(cls, name) for cls in _models() for name, field in cls.model_fields.items() if _is_named(field)}
    assert checked == {_owner(path) for path in NAMED}


def test_old_key_names_load_under_their_new_names():
    old = tiny_cfg_dict(**{"sampling.engine": "hf", "grpo.reuse_decode": False, "grpo.filter_zero_variance": True})
    cfg = parse_config(old)
    assert (cfg.sampling.backend, cfg.sampling.replay, cfg.grpo.filter) == ("hf", False, "zero_variance_groups")
    assert parse_config(tiny_cfg_dict(**{"grpo.filter_zero_variance": False})).grpo.filter == "none"
    with pytest.raises(ConfigError, match="sampling.engine is the old name of sampling.backend"):
        parse_config(tiny_cfg_dict(**{"sampling.engine": "hf", "sampling.backend": "auto"}))
    assert set(config._MOVED) == {("sampling", "engine"), ("grpo", "reuse_decode"), ("grpo", "filter_zero_variance")}


def test_each_task_type_is_its_registry_key():
    from forkrl.tasks import TASKS

    for name, cls in TASKS.items():
        assert typing.get_args(cls.model_fields["type"].annotation) == (name,)
    with pytest.raises(ConfigError, match="'arithmetic', 'reasoning_gym', 'jsonl'"):
        parse_config(tiny_cfg_dict(task={"type": "nope"}))


def test_a_run_directory_written_with_old_key_names_resumes(tmp_path):
    """``--resume`` compares the run's saved config as this version reads it, so an older run's config.yaml (old
    key names) matches the same config given today; one that no longer reads is a clear error."""
    import yaml

    from forkrl.pipeline import _saved_config

    today = parse_config(tiny_cfg_dict(**{"sampling.backend": "hf", "grpo.filter": "zero_variance_groups"}))
    old = today.model_dump(mode="json")
    old["sampling"]["engine"] = old["sampling"].pop("backend")
    old["grpo"]["filter_zero_variance"] = old["grpo"].pop("filter") == "zero_variance_groups"
    old["grpo"]["reuse_decode"] = old["sampling"].pop("replay")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert _saved_config(tmp_path / "config.yaml") == today
    (tmp_path / "config.yaml").write_bytes(b"stages: [\xe9")
    with pytest.raises(ConfigError, match="no longer reads"):
        _saved_config(tmp_path / "config.yaml")
