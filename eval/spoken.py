"""Spoken versions of benchmarks: every context synthesized once into a shard set, then reused.

The shard set is built by ``shards.build`` from the contexts as text (one document per item id) with
the evaluation voice, which may differ from every training voice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from eval.benchmarks import MCQItem
from shards.build import synthesize_texts
from shards.format import read_shard, shard_urls
from shards.tts import TTSConfig


def build_spoken(items: list[MCQItem], out: Path, tts: TTSConfig, sample_rate: int, workers: int = 1,
                 part: tuple[int, int] = (0, 1), barrier: Callable[[], None] = lambda: None) -> Path:
    """Synthesize the contexts of ``items`` into the shard set ``out`` unless it is already complete; every rank
    of a job calls it, each speaking its share (``part``: rank, world; ``barrier``: the job's)."""
    return synthesize_texts([(it.id, it.context) for it in items], out, tts, sample_rate, workers, source="benchmark",
                            part=part, barrier=barrier)


def load_spoken(folder: Path) -> dict[str, np.ndarray]:
    """Item id -> waveform of its spoken context."""
    audio: dict[str, np.ndarray] = {}
    for url in shard_urls(folder):
        for chunk in read_shard(url):
            audio[chunk.doc] = np.concatenate([s.audio for s in chunk.segments if s.audio is not None])
    return audio
