"""Input readers for the shard builder: manifests, LibriSpeech-style trees and plain text.

Readers only list segments (cheap: no audio is decoded), in input order, as ``Record``s. A bad
input is never dropped silently: it comes out as a Record with a ``reject`` reason, so the builder
can count it and write it to ``rejects.jsonl``. Audio is read later, in the builder's worker
processes, by ``load_audio``, which raises ``Rejected`` for unusable audio.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

FORMATS = ("manifest", "librispeech", "text")
AUDIO_SUFFIXES = (".flac", ".wav")

MISSING_FILE = "missing_file"
UNREADABLE_AUDIO = "unreadable_audio"
ZERO_LENGTH = "zero_length"
NON_FINITE = "non_finite"
TOO_LONG = "too_long"
EMPTY_TEXT = "empty_text"
UNDECODABLE_TEXT = "undecodable_text"
DUPLICATE_KEY = "duplicate_key"
BAD_RANGE = "bad_range"
BAD_RECORD = "bad_record"  # a JSON line whose fields have the wrong type (e.g. "start": "abc")
TTS_FAILED = "tts_failed"


class Rejected(Exception):
    """An input that is skipped and counted; ``reason`` is one of the constants above."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Record:
    """One input segment before its audio is read, or (``reject`` set) a rejected input.

    ``input`` locates it for humans (``file:line`` or the audio path); ``uid`` identifies it for
    duplicate detection (utterance id, or doc and position); ``pos`` orders segments in ``doc``.
    """

    input: str
    reject: str | None = None
    uid: str = ""
    doc: str = ""
    pos: int = 0
    text: str = ""
    audio: str | None = None
    start: float | None = None
    end: float | None = None
    words: list[list[Any]] | None = None


def detect_format(path: Path) -> str:
    """A folder is a LibriSpeech-style tree; a JSONL whose first record has "audio" is a manifest."""
    if path.is_dir():
        return "librispeech"
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    try:
                        first = json.loads(raw)
                    except ValueError:
                        break
                    return "manifest" if isinstance(first, dict) and "audio" in first else "text"
    return "text"


def read_records(path: Path, fmt: str) -> list[Record]:
    """All records of an input in input order, duplicates marked as rejected."""
    readers = {"manifest": read_manifest, "librispeech": read_librispeech, "text": read_text}
    return mark_duplicates(readers[fmt](path))


def mark_duplicates(records: Iterable[Record]) -> list[Record]:
    """Reject every record whose uid an earlier accepted record already has."""
    seen: set[str] = set()
    out = []
    for rec in records:
        if rec.reject is None:
            if rec.uid in seen:
                rec = Record(input=rec.input, reject=DUPLICATE_KEY)
            else:
                seen.add(rec.uid)
        out.append(rec)
    return out


def read_manifest(path: Path) -> Iterator[Record]:
    """JSONL: ``{"audio", "text", "doc"?, "pos"?, "start"?, "end"?, "words"?}``, paths relative to it."""
    for where, lineno, obj in _json_lines(path):
        yield _guarded(where, _manifest_record, obj, where, lineno, path.parent)


def read_librispeech(root: Path) -> Iterator[Record]:
    """``*.trans.txt`` files (``UTTID TEXT`` lines, ``UTTID.flac`` beside): one chapter is one doc."""
    for trans in sorted(root.rglob("*.trans.txt")):
        doc = trans.name.removesuffix(".trans.txt")
        for lineno, line in _text_lines(trans):
            where = f"{trans}:{lineno}"
            yield _guarded(where, _librispeech_record, line, trans.parent, doc, lineno)


def read_text(path: Path) -> Iterator[Record]:
    """Text only: JSONL (``{"text", "doc"?, "pos"?}``, one doc per line by default) or plain text
    (one segment per line, one doc per file); a folder means all such files in it."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt")) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    for file in files:
        name = file.relative_to(root).with_suffix("").as_posix()
        if file.suffix == ".jsonl":
            for where, lineno, obj in _json_lines(file):
                yield _guarded(where, _text_record, obj, where, f"{name}-{lineno:06d}", lineno)
        else:
            for lineno, line in _text_lines(file):
                where = f"{file}:{lineno}"
                yield _guarded(where, _line_record, line, where, name, lineno)


def load_audio(rec: Record, sr: int, max_seconds: float | None) -> np.ndarray:
    """The record's span as float32 mono at ``sr``; raises Rejected when the audio is unusable."""
    assert rec.audio is not None
    if not Path(rec.audio).exists():
        raise Rejected(MISSING_FILE)
    try:
        info = sf.info(rec.audio)
    except (sf.LibsndfileError, RuntimeError, OSError):
        raise Rejected(UNREADABLE_AUDIO) from None
    native, frames = info.samplerate, info.frames
    if frames <= 0:
        raise Rejected(ZERO_LENGTH)
    start = round((rec.start or 0.0) * native)
    stop = frames if rec.end is None else round(rec.end * native)
    if start >= frames or stop > frames:
        raise Rejected(BAD_RANGE)
    check_length(stop - start, native, max_seconds)
    try:
        audio, _ = sf.read(rec.audio, start=start, stop=stop, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError):
        raise Rejected(UNREADABLE_AUDIO) from None
    if len(audio) < stop - start:
        raise Rejected(UNREADABLE_AUDIO)  # shorter than its header says: truncated
    audio = audio.mean(axis=1)
    check_audio(audio, native, max_seconds)
    if native != sr:
        audio = torchaudio.functional.resample(torch.from_numpy(audio), native, sr).numpy()
    return audio


