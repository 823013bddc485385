"""The experiment config: every section in one typed tree, loaded from one YAML file.

It sits above the jobs (train, eval, selection): each section's dataclass lives in the folder that owns it, and
this module composes them; the jobs' entry points (``python -m train``, ...) read it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from config import ConfigError, load_config, split_overrides
from eval.config import EvalConfig
from model.build import ModelConfig
from model.inputs import InputsConfig
from selection.config import SelectionConfig
from shards.stream import StreamConfig
from train.data import DataConfig
from train.engine import TrainConfig
from train.layout import RunConfig
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


def job_parser(prog: str, doc: str | None, round_help: str | None = None,
               round_required: bool = False) -> argparse.ArgumentParser:
    """The options every job shares: ``--config``, and for per-round jobs ``--round`` and the ``--local_rank``
    that the deepspeed launcher passes."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML")
    if round_help is not None:
        parser.add_argument("--round", type=int, required=round_required, default=0, help=round_help)
        parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_job(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, ExperimentConfig]:
    """Options and ``key=value`` overrides from ``argv`` (default: the command line), then the config they name.

    A bad config ends the process with status 2 and one line naming the key and the file.
    """
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(args)
    try:
        return ns, load_experiment(ns.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
