"""Streaming reads of shard sets: mixed by weight, split by rank and worker, shuffled, resumable exactly.

Every DataLoader worker of every rank is one *slot* (``slot = rank * workers + worker``). Per epoch
the shards of a set are shuffled from (seed, set, epoch), identically on every slot, then split: by
shard when there are at least as many shards as slots, else by sample (every slot reads all shards
and keeps sample i when ``i % slots == slot``, so no slot is ever empty). Either way one epoch gives
every sample of the set to exactly one slot. A slot reads ``open_shards`` of its shards at once, a sample
from each in turn, so that consecutive samples come from different shards (a shard holds the chunks of a
few books one after the other); it mixes its per-set streams with an RNG seeded from (seed, slot), and
permutes each block of ``shuffle`` mixed samples with an RNG seeded from (seed, slot, block).

What a slot yields is thus a pure function of the arguments and of the number of samples in each shard,
which ``index.json`` lists. Resuming after n samples replays the mixing and the shard schedule on those
counts, without reading anything, then reads only the shards in progress, from their start (the block in
progress: ``shuffle`` samples at most). A sample that cannot be read or decoded (``skip_corrupt``) still takes
its place: the stream yields None there, so positions, and resume, stay exact.

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
    open_shards: int = 8  # shards a slot reads at once, a sample from each in turn
    shuffle: int = 64  # mixed samples permuted together (held in memory, undecoded); 1: stream order

    def __post_init__(self) -> None:
        for name, low in (("workers", 0), ("prefetch", 1), ("open_shards", 1), ("shuffle", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: must be >= {low}, got {getattr(self, name)}")


@dataclass
class _ShardSet:
    name: str
    urls: list[str]
    sha256: dict[str, str]  # url -> expected hash, for shards listed in an index
    weight: float
    counts: dict[str, int]  # url -> samples, from the index (shards without a count are counted by reading)


def _load_set(source: str | os.PathLike | list[str], weight: float) -> _ShardSet:
    """A shard-set folder (its index gives URLs, hashes and sample counts) or an explicit URL list."""
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        urls = shard_urls(source)
        entries = read_index(source)["shards"]
        sha = {url: e["sha256"] for url, e in zip(urls, entries, strict=True) if e.get("sha256")}
        counts = {url: int(e["chunks"]) for url, e in zip(urls, entries, strict=True) if "chunks" in e}
    else:
        urls, sha, counts = [str(u) for u in source], {}, {}
        name = f"{urls[0]} (+{len(urls) - 1} more)" if urls else "[]"
    if not urls:
        raise ValueError(f"shard set {name}: no shards")
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"shard set {name}: weight must be a positive number, got {weight!r}")
    return _ShardSet(name, urls, sha, float(weight), counts)


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


@dataclass(eq=False)
class _Piece:
    """What one slot reads of a shard in an epoch: samples start, start + step, ... below count."""

    url: str
    count: int
    start: int
    step: int
    cursor: int = 0   # the next sample index its open reader yields

    @property
    def size(self) -> int:
        return len(range(self.start, self.count, self.step))


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

    def __iter__(self) -> Iterator[Chunk | None]:
        """Chunks in a fixed order; None where a sample was skipped as corrupt (``skip_corrupt``): a position
        the caller counts as consumed, so that resuming by count stays exact."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # The DataLoader takes samples from its workers round-robin starting at worker 0: after N
        # samples the next one was due from worker N % W, so worker w resumes as worker (w + N) % W,
        # which delivered the samples n < N with n % W == that worker.
        worker = (worker + self.skip) % workers
        skip = self.skip // workers + (worker < self.skip % workers)
        slots, slot = self.world * workers, self.rank * workers + worker
        block_size = self.cfg.shuffle
        first_block = skip // block_size
        plan = self._mix_plan(slot, slots)
        starts = Counter(itertools.islice(plan, first_block * block_size))   # replayed: nothing read
        streams = {i: self._set_samples(i, slot, slots, starts[i]) for i in range(len(self.sets))}
        mixed = (next(streams[i]) for i in plan)
        for block in itertools.count(first_block):
            items = list(itertools.islice(mixed, block_size))
            if not items:
                return
            order = list(range(len(items)))
            random.Random(f"block:{self.seed}:{slot}:{block}").shuffle(order)
            offset = skip - block * block_size if block == first_block else 0
            for k in order[offset:]:
                yield None if items[k] is None else self._decode(items[k])

    def _lengths(self, slot: int, slots: int) -> list[float]:
        """Samples of each set's stream for this slot (infinite when streaming forever)."""
        if self.epochs is None:
            return [float("inf")] * len(self.sets)
        return [sum(p.size for e in range(self.epochs) for p in self._pieces(i, e, slot, slots))
                for i in range(len(self.sets))]

    def _mix_plan(self, slot: int, slots: int) -> Iterator[int]:
        """The set each mixed sample comes from, drawn by weight; a set drops out when its stream ends."""
        rng = random.Random(f"mix:{self.seed}:{slot}")
        left = dict(enumerate(self._lengths(slot, slots)))
        left = {i: n for i, n in left.items() if n > 0}
        while left:
            live = list(left)
            i = rng.choices(live, [self.sets[j].weight for j in live])[0] if len(live) > 1 else live[0]
            yield i
            left[i] -= 1
            if not left[i]:
                del left[i]

    def _count(self, shard_set: _ShardSet, url: str) -> int:
        """Samples in a shard: the index's count, or (a URL list) counted by reading it once."""
        if url not in shard_set.counts:
            shard_set.counts[url] = sum(1 for _ in self._shard_samples(url, shard_set.sha256.get(url)))
        return shard_set.counts[url]

    def _pieces(self, index: int, epoch: int, slot: int, slots: int) -> list[_Piece]:
        """What this slot reads of a set in an epoch: whole shards, or every ``slots``-th sample of each."""
        shard_set = self.sets[index]
        urls = list(shard_set.urls)
        random.Random(f"shards:{self.seed}:{index}:{epoch}").shuffle(urls)
        if len(urls) >= slots:
            return [_Piece(u, self._count(shard_set, u), 0, 1) for u in urls[slot::slots]]
        pieces, offset = [], 0
        for url in urls:
            n = self._count(shard_set, url)
            pieces.append(_Piece(url, n, (slot - offset) % slots, slots))
            offset += n
        return pieces

    def _positions(self, index: int, slot: int, slots: int) -> Iterator[tuple[_Piece, int]]:
        """(shard piece, sample index in its shard) of every sample of a set's stream, epoch after epoch:
        ``open_shards`` pieces are read at once, a sample from each in turn; a finished piece's place goes to
        the next piece. Counts only: no shard is read here."""
        def queue() -> Iterator[_Piece]:
            for epoch in itertools.count() if self.epochs is None else range(self.epochs):
                pieces = [p for p in self._pieces(index, epoch, slot, slots) if p.size]
                if not pieces and self.epochs is None:   # looping over nothing forever would hang the caller
                    raise ValueError(f"shard set {self.sets[index].name}: epoch {epoch} has no samples for slot "
                                     f"{slot} of {slots} (fewer samples than ranks x workers)")
                yield from pieces

        waiting = queue()
        lanes = [[p, 0] for p in itertools.islice(waiting, self.cfg.open_shards)]
        while lanes:
            for lane in list(lanes):
                piece, k = lane
                yield piece, piece.start + k * piece.step
                lane[1] += 1
                if lane[1] == piece.size:
                    following = next(waiting, None)
                    if following is None:
                        lanes.remove(lane)
                    else:
                        lane[:] = [following, 0]

    def _set_samples(self, index: int, slot: int, slots: int, start: int) -> Iterator[dict[str, Any] | None]:
        """Raw samples of a set's stream for this slot from its ``start``-th on (None where one could not be
        read); only the shards in progress at ``start`` are read from their beginning."""
        shard_set = self.sets[index]
        readers: dict[int, Iterator[dict[str, Any] | None]] = {}
        for piece, at in itertools.islice(self._positions(index, slot, slots), start, None):
            reader = readers.get(id(piece))
            if reader is None:
                reader = readers[id(piece)] = self._padded(piece, shard_set.sha256.get(piece.url))
            sample = next(itertools.islice(reader, at - piece.cursor, None))
            piece.cursor = at + 1
            if at + piece.step >= piece.count:   # the piece's last sample
                del readers[id(piece)]
            yield sample

    def _padded(self, piece: _Piece, sha256: str | None) -> Iterator[dict[str, Any] | None]:
        """A shard's raw samples in order, then None up to the index's count where it ended early."""
        piece.cursor = 0
        n = 0
        for sample in self._shard_samples(piece.url, sha256):
            if n == piece.count:
                break
            yield sample
            n += 1
        yield from itertools.repeat(None, piece.count - n)

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


def stream_loader(stream: ShardStream, workers: int | None = None) -> DataLoader:
    """One sample at a time from ``workers`` processes (default ``stream.cfg.workers``), in a fixed order."""
    workers = stream.cfg.workers if workers is None else workers
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=stream.cfg.prefetch if workers else None)
