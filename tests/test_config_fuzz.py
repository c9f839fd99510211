"""Fuzzing the config loader: whatever YAML a user writes, the answer is a RunCfg or one ConfigError,
never another exception (which the CLI would show as a traceback)."""

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forkrl.config import ConfigError, load_config, parse_config

from conftest import tiny_cfg_dict

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                      max_leaves=12)


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


VALID = tiny_cfg_dict(**{"stages": ["sft", "grpo"]})
PATHS = list(_paths(VALID))


def _accepts_or_config_error(data):
    try:
        parse_config(data)
    except ConfigError as e:
        assert str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_arbitrary_documents(data):
    _accepts_or_config_error(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PATHS), values, st.booleans())
def test_mutated_valid_config(path, value, as_unknown_key):
    data = copy.deepcopy(VALID)
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1] + "_typo" if as_unknown_key else path[-1]] = value
    _accepts_or_config_error(data)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e)


def test_valid_config_round_trips_through_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(VALID))
    assert load_config(p).stages == ["sft", "grpo"]
