"""Selection at corpus scale: the pool streamed into an offsets index and read back by position, the embeddings
file filled by rank blocks, balanced k-means fit on a sample and assigned in blocks, and a data path whose memory
does not grow with the pool's texts. Embeddings come from a hash (``HashEncoder``), not a model: fast and exact."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.multiprocessing as mp

from selection import cluster, vectors
from selection import pool as pool_module
from selection.allocate import allocate
from selection.cluster import balanced_kmeans, cluster_summary
from selection.embed import EmbedConfig, embed_block, embed_pool, embedding_key
from selection.pool import index_pool, load_index, open_pool, save_index
from selection.vectors import Vectors
from shards.format import Chunk, Segment, atomic_write_json, write_shard
from train import distributed
from train.distributed import free_port

TEXTS = [f"Text number {i}: " + " ".join(["naïve café", "tea", "long " * (i % 7), "end."][: 1 + i % 4]).strip()
         for i in range(41)]
FORMATS = ["jsonl", "jsonl.gz", "txt", "parquet", "shards"]


class HashEncoder:
    """Unit vectors seeded by a hash of each text (no model): a text always gets the same row."""

    def __init__(self, dim: int = 8):
        self.size, self.calls = dim, []

    def identity(self) -> bytes:
        return b"hash-encoder"

    def dim(self) -> int:
        return self.size

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        rows = np.stack([np.random.default_rng(list(hashlib.sha256(t.encode()).digest()[:8])).standard_normal(
            self.size) for t in texts])
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def write_pool(fmt: str, folder: Path, texts: list[str]) -> Path:
    """``texts`` as a pool in format ``fmt``, with blank entries between them (skipped by the reader)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("jsonl", "jsonl.gz"):
        lines = "".join(json.dumps({"id": i, "text": f" {t} "}) + "\n" + ("\n" if i % 5 == 0 else "")
                        + (json.dumps({"text": "  "}) + "\n" if i % 7 == 3 else "") for i, t in enumerate(texts))
        path = folder / f"pool.{fmt}"
        path.write_bytes(gzip.compress(lines.encode()) if fmt.endswith(".gz") else lines.encode())
        return path
    if fmt == "txt":
        path = folder / "pool.txt"
        path.write_text("".join(f"  {t}\n" + ("\n" if i % 4 == 0 else "") for i, t in enumerate(texts)))
        return path
    if fmt == "parquet":   # two files of small row groups, with None and blank rows
        rows: list[str | None] = []
        for i, t in enumerate(texts):
            rows += [f" {t}", None] if i % 6 == 0 else [t, " "] if i % 9 == 0 else [t]
        (folder / "data").mkdir()
        for n, part in enumerate([rows[:len(rows) // 2], rows[len(rows) // 2:]]):
            pq.write_table(pa.table({"text": pa.array(part, pa.string())}), folder / f"data/{n:03d}.parquet",
                           row_group_size=4)
        return folder / "data"
    segments: list[Segment] = []   # a shard set of two shards, with blank segments
    for i, t in enumerate(texts):
        segments += [Segment(f" {t}"), Segment("")] if i % 5 == 0 else [Segment(t)]
    for n, part in enumerate([segments[:len(segments) // 2], segments[len(segments) // 2:]]):
        write_shard(folder / f"shard-{n:06d}.tar", [Chunk(f"d{n}-{j}", f"d{n}-{j}", segments=part[j:j + 3])
                                                    for j in range(0, len(part), 3)])
    atomic_write_json(folder / "index.json", {"sr": 16000, "shards": [{"url": f"shard-{n:06d}.tar"} for n in (0, 1)]})
    return folder


# ----------------------------------------------------------------------------- the pool: streamed, indexed


@pytest.mark.parametrize("fmt", FORMATS)
def test_pool_streams_its_texts_and_reads_them_back_by_position(tmp_path, fmt):
    pool = index_pool(write_pool(fmt, tmp_path / "pool", TEXTS))
    assert len(pool) == len(TEXTS) and list(pool.stream()) == TEXTS
    assert pool.words.tolist() == [len(t.split()) for t in TEXTS]
    idx = np.random.default_rng(0).integers(0, len(TEXTS), 30)   # unsorted, with repeats
    assert pool.texts(idx) == [TEXTS[i] for i in idx] and pool.texts([]) == []
    for start, stop in [(0, 1), (7, 23), (len(TEXTS) - 3, len(TEXTS)), (11, 11)]:   # a rank's block
        assert list(pool.stream(start, stop)) == TEXTS[start:stop]
    save_index(pool, tmp_path / "index")
    again = load_index(tmp_path / "index", pool.key)
    assert again.texts(idx[:5]) == [TEXTS[i] for i in idx[:5]] and list(again.stream(30)) == TEXTS[30:]
    # the key is over the texts alone: the same texts in any format, the same key
    assert pool.key == index_pool(write_pool("txt", tmp_path / "other", TEXTS)).key
    assert pool.key != index_pool(write_pool("txt", tmp_path / "edited", TEXTS[:-1] + ["edited"])).key


def test_a_pool_changed_after_indexing_is_an_error(tmp_path):
    path = write_pool("jsonl", tmp_path, TEXTS)
    pool = index_pool(path)
    path.write_text(json.dumps({"text": "inserted"}) + "\n" + path.read_text())
    with pytest.raises(ValueError, match="changed since it was indexed: .*pool.jsonl"):
        list(pool.stream(3, 6))   # its offsets now point inside lines
    with pytest.raises(ValueError, match="changed since it was indexed: .*text 1 is not where the index has it"):
        list(pool.stream(0, 6))   # one line more: the second text starts elsewhere
    with pytest.raises(ValueError, match="changed since it was indexed"):
        pool.texts([5])
    with pytest.raises(ValueError, match="holds no texts"):
        index_pool(write_pool("txt", tmp_path / "empty", []))


def test_open_pool_saves_the_index_once(tmp_path):
    path = write_pool("jsonl.gz", tmp_path, TEXTS)
    pool = open_pool(path, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"pool-{pool.key}.json", f"pool-{pool.key}.npy"]
    np.testing.assert_array_equal(load_index(tmp_path / "cache", pool.key).where, pool.where)


# ----------------------------------------------------------------------------- the embeddings file


def test_embeddings_file_equals_the_in_memory_result_and_is_reused(tmp_path):
    pool = index_pool(write_pool("jsonl", tmp_path, TEXTS))
    encoder = HashEncoder()
    got = embed_pool(pool, EmbedConfig(batch_size=1), cache_dir=tmp_path / "cache", encoder=encoder)
    assert encoder.calls == [16, 16, 9]   # 16 x batch_size texts held at once
    np.testing.assert_array_equal(got[:], HashEncoder()(TEXTS))
    assert isinstance(got, Vectors) and got.path.name == f"{embedding_key(pool, encoder)}.npy"
    again = embed_pool(pool, EmbedConfig(), cache_dir=tmp_path / "cache", encoder=encoder)
    assert encoder.calls == [16, 16, 9] and again.path == got.path   # a re-run reads the cache
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [got.path.name]


def test_two_ranks_as_separate_calls_fill_the_same_file_as_one(tmp_path):
    pool = index_pool(write_pool("parquet", tmp_path, TEXTS))
    one = embed_pool(pool, EmbedConfig(), cache_dir=tmp_path / "one", encoder=HashEncoder())
    encoder = HashEncoder()
    partial = tmp_path / "two" / f"{embedding_key(pool, encoder)}.partial.npy"
    vectors.create(partial, len(pool), encoder.dim())
    for rank in (0, 1):
        embed_block(pool, encoder, partial, rank, 2)
    assert encoder.calls == [20, 21]
    two = embed_pool(pool, EmbedConfig(), rank=1, world=2, cache_dir=tmp_path / "two", encoder=encoder)
    assert encoder.calls == [20, 21] and two.path.read_bytes() == one.path.read_bytes()


def test_a_killed_embedding_redoes_only_unfinished_blocks(tmp_path):
    pool = index_pool(write_pool("txt", tmp_path, TEXTS))
    encoder = HashEncoder()
    partial = tmp_path / "cache" / f"{embedding_key(pool, encoder)}.partial.npy"
    vectors.create(partial, len(pool), encoder.dim())
    embed_block(pool, encoder, partial, 2, 3)   # the run was killed after block 2 of 3
    (tmp_path / "cache" / f"{embedding_key(pool, encoder)}.part0of4.done").touch()   # another world size: ignored
    got = embed_pool(pool, EmbedConfig(), rank=0, world=3, cache_dir=tmp_path / "cache", encoder=encoder)
    assert encoder.calls == [14, 13, 14]
    np.testing.assert_array_equal(got[:], HashEncoder()(TEXTS))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [got.path.name]
    stale = HashEncoder()   # markers without their file vouch for nothing
    got.path.unlink()
    (partial.parent / partial.name.replace(".partial.npy", ".part0of1.done")).touch()
    np.testing.assert_array_equal(embed_pool(pool, EmbedConfig(), cache_dir=tmp_path / "cache", encoder=stale)[:],
                                  HashEncoder()(TEXTS))
    assert stale.calls == [len(TEXTS)]


def _rank(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.join(timeout_minutes=1)
    if rank == 1:   # rank 1 opens rank 0's index, never reads the pool itself
        pool_module.index_pool = None
    pool = open_pool(Path(tmp) / "pool.jsonl", Path(tmp) / "cache")
    encoder = HashEncoder()
    got = embed_pool(pool, EmbedConfig(batch_size=64), rank, 2, Path(tmp) / "cache", encoder=encoder)
    Path(tmp, f"{rank}.json").write_text(json.dumps({"calls": encoder.calls, "path": str(got.path)}))
    distributed.finish()


def test_two_gloo_ranks_each_embed_their_block_of_one_file(tmp_path):
    write_pool("jsonl", tmp_path, TEXTS)
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [g["calls"] for g in got] == [[20], [21]] and got[0]["path"] == got[1]["path"]
    np.testing.assert_array_equal(Vectors(got[0]["path"])[:], HashEncoder()(TEXTS))
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy", ".npy"]   # index + file


# ----------------------------------------------------------------------------- balanced k-means in blocks


class Reads:
    """An array that records how many rows each read returns."""

    def __init__(self, x: np.ndarray):
        self.x, self.shape, self.rows = x, x.shape, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        out = self.x[key]
        self.rows.append(len(out))
        return out


def uneven_blobs(n: int, k: int = 8, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(k, 0.7))   # true groups far from balanced
    centers = rng.standard_normal((k, dim)) * 3
    return (centers[rng.choice(k, n, p=weights)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("tolerance", [0.05, 0.2])
def test_kmeans_fit_on_a_sample_assigns_every_point_in_bounded_blocks(tmp_path, monkeypatch, tolerance):
    monkeypatch.setattr(cluster, "_BLOCK", 500)
    x, k = uneven_blobs(6000), 12
    reads = Reads(x)
    labels, centroids = balanced_kmeans(reads, k, seed=1, tolerance=tolerance, sample=900)
    assert labels.shape == (6000,) and labels.dtype == np.int32 and centroids.shape == (k, 16)
    sizes = np.bincount(labels, minlength=k)
    assert math.floor(500 * (1 - tolerance)) <= sizes.min() and sizes.max() <= math.ceil(500 * (1 + tolerance))
    assert max(reads.rows) <= 900   # the sample, then blocks: never all N rows at once
    path = tmp_path / "x.npy"
    vectors.create(path, *x.shape)
    vectors.write_rows(path, 0, x)
    from_file, _ = balanced_kmeans(Vectors(path), k, seed=1, tolerance=tolerance, sample=900)
    np.testing.assert_array_equal(from_file, labels)   # a file or an array: the same labels


def test_kmeans_without_a_sample_is_the_in_memory_algorithm():
    x = uneven_blobs(1500)
    a, ca = balanced_kmeans(x, 6, seed=2)   # 1500 <= 256 x 6: every point fits the centroids
    b, cb = balanced_kmeans(x, 6, seed=2, sample=10_000)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ca, cb)
    for c in range(6):
        np.testing.assert_allclose(ca[c], x[a == c].mean(0), atol=1e-4)


# ----------------------------------------------------------------------------- memory: texts are never held


def traced_data_path(pool_path: Path, cache: Path, hold: bool = False) -> tuple[int, int]:
    """(peak bytes allocated, texts chosen) while the pool is indexed, embedded, clustered, allocated, and its
    cluster examples and chosen texts read. tracemalloc counts every Python object and numpy array, exactly
    (RSS would move with shared libraries' pages on a busy host); the embeddings file's pages are not
    allocations. ``hold``: the control that also keeps every text, as ``read_pool`` did."""
    tracemalloc.start()
    try:
        pool = index_pool(pool_path)
        _held = list(pool.stream()) if hold else []
        embeddings = embed_pool(pool, EmbedConfig(batch_size=4), cache_dir=cache, encoder=HashEncoder())
        labels, _ = balanced_kmeans(embeddings, 8, seed=0)
        cluster_summary(labels, pool.texts)
        chosen = allocate(labels, np.ones(8), 0.0, 5_000.0, pool.words / 2.6, seed=0)
        pool.texts(chosen)
        return tracemalloc.get_traced_memory()[1], len(chosen)
    finally:
        tracemalloc.stop()


def test_the_data_path_holds_no_more_than_a_few_texts_whatever_the_pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    with path.open("w") as f:
        for i in range(2500):   # 20 MB of texts, 8 kB each
            f.write(json.dumps({"text": f"text {i} " + "word " * 1600}) + "\n")
    traced_data_path(write_pool("jsonl", tmp_path / "warm", TEXTS * 10), tmp_path / "warm-cache")   # first imports
    peak, chosen = traced_data_path(path, tmp_path / "cache")
    held, _ = traced_data_path(path, tmp_path / "cache-held", hold=True)
    pool_bytes = path.stat().st_size
    assert chosen >= 3
    assert peak < pool_bytes / 10 and held > pool_bytes * 0.9, (peak, held, pool_bytes)
