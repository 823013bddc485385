"""A text pool streamed, never held: its texts in order, and an index to read any of them back by offset.

Why: a FineWeb-Edu pool holds tens of millions of texts; as a list of Python strings on every rank it fills a
host's memory. ``index_pool`` reads the pool once and keeps, per text, only where it lies (file number and
position: the byte offset of its line in a JSONL or .txt file, decompressed for .gz; its row in a parquet file;
its segment in a shard) and its word count (allocation's spoken-length estimate), while it hashes every text
into the pool's content key. Texts are then streamed from any of them on (a rank's block of the embedding) or
read back by index (cluster examples, probes, the chosen texts): in pool order, at most one forward pass per
file (a seek per text in plain files, the needed row groups in parquet).

Formats: a JSONL or gzipped JSONL file (``text`` field), a .txt file (one text per line), parquet as the
``datasets`` library writes corpora (a file or a folder of them, ``text`` column), or a shard set folder (one
text per segment). Texts are stripped; blank ones are skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from shards import sources
from shards.format import atomic_write_json, read_index, read_shard, shard_urls
from train import distributed

KINDS = ("lines", "parquet", "shards")
_ROWS = 65536  # index rows gathered per numpy block while a pool is read


@dataclass(frozen=True, eq=False)
class PoolIndex:
    """Where each text of a pool lies: ``where`` is int64 [N, 3] (file number, position in it, words)."""

    kind: str
    files: list[str]
    where: np.ndarray
    key: str  # sha256 of every text, length-prefixed

    def __len__(self) -> int:
        return len(self.where)

    @property
    def words(self) -> np.ndarray:
        return self.where[:, 2]

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
        """Texts ``start..stop-1`` in order, read from the position of ``start`` on (a rank reads its block
        only)."""
        stop = len(self) if stop is None else min(stop, len(self))
        if start >= stop:
            return
        i = start
        with _unchanged():
            for file, pos, text in _scan(self.kind, self.files, int(self.where[start, 0]),
                                         int(self.where[start, 1])):
                if file != self.where[i, 0] or pos != self.where[i, 1]:
                    raise ValueError(f"{self.files[file]}: text {i} is not where the index has it")
                yield text
                i += 1
                if i == stop:
                    return
            raise ValueError(f"{self.files[-1]}: ends before text {i}")

    def texts(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The texts at these pool indices, in the order given, read by their positions."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = self.where[np.unique(idx)]
        found: dict[tuple[int, int], str] = {}
        with _unchanged():
            for file in np.unique(rows[:, 0]).tolist():
                got = _READ[self.kind](self.files[file], rows[rows[:, 0] == file, 1])
                found.update(((file, pos), text) for pos, text in got.items())
        return [found[(int(self.where[i, 0]), int(self.where[i, 1]))] for i in idx]


@contextmanager
def _unchanged() -> Iterator[None]:
    """A pool that no longer reads as it did when indexed (every text parsed then) is named as changed."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"the text pool changed since it was indexed: {exc}") from None


