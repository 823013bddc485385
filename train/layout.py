"""The run folder: where every job of a run reads and writes. One module knows its layout, so no job spells a path
(and every job may import it: it sits in ``train``, below eval, selection and the rounds driver).

    runs/<name>/
      data.yaml                   the selected shard sets, their weights and shares (selection appends)
      pool_embeddings/            the selection pool's embeddings and index, shared by the rounds
      spoken/<task>/              the spoken benchmarks, shared by the rounds
      monitor/                    experiment tracking (train.monitor: tensorboard/, csv/, wandb/), when on
      round-R/
        config.json engine.json data_mix.json metrics.jsonl
        checkpoints/              step-NNNNNNN, pre-decay, final (DeepSpeed ZeRO checkpoints)
        export/                   the trained model, loadable without DeepSpeed
        DONE                      training finished and its export checked
        eval.json                 the round's evaluation
        selection/                clusters.json probe.json allocation.json chosen.jsonl score_vs_share.png
                                  shards/ (the synthesized speech) and DONE (rounds >= 1)
      report.json report.md *.png the rounds side by side (eval.report)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from config import require

DONE = "DONE"
PRE_DECAY = "pre-decay"
ROUND_NAME = re.compile(r"round-(\d+)")


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "runs"
    # How long a rank may wait in a collective for the others (e.g. while rank 0 consolidates a 7B checkpoint
    # for export); torch's own default, 10 minutes, is too short for that.
    comm_timeout_minutes: float = 60.0

    def __post_init__(self) -> None:
        require(self.comm_timeout_minutes > 0, "comm_timeout_minutes", "must be > 0")
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                f"must be a plain folder name, got {self.name!r}")

    def path(self) -> Path:
        """Folder of this run: ``<dir>/<name>``."""
        return Path(self.dir) / self.name

    def folder(self) -> RunFolder:
        return RunFolder(self.path())


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run (the module docstring draws them)."""

    root: Path

    @property
    def data_yaml(self) -> Path:
        return self.root / "data.yaml"

    @property
    def pool_embeddings(self) -> Path:
        return self.root / "pool_embeddings"

    @property
    def spoken(self) -> Path:
        return self.root / "spoken"

    @property
    def monitor(self) -> Path:
        """Where the experiment tracking writes unless ``train.monitor.dir`` names another folder."""
        return self.root / "monitor"

    def round(self, r: int) -> Path:
        return self.root / f"round-{r}"

    def checkpoints(self, r: int) -> Path:
        return self.round(r) / "checkpoints"

    def export(self, r: int) -> Path:
        return self.round(r) / "export"

    def trained(self, r: int) -> Path:
        """The marker of a finished training round (its JSON: step, start, export check)."""
        return self.round(r) / DONE

    def eval_json(self, r: int) -> Path:
        return self.round(r) / "eval.json"

    def selection(self, r: int) -> Path:
        return self.round(r) / "selection"

    def selected(self, r: int) -> Path:
        """The marker of a finished selection round."""
        return self.selection(r) / DONE

    def rounds(self) -> list[int]:
        """The rounds that have a folder, in order."""
        found = (ROUND_NAME.fullmatch(p.name) for p in self.root.glob("round-*") if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)
