"""Training batches: speech and text shard streams mixed at a ratio, turned into packed layouts.

Resumable by construction: which stream a micro-batch draws from and how its documents are cut
into spans depend only on (seed, rank, step, micro-step), and each stream continues from the count
of documents already consumed, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from config import from_dict, require
from model.inputs import Batch, InputsConfig, batch_of_rows, interleave, pack, pack_rows, text_document
from shards.format import Chunk, atomic_write_bytes, read_index
from shards.stream import ShardStream, StreamConfig, stream_loader
from train.layout import RunFolder

if TYPE_CHECKING:
    from train.teacher_cache import TeacherCache


@dataclass
class ShardSetRef:
    path: str                 # shard-set folder (with index.json)
    weight: float = 1.0

    def __post_init__(self) -> None:
        require(self.weight > 0, "weight", f"must be positive, got {self.weight}")


@dataclass
class DataConfig:
    speech: list[ShardSetRef] = field(default_factory=list)   # natural (and later selected) speech
    text: list[ShardSetRef] = field(default_factory=list)     # broad text for the anti-forgetting mix
    text_ratio: float = 0.33          # share of micro-batches that are text only
    # Stage II: the share of speech documents drawn from the selected sets, whatever the natural sets weigh
    # (weights count only among the natural sets, and among the selected ones). The paper mixes natural speech,
    # selected speech and text in about equal parts: with text_ratio 1/3, a share of 0.5.
    selected_share: float = 0.5
    docs_per_batch: int = 8           # document chunks per micro-batch and rank
    assets: str = ""                  # module run as `python -m <assets>` before training: builds what is missing

    def __post_init__(self) -> None:
        require(0.0 <= self.text_ratio <= 1.0, "text_ratio", "must be in [0, 1]")
        require(0.0 <= self.selected_share < 1.0, "selected_share", f"must be in [0, 1), got {self.selected_share}")
        require(self.docs_per_batch >= 1, "docs_per_batch", "must be >= 1")


def check_sample_rate(refs: list[ShardSetRef], sample_rate: int) -> None:
    """Audio is resampled when shards are built, never per step: the rates must already agree."""
    for ref in refs:
        sr = read_index(ref.path)["sr"]
        if sr != sample_rate:
            raise ValueError(f"{ref.path}/index.json: shards are at {sr} Hz but the encoder needs "
                             f"{sample_rate} Hz; rebuild them with `python -m shards.build --sr {sample_rate}`")


class BatchSource:
    """Yields (Batch, is_text) micro-batches for one rank; ``state()`` is what a checkpoint stores.

    With a ``teacher_cache``, a batch carries its documents' cached teacher targets (``Batch.teacher``) when
    the cache has all of them."""

    def __init__(self, cfg: DataConfig, inputs: InputsConfig, stream_cfg: StreamConfig, tokenizer,
                 vectors_for: Callable[[int], int], seed: int, rank: int, world: int,
                 consumed: dict[str, int] | None = None, teacher_cache: TeacherCache | None = None) -> None:
        require(bool(cfg.speech), "data.speech", "at least one speech shard set is needed")
        self.cfg, self.inputs, self.tokenizer, self.vectors_for = cfg, inputs, tokenizer, vectors_for
        self.teacher_cache = teacher_cache
        self.seed, self.rank = seed, rank
        self.consumed = {"speech": 0, "text": 0, **(consumed or {})}
        self._iters: dict[str, Iterator[Chunk]] = {}
        for name, refs in (("speech", cfg.speech), ("text", cfg.text)):
            if refs:
                stream = ShardStream([(r.path, r.weight) for r in refs], stream_cfg, seed=seed, rank=rank,
                                     world=world, skip=self.consumed[name])
                self._iters[name] = iter(stream_loader(stream))

    def state(self) -> dict[str, int]:
        return dict(self.consumed)

    def _take(self, name: str) -> list[Chunk]:
        """The next ``docs_per_batch`` chunks; a position the stream skipped as corrupt (None) counts as consumed,
        so a resumed stream starts at the same position."""
        chunks: list[Chunk] = []
        while len(chunks) < self.cfg.docs_per_batch:
            chunk = next(self._iters[name])
            self.consumed[name] += 1
            if chunk is not None:
                chunks.append(chunk)
        return chunks

    def next(self, step: int, micro: int) -> tuple[Batch, bool]:
        rng = np.random.default_rng([self.seed, self.rank, step, micro])
        is_text = "text" in self._iters and rng.random() < self.cfg.text_ratio
        chunks = self._take("text" if is_text else "speech")
        if is_text:
            docs = [text_document(c, self.tokenizer) for c in chunks]
        else:
            docs = [interleave(c, self.tokenizer, self.inputs, rng) for c in chunks]
        batch = pack(docs, self.vectors_for, self.inputs.context, self.tokenizer.bos_token_id)
        if self.teacher_cache is not None:
            batch.teacher = self.teacher_cache.targets(docs, batch, self.tokenizer.bos_token_id)
        return batch, is_text


def heldout_batch(path: str, docs: int, inputs: InputsConfig, tokenizer, vectors_for: Callable[[int], int],
                  seed: int, rank: int, world: int) -> tuple[Batch, float]:
    """This rank's share of a fixed interleaved batch of held-out speech documents (for M and F), and the weight
    of its sums (1.0, or 0.0 for a rank left without a row).

    Every rank reads and packs the same first ``docs`` documents and takes whole rows (r, r + world, ...), so
    the sums over ranks, and M and F, do not depend on the world size. Under ZeRO-3 every rank must run the
    forward: a rank without a row of its own runs row 0 and weights its sums by 0.
    """
    stream = ShardStream([(path, 1.0)], StreamConfig(shuffle=1, open_shards=1), seed=seed, rank=0, world=1, epochs=1)
    chunks = [c for c in itertools.islice(stream, max(1, docs)) if c is not None]
    rng = np.random.default_rng([seed, 0])
    documents = [interleave(c, tokenizer, inputs, rng) for c in chunks]
    rows = pack_rows(documents, vectors_for, inputs.context, tokenizer.bos_token_id)
    if not rows:
        raise ValueError(f"{path}: no held-out document fits the context ({inputs.context})")
    mine = rows[rank::world]
    return batch_of_rows(mine or rows[:1], vectors_for, tokenizer.bos_token_id), float(bool(mine))


def round_speech_sets(run_dir: Path, cfg: DataConfig, round_: int) -> list[ShardSetRef]:
    """Speech shard sets round ``round_`` trains on: the config's natural sets, plus every selected set that
    ``runs/<name>/data.yaml`` lists from an earlier round up to this one (``mixed``)."""
    path = RunFolder(run_dir).data_yaml
    entries = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return mixed(cfg, _selected(entries, round_, path))


def _selected(entries: dict, round_: int, where: Path) -> list[ShardSetRef]:
    return [from_dict(ShardSetRef, {"path": e["path"], "weight": e["weight"]}, f"{where}: speech")
            for e in entries.get("speech", []) if e.get("round", 0) <= round_]


def mixed(cfg: DataConfig, selected: list[ShardSetRef]) -> list[ShardSetRef]:
    """Natural and selected sets with the weights that give the selected ones ``cfg.selected_share`` of the
    documents; within each group the configured weights keep their proportions."""
    if not selected or cfg.selected_share == 0:
        return list(cfg.speech)
    natural_total, selected_total = sum(r.weight for r in cfg.speech), sum(r.weight for r in selected)
    return ([ShardSetRef(r.path, (1 - cfg.selected_share) * r.weight / natural_total) for r in cfg.speech]
            + [ShardSetRef(r.path, cfg.selected_share * r.weight / selected_total) for r in selected])


def shares(refs: list[ShardSetRef]) -> dict[str, float]:
    """Each set's share of the documents drawn (its weight over the sum)."""
    total = sum(r.weight for r in refs)
    return {r.path: r.weight / total for r in refs}