def pool_files(path: str | Path) -> tuple[str, list[str]]:
    """The pool's kind (one of KINDS) and its files in reading order; errors name the path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such text pool (a .jsonl, .jsonl.gz, .txt, .parquet or shard set "
                                "folder)")
    if path.suffix == ".parquet":
        return "parquet", [str(path)]
    if path.is_dir() and sources.detect_format(path) == "parquet":
        return "parquet", [str(p) for p in sorted(path.rglob("*.parquet"))]
    if path.is_dir():
        read_index(path)  # a clear error when the folder is no complete shard set
        return "shards", shard_urls(path)
    if path.name.endswith((".txt", ".jsonl", ".jsonl.gz")):
        return "lines", [str(path)]
    raise ValueError(f"{path}: unknown text pool format {path.suffix!r} (use .jsonl, .jsonl.gz, .txt, .parquet "
                     "or a shard set)")


def index_pool(path: str | Path) -> PoolIndex:
    """Read the pool once: every text's position and word count, and the content key (the texts are hashed
    and dropped as they pass)."""
    kind, files = pool_files(path)
    digest = hashlib.sha256()
    blocks: list[np.ndarray] = []
    rows: list[tuple[int, int, int]] = []
    for file, pos, text in _scan(kind, files):
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
        rows.append((file, pos, len(text.split())))
        if len(rows) == _ROWS:
            blocks.append(np.array(rows, dtype=np.int64))
            rows.clear()
    blocks.append(np.array(rows, dtype=np.int64).reshape(-1, 3))
    where = np.concatenate(blocks)
    if not len(where):
        raise ValueError(f"{path}: the text pool holds no texts")
    return PoolIndex(kind, files, where, digest.hexdigest())


def save_index(pool: PoolIndex, folder: Path) -> None:
    """``pool-<key>.npy`` (the positions) and ``pool-<key>.json`` (kind and files), unless already there."""
    array, meta = folder / f"pool-{pool.key}.npy", folder / f"pool-{pool.key}.json"
    if array.is_file() and meta.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{array.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)   # mkstemp makes 0600; the run folder is read by other users and jobs
        with os.fdopen(fd, "wb") as f:
            np.save(f, pool.where, allow_pickle=False)
        os.replace(tmp, array)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_json(meta, {"kind": pool.kind, "files": pool.files, "texts": len(pool)})


def load_index(folder: Path, key: str) -> PoolIndex:
    """The index ``save_index`` wrote for ``key``, its positions memory-mapped."""
    meta = json.loads((folder / f"pool-{key}.json").read_text())
    where = np.load(folder / f"pool-{key}.npy", mmap_mode="r", allow_pickle=False)
    if where.shape != (meta["texts"], 3) or meta["kind"] not in KINDS:
        raise ValueError(f"{folder / f'pool-{key}.npy'}: not the index its .json describes")
    return PoolIndex(meta["kind"], meta["files"], where, key)


def open_pool(path: str | Path, folder: Path) -> PoolIndex:
    """The pool's index: rank 0 reads the pool and saves it, the other ranks open it (without a process
    group every process reads the pool itself)."""
    if distributed.rank() != 0:
        return load_index(folder, distributed.broadcast_object(None))
    pool = index_pool(path)
    save_index(pool, folder)
    distributed.broadcast_object(pool.key)
    return pool


# ----------------------------------------------------------------------------- per format: scan and read


def _scan(kind: str, files: list[str], file: int = 0, start: int = 0) -> Iterator[tuple[int, int, str]]:
    """(file number, position, text) of every text from position ``start`` of file ``file`` on."""
    for f in range(file, len(files)):
        for pos, text in _SCAN[kind](files[f], start if f == file else 0):
            yield f, pos, text


@contextmanager
def _opened(file: str) -> Iterator[IO[bytes]]:
    """The file in binary, gunzipped when its name ends in .gz; a corrupt gzip stream is an InputError."""
    opener = gzip.open if file.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            yield f
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise sources.InputError(f"{file}: unreadable gzip ({exc})") from None


def _line_text(file: str, raw: bytes, lineno: int | None, offset: int) -> str:
    """The stripped text of a line: the line (.txt) or its JSON ``text`` field; "" when blank. Errors name
    the line by its number when known, else by its byte offset."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{file}: not UTF-8 text") from None
    if file.endswith(".txt") or not line.strip():
        return line.strip()
    where = f"{file}:{lineno}" if lineno else f"{file} (byte {offset})"
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{where}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f"{where}: text: expected an object with a string field 'text'")
    return obj["text"].strip()


def _scan_lines(file: str, start: int) -> Iterator[tuple[int, str]]:
    with _opened(file) as f:
        f.seek(start)  # gzip: decompresses up to it
        offset = start
        for lineno, raw in enumerate(f, 1):
            text = _line_text(file, raw, lineno if start == 0 else None, offset)
            if text:
                yield offset, text
            offset += len(raw)


def _read_lines(file: str, positions: np.ndarray) -> dict[int, str]:
    with _opened(file) as f:
        out = {}
        for pos in positions.tolist():  # ascending: gzip seeks forward only
            f.seek(pos)
            out[pos] = _line_text(file, f.readline(), None, pos)
        return out


@contextmanager
def _arrow_errors(file: str) -> Iterator[None]:
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise sources.InputError(f"{file}: unreadable parquet ({exc})") from None


def _row_group_starts(parquet) -> np.ndarray:
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    return np.cumsum([0] + sizes)[:-1]


def _scan_parquet(file: str, start: int) -> Iterator[tuple[int, str]]:
    parquet = sources.text_parquet(Path(file))
    starts = _row_group_starts(parquet)
    first = max(int(np.searchsorted(starts, start, side="right")) - 1, 0)
    row = int(starts[first]) if len(starts) else 0
    with _arrow_errors(file):
        groups = range(first, parquet.num_row_groups)
        for batch in parquet.iter_batches(batch_size=4096, columns=["text"], row_groups=groups):
            for text in batch.column("text").to_pylist():
                if row >= start and text is not None and text.strip():
                    yield row, text.strip()
                row += 1


def _read_parquet(file: str, positions: np.ndarray) -> dict[int, str]:
    parquet = sources.text_parquet(Path(file))
    starts = _row_group_starts(parquet)
    groups = np.searchsorted(starts, positions, side="right") - 1
    out = {}
    with _arrow_errors(file):
        for g in np.unique(groups):
            column = parquet.read_row_group(int(g), columns=["text"]).column("text")
            for pos in positions[groups == g].tolist():
                out[pos] = column[pos - int(starts[g])].as_py().strip()
    return out


def _scan_shard(url: str, start: int) -> Iterator[tuple[int, str]]:
    n = 0
    for chunk in read_shard(url, decode_audio=False):
        for segment in chunk.segments:
            if n >= start and segment.text.strip():
                yield n, segment.text.strip()
            n += 1


def _read_shard(url: str, positions: np.ndarray) -> dict[int, str]:
    wanted, out = set(positions.tolist()), {}
    for pos, text in _scan_shard(url, int(positions[0])):
        if pos in wanted:
            out[pos] = text
            if len(out) == len(wanted):
                break
    return out


_SCAN = {"lines": _scan_lines, "parquet": _scan_parquet, "shards": _scan_shard}
_READ = {"lines": _read_lines, "parquet": _read_parquet, "shards": _read_shard}
