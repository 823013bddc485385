"""Spoken versions of benchmarks: every spoken part synthesized once into a shard set, then reused.

The shard set is built by ``shards.build`` from the items' spoken parts (``MCQItem.context``: the template's
words, "Question: " and "\\nAnswer:", are never spoken) as text, one document per item id, with the evaluation
voice, which may differ from every training voice. The examples drawn from another split are spoken into a set of
their own, named after what it holds, so that other examples (another seed, k or limit) get a new set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from eval.benchmarks import MCQItem
from shards.build import synthesize_texts
from shards.format import read_shard, shard_urls
from shards.tts import TTSConfig

SHOT_ID = "shot:"   # prefix of the examples' ids: another split may reuse the scored split's ids


def build_spoken(items: list[MCQItem], out: Path, tts: TTSConfig, sample_rate: int, workers: int = 1,
                 part: tuple[int, int] = (0, 1), barrier: Callable[[], None] = lambda: None) -> Path:
    """Synthesize the spoken parts of ``items`` into the shard set ``out`` unless it is already complete; every
    rank of a job calls it, each speaking its share (``part``: rank, world; ``barrier``: the job's)."""
    return synthesize_texts([(it.id, it.context) for it in items], out, tts, sample_rate, workers, source="benchmark",
                            part=part, barrier=barrier)


def load_spoken(folder: Path, items: list[MCQItem] | None = None) -> dict[str, np.ndarray]:
    """Item id -> waveform of its spoken part. With ``items``, every one must be there, spoken from its own text:
    a set spoken from other texts (a conversion from before the template words were kept out of speech) or for
    other items is refused, naming the folder to delete."""
    audio: dict[str, np.ndarray] = {}
    spoken: dict[str, str] = {}
    for url in shard_urls(folder):
        for chunk in read_shard(url):
            audio[chunk.doc] = np.concatenate([s.audio for s in chunk.segments if s.audio is not None])
            spoken[chunk.doc] = " ".join(s.text for s in chunk.segments)
    if items is not None:
        missing = [it.id for it in items if it.id not in audio]
        if missing:
            raise ValueError(f"{folder}: no speech for items {missing[:5]} (see its rejects.jsonl; a set spoken for "
                             "other items: delete the folder to speak them)")
        other = [it.id for it in items if spoken[it.id].split() != it.context.split()]
        if other:
            raise ValueError(f"{folder}: items {other[:5]} were spoken from other texts than their spoken parts "
                             "(an older conversion?): delete the folder to speak them again")
    return audio


def shot_items(pool: list[MCQItem]) -> list[MCQItem]:
    """Examples from another split, their ids marked (``SHOT_ID``) so that they never meet a scored item's."""
    return [replace(it, id=SHOT_ID + it.id) for it in pool]


def shots_folder(base: Path, task: str, shots: list[MCQItem]) -> Path:
    """``<base>/<task>-shots-<digest>``: the digest of the examples' ids and spoken parts names the set."""
    digest = hashlib.sha256("\0".join(f"{it.id}\0{it.context}" for it in shots).encode("utf-8")).hexdigest()
    return base / f"{task}-shots-{digest[:12]}"
