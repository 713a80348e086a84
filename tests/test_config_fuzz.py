"""Config loading under generated input: YAML files and dotted overrides built from the
real config keys (walked from ``Config``'s fields) mixed with unknown keys, wrong types,
out-of-range numbers, odd strings and malformed overrides. Whatever comes in,
``load_config`` returns a ``Config`` or raises a one-line ``ConfigError``, never anything
else. Derandomized, so CI sees the same examples on every run."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from raycv.config import Config, ConfigError, load_config

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _section(annotation) -> type[BaseModel] | None:
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree, sections included."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if sub := _section(field.annotation):
            keys += config_keys(sub, f"{prefix}{name}.")
    return keys


KEYS = config_keys()
ODD_TEXT = st.one_of(
    st.text(max_size=12),
    st.text(min_size=500, max_size=2000),  # very long
    st.sampled_from(["", " ", "é", "\u202e", "\x00", "\t", "\n", "1e400", ".inf", "~", "yes"]),
    st.sampled_from(["[", "{a: 1", "&a [*a]", "!!python/object/apply:os.system ['true']"]),
)
NAMES = st.sampled_from(
    [
        *("resnet18", "mobilenet_v3_small", "shapes", "folder", "classic", "eval", "sgd"),
        *("adamw", "cosine", "channel", "l1_unstructured", "full", "gradual", "optuna", "asha"),
        *("int8", "classification", "DEFAULT", "runs", "val_acc"),
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3000),
    st.integers(),  # far out of range, and beyond 64 bits
    st.floats(),  # nan and infinities included
    NAMES,
    ODD_TEXT,
)
ANY_KEY = st.one_of(st.sampled_from([k.rsplit(".", 1)[-1] for k in KEYS]), st.text(max_size=10))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(ANY_KEY, inner, max_size=3)
    ),
    max_leaves=6,
)


def typed(annotation) -> st.SearchStrategy:
    """Values of the field's own type (so that validation gets past the field checks to
    the cross-checks), or anything at all."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if sub := _section(annotation):
        return st.one_of(section(sub), section(sub), VALUES)
    if origin is typing.Literal:
        return st.one_of(st.sampled_from(args), st.sampled_from(args), VALUES)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([typed(a) for a in args])
    own = {
        type(None): st.none(),
        bool: st.booleans(),
        int: st.integers(-2, 300),
        float: st.floats(-1, 2),
        str: NAMES,
    }.get(annotation)
    if own is None and origin in (list, tuple):
        own = st.lists(typed(args[0]) if args else VALUES, min_size=1, max_size=4)
    return st.one_of(own, own, VALUES) if own is not None else VALUES


def section(model: type[BaseModel]) -> st.SearchStrategy:
    """A mapping with some of ``model``'s keys, and sometimes unknown ones."""
    known = st.fixed_dictionaries(
        {}, optional={name: typed(f.annotation) for name, f in model.model_fields.items()}
    )
    unknown = st.dictionaries(st.one_of(ANY_KEY, st.integers(), st.none()), VALUES, max_size=1)
    return st.one_of(known, known, st.builds(lambda k, u: {**u, **k}, known, unknown))


MALFORMED = st.sampled_from(
    [
        *("a..b=1", "=3", "model=", "train.epochs=[1", "train.epochs", ".a=1", "a.=1", "1a=2"),
        *("a b=1", "=", "==", "train.epochs==3", "é=1", "\x00=1", "train.epochs=\x00"),
        *("model.name.x=1", "seed.x=1", "tune.space.lr.choice=[1, 2]", "tune.space.x.bogus=1"),
        *("pipeline.pretrain.storage_token=abc", "train=3", "train.epochs=1e400", "a.b.c.d=1"),
    ]
)
OVERRIDES = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.one_of(ODD_TEXT, NAMES)),
        st.builds(
            lambda k, v: f"{k}={json.dumps(v, ensure_ascii=False)}",
            st.sampled_from(KEYS),
            VALUES,
        ),
        MALFORMED,
        st.text(max_size=30),
    ),
    max_size=4,
)
YAML_TEXT = st.one_of(
    section(Config).map(lambda m: yaml.safe_dump(m, allow_unicode=True, sort_keys=False)),
    # a valid file cut short anywhere
    st.builds(
        lambda m, cut: (t := yaml.safe_dump(m, sort_keys=False))[: int(cut * len(t))],
        section(Config),
        st.floats(0, 1),
    ),
    st.text(max_size=200),
    st.sampled_from(["- a\n- b", "a: [1", "{", "\t", "a: &x [*x]", "null", "3", "%YAML 9.9\n---"]),
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "config.yaml"


def config_or_config_error(path: Path | None, overrides: list[str]) -> None:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        message = str(e)
        assert message.strip(), "a ConfigError must say what is wrong"
        assert "\n" not in message, f"config errors are one line, got {message!r}"
    else:
        assert isinstance(cfg, Config)


def test_the_generated_keys_are_the_real_ones():
    assert {"train.epochs", "data.shapes.num_images", "tune.scheduler.name"} <= set(KEYS)
    assert "train" in KEYS and "train.epochs.x" not in KEYS


@FUZZ
@given(text=YAML_TEXT, overrides=OVERRIDES)
def test_yaml_file_and_overrides(config_file, text, overrides):
    config_file.write_text(text, encoding="utf-8")
    config_or_config_error(config_file, overrides)


@FUZZ
@given(overrides=st.lists(st.one_of(MALFORMED, OVERRIDES.map(" ".join)), max_size=5))
def test_overrides_alone(overrides):
    config_or_config_error(None, overrides)


@FUZZ
@given(data=st.binary(max_size=300))
def test_a_file_that_is_not_text(config_file, data):
    config_file.write_bytes(data)
    config_or_config_error(config_file, [])
