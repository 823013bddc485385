"""Config loading: typed values, errors that name the key and the file, overrides."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from config import ConfigError, from_dict, require, split_overrides
from rounds.experiment import ExperimentConfig, load_experiment


@dataclass
class Inner:
    lr: float = 1e-3
    mode: Literal["frozen", "lora", "full"] = "lora"
    layers: list[int] = field(default_factory=lambda: [1, 2])

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path):
    cfg = load_experiment(write(tmp_path, "run: {name: exp1}\nseed: 7\n"))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.name == "exp1" and cfg.run.dir == "runs" and cfg.seed == 7
    assert str(cfg.run.path()) == "runs/exp1"
    assert load_experiment(None).run.name == "default"


def test_int_promotes_to_float_and_nested_dataclass():
    cfg = from_dict(Outer, {"inner": {"lr": 1, "layers": [3]}, "maybe": 4})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.layers == [3] and cfg.maybe == 4


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "run: {name: a, nmae: b}\n")
    with pytest.raises(ConfigError) as exc:
        load_experiment(path)
    assert str(path) in str(exc.value) and "run.nmae" in str(exc.value) and "unknown key" in str(exc.value)


@pytest.mark.parametrize("data, key", [
    ({"inner": {"lr": "fast"}}, "inner.lr"),
    ({"inner": {"mode": "half"}}, "inner.mode"),
    ({"inner": {"layers": [1, "two"]}}, "inner.layers[1]"),
    ({"inner": {"lr": -1.0}}, "inner.lr"),
    ({"inner": 3}, "inner"),
    ({"maybe": 1.5}, "maybe"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, data)
    assert str(exc.value).startswith(key + ":"), str(exc.value)


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, "run: {name: a}\n")
    cfg = load_experiment(path, ["seed=3", "run.name=b", "run.dir=/tmp/runs"])
    assert (cfg.seed, cfg.run.name, cfg.run.dir) == (3, "b", "/tmp/runs")
    with pytest.raises(ConfigError, match="seed: expected an integer"):
        load_experiment(path, ["seed=abc"])
    with pytest.raises(ConfigError, match="run.bogus: unknown key"):
        load_experiment(path, ["run.bogus=1"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_experiment(path, ["run..name=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(write(tmp_path, "run: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_experiment(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="run.name: must be a plain folder name"):
        load_experiment(write(tmp_path, "run: {name: ../x}\n"))


def test_split_overrides():
    args, overrides = split_overrides(["--config", "c.yaml", "seed=1", "--round", "2", "run.name=x"])
    assert args == ["--config", "c.yaml", "--round", "2"] and overrides == ["seed=1", "run.name=x"]
