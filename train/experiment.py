"""The experiment config: every section in one typed tree, loaded from one YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.config import EvalConfig
from model.build import ModelConfig
from model.inputs import InputsConfig
from selection.config import SelectionConfig
from shards.stream import StreamConfig
from train.config import RunConfig, load_config
from train.data import DataConfig
from train.engine import TrainConfig
from train.objective import LossConfig


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    rounds: int = 1        # selection rounds after stage I (./run.sh runs rounds 0..rounds)
    model: ModelConfig = field(default_factory=ModelConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(path, ExperimentConfig, overrides)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.experiment CONFIG [key=value ...] --get KEY...``: print resolved values (for run.sh)."""
    import sys

    from train.config import ConfigError, split_overrides

    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    if "--get" not in args or args.index("--get") != 1:
        print("usage: python -m train.experiment CONFIG [key=value ...] --get KEY [KEY ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_experiment(args[0], overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    values = []
    for key in args[2:]:
        node = cfg
        for part in key.split("."):
            if not hasattr(node, part):
                print(f"error: {key}: no such key", file=sys.stderr)
                return 2
            node = getattr(node, part)
        values.append(str(node))
    print(" ".join(values))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
