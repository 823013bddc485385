"""Experiment tracking: DeepSpeed's monitor (TensorBoard, CSV, W&B), configured by ``train.monitor``.

Why DeepSpeed's ``MonitorMaster``: one writer call for every backend, the ones DeepSpeed users already read. It is
built here from ``train.monitor`` rather than through the ds_config, so that the engine's own ``Train/Samples``
events stay out, and so that the rounds driver, which has no process group, writes to the same run: the training
job logs every figure of ``metrics.jsonl`` as ``train/<name>``, the driver each round's ``selection/...``
(``allocation.json``) and ``eval/...`` (``eval.json``). Only rank 0 writes.

Where (``<dir>``: ``train.monitor.dir``, else ``runs/<name>/monitor``)::

    <dir>/tensorboard/<name>/   event files: every job of the run adds its own file to this one TensorBoard run
    <dir>/csv/<name>/           one <tag>.csv per tag (tag with "/" as "_"): step, value
    <dir>/wandb/                W&B runs (offline unless wandb_mode: online), grouped as <name>, one per job

One step axis for the whole run: step ``s`` of training round R is logged at ``round_offset(R) + s`` (the steps of
the rounds before it), a round's selection at ``round_offset(R)`` and its eval at ``round_offset(R + 1)``, where
its training ended. A training job first drops what an earlier, killed try of it logged past its checkpoint
(TensorBoard's restart marker, the CSV rows), as ``metrics.jsonl`` is trimmed.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from config import require
from train.layout import RunConfig

if TYPE_CHECKING:   # train.engine's TrainConfig holds a MonitorConfig
    from train.engine import TrainConfig

Backend = Literal["tensorboard", "csv", "wandb"]


@dataclass
class MonitorConfig:
    backends: list[Backend] = field(default_factory=list)   # empty: no tracking beyond metrics.jsonl
    dir: str = ""                      # "": runs/<name>/monitor
    wandb_project: str = "salad"
    wandb_team: str = ""               # the W&B entity; "": the account's default
    wandb_mode: Literal["offline", "online"] = "offline"   # offline: no network; `wandb sync <dir>/wandb/...` later

    def __post_init__(self) -> None:
        require(len(set(self.backends)) == len(self.backends), "backends", f"names a backend twice: {self.backends}")
        require("wandb" not in self.backends or bool(self.wandb_project), "wandb_project",
                "must not be empty when backends has wandb")


def round_offset(train_cfg: TrainConfig, round_: int) -> int:
    """The global step where training round ``round_`` starts: the steps of every round before it."""
    return sum(train_cfg.for_round(r).max_steps for r in range(round_))


def scalars(tree: Any, prefix: str) -> dict[str, float]:
    """Every number in a JSON tree by its path (``prefix/key/.../index``); text, flags and nulls are left out."""
    if isinstance(tree, bool | str) or tree is None:
        return {}
    if isinstance(tree, int | float):
        return {prefix: float(tree)}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    out: dict[str, float] = {}
    for key, value in items:
        out.update(scalars(value, f"{prefix}/{key}"))
    return out


@contextlib.contextmanager
def _as_rank_zero() -> Iterator[None]:
    """DeepSpeed's monitors ask ``deepspeed.comm`` at every call whether this is rank 0. A Monitor exists on rank 0
    only, and the rounds driver has no group to ask (joining one would put a launcher's variables into the
    environment of the jobs it starts), so there the answer is given for the call."""
    import deepspeed.comm as dist

    if dist.is_initialized():
        yield
        return
    get_rank = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = get_rank


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in the environment for the block (W&B reads its mode, folder and run name from there)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Monitor:
    """Rank 0's writer to the configured backends (a context manager); elsewhere, or with no backend, a no-op."""

    def __init__(self, cfg: MonitorConfig, run: RunConfig, job: str, rank: int = 0) -> None:
        self.master = None
        if not cfg.backends or rank != 0:
            return
        from deepspeed.monitor.config import get_monitor_config
        from deepspeed.monitor.monitor import MonitorMaster

        root = Path(cfg.dir) if cfg.dir else run.folder().monitor
        root.mkdir(parents=True, exist_ok=True)
        ds = {"tensorboard": {"enabled": "tensorboard" in cfg.backends, "output_path": str(root / "tensorboard"),
                              "job_name": run.name},
              "csv_monitor": {"enabled": "csv" in cfg.backends, "output_path": str(root / "csv"), "job_name": run.name},
              "wandb": {"enabled": "wandb" in cfg.backends, "project": cfg.wandb_project, "group": run.name,
                        "team": cfg.wandb_team or None}}
        wandb_env = {"WANDB_MODE": cfg.wandb_mode, "WANDB_DIR": str(root), "WANDB_NAME": f"{run.name} {job}"}
        with _as_rank_zero(), _environ(wandb_env if "wandb" in cfg.backends else {}):
            self.master = MonitorMaster(get_monitor_config(ds))
        if self.master.csv_monitor is not None:   # files of earlier jobs have their header already
            self.master.csv_monitor.filenames = [p.stem for p in self.csv_files()]

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def csv_files(self) -> list[Path]:
        csv_monitor = self.master.csv_monitor if self.master else None
        return sorted(Path(csv_monitor.log_dir).glob("*.csv")) if csv_monitor else []

    def write(self, figures: Mapping[str, float], step: int) -> None:
        """``figures`` (tag -> value, as ``scalars`` names them) at ``step``."""
        if self.master is not None and figures:
            with _as_rank_zero():
                self.master.write_events([(tag, float(value), step) for tag, value in figures.items()])

    def purge(self, step: int) -> None:
        """Drop what was logged at ``step`` and later (by a killed try of the job that logs it again now)."""
        if self.master is None:
            return
        if self.master.tb_monitor is not None:   # TensorBoard drops earlier events at or past a restart's step
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            writer = self.master.tb_monitor.summary_writer
            writer.file_writer.add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            writer.flush()
        for path in self.csv_files():
            with path.open(newline="") as f:
                rows = [row for row in csv.reader(f) if not (row and row[0].isdigit() and int(row[0]) >= step)]
            with path.open("w", newline="") as f:
                csv.writer(f).writerows(rows)

    def close(self) -> None:
        if self.master is None:
            return
        if self.master.tb_monitor is not None:
            self.master.tb_monitor.summary_writer.close()
        if self.master.wandb_monitor is not None:
            import wandb

            wandb.finish()
        self.master = None


def log_round(cfg: Any, round_: int) -> None:
    """A finished round's selection figures (``allocation.json``, rounds >= 1) and eval figures (``eval.json``)
    under the run's monitor (``cfg`` is the ``ExperimentConfig``); nothing without a backend."""
    if not cfg.train.monitor.backends:
        return
    run = cfg.run.folder()
    allocation = run.selection(round_) / "allocation.json"
    with Monitor(cfg.train.monitor, cfg.run, f"round-{round_} eval") as monitor:
        if allocation.is_file():
            monitor.write(scalars(json.loads(allocation.read_text()), "selection"), round_offset(cfg.train, round_))
        if run.eval_json(round_).is_file():
            result = json.loads(run.eval_json(round_).read_text())
            figures = {**scalars(result.pop("tasks", {}), "eval"), **scalars(result, "eval")}
            monitor.write(figures, round_offset(cfg.train, round_ + 1))
