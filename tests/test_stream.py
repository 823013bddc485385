"""ShardStream: rank x worker splits, epochs, mixing, exact resume, corrupt shards, pipe URLs."""

import hashlib
import itertools
import json
import re
import shlex
import shutil
import tarfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from shards.format import Chunk, Segment, atomic_write_json, encode_chunk, write_shard
from shards.stream import SKIPPED, ShardReadError, ShardStream, StreamConfig, stream_loader

SR = 16000


def _chunk(name: str, i: int) -> Chunk:
    """A tiny sample: one short spoken segment (3-50 ms, its content depends on the key) and a text one."""
    n = 50 + (i * 97) % 750
    audio = (0.5 * np.sin(np.arange(n) * 0.01 * (i + 1))).astype(np.float32)
    return Chunk(key=f"{name}_{i:04d}", doc=f"{name}-doc{i // 3}", source="test",
                 segments=[Segment(f"spoken {name} {i}", audio, SR), Segment(f"text {name} {i}")])


def make_set(folder: Path, name: str, shards: int, per_shard: int,
             chunk: Callable[[str, int], Chunk] = _chunk) -> list[str]:
    """A shard set with an index, as shards.build writes it; returns the sample keys."""
    entries, keys = [], []
    for s in range(shards):
        chunks = [chunk(name, s * per_shard + j) for j in range(per_shard)]
        url = f"shard-{s:06d}.tar"
        sha = write_shard(folder / url, chunks)
        entries.append({"url": url, "chunks": len(chunks), "docs": len({c.doc for c in chunks}),
                        "segments": sum(len(c.segments) for c in chunks),
                        "seconds": sum(c.seconds for c in chunks), "sha256": sha})
        keys += [c.key for c in chunks]
    atomic_write_json(folder / "index.json", {"sr": SR, "shards": entries, "rejects": {}})
    return keys


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """Built once (write_shard fsyncs each shard): 10 shards of 4 samples, more than 2 ranks x 2
    workers; 2 shards of 7 samples, fewer than the slots, so samples are striped."""
    root = tmp_path_factory.mktemp("sets")
    return {name: (root / name, make_set(root / name, name, shards, per_shard))
            for name, shards, per_shard in [("many", 10, 4), ("few", 2, 7)]}


