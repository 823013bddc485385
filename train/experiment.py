"""The experiment config: every section in one typed tree, loaded from one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.config import EvalConfig
from model.build import ModelConfig
from model.inputs import InputsConfig
from shards.stream import StreamConfig
from train.config import RunConfig, load_config
from train.data import DataConfig
from train.engine import TrainConfig
from train.objective import LossConfig


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(path, ExperimentConfig, overrides)
