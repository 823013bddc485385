"""Streaming reads of shard sets: mixed by weight, split by rank and worker, resumable exactly.

Every DataLoader worker of every rank is one *slot* (``slot = rank * workers + worker``). Per epoch
the shards of a set are shuffled from (seed, set, epoch), identically on every slot, then split: by
shard when there are at least as many shards as slots, else by sample (every slot reads all shards
and keeps sample i when ``i % slots == slot``, so no slot is ever empty). Either way one epoch gives
every sample of the set to exactly one slot. A slot mixes its per-set streams with an RNG seeded from
(seed, slot), so what a slot yields is a pure function of the arguments: resuming after a kill is
skipping, without decoding audio, what the rank already consumed.

Python's tarfile silently stops at a member boundary where a shard was cut, or at a garbage header;
so every shard must end with the tar end-of-archive blocks, and one listed in an ``index.json`` must
match the index's sha256 (checked as it streams past).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from shards.format import Chunk, ShardFormatError, decode_chunk, read_index, shard_urls

log = logging.getLogger(__name__)

# What this process skipped because of ``skip_corrupt``: "shards" (rest of a shard) and "samples".
SKIPPED: Counter[str] = Counter()


class ShardReadError(ShardFormatError):
    """A shard cannot be read to its end (corrupt, truncated, wrong hash, failing pipe); names the URL."""


@dataclass
class StreamConfig:
    """How training and evaluation read shards."""

    workers: int = 0  # DataLoader worker processes per rank (0: read in the training process)
    skip_corrupt: bool = False  # skip and count the rest of a corrupt shard instead of stopping
    prefetch: int = 4  # samples each worker keeps ready (DataLoader prefetch_factor)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch: must be >= 1, got {self.prefetch}")


@dataclass
class _ShardSet:
    name: str
    urls: list[str]
    sha256: dict[str, str]  # url -> expected hash, for shards listed in an index
    weight: float


def _load_set(source: str | os.PathLike | list[str], weight: float) -> _ShardSet:
    """A shard-set folder (its index gives URLs and hashes) or an explicit URL list."""
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        urls = shard_urls(source)
        sha = {url: entry["sha256"] for url, entry in zip(urls, read_index(source)["shards"], strict=True)
               if entry.get("sha256")}
    else:
        urls, sha = [str(u) for u in source], {}
        name = f"{urls[0]} (+{len(urls) - 1} more)" if urls else "[]"
    if not urls:
        raise ValueError(f"shard set {name}: no shards")
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"shard set {name}: weight must be a positive number, got {weight!r}")
    return _ShardSet(name, urls, sha, float(weight))


class _CheckedReader:
    """A shard's byte stream, watched as it passes: tarfile silently stops at a cut member boundary or
    a garbage header, so the end must be the tar's zero blocks and, where the index has one, the bytes
    must hash to its sha256."""

    END = bytes(1024)  # a tar ends with two zero blocks (then zero padding to a whole record)

    def __init__(self, stream: Any, sha256: str | None) -> None:
        self.stream, self.expected = stream, sha256
        self.sha = hashlib.sha256() if sha256 else None
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.sha is not None:
            self.sha.update(data)
        self.tail = (self.tail + data)[-len(self.END):]
        return data

    def problem(self) -> str | None:
        """Once tarfile has stopped: why the shard is not whole, or None."""
        while self.read(1 << 20):
            pass
        if self.tail != self.END:
            return "cut short: it does not end with the tar end-of-archive blocks"
        if self.sha is not None and self.sha.hexdigest() != self.expected:
            return "sha256 differs from the index (corrupt or replaced)"
        return None


class ShardStream(IterableDataset):
    """Chunks from several shard sets mixed by weight, each sample once per epoch across ranks x workers.

    ``sets``: ``[(folder or URL list, weight), ...]``; this stream is ``rank`` of ``world`` (the caller's share).
    ``epochs=None`` streams forever (training).
    ``skip``: samples this rank already consumed through a DataLoader (batch_size=None) with the same
    world size, worker count and arguments; the stream then continues exactly where it stopped (in
    finite mode: as long as no worker had run out).
    """

    def __init__(self, sets: list[tuple[str | os.PathLike | list[str], float]], cfg: StreamConfig | None = None,
                 seed: int = 0, rank: int = 0, world: int = 1, epochs: int | None = None,
                 skip: int = 0, decode_audio: bool = True) -> None:
        super().__init__()
        if not sets:
            raise ValueError("ShardStream: no shard sets given")
        self.sets = [_load_set(source, weight) for source, weight in sets]
        self.cfg = cfg or StreamConfig()
        self.rank, self.world = rank, world
        if not 0 <= self.rank < self.world:
            raise ValueError(f"ShardStream: rank {self.rank} outside world size {self.world}")
        if (epochs is not None and epochs < 0) or skip < 0:
            raise ValueError(f"ShardStream: epochs ({epochs}) and skip ({skip}) must be >= 0")
        self.seed, self.epochs, self.skip, self.decode_audio = seed, epochs, skip, decode_audio

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # The DataLoader takes samples from its workers round-robin starting at worker 0: after N
        # samples the next one was due from worker N % W, so worker w resumes as worker (w + N) % W,
        # which delivered the samples n < N with n % W == that worker.
        worker = (worker + self.skip) % workers
        skip = self.skip // workers + (worker < self.skip % workers)
        slots, slot = self.world * workers, self.rank * workers + worker
        streams = [self._set_samples(i, slot, slots) for i in range(len(self.sets))]
        mixed = _mix(streams, [s.weight for s in self.sets], random.Random(f"mix:{self.seed}:{slot}"))
        for sample in itertools.islice(mixed, skip, None):
            chunk = self._decode(sample)
            if chunk is not None:
                yield chunk

    def _set_samples(self, index: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """Raw samples of one set for one slot, epoch after epoch."""
        shard_set = self.sets[index]
        for epoch in itertools.count() if self.epochs is None else range(self.epochs):
            urls = list(shard_set.urls)
            random.Random(f"shards:{self.seed}:{index}:{epoch}").shuffle(urls)
            if len(urls) >= slots:
                samples = self._read(urls[slot::slots], shard_set)
            else:
                samples = itertools.islice(self._read(urls, shard_set), slot, None, slots)
            empty = True
            for sample in samples:
                empty = False
                yield sample
            if empty and self.epochs is None:  # looping over nothing forever would hang the caller
                raise ValueError(f"shard set {shard_set.name}: epoch {epoch} has no samples for slot "
                                     f"{slot} of {slots} (fewer samples than ranks x workers, or every "
                                     "shard skipped as corrupt)")

    def _read(self, urls: list[str], shard_set: _ShardSet) -> Iterator[dict[str, Any]]:
        for url in urls:
            yield from self._shard_samples(url, shard_set.sha256.get(url))

    def _shard_samples(self, url: str, sha256: str | None) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard; a corrupt one raises ShardReadError, or is skipped and counted."""
        try:
            stream = gopen(url, "rb")
            try:
                reader = _CheckedReader(stream, sha256)
                last = None  # held back until the shard is checked: after a cut it is the partial sample
                for sample in group_by_keys(tar_file_expander([{"url": url, "stream": reader}])):
                    if last is not None:
                        yield last
                    last = sample
                if problem := reader.problem():
                    raise ShardReadError(f"{url}: {problem}")
                if last is not None:
                    yield last
            finally:
                stream.close()  # a pipe reports its command's failure here
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            error = exc if isinstance(exc, ShardReadError) else ShardReadError(
                f"{url}: cannot read the shard to its end ({_reason(exc)})")
            if not self.cfg.skip_corrupt:
                raise error from None
            SKIPPED["shards"] += 1
            log.warning("skipping the rest of a shard: %s", error)

    def _decode(self, sample: dict[str, Any]) -> Chunk | None:
        try:
            return decode_chunk(sample, sample.get("__url__", ""), decode_audio=self.decode_audio)
        except ShardFormatError as exc:
            if not self.cfg.skip_corrupt:
                raise
            SKIPPED["samples"] += 1
            log.warning("skipping a sample: %s", exc)
            return None


def _reason(exc: BaseException) -> str:
    """The cause without what webdataset appends to the message (stream objects, the URL again)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    failed_pipe = re.search(r": exit (-?\d+) \(read\)", text)
    return f"command exited with status {failed_pipe[1]}" if failed_pipe else text.split(" @ ")[0]


def _mix(streams: list[Iterator[Any]], weights: list[float], rng: random.Random) -> Iterator[Any]:
    """Draw the next item from a stream picked by weight; an exhausted stream drops out."""
    streams, weights = list(streams), list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]


def stream_loader(stream: ShardStream, workers: int | None = None) -> DataLoader:
    """One sample at a time from ``workers`` processes (default ``stream.cfg.workers``), in a fixed order."""
    workers = stream.cfg.workers if workers is None else workers
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=stream.cfg.prefetch if workers else None)
