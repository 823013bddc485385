"""The shard format: the one module that writes and reads it.

A shard is a WebDataset tar. One sample is one document chunk (consecutive segments of one book,
talk or generated text), so interleaving text and speech never needs state across samples:

    <key>.json    {"doc", "source", "lang", "segments": [{"text", "audio": "0.flac"|null, "sr", "dur",
                   "words"?: [[word, start_s, end_s], ...]}]}
    <key>.0.flac  audio of segment 0 (mono, 16-bit FLAC at the shard set's rate), <key>.1.flac, ...

Text-only samples use the same schema with ``"audio": null``. A shard set is a folder of
``shard-NNNNNN.tar`` files plus ``index.json`` (written last, so its presence means "complete").
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import webdataset as wds

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ShardFormatError(ValueError):
    """A sample does not follow the schema; the message names the shard/key and the field."""


@dataclass
class Segment:
    """One utterance or text span. ``audio`` is float32 mono at ``sr`` Hz, or None for text only."""

    text: str
    audio: np.ndarray | None = None
    sr: int | None = None
    words: list[tuple[str, float, float]] | None = None

    @property
    def dur(self) -> float:
        return 0.0 if self.audio is None or not self.sr else len(self.audio) / self.sr


@dataclass
class Chunk:
    """One sample: consecutive segments of one document."""

    key: str
    doc: str
    source: str = ""
    lang: str = "en"
    segments: list[Segment] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.dur for s in self.segments)


def safe_key(text: str) -> str:
    """A WebDataset key: no dots (they separate the key from the extension), no path characters."""
    key = _KEY_UNSAFE.sub("_", text).strip("_")
    return key or "x"


def encode_flac(audio: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sr, format="FLAC",
             subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    return audio, sr


def encode_chunk(chunk: Chunk) -> dict[str, Any]:
    """Chunk -> WebDataset sample (``__key__``, ``json`` and one ``<i>.flac`` per spoken segment)."""
    sample: dict[str, Any] = {"__key__": chunk.key}
    segments = []
    for i, seg in enumerate(chunk.segments):
        entry: dict[str, Any] = {"text": seg.text, "audio": None, "sr": None, "dur": 0.0}
        if seg.audio is not None:
            if not seg.sr:
                raise ShardFormatError(f"{chunk.key}: segment {i} has audio but no sample rate")
            name = f"{i}.flac"
            sample[name] = encode_flac(seg.audio, seg.sr)
            entry.update(audio=name, sr=int(seg.sr), dur=round(seg.dur, 4))
        if seg.words is not None:
            entry["words"] = [[w, float(s), float(e)] for w, s, e in seg.words]
        segments.append(entry)
    meta = {"doc": chunk.doc, "source": chunk.source, "lang": chunk.lang, "segments": segments}
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


def decode_chunk(sample: dict[str, Any], where: str = "", decode_audio: bool = True) -> Chunk:
    """WebDataset sample (raw bytes per extension) -> Chunk, with audio decoded to float32."""
    key = sample.get("__key__", "?")
    label = f"{where}:{key}" if where else key
    try:
        meta = json.loads(sample["json"])
    except KeyError:
        raise ShardFormatError(f"{label}: no .json member") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ShardFormatError(f"{label}.json: not valid JSON ({exc})") from None
    for name in ("doc", "segments"):
        if name not in meta:
            raise ShardFormatError(f"{label}.json: missing field {name!r}")
    segments = []
    for i, entry in enumerate(meta["segments"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise ShardFormatError(f"{label}.json: segments[{i}].text missing or not a string")
        audio, sr = None, entry.get("sr")
        if entry.get("audio"):
            data = sample.get(entry["audio"])
            if data is None:
                raise ShardFormatError(f"{label}: segments[{i}].audio names {entry['audio']!r}, "
                                       "which is not in the sample")
            if decode_audio:
                try:
                    audio, sr = decode_flac(data)
                except (sf.LibsndfileError, RuntimeError) as exc:
                    raise ShardFormatError(f"{label}.{entry['audio']}: cannot decode ({exc})") from None
        words = entry.get("words")
        segments.append(Segment(text=entry["text"], audio=audio, sr=sr,
                                words=[tuple(w) for w in words] if words is not None else None))
    return Chunk(key=key, doc=str(meta["doc"]), source=meta.get("source", ""), lang=meta.get("lang", "en"),
                 segments=segments)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)   # mkstemp makes 0600; shards are read by other users and jobs
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _tar_bytes(samples: Iterable[dict[str, Any]]) -> bytes:
    """Samples -> tar bytes with fixed metadata (mtime 0), so that builds are reproducible."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="salad", group="salad") as writer:
        for sample in samples:
            key = sample["__key__"]
            if "." in key or "/" in key:
                raise ShardFormatError(f"{key}: keys may not contain '.' or '/'")
            writer.write(sample)
    return buf.getvalue()


def write_samples(path: str | Path, samples: Iterable[dict[str, Any]]) -> str:
    """Write already-encoded samples (``encode_chunk``) as one shard atomically; return its sha256."""
    data = _tar_bytes(samples)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def write_shard(path: str | Path, chunks: Iterable[Chunk]) -> str:
    """Write chunks as one shard atomically; return its sha256."""
    return write_samples(path, (encode_chunk(c) for c in chunks))


def read_shard(path: str | Path, decode_audio: bool = True) -> Iterator[Chunk]:
    """All chunks of one local shard file, in order; a corrupt tar raises ShardFormatError naming it."""
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
            yield decode_chunk(sample, str(path), decode_audio=decode_audio)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, ShardFormatError):
            raise
        reason = exc.args[0] if exc.args else exc
        raise ShardFormatError(f"{path}: corrupt or truncated shard ({reason})") from None


def read_index(folder: str | Path) -> dict[str, Any]:
    """The ``index.json`` of a shard set; a missing or malformed index names the file."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index (the shard set is missing or its build did not finish)")
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise ShardFormatError(f"{path}: not valid JSON ({exc})") from None
    for name in ("sr", "shards"):
        if name not in index:
            raise ShardFormatError(f"{path}: missing field {name!r}")
    return index


def shard_urls(folder: str | Path) -> list[str]:
    """Absolute URLs of the shards listed in a shard set's index (urls are stored relative)."""
    folder = Path(folder)
    urls = []
    for entry in read_index(folder)["shards"]:
        url = entry["url"]
        urls.append(url if ("://" in url or url.startswith("pipe:") or os.path.isabs(url))
                    else str((folder / url).resolve()))
    return urls


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``wave`` at ``rate`` Hz as ``target`` Hz (itself when they agree): shards, encoders and inference each read
    one rate. torchaudio is imported here only, so reading shards does not load it."""
    if rate == target:
        return wave
    import torch
    import torchaudio

    return torchaudio.functional.resample(torch.from_numpy(wave), rate, target).numpy()
