"""Embeddings on disk: one preallocated float32 .npy that ranks fill by row blocks, read back in bounded blocks.

Why a reader of its own instead of ``np.load(mmap_mode="r")``: a pass over a memory map leaves every page it
touched mapped and resident, counted in the process's RSS (10M x 384 float32 is 15 GB), and RLIMIT_AS counts
the whole mapping at once. ``Vectors`` maps the file once too, but copies out the rows it is asked for and
then releases those pages from the process (``madvise(MADV_DONTNEED)``: the data stays in the page cache), so
what a pass holds is one block, whatever N.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

_GATHER = 8192  # rows per gathered chunk: bounds the pages one scattered read touches
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a C-ordered .npy file."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in _HEADER_READERS:
            raise ValueError(f"{path}: .npy format {version} is not supported")
        shape, fortran, dtype = _HEADER_READERS[version](f)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        return shape, dtype, f.tell()


def complete(path: Path, rows: int) -> bool:
    """Whether ``path`` is a whole float32 [rows, D] .npy (a stale, foreign or cut-short file is not)."""
    if not path.is_file():
        return False
    try:
        shape, dtype, offset = header(path)
    except (OSError, ValueError):
        return False
    return (len(shape) == 2 and shape[0] == rows and dtype == np.float32
            and path.stat().st_size == offset + rows * shape[1] * 4)


def create(path: Path, rows: int, dim: int) -> None:
    """A zero-filled (sparse) float32 [rows, dim] .npy at ``path``, unless one is there: it is made under a
    temporary name and hard-linked into place, so that of processes racing to create it all share the first,
    and rows already written are never lost."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def write_rows(path: Path, start: int, block: np.ndarray) -> None:
    """Rows ``start..start+len(block)-1`` of the .npy at ``path``, written through to disk."""
    shape, _, offset = header(path)
    if block.ndim != 2 or block.shape[1] != shape[1] or not 0 <= start <= shape[0] - len(block):
        raise ValueError(f"{path}: cannot write {block.shape} rows at {start} into {shape}")
    with open(path, "r+b") as f:
        f.seek(offset + start * shape[1] * 4)
        f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        f.flush()
        os.fsync(f.fileno())


class Vectors:
    """A float32 [N, D] .npy read like an array (``x[a:b]``, ``x[rows]``, ``len(x)``), each read a copy whose
    pages are released afterwards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        shape, dtype, self._offset = header(self.path)
        if len(shape) != 2 or dtype != np.float32:
            raise ValueError(f"{self.path}: expected a float32 [N, D] array, got {dtype} {shape}")
        self.shape = shape
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._array = np.frombuffer(self._map, dtype=np.float32, count=shape[0] * shape[1],
                                    offset=self._offset).reshape(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            out = self._array[start:stop:step].copy()
            self._release(start, stop)
            return out
        rows = np.asarray(key, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for s in range(0, len(rows), _GATHER):
            part = rows[s:s + _GATHER]
            out[s:s + len(part)] = self._array[part]
            if len(part):
                self._release(int(part.min()), int(part.max()) + 1)
        return out

    def _release(self, start: int, stop: int) -> None:
        """Drop the pages of rows ``start..stop-1`` from this process (they stay in the page cache)."""
        if stop <= start or not hasattr(mmap, "MADV_DONTNEED"):
            return
        row = self.shape[1] * 4
        lo = (self._offset + start * row) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, lo, self._offset + stop * row - lo)
