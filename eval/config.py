"""The ``eval`` section of an experiment config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from config import require
from shards.tts import TTSConfig


@dataclass
class TaskRef:
    name: str
    path: str                 # benchmark JSONL in the eval schema (eval.benchmarks)
    shots: int = 5
    limit: int = 0            # 0: all items

    def __post_init__(self) -> None:
        require(self.shots >= 0, "shots", "must be >= 0")
        require(self.limit >= 0, "limit", "must be >= 0")


@dataclass
class EvalConfig:
    tasks: list[TaskRef] = field(default_factory=list)
    tts: TTSConfig = field(default_factory=lambda: TTSConfig(voices=["en-gb-scotland"]))  # a held-out voice
    spoken_dir: str = ""      # spoken benchmark shards; default <run dir>/spoken
    heldout: str = ""         # speech shard set (held out from training) for M and F
    heldout_docs: int = 32
    norm: Literal["tokens", "chars"] = "tokens"
    bootstrap: int = 1000
    workers: int = 1          # TTS processes when building spoken benchmarks
    # JSON {"shares": {task: share of the natural speech that speaks the task's domain}} (the toy's speech/
    # coverage.json): copied into eval.json and shown beside each task's gap and M in the report
    coverage: str = ""
    # tasks the natural speech covers well; the ablation compares its variants on the average of the others
    natural_tasks: list[str] = field(default_factory=lambda: ["narrative"])

    def __post_init__(self) -> None:
        require(self.heldout_docs >= 1, "heldout_docs", "must be >= 1")
        require(self.bootstrap >= 10, "bootstrap", "must be >= 10")
        names = [t.name for t in self.tasks]
        require(len(names) == len(set(names)), "tasks", f"task names must be unique, got {names}")