def check_length(frames: int, sr: int, max_seconds: float | None) -> None:
    if frames <= 0:
        raise Rejected(ZERO_LENGTH)
    if max_seconds is not None and frames / sr > max_seconds:
        raise Rejected(TOO_LONG)


def check_audio(audio: np.ndarray, sr: int, max_seconds: float | None) -> None:
    """Reject empty, too long, or NaN/Inf audio (decoded files and synthesized speech alike)."""
    check_length(len(audio), sr, max_seconds)
    if not np.isfinite(audio).all():
        raise Rejected(NON_FINITE)


def _guarded(where: str, make: Callable[..., Record], *args: Any) -> Record:
    """``make(*args)``, or a rejected Record when it raises Rejected."""
    try:
        return make(*args)
    except Rejected as exc:
        return Record(input=where, reject=exc.reason)


def _json_lines(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(``file:line``, line number, parsed object or a Rejected) for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                obj = Rejected(UNDECODABLE_TEXT)
            else:
                obj = obj if isinstance(obj, dict) else Rejected(BAD_RECORD)
            yield f"{path}:{lineno}", lineno, obj


def _text_lines(path: Path) -> Iterator[tuple[int, str | Rejected]]:
    """(line number, decoded line or a Rejected) for each line of a UTF-8 text file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield lineno, Rejected(UNDECODABLE_TEXT)


def _manifest_record(obj: dict | Rejected, where: str, lineno: int, base: Path) -> Record:
    obj = _ok(obj)
    audio = obj.get("audio")
    if audio is None:
        raise Rejected(MISSING_FILE)
    if not isinstance(audio, str) or not audio:
        raise Rejected(BAD_RECORD)
    text = _text(obj.get("text"))
    doc = _field(obj, "doc", str) or Path(audio).stem
    pos = _field(obj, "pos", int, lineno)
    start, end = _field(obj, "start", (int, float)), _field(obj, "end", (int, float))
    words = _words(obj.get("words"))
    if not _valid_range(start, end):
        raise Rejected(BAD_RANGE)
    path = base / audio
    if not path.exists():
        raise Rejected(MISSING_FILE)
    return Record(input=where, uid=f"{doc}\0{pos}", doc=doc, pos=pos, text=text, audio=str(path),
                  start=start, end=end, words=words)


def _librispeech_record(line: str | Rejected, folder: Path, doc: str, lineno: int) -> Record:
    parts = _ok(line).split(maxsplit=1)
    if not parts:
        raise Rejected(EMPTY_TEXT)
    uttid, text = parts[0], _text(parts[1] if len(parts) > 1 else "")
    audio = next((folder / f"{uttid}{s}" for s in AUDIO_SUFFIXES if (folder / f"{uttid}{s}").exists()), None)
    if audio is None:
        raise Rejected(MISSING_FILE)
    return Record(input=str(audio), uid=uttid, doc=doc, pos=lineno, text=text, audio=str(audio))


def _text_record(obj: dict | Rejected, where: str, default_doc: str, lineno: int) -> Record:
    obj = _ok(obj)
    text = _text(obj.get("text"))
    doc = _field(obj, "doc", str) or default_doc
    pos = _field(obj, "pos", int, lineno)
    return Record(input=where, uid=f"{doc}\0{pos}", doc=doc, pos=pos, text=text)


def _line_record(line: str | Rejected, where: str, doc: str, lineno: int) -> Record:
    return Record(input=where, uid=f"{doc}\0{lineno}", doc=doc, pos=lineno, text=_text(line))


def _ok(value: Any) -> Any:
    if isinstance(value, Rejected):
        raise value
    return value


def _text(value: Any) -> str:
    """Stripped text; None, empty or whitespace is empty_text, a non-string is bad_record."""
    value = _ok(value)
    if value is None:
        raise Rejected(EMPTY_TEXT)
    if not isinstance(value, str):
        raise Rejected(BAD_RECORD)
    if not value.strip():
        raise Rejected(EMPTY_TEXT)
    return value.strip()


def _field(obj: dict, name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    """An optional field of the given type (bools are not numbers); a wrong type is bad_record."""
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, types):
        raise Rejected(BAD_RECORD)
    return value


def _words(value: Any) -> list[list[Any]] | None:
    """``[[word, start_s, end_s], ...]`` or None; anything else is bad_record."""
    if value is None:
        return None
    ok = isinstance(value, list) and all(
        isinstance(w, list) and len(w) == 3 and isinstance(w[0], str)
        and all(isinstance(t, int | float) and not isinstance(t, bool) for t in w[1:]) for w in value)
    if not ok:
        raise Rejected(BAD_RECORD)
    return [[w, float(s), float(e)] for w, s, e in value]


def _valid_range(start: float | None, end: float | None) -> bool:
    """Finite, non-negative, and start < end when both are given (the file's length is checked later)."""
    if any(t is not None and (not math.isfinite(t) or t < 0) for t in (start, end)):
        return False
    return end is None or end > (start or 0.0)
