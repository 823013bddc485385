"""The ``eval`` section of an experiment config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from config import require
from shards.tts import TTSConfig

# How choices are compared (eval.mcq.normalise): summed log-probability (lm-eval-harness's acc), per token, or per
# character (lm-eval-harness's acc_norm).
Norm = Literal["none", "tokens", "chars"]
NORMS: tuple[str, ...] = get_args(Norm)


@dataclass
class TaskRef:
    name: str
    path: str                 # benchmark JSONL in the eval schema (eval.benchmarks)
    shots: int = 5
    limit: int = 0            # 0: all items
    # benchmark JSONL the examples are drawn from: another split than the scored one, as lm-eval-harness draws them
    # (its training split, else validation); "": the scored file's other items
    fewshot_path: str = ""
    norm: Literal["", "none", "tokens", "chars"] = ""   # "": eval.norm

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
    norm: Norm = "tokens"     # every task's, unless it names its own
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
