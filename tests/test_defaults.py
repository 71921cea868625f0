"""Defaults live in the YAML: every default a configured class's signature still carries equals its config's value,
so that a change to one without the other fails here."""

import inspect

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from psdclip.data import EmbeddedDataModule, MosaicDataModule, ShardDataModule
from psdclip.eval.linear_probe import linear_probe, select_C
from psdclip.eval.suite import EvalSuite
from tests.conftest import compose_config, tiny_paths


def python_defaults(function) -> dict:
    """The defaults of ``function``'s parameters that have one, as plain values (tuples as lists)."""
    return {
        name: list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def configured(overrides: list[str], node: str, tmp_path) -> dict:
    """The resolved settings of ``node`` in ``conf/train.yaml`` composed with ``overrides``."""
    cfg = compose_config([*tiny_paths(tmp_path, tmp_path), *overrides])
    return OmegaConf.to_container(OmegaConf.select(cfg, node), resolve=True)


def constructors(cls) -> list:
    """``cls.__init__`` and, while one hands ``**kwargs`` on to its base class, the bases' (the config reaches all)."""
    found = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        found.append(klass.__init__)
        if not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(klass.__init__).parameters.values()
        ):
            break
    return found


@pytest.mark.parametrize(
    ("cls", "overrides", "node"),
    [
        (ShardDataModule, ["data=shards", "data.train_shards=/data/mine"], "data"),
        (EmbeddedDataModule, ["data=embedded"], "data"),
        (MosaicDataModule, ["data=embedded_mosaic"], "data"),
        (EvalSuite, [], "evaluation"),
    ],
)
def test_python_defaults_equal_the_yaml(cls, overrides, node, tmp_path):
    settings = configured(overrides, node, tmp_path)
    assert get_object(settings["_target_"]) is cls  # the config builds the class whose signature is checked
    for constructor in constructors(cls):
        for name, default in python_defaults(constructor).items():
            if name not in settings:
                continue  # not a configured setting (transform, tokenizer, …)
            if name == "linear_probe" and default is None:
                continue  # None: the probe's own defaults, checked below
            assert default == settings[name], (
                f"{constructor.__qualname__}({name}={default!r}) but {node}.{name} is {settings[name]!r}"
            )


def test_linear_probe_defaults_equal_the_yaml(tmp_path):
    settings = configured([], "evaluation.linear_probe", tmp_path)
    defaults = {**python_defaults(select_C), **python_defaults(linear_probe)}
    for name, value in settings.items():
        assert name in defaults and defaults[name] == value, (
            f"evaluation.linear_probe.{name}={value!r}, Python: {defaults.get(name)!r}"
        )