def _copy(pristine, name: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """A private copy, which a test may damage."""
    folder, keys = pristine[name]
    return Path(shutil.copytree(folder, tmp_path / name)), keys


@pytest.fixture
def many(pristine, tmp_path):
    return _copy(pristine, "many", tmp_path)


@pytest.fixture
def few(pristine, tmp_path):
    return _copy(pristine, "few", tmp_path)


def keys_of(stream: ShardStream, workers: int, limit: int | None = None) -> list[str]:
    """Keys of the first ``limit`` positions, less those skipped as corrupt (None)."""
    return [c.key for c in itertools.islice(stream_loader(stream, workers), limit) if c is not None]


def per_rank(sets, world: int = 2, workers: int = 2, **kwargs) -> list[list[str]]:
    return [keys_of(ShardStream(sets, seed=3, rank=r, world=world, **kwargs), workers) for r in range(world)]


@pytest.mark.parametrize("layout", ["many", "few"])
def test_epoch_gives_every_sample_once_across_ranks_and_workers(layout, request):
    folder, keys = request.getfixturevalue(layout)
    ranks = per_rank([(folder, 1.0)], epochs=1, decode_audio=False)
    assert all(ranks), "a rank got nothing"
    union = [k for r in ranks for k in r]
    assert sorted(union) == sorted(keys)  # every sample, none twice
    assert set(ranks[0]).isdisjoint(ranks[1])


def test_finite_mixture_gives_every_sample_of_every_set_once(many, few):
    (a, keys_a), (b, keys_b) = many, few
    ranks = per_rank([(a, 3.0), (b, 1.0)], epochs=1, decode_audio=False)
    assert sorted(k for r in ranks for k in r) == sorted(keys_a + keys_b)


def test_samples_round_trip_through_workers(few):
    folder, _ = few
    chunks = list(stream_loader(ShardStream([(folder, 1.0)], epochs=1), workers=2))
    assert len(chunks) == 14
    for chunk in chunks:
        i = int(chunk.key.split("_")[1])
        want = _chunk("few", i)
        assert chunk.doc == want.doc and [s.text for s in chunk.segments] == [s.text for s in want.segments]
        audio = chunk.segments[0].audio
        assert audio.dtype == np.float32 and chunk.segments[0].sr == SR
        np.testing.assert_allclose(audio, want.segments[0].audio, atol=1e-4)  # 16-bit FLAC
        assert chunk.segments[1].audio is None


def test_epochs_reshuffle_the_same_content(many):
    folder, keys = many
    # one shard at a time, no shuffle: epochs do not overlap (with lanes an epoch starts as the last ends)
    stream = ShardStream([(folder, 1.0)], StreamConfig(shuffle=1, open_shards=1), seed=1, epochs=2, decode_audio=False)
    order = keys_of(stream, workers=0)
    first, second = order[:len(keys)], order[len(keys):]
    assert sorted(first) == sorted(second) == sorted(keys)
    assert first != second
    assert keys_of(stream, workers=0) == order  # deterministic for the same seed
    other = keys_of(ShardStream([(folder, 1.0)], seed=2, epochs=1, decode_audio=False), workers=0)
    assert other != first and sorted(other) == sorted(keys)


def test_infinite_mixture_follows_the_weights(many, few):
    (a, keys_a), (b, keys_b) = many, few
    stream = ShardStream([(a, 3.0), (b, 1.0)], seed=5, decode_audio=False)  # epochs=None: forever
    drawn = keys_of(stream, workers=2, limit=2000)
    share = sum(k in set(keys_a) for k in drawn) / len(drawn)
    assert abs(share - 0.75) < 0.04, share
    assert set(drawn) == set(keys_a) | set(keys_b)  # both sets cycled through their epochs


@pytest.mark.parametrize("workers,rank,world", [(0, 0, 1), (2, 0, 1), (2, 1, 2)])
def test_resume_with_skip_continues_exactly(many, few, workers, rank, world):
    sets = [(many[0], 2.0), (few[0], 1.0)]

    def stream(skip: int) -> ShardStream:
        return ShardStream(sets, seed=7, rank=rank, world=world, skip=skip)

    consumed, more = 23, 40  # odd, so workers consumed unequal counts; crosses epoch boundaries
    whole = list(itertools.islice(stream_loader(stream(0), workers), consumed + more))
    assert len({c.key for c in whole}) < len(whole)  # some samples came back in a later epoch
    resumed = list(itertools.islice(stream_loader(stream(consumed), workers), more))
    assert [c.key for c in resumed] == [c.key for c in whole[consumed:]]
    for a, b in zip(resumed, whole[consumed:], strict=True):
        np.testing.assert_array_equal(a.segments[0].audio, b.segments[0].audio)


def _cut(folder: Path, shard: int, where: str, member: int = 2) -> str:
    """Truncate a shard inside a header, inside member data, at a member boundary, or to nothing
    (each sample here has two members: 0.flac and json)."""
    path = folder / f"shard-{shard:06d}.tar"
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    keep = {"header": info.offset + 100, "data": info.offset_data + 10, "boundary": info.offset,
            "empty": 0}[where]
    path.write_bytes(path.read_bytes()[:keep])
    return str(path)


@pytest.mark.parametrize("where", ["header", "data", "boundary", "empty"])
@pytest.mark.parametrize("indexed", [True, False])
def test_corrupt_shard_raises_naming_it(many, where, indexed):
    folder, _ = many
    bad = _cut(folder, 4, where)
    source = folder if indexed else [str(p) for p in sorted(folder.glob("*.tar"))]
    with pytest.raises(ShardReadError, match=f"{re.escape(bad)}: (cut short|cannot read)"):
        keys_of(ShardStream([(source, 1.0)], epochs=1), workers=0)


@pytest.mark.timeout(60)
def test_corrupt_shard_stops_ranks_and_workers_promptly(many):
    """The error crosses the worker process boundary and names the shard."""
    folder, _ = many
    bad = _cut(folder, 4, "data")
    start = time.monotonic()
    with pytest.raises(ShardReadError, match=re.escape(bad)) as info:
        per_rank([(folder, 1.0)], epochs=1)
    assert time.monotonic() - start < 20
    # The traceback's frames hold the loader in a reference cycle; reaped later by the garbage
    # collector, torch waits 2 x 5 s for its workers. Freed now, it shuts them down at once.
    traceback.clear_frames(info.tb)


def test_changed_shard_fails_its_index_hash(many):
    folder, _ = many
    path = folder / "shard-000002.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[2].offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 512] = b"x" * 512  # a garbage header: tarfile just stops there
    path.write_bytes(bytes(data))
    with pytest.raises(ShardReadError, match=f"{re.escape(str(path))}: sha256 differs"):
        keys_of(ShardStream([(folder, 1.0)], epochs=1), workers=0)


@pytest.mark.parametrize("indexed", [True, False])
def test_skip_corrupt_skips_the_rest_of_the_shard_and_counts_it(many, indexed):
    folder, keys = many
    # Cut inside sample 2 (many_0018): sample 0 comes through; sample 1, which tarfile would end
    # with silently, is held back until the shard's end is checked, and so never comes.
    _cut(folder, 4, "header", member=4)
    source = folder if indexed else [str(p) for p in sorted(folder.glob("*.tar"))]
    SKIPPED.clear()
    got = keys_of(ShardStream([(source, 1.0)], StreamConfig(skip_corrupt=True), epochs=1), workers=0)
    intact = [k for k in keys if not 16 <= int(k.split("_")[1]) < 20]
    assert sorted(got) == sorted(intact + ["many_0016"])
    assert SKIPPED["shards"] == 1 and SKIPPED["samples"] == 0


def test_skip_corrupt_drops_a_sample_whose_audio_does_not_decode(tmp_path):
    bad = encode_chunk(_chunk("bad", 1))
    bad["0.flac"] = b"not flac"
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        for sample in (encode_chunk(_chunk("bad", 0)), bad, encode_chunk(_chunk("bad", 2))):
            writer.write(sample)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:bad_0001.0.flac: cannot decode"):
        keys_of(ShardStream([([str(path)], 1.0)], epochs=1), workers=0)
    SKIPPED.clear()
    got = keys_of(ShardStream([([str(path)], 1.0)], StreamConfig(skip_corrupt=True), epochs=1), workers=0)
    assert got == ["bad_0000", "bad_0002"] and SKIPPED["samples"] == 1


def test_pipe_url_reads_like_the_file(few):
    folder, _ = few
    path = folder / "shard-000001.tar"
    direct = keys_of(ShardStream([([str(path)], 1.0)], epochs=1, decode_audio=False), workers=0)
    piped = keys_of(ShardStream([([f"pipe:cat {shlex.quote(str(path))}"], 1.0)], epochs=1), workers=2)
    assert sorted(piped) == sorted(direct) and len(direct) == 7
    with pytest.raises(ShardReadError, match="pipe:cat .*missing.tar.*exited with status 1"):
        keys_of(ShardStream([([f"pipe:cat {shlex.quote(str(folder / 'missing.tar'))}"], 1.0)], epochs=1), 0)


def test_infinite_stream_with_no_samples_for_a_slot_fails_instead_of_hanging(tmp_path):
    folder = tmp_path / "one"
    make_set(folder, "one", 1, 1)
    with pytest.raises(ValueError, match="no samples for slot 1 of 2"):
        keys_of(ShardStream([(folder, 1.0)], rank=1, world=2), workers=0, limit=1)


def test_bad_arguments_name_the_problem(many, tmp_path):
    folder, _ = many
    with pytest.raises(ValueError, match=f"shard set {re.escape(str(folder))}: weight"):
        ShardStream([(folder, 0.0)])
    with pytest.raises(FileNotFoundError, match="index.json"):
        ShardStream([(tmp_path / "nowhere", 1.0)])
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        ShardStream([(folder, 1.0)], rank=2, world=2)
    with pytest.raises(ValueError, match="no shards"):
        ShardStream([([], 1.0)])
    with pytest.raises(ValueError, match="workers"):
        StreamConfig(workers=-1)


def _book_chunk(name: str, i: int) -> Chunk:
    """Books as audiobook shards hold them: 20 consecutive chunks per book, two books per shard."""
    return Chunk(key=f"{name}_{i:04d}", doc=f"book{i // 20}", source="test", segments=[Segment(f"text {i}")])


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    folder = tmp_path_factory.mktemp("books")
    return folder, make_set(folder, "books", 10, 40, _book_chunk)


def test_a_batch_draws_from_many_books(books):
    folder, _ = books
    default = keys_of(ShardStream([(folder, 1.0)], seed=0, decode_audio=False), workers=0, limit=400)
    in_order = keys_of(ShardStream([(folder, 1.0)], StreamConfig(shuffle=1, open_shards=1), seed=0,
                                   decode_audio=False), workers=0, limit=400)

    def books_per_batch(keys: list[str]) -> float:   # 8 chunks per micro-batch, as docs_per_batch
        return np.mean([len({int(k.split("_")[1]) // 20 for k in keys[i:i + 8]}) for i in range(0, 400, 8)])

    assert books_per_batch(in_order) <= 1.5         # consecutive chunks of one book
    assert books_per_batch(default) > 4             # open shards read in turn, blocks shuffled


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reads_only_the_shards_in_progress(books, workers, monkeypatch):
    """Resuming at sample n replays the mixing and the shard schedule on the index's counts: it opens the shards
    in progress, not every shard read before (at corpus scale, hours of reading and a re-download)."""
    folder, _ = books
    cfg = StreamConfig(shuffle=16, open_shards=2)
    consumed, more = 1234, 50   # three epochs of 400 samples, and a bit
    whole = keys_of(ShardStream([(folder, 1.0)], cfg, seed=4), workers, consumed + more)
    opened = []
    real = ShardStream._shard_samples

    def counted(self, url, sha256):
        opened.append(url)
        return real(self, url, sha256)

    monkeypatch.setattr(ShardStream, "_shard_samples", counted)
    resumed = keys_of(ShardStream([(folder, 1.0)], cfg, seed=4, skip=consumed), workers, more)
    assert resumed == whole[consumed:]
    if workers == 0:   # (the workers' opens happen in their own processes)
        assert len(opened) <= 2 + 2 + 1, opened   # two lanes' shards, their successors, one more at most


def test_resume_is_exact_with_corrupt_samples_skipped(tmp_path):
    """A corrupt sample keeps its position (the stream yields None there), so a consumer that counts positions
    resumes exactly; before, a skipped sample shifted every later position by one."""
    folder = tmp_path / "set"
    make_set(folder, "c", 4, 10)
    shard = folder / "shard-000001.tar"
    samples = [s for s in wds.WebDataset(str(shard), shardshuffle=False)]
    samples[3]["0.flac"] = b"not flac"
    with wds.TarWriter(str(shard), encoder=False) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k in ("__key__", "json", "0.flac")})
    index = json.loads((folder / "index.json").read_text())
    index["shards"][1]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    atomic_write_json(folder / "index.json", index)
    cfg = StreamConfig(skip_corrupt=True, shuffle=8, open_shards=2)
    positions = list(itertools.islice(ShardStream([(folder, 1.0)], cfg, seed=1), 100))
    assert positions.count(None) == 2   # the bad sample, once in each of the two and a half epochs read
    for stop in (7, 23, 41, 63):
        resumed = list(itertools.islice(ShardStream([(folder, 1.0)], cfg, seed=1, skip=stop), 100 - stop))
        assert [c and c.key for c in resumed] == [c and c.key for c in positions[stop:]]