def chunk_count(path: str) -> int | None:
    """Chunks (training samples) in a shard set, from its index; None where a shard's entry has no count."""
    entries = read_index(path)["shards"]
    return sum(int(e["chunks"]) for e in entries) if all("chunks" in e for e in entries) else None


def speech_draws(cfg: DataConfig, steps: int, grad_accum: int, world: int) -> float:
    """Speech chunks a run of ``steps`` optimizer steps draws in all, in expectation (text micro-batches draw
    none)."""
    return steps * grad_accum * world * cfg.docs_per_batch * (1 - (cfg.text_ratio if cfg.text else 0.0))


def plays(refs: list[ShardSetRef], draws: float) -> dict[str, float | None]:
    """How often each set's chunks are heard in ``draws`` speech chunks, on average: the set's share of the draws
    over its chunk count (None without a count). For a selected set: the plays per selected text."""
    mix = shares(refs)
    return {r.path: (None if (n := chunk_count(r.path)) is None else draws * mix[r.path] / max(n, 1))
            for r in refs}


def append_speech_set(run_dir: Path, ref: ShardSetRef, round_: int, cfg: DataConfig) -> None:
    """Add a selected shard set to ``data.yaml`` (atomic; appending twice is a no-op), its weight relative to the
    other selected sets (e.g. its documents), and write down the share of speech documents every set gets from
    this round on (``share``; the natural sets under ``natural``)."""
    path = RunFolder(run_dir).data_yaml
    entries = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {"speech": []}
    if not any(e["path"] == ref.path for e in entries["speech"]):
        entries["speech"].append({"path": ref.path, "weight": ref.weight, "round": round_})
    mix = shares(mixed(cfg, _selected(entries, round_, path)))
    for entry in entries["speech"]:
        entry["share"] = round(mix.get(entry["path"], 0.0), 6)
    entries["natural"] = [{"path": r.path, "share": round(mix[r.path], 6)} for r in cfg.speech]
    atomic_write_bytes(path, yaml.safe_dump(entries, sort_keys=False).encode())
