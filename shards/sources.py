"""Input readers for the shard builder: manifests, LibriSpeech-style trees, lhotse cut manifests (the paper's
LibriHeavy, Emilia through lhotse's recipe), Emilia's WebDataset tars, ``datasets``-written parquet and plain text.

Readers only list segments (cheap: no audio is decoded), in input order, as ``Record``s. A bad
input is never dropped silently: it comes out as a Record with a ``reject`` reason, so the builder
can count it and write it to ``rejects.jsonl``. Audio is read later, in the builder's worker
processes, by ``load_audio``, which raises ``Rejected`` for unusable audio. A whole input file that
cannot be read (a truncated gzip or tar, a parquet file without a ``text`` column) raises ``InputError``
before any audio is touched.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from shards.format import resample

FORMATS = ("manifest", "librispeech", "lhotse", "emilia", "parquet", "text")
TEXT_FORMATS = ("text", "parquet")  # no audio: spoken by --tts, or text-only shards
AUDIO_SUFFIXES = (".flac", ".wav")
TAR_AUDIO = ("mp3", "flac", "wav")  # audio members of a WebDataset sample, in order of preference
RANGE_SLACK_S = 0.002  # an end this far past the file is its end (start + duration rounded to ms)
CUT_TYPES = ("MonoCut", "MultiCut", "MixedCut", "PaddingCut")  # the "type" of a lhotse cut manifest's lines
LHOTSE_JSONL = (".jsonl", ".jsonl.gz")  # read line by line; other lhotse manifests (.json, .yaml) whole
# what lhotse raises on a malformed manifest entry: it builds its objects without checking types or fields
_MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError)

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
UNSUPPORTED_CUT = "unsupported_cut"  # a lhotse item that is not a MonoCut/MultiCut with a recording

_WINDOW_ID = re.compile(r"(.+)_W(\d+)")  # Emilia: <source>_W<window index>
_WDS_MEMBER = re.compile(r"((?:.*/)?[^./]+)\.([^/]+)")  # WebDataset: key = up to the basename's first dot


class InputError(ValueError):
    """A whole input file cannot be read in its format; the message names the file and the reason."""


class Rejected(Exception):
    """An input that is skipped and counted; ``reason`` is one of the constants above."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Record:
    """One input segment before its audio is read, or (``reject`` set) a rejected input.

    ``input`` locates it for humans (``file:line``, ``file:line (cut id)`` or the audio path); ``uid``
    identifies it for duplicate detection (utterance or cut id, or doc and position); ``pos`` orders segments
    in ``doc``; ``start``/``end`` cut the audio file (seconds); ``byte_range`` (offset, size) says the audio
    file is those bytes of ``audio`` (a member of a tar); ``cut`` is a lhotse cut (JSON, without its
    supervisions) whose audio lhotse reads: any source type, channel layout or transform it knows.
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
    byte_range: tuple[int, int] | None = None
    cut: str | None = None


def detect_format(path: Path) -> str:
    """By suffix (``.tar`` Emilia, ``.parquet``) or, for JSONL (``.jsonl``, ``.jsonl.gz``), by the first
    record: a lhotse cut has a cut "type" or "recording" and "supervisions", a manifest has "audio", else text
    (a lhotse ``.json`` or ``.yaml`` manifest needs ``--format lhotse``). A folder
    is read by what it holds: ``*.trans.txt`` (LibriSpeech), ``*.tar`` (Emilia) or ``*.parquet``."""
    if path.is_dir():
        for fmt, pattern in (("librispeech", "*.trans.txt"), ("emilia", "*.tar"), ("parquet", "*.parquet")):
            if next(path.rglob(pattern), None) is not None:
                return fmt
        return "librispeech"
    if path.suffix in (".tar", ".parquet"):
        return "emilia" if path.suffix == ".tar" else "parquet"
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        first = next((_parse_json(raw) for _, raw in read_lines(path) if raw.strip()), None)
        if isinstance(first, dict) and (first.get("type") in CUT_TYPES
                                        or "recording" in first and "supervisions" in first):
            return "lhotse"
        return "manifest" if isinstance(first, dict) and "audio" in first else "text"
    return "text"


def read_records(path: Path, fmt: str, audio_root: Path | None = None) -> list[Record]:
    """All records of an input in input order, duplicates marked as rejected. Relative audio paths of
    manifests and cuts are under ``audio_root`` (default: the manifest's folder)."""
    base = audio_root if audio_root is not None else path.parent
    readers: dict[str, Callable[[], Iterable[Record]]] = {
        "manifest": lambda: read_manifest(path, base), "librispeech": lambda: read_librispeech(path),
        "lhotse": lambda: read_lhotse(path, base), "emilia": lambda: read_emilia(path),
        "parquet": lambda: read_parquet(path), "text": lambda: read_text(path)}
    return mark_duplicates(readers[fmt]())


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


def read_manifest(path: Path, base: Path) -> Iterator[Record]:
    """JSONL: ``{"audio", "text", "doc"?, "pos"?, "start"?, "end"?, "words"?}``, paths relative to ``base``."""
    for where, lineno, obj in _json_lines(path):
        yield _guarded(where, _manifest_record, obj, where, lineno, base)


def read_lhotse(path: Path, base: Path) -> list[Record]:
    """A lhotse cut manifest: JSONL (``.jsonl``, ``.jsonl.gz``; LibriHeavy's ``libriheavy_cuts_*.jsonl.gz``,
    ``lhotse prepare emilia``'s ``emilia_cuts_EN.jsonl.gz``), or a ``.json``/``.yaml`` one read whole.

    Lhotse parses each cut (a JSONL line at a time, so one bad line is one reject, as in every JSONL reader)
    and later reads its audio; relative file paths are under ``base``. The text and word timings are the
    supervisions' (``_cut_text``). A document is ``_cut_doc`` of the recording id; cuts are ordered by
    recording path, then start, so a book's chapters follow each other.
    """
    records = [_guarded(where, _cut_record, obj, where, base) for where, obj in _lhotse_items(path)]
    for pos, rec in enumerate(sorted((r for r in records if r.reject is None), key=lambda r: (r.audio, r.start))):
        rec.pos = pos
    return records


def read_emilia(path: Path) -> Iterator[Record]:
    """Emilia's WebDataset tars (``EN/EN-B000000.tar``; a folder means all tars in it, sorted): per sample
    ``<key>.mp3`` and ``<key>.json`` ``{"id" (Emilia-YODAS: "_id"), "text", "speaker", "duration", ...}``.

    A document is the source recording: the id without its ``_W<window>`` suffix, windows ordered by
    that index (``EN_B00000_S00000_W000001`` is window 1 of ``EN_B00000_S00000``); an id of another form
    falls back to ``speaker`` as the document, in input order. Audio stays in the tar: the record points
    at the member's bytes.
    """
    tars = sorted(path.rglob("*.tar")) if path.is_dir() else [path]
    samples = (sample for tar in tars for sample in _tar_samples(tar))
    for n, (where, key, meta, byte_range, tar) in enumerate(samples):
        yield _guarded(where, _emilia_record, meta, byte_range, where, key, tar, n)


def read_parquet(path: Path) -> Iterator[Record]:
    """Text corpora as the ``datasets`` library writes them (FineWeb-Edu, SmolLM-Corpus): parquet with a
    string ``text`` column, one document per row, named by a string ``id`` column when there is one; a
    folder means all ``*.parquet`` files in it, sorted."""
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    for file in files:
        name = _file_name(file, root)
        for row, (text, doc) in enumerate(_parquet_rows(file), 1):
            where = f"{file}:{row}"
            yield _guarded(where, _line_record, text, where, doc or f"{name}-{row:07d}", 0)


def read_librispeech(root: Path) -> Iterator[Record]:
    """``*.trans.txt`` files (``UTTID TEXT`` lines, ``UTTID.flac`` beside): one chapter is one doc."""
    for trans in sorted(root.rglob("*.trans.txt")):
        doc = trans.name.removesuffix(".trans.txt")
        for lineno, line in _text_lines(trans):
            where = f"{trans}:{lineno}"
            yield _guarded(where, _librispeech_record, line, trans.parent, doc, lineno)


def read_text(path: Path) -> Iterator[Record]:
    """Text only: JSONL or gzipped JSONL (``{"text", "doc"?, "pos"?}``, one doc per line by default, named
    by a string ``id`` when there is one) or plain text (one segment per line, one doc per file); a folder
    means all such files in it."""
    suffixes = (".jsonl", ".jsonl.gz", ".txt")
    files = sorted(p for p in path.rglob("*") if p.name.endswith(suffixes)) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    for file in files:
        name = _file_name(file, root)
        if file.name.endswith((".jsonl", ".jsonl.gz")):
            for where, lineno, obj in _json_lines(file):
                yield _guarded(where, _text_record, obj, where, f"{name}-{lineno:06d}", lineno)
        else:
            for lineno, line in _text_lines(file):
                where = f"{file}:{lineno}"
                yield _guarded(where, _line_record, line, where, name, lineno)


def load_audio(rec: Record, sr: int, max_seconds: float | None) -> np.ndarray:
    """The record's span as float32 mono at ``sr``; raises Rejected when the audio is unusable."""
    audio, native = _cut_audio(rec.cut, max_seconds) if rec.cut is not None else _file_audio(rec, max_seconds)
    check_audio(audio, native, max_seconds)
    return resample(audio, native, sr)


def _file_audio(rec: Record, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """The record's span of its file (or tar member), mono at the file's rate, and that rate."""
    assert rec.audio is not None
    if not Path(rec.audio).exists():
        raise Rejected(MISSING_FILE)
    try:
        with sf.SoundFile(_audio_file(rec)) as f:
            native, frames = f.samplerate, f.frames
            if frames <= 0:
                raise Rejected(ZERO_LENGTH)
            start = round((rec.start or 0.0) * native)
            stop = frames if rec.end is None else round(rec.end * native)
            if frames < stop <= frames + RANGE_SLACK_S * native:
                stop = frames
            if start >= frames or stop > frames:
                raise Rejected(BAD_RANGE)
            check_length(stop - start, native, max_seconds)
            f.seek(start)
            audio = f.read(stop - start, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError):
        raise Rejected(UNREADABLE_AUDIO) from None
    if len(audio) < stop - start:
        raise Rejected(UNREADABLE_AUDIO)  # shorter than its header says: truncated
    return audio.mean(axis=1), native


def _cut_audio(cut_json: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """A lhotse cut's audio read by lhotse, its channels mixed to mono, at the recording's rate, and that rate."""
    from lhotse.serialization import deserialize_item

    try:
        cut = deserialize_item(json.loads(cut_json))
        frames, native, files = cut.num_samples, cut.sampling_rate, _recording_files(cut.recording)
    except _MALFORMED:
        raise Rejected(BAD_RECORD) from None
    check_length(frames, native, max_seconds)
    if not all(Path(f).is_file() for f in files):
        raise Rejected(MISSING_FILE)  # removed since it was listed
    try:
        audio = cut.load_audio()
    except Exception:  # noqa: BLE001 - lhotse's decoders raise anything (AssertionError, RuntimeError, ...)
        raise Rejected(UNREADABLE_AUDIO) from None
    return np.asarray(audio, dtype=np.float32).mean(axis=0), native


def _audio_file(rec: Record) -> str | io.BytesIO:
    """What to decode: the audio path, or (``byte_range`` set) the tar member's bytes."""
    assert rec.audio is not None
    if rec.byte_range is None:
        return rec.audio
    offset, size = rec.byte_range
    with open(rec.audio, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise Rejected(UNREADABLE_AUDIO)  # the tar is shorter than when it was listed
    return io.BytesIO(data)


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


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a file, gunzipped when its name ends in ``.gz``; InputError when the
    gzip stream is corrupt or truncated."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{path}: unreadable gzip ({exc})") from None


def _parse_json(raw: bytes) -> dict | Rejected:
    """A JSON object, or Rejected: undecodable_text (not UTF-8 or not JSON), bad_record (not an object)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return Rejected(UNDECODABLE_TEXT)
    return obj if isinstance(obj, dict) else Rejected(BAD_RECORD)


def _json_lines(path: Path) -> Iterator[tuple[str, int, dict | Rejected]]:
    """(``file:line``, line number, parsed object or a Rejected) for each non-blank line."""
    for lineno, raw in read_lines(path):
        if raw.strip():
            yield f"{path}:{lineno}", lineno, _parse_json(raw)


def _text_lines(path: Path) -> Iterator[tuple[int, str | Rejected]]:
    """(line number, decoded line or a Rejected) for each line of a UTF-8 text file."""
    for lineno, raw in read_lines(path):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            yield lineno, Rejected(UNDECODABLE_TEXT)


def _file_name(file: Path, root: Path) -> str:
    """A file's path under ``root`` without its format suffixes: the default document name prefix."""
    name = file.relative_to(root).as_posix()
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".parquet"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def _tar_samples(tar: Path) -> Iterator[tuple[str, str, dict | Rejected | None, tuple[int, int] | None, Path]]:
    """(``tar:key``, key, parsed JSON or None, audio member's (offset, size) or None, tar) per WebDataset
    sample, in order of first appearance; InputError when the tar itself is unreadable or cut short (tarfile
    ends quietly at a missing header, so a member whose data runs past the file's end is the sign)."""
    size = tar.stat().st_size
    try:
        with tarfile.open(tar) as tf:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for info in tf:
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"{info.name} is cut short: a truncated file")
                match = _WDS_MEMBER.fullmatch(info.name)
                if info.isfile() and match:
                    samples.setdefault(match[1], {})[match[2].lower()] = info
            for key, members in samples.items():
                meta = members.get("json")
                audio = next((members[e] for e in TAR_AUDIO if e in members), None)
                yield (f"{tar}:{key}", key, _parse_json(tf.extractfile(meta).read()) if meta else None,
                       None if audio is None else (audio.offset_data, audio.size), tar)
    except (tarfile.TarError, EOFError) as exc:
        raise InputError(f"{tar}: unreadable tar ({exc})") from None


def text_parquet(file: Path) -> Any:
    """The opened ``pyarrow.parquet.ParquetFile``; InputError when it is unreadable or has no string ``text``
    column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file}: unreadable parquet ({exc})") from None
    types = {f.name: f.type for f in parquet.schema_arrow}
    if not _is_string(types.get("text")):
        found = f"is {types['text']}" if "text" in types else "is missing"
        raise InputError(f"{file}: column 'text' {found} (columns: {', '.join(types)}); "
                         "a string 'text' column is required")
    return parquet


def _parquet_rows(file: Path) -> Iterator[tuple[Any, str | None]]:
    """(text, id or None) per row of a parquet file; InputError when it is unreadable or has no string
    ``text`` column."""
    import pyarrow as pa

    parquet = text_parquet(file)
    types = {f.name: f.type for f in parquet.schema_arrow}
    columns = ["text", "id"] if _is_string(types.get("id")) else ["text"]
    try:
        for batch in parquet.iter_batches(batch_size=4096, columns=columns):
            texts = batch.column("text").to_pylist()
            ids = batch.column("id").to_pylist() if "id" in columns else [None] * len(texts)
            yield from zip(texts, ids, strict=True)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file}: unreadable parquet ({exc})") from None


def _is_string(arrow_type: Any) -> bool:
    import pyarrow as pa

    return arrow_type is not None and (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))


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


def _lhotse_items(path: Path) -> Iterator[tuple[str, dict | Rejected]]:
    """(``file:line (cut id)``, the cut's dict or a Rejected) per cut; InputError when a manifest read whole
    is not a lhotse cut manifest."""
    if path.name.endswith(LHOTSE_JSONL):
        for where, _, obj in _json_lines(path):
            cut_id = obj.get("id") if isinstance(obj, dict) else None
            yield (f"{where} ({cut_id})" if isinstance(cut_id, str) else where), obj
        return
    from lhotse import CutSet

    try:
        cuts = CutSet.from_file(path)
    except Exception as exc:  # noqa: BLE001 - lhotse raises ValueError, JSON and YAML errors, ...
        raise InputError(f"{path}: not a lhotse cut manifest ({exc})") from None
    for n, cut in enumerate(cuts, 1):
        yield f"{path}:{n} ({cut.id})", cut.to_dict()


def _cut_record(obj: dict | Rejected, where: str, base: Path) -> Record:
    from lhotse.serialization import deserialize_item

    if _ok(obj).get("type") in ("MixedCut", "PaddingCut"):
        raise Rejected(UNSUPPORTED_CUT)  # audio of several cuts, or none
    if "recording" in obj:
        obj.setdefault("type", "MonoCut")  # lhotse before v0.8 wrote no type
    try:
        return _lhotse_record(deserialize_item(obj), where, base)
    except _MALFORMED:
        raise Rejected(BAD_RECORD) from None


def _lhotse_record(cut: Any, where: str, base: Path) -> Record:
    from lhotse.cut.data import DataCut
    from lhotse.utils import fastcopy

    if not isinstance(cut, DataCut) or not cut.has_recording:
        raise Rejected(UNSUPPORTED_CUT)
    recording = cut.recording
    if not all(isinstance(i, str) and i for i in (cut.id, recording.id)):
        raise Rejected(BAD_RECORD)
    start, duration, length = (_seconds(t) for t in (cut.start, cut.duration, recording.duration))
    if not _valid_range(start, start + duration) or start + duration > length + RANGE_SLACK_S:
        raise Rejected(BAD_RANGE)
    text, words = _cut_text(cut)
    recording = recording.with_path_prefix(base)
    if not all(Path(f).is_file() for f in _recording_files(recording)):
        raise Rejected(MISSING_FILE)
    # the audio's cut: no supervisions (read above), ending at the recording's end; its recording serialized
    # apart, as DataCut.to_dict does (after serializing it once more inside asdict: twice the cost)
    audio = fastcopy(cut, duration=min(duration, length - start), recording=None, supervisions=[], features=None,
                     custom=None).to_dict() | {"recording": recording.to_dict()}
    first = recording.sources[0].source
    return Record(input=where, uid=cut.id, doc=_cut_doc(recording.id), text=text,
                  audio=first if isinstance(first, str) else recording.id, start=start, end=start + duration,
                  words=words, cut=json.dumps(audio, ensure_ascii=False, separators=(",", ":")))


def _recording_files(recording: Any) -> list[str]:
    """The local files a lhotse recording reads."""
    return [s.source for s in recording.sources if s.type == "file"]


def _cut_text(cut: Any) -> tuple[str, list[list[Any]] | None]:
    """The cut's supervisions' text, in time order: each one's LibriHeavy book text (``custom.texts[0]``,
    cased and punctuated) when present, else its ``text``. Word timings (seconds from the cut's start) when
    every supervision with text has a word alignment (``alignment["word"]``, whose times lhotse counts from
    the recording's start) of exactly its text's words, inside the cut; else None (``--align`` can time them).
    """
    texts: list[str] = []
    words: list[list[Any]] | None = []
    for sup in sorted(cut.supervisions, key=lambda s: _seconds(s.start)):
        book = sup.custom.get("texts") if isinstance(sup.custom, dict) else None
        value = book[0] if isinstance(book, list) and book else sup.text
        if value is not None and not isinstance(value, str):
            raise Rejected(BAD_RECORD)
        tokens = (value or "").split()
        if not tokens:
            continue
        texts.append(" ".join(tokens))
        items = [a for a in (sup.alignment or {}).get("word") or [] if a.symbol.strip()]
        if words is None or len(items) != len(tokens):
            words = None
            continue
        for token, item in zip(tokens, items, strict=True):
            lo, hi = _seconds(item.start) - cut.start, _seconds(item.start) + _seconds(item.duration) - cut.start
            words.append([token, round(lo, 6), round(hi, 6)])
    if words and not all(-RANGE_SLACK_S <= lo <= hi <= cut.duration + RANGE_SLACK_S for _, lo, hi in words):
        words = None
    return _text(" ".join(texts)), words or None


def _cut_doc(recording_id: str) -> str:
    """LibriHeavy: the folder of the recording (``small/100/sea_fairies_.../01_baum_...`` ->
    ``small/100/sea_fairies_...``: one reading of a book, where ``custom.text_path`` would merge a book's
    readers); Emilia's recipe: the source recording of a window (``EN_B00000_S00000_W000001`` ->
    ``EN_B00000_S00000``, as for its tars); else the recording itself."""
    if "/" in recording_id:
        return recording_id.rsplit("/", 1)[0]
    window = _WINDOW_ID.fullmatch(recording_id)
    return window[1] if window else recording_id


def _emilia_record(meta: dict | Rejected | None, byte_range: tuple[int, int] | None, where: str, key: str,
                   tar: Path, n: int) -> Record:
    if meta is None:
        raise Rejected(BAD_RECORD)  # audio without its JSON: no transcript
    meta = _ok(meta)
    text = _text(meta.get("text"))
    uid = _field(meta, "id", str) or _field(meta, "_id", str) or key
    window = _WINDOW_ID.fullmatch(uid)
    doc, pos = (window[1], int(window[2])) if window else (_field(meta, "speaker", str) or uid, n)
    if byte_range is None:
        raise Rejected(MISSING_FILE)
    return Record(input=where, uid=uid, doc=doc, pos=pos, text=text, audio=str(tar), byte_range=byte_range)


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
    row_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    doc = _field(obj, "doc", str) or row_id or default_doc
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


def _seconds(value: Any) -> float:
    """A time in seconds from a lhotse object (which does not check types); bad_record if not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(BAD_RECORD)
    return float(value)


def _valid_range(start: float | None, end: float | None) -> bool:
    """Finite, non-negative, and start < end when both are given (the file's length is checked later)."""
    if any(t is not None and (not math.isfinite(t) or t < 0) for t in (start, end)):
        return False
    return end is None or end > (start or 0.0)
