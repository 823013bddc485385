"""Spoken versions of benchmarks: every context synthesized once into a shard set, then reused.

The shard set is built by ``shards.build`` from the contexts as text (one document per item id) with
the evaluation voice, which may differ from every training voice.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from eval.benchmarks import MCQItem
from shards.build import BuildConfig, build
from shards.format import INDEX_NAME, read_shard, shard_urls
from shards.tts import TTSConfig


def build_spoken(items: list[MCQItem], out: Path, tts: TTSConfig, sample_rate: int, workers: int = 1) -> Path:
    """Synthesize the contexts of ``items`` into the shard set ``out`` unless it is already complete."""
    if (out / INDEX_NAME).is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "contexts.jsonl"
        source.write_text("".join(json.dumps({"text": it.context, "doc": it.id}) + "\n" for it in items))
        build(BuildConfig(input=source, out=out, sr=sample_rate, format="text", tts=tts,
                          workers=workers, chunk_segments=1, source="benchmark"))
    return out


def load_spoken(folder: Path) -> dict[str, np.ndarray]:
    """Item id -> waveform of its spoken context."""
    audio: dict[str, np.ndarray] = {}
    for url in shard_urls(folder):
        for chunk in read_shard(url):
            audio[chunk.doc] = np.concatenate([s.audio for s in chunk.segments if s.audio is not None])
    return audio
