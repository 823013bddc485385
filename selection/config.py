"""The ``selection`` section of an experiment config (SALAD's active selection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from config import require
from selection.embed import EmbedConfig
from shards.tts import TTSConfig


@dataclass
class SelectionConfig:
    # active: probe the previous student, P(c) ~ P_pool(c) * score^gamma; uniform: the ablation's baseline, P(c) ~
    # P_pool(c), no probing; natural: the control, nothing selected (the round trains on the natural speech only)
    strategy: Literal["active", "uniform", "natural"] = "active"
    pool: str = ""                  # broad text pool: JSONL(.gz) (`text`), .txt, parquet file/folder, or text shards
    clusters: int = 128             # K of the balanced k-means
    tolerance: float = 0.05         # cluster sizes within this fraction of N/K
    kmeans_sample: int = 0          # points the centroids are fit on (all N are then assigned); 0 = 256 per cluster
    probes: int = 8                 # probe texts per cluster
    min_positions: int = 8          # a cluster scored at fewer probe positions is reported and gets the mean score
    score: Literal["M", "F", "D"] = "M"   # M misalignment, F forgetting, D teacher-vs-student-on-speech KL
    gamma: float = 5.0              # P(c) ~ P_pool(c) * score(c)^gamma; 0 = uniform over the pool
    budget_s: float = 0.0           # speech seconds per round; 0: budget_fraction of the natural speech
    budget_fraction: float = 0.01
    words_per_second: float = 2.6   # to estimate a text's spoken length before synthesis
    tts: TTSConfig = field(default_factory=TTSConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    workers: int = 1                # TTS processes

    def __post_init__(self) -> None:
        require(self.clusters >= 1, "clusters", "must be >= 1")
        require(self.kmeans_sample >= 0, "kmeans_sample", "must be >= 0 (0: 256 per cluster)")
        require(self.probes >= 1, "probes", "must be >= 1")
        require(self.min_positions >= 1, "min_positions", "must be >= 1")
        require(self.gamma >= 0, "gamma", "must be >= 0")
        require(self.budget_s >= 0 and 0 <= self.budget_fraction <= 1, "budget_s", "budgets must be >= 0")
        require(self.words_per_second > 0, "words_per_second", "must be > 0")
