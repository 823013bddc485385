"""Embeddings on disk: one preallocated float32 .npy that ranks fill by row blocks, read back in bounded blocks.

The file is made by ``np.lib.format.open_memmap`` (sparse, so creating 15 GB costs nothing) and stays a plain
.npy (``np.load(path, mmap_mode="r")`` opens it). Why ``Vectors`` reads it with ``pread`` instead of through a
memory map: a pass over a map leaves every page it touched resident and counted in the process's RSS (10M x
384 float32 is 15 GB), a scattered read through a map faults in whole neighbourhoods (the kernel maps up to
64 kB around each touched row), and RLIMIT_AS counts the whole mapping at once. With ``pread`` into a fresh
array the process holds exactly the rows it asked for; the file's pages live in the page cache, which the
kernel reclaims as it needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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
    """A float32 [N, D] .npy read like an array (``x[a:b]``, ``x[rows]``, ``len(x)``), each read a fresh array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        shape, dtype, self._offset = header(self.path)
        if len(shape) != 2 or dtype != np.float32:
            raise ValueError(f"{self.path}: expected a float32 [N, D] array, got {dtype} {shape}")
        self.shape = shape
        self._row = shape[1] * 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("Vectors: slices with a step are not supported")
            out = np.empty((max(stop - start, 0), self.shape[1]), dtype=np.float32)
            with open(self.path, "rb", buffering=0) as f:
                self._read(f.fileno(), out, start)
            return out
        rows = np.asarray(key, dtype=np.int64)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows out of 0..{len(self) - 1}")
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        with open(self.path, "rb", buffering=0) as f:
            for i, row in enumerate((rows % len(self)).tolist()):
                self._read(f.fileno(), out[i:i + 1], row)
        return out

    def _read(self, fd: int, out: np.ndarray, row: int) -> None:
        """Fill ``out`` with the rows from ``row`` on."""
        view, offset = memoryview(out).cast("B"), self._offset + row * self._row
        while len(view):
            got = os.preadv(fd, [view], offset)
            if got == 0:
                raise ValueError(f"{self.path}: shorter than its header says")
            view, offset = view[got:], offset + got
