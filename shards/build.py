"""Offline shard builder: ``python -m shards.build --input PATH --out DIR [...]``.

Why it is planned first: reading the input lists (``shards.sources``) is cheap, so the ordered list
of chunks (the plan) is fixed before any audio is touched. Worker processes then read, resample and
encode chunks in plan order (ordered ``imap``), and the main process rolls shards by size. Output
therefore depends only on the input and the settings, never on ``--workers`` or timing.

Why it resumes: after each ``shard-NNNNNN.tar`` a sidecar ``shard-NNNNNN.json`` records the plan
fingerprint, the range of plan chunks the shard consumed, its sha256 and the rejects found while
encoding it. A re-run trusts the longest prefix of shards whose tar matches its sidecar and goes on
from there; ``index.json`` is written last, so its presence means the build is complete. The
fingerprint covers the settings and the plan (paths, texts, ranges), not the bytes of audio files:
after editing audio in place, build into a fresh folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shards import sources
from shards.align import Unaligned, WordAligner, load_aligner
from shards.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    REJECTS_NAME,
    Chunk,
    Segment,
    atomic_write_bytes,
    atomic_write_json,
    encode_chunk,
    read_index,
    safe_key,
    write_samples,
)
from shards.sources import Record, Rejected
from shards.tts import TTS, TTSConfig, TTSError, make_tts

BUILDER_VERSION = 1
UNALIGNED = "unaligned"   # a spoken segment forced alignment could not time: kept without word timings
_SHARD_FILE = re.compile(r"shard-(\d{6})\.(tar|json)")
_TEMP_FILE = re.compile(r"\.(shard-\d{6}\.(tar|json)|index\.json|rejects\.jsonl)\..*\.tmp")
_TAR_BLOCK = 512


class BuildError(RuntimeError):
    """A problem with the whole build (no input, nothing usable): reported as one line, exit 1."""


@dataclass
class BuildConfig:
    input: Path
    out: Path
    sr: int = 16000
    format: str = "auto"
    audio_root: Path | None = None  # relative audio paths of manifests and cuts; None = the manifest's folder
    tts: TTSConfig | None = None
    workers: int = 1
    shard_size_mb: float = 256.0
    max_seconds: float | None = None
    chunk_segments: int = 16
    source: str = ""
    lang: str = "en"
    seed: int = 0
    part: tuple[int, int] = (0, 1)   # (rank, world): build only this process's share of the documents
    align: str = ""   # forced-alignment model giving spoken segments without timings their words (shards.align)
    align_device: str = "auto"   # auto: a GPU when the worker sees one (MMS_FA runs ~2x real time per CPU core)

    def __post_init__(self) -> None:
        if not 0 <= self.part[0] < self.part[1]:
            raise ValueError(f"part: rank {self.part[0]} outside world size {self.part[1]}")


@dataclass
class PlannedChunk:
    """One future sample: consecutive segments of one doc; ``first`` is the plan-wide segment index."""

    index: int
    key: str
    doc: str
    first: int
    records: list[Record]


@dataclass
class ChunkResult:
    """A planned chunk after its audio was read: the encoded sample (None if all rejected) and rejects."""

    index: int
    doc: str
    sample: dict[str, Any] | None
    segments: int
    seconds: float
    rejects: list[tuple[str, str]]


def make_plan(records: list[Record], chunk_segments: int) -> list[PlannedChunk]:
    """Accepted records grouped by doc (docs in order of first appearance, segments by pos) into chunks."""
    docs: dict[str, list[Record]] = {}
    for rec in records:
        if rec.reject is None:
            docs.setdefault(rec.doc, []).append(rec)
    plan: list[PlannedChunk] = []
    first = 0
    for doc, base in zip(docs, _doc_bases(docs), strict=True):
        recs = sorted(docs[doc], key=lambda r: r.pos)
        for i in range(0, len(recs), chunk_segments):
            part = recs[i:i + chunk_segments]
            plan.append(PlannedChunk(len(plan), f"{base}-{i // chunk_segments:05d}", doc, first, part))
            first += len(part)
    return plan


def share_of_plan(plan: list[PlannedChunk], rank: int, world: int) -> list[PlannedChunk]:
    """The chunks of every ``world``-th document (in plan order) from the ``rank``-th, renumbered: each keeps its
    key and its plan-wide segment index, which picks the TTS variant, so the parts speak what a whole build would."""
    docs = {doc: i for i, doc in enumerate(dict.fromkeys(c.doc for c in plan))}
    return [replace(c, index=i) for i, c in enumerate(c for c in plan if docs[c.doc] % world == rank)]


def _doc_bases(docs: Iterable[str]) -> list[str]:
    """A distinct key prefix per doc (safe_key can map two docs to one string: add a hash then)."""
    bases, used = [], set()
    for doc in docs:
        base, attempt = safe_key(doc), 0
        while base in used:
            attempt += 1
            base = safe_key(f"{doc}-{hashlib.sha1(f'{attempt}:{doc}'.encode()).hexdigest()[:8]}")
        used.add(base)
        bases.append(base)
    return bases


def fingerprint(plan: list[PlannedChunk], cfg: BuildConfig) -> str:
    """Everything that decides the output bytes (not --workers): a shard is reused only if this matches."""
    settings = {"builder_version": BUILDER_VERSION, "format_version": FORMAT_VERSION, "sr": cfg.sr,
                "tts": asdict(cfg.tts) if cfg.tts else None, "shard_size_mb": cfg.shard_size_mb,
                "max_seconds": cfg.max_seconds, "source": cfg.source, "lang": cfg.lang, "seed": cfg.seed,
                "align": cfg.align}
    blob = json.dumps([settings, [asdict(c) for c in plan]], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- worker processes

@dataclass
class _Worker:
    cfg: BuildConfig
    tts: TTS | None
    aligner: WordAligner | None


_worker: _Worker | None = None


def _init_worker(cfg: BuildConfig, tts: TTS | None) -> None:
    global _worker
    device = cfg.align_device
    if device == "auto":   # decided in the worker: a parent that touched CUDA could not fork workers that use it
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _worker = _Worker(cfg, tts, load_aligner(cfg.align, device) if cfg.align else None)


def _init_pool_worker(cfg: BuildConfig, tts: TTS | None) -> None:
    torch.set_num_threads(1)  # one process per core already (and a forked OpenMP pool is unsafe)
    _init_worker(cfg, tts)


def _process_chunk(task: PlannedChunk) -> ChunkResult:
    """Read (or synthesize) every segment of a chunk and encode the chunk as one sample."""
    assert _worker is not None, "worker was not initialised"
    segments, rejects = [], []
    aligner = _worker.aligner
    for i, rec in enumerate(task.records):
        try:
            segment = _segment(rec, task.first + i)
        except Rejected as exc:
            rejects.append((rec.input, exc.reason))
            continue
        if aligner is not None and segment.audio is not None and not segment.words:
            try:
                segment.words = aligner.align(segment.audio, segment.sr, segment.text)
            except Unaligned as exc:   # kept, as a whole-segment span; counted with the reason in the input
                rejects.append((f"{rec.input} ({exc})", UNALIGNED))
        segments.append(segment)
    cfg = _worker.cfg
    chunk = Chunk(key=task.key, doc=task.doc, source=cfg.source, lang=cfg.lang, segments=segments)
    return ChunkResult(task.index, task.doc, encode_chunk(chunk) if segments else None, len(segments),
                       chunk.seconds, rejects)


def _segment(rec: Record, index: int) -> Segment:
    """One segment at the target rate: audio from its file, synthesized speech, or text only."""
    assert _worker is not None
    cfg, tts = _worker.cfg, _worker.tts
    if rec.audio is not None:
        audio = sources.load_audio(rec, cfg.sr, cfg.max_seconds)
    elif tts is not None:
        try:
            audio = tts.synthesize(rec.text, variant=cfg.seed + index)
        except TTSError:
            raise Rejected(sources.TTS_FAILED) from None
        sources.check_audio(audio, cfg.sr, cfg.max_seconds)
    else:
        return Segment(rec.text, words=rec.words)
    return Segment(rec.text, audio=audio, sr=cfg.sr, words=rec.words)


@contextmanager
def _results(plan: list[PlannedChunk], cfg: BuildConfig, tts: TTS | None) -> Iterator[Iterator[ChunkResult]]:
    """Processed chunks in plan order: in this process, or (--workers > 1) from a process pool."""
    if cfg.workers <= 1 or len(plan) <= 1:
        _init_worker(cfg, tts)
        yield map(_process_chunk, plan)
        return
    with mp.Pool(min(cfg.workers, len(plan)), initializer=_init_pool_worker, initargs=(cfg, tts)) as pool:
        yield pool.imap(_process_chunk, plan)


# ----------------------------------------------------------------------------- shards on disk

def shard_name(n: int, ext: str = "tar") -> str:
    return f"shard-{n:06d}.{ext}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a header block per member plus its data padded to blocks."""
    sizes = [len(v) for k, v in sample.items() if k != "__key__"]
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in sizes)


def trusted_shards(out: Path, fp: str) -> list[dict[str, Any]]:
    """Sidecars of the longest run of shards from 0 that belong to this plan and match their tar."""
    trusted: list[dict[str, Any]] = []
    next_chunk = 0
    while True:
        n = len(trusted)
        tar, side = out / shard_name(n), out / shard_name(n, "json")
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            return trusted
        if (not isinstance(meta, dict) or meta.get("fingerprint") != fp
                or meta.get("first_chunk") != next_chunk or not tar.is_file()
                or _sha256_file(tar) != meta.get("sha256")):
            return trusted
        trusted.append(meta)
        next_chunk = meta["next_chunk"]


@dataclass
class ShardWriter:
    """Collects processed chunks in plan order and writes a shard (tar, then sidecar) once it is full."""

    out: Path
    max_bytes: int
    fp: str
    shard: int
    next_chunk: int
    written: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    docs: list[str] = field(default_factory=list)
    rejects: list[tuple[str, str]] = field(default_factory=list)
    segments: int = 0
    seconds: float = 0.0
    size: int = 0
    first_chunk: int = 0

    def __post_init__(self) -> None:
        self.first_chunk = self.next_chunk

    def add(self, result: ChunkResult) -> None:
        self.next_chunk = result.index + 1
        self.rejects.extend(result.rejects)
        if result.sample is not None:
            self.samples.append(result.sample)
            self.docs.append(result.doc)
            self.segments += result.segments
            self.seconds += result.seconds
            self.size += _sample_bytes(result.sample)
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the pending chunks as the next shard; rejects of trailing empty chunks stay pending."""
        if not self.samples:
            return
        sha256 = write_samples(self.out / shard_name(self.shard), self.samples)
        meta = {"fingerprint": self.fp, "first_chunk": self.first_chunk, "next_chunk": self.next_chunk,
                "url": shard_name(self.shard), "keys": [s["__key__"] for s in self.samples],
                "docs": list(dict.fromkeys(self.docs)), "segments": self.segments,
                "seconds": round(self.seconds, 3), "sha256": sha256,
                "rejects": [list(r) for r in self.rejects]}
        atomic_write_json(self.out / shard_name(self.shard, "json"), meta)
        self.written.append(meta)
        self.shard += 1
        self.first_chunk = self.next_chunk
        self.samples, self.docs, self.rejects = [], [], []
        self.segments, self.seconds, self.size = 0, 0.0, 0


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file (and its mtime) alone."""
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)


def _remove_stale(out: Path, n_shards: int) -> None:
    """Drop temp files of killed writes and shards past the end (left by an earlier, larger build)."""
    for path in out.iterdir():
        m = _SHARD_FILE.fullmatch(path.name)
        if (m and int(m.group(1)) >= n_shards) or _TEMP_FILE.fullmatch(path.name):
            path.unlink(missing_ok=True)


def _shard_entries(sidecars: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"url": s["url"], "chunks": len(s["keys"]), "docs": len(s["docs"]), "segments": s["segments"],
             "seconds": s["seconds"], "sha256": s["sha256"]} for s in sidecars]


def make_index(cfg: BuildConfig, fp: str, shards: list[dict[str, Any]], rejects: list[tuple[str, str]]) -> dict:
    counts = Counter(reason for _, reason in rejects)
    return {"format_version": FORMAT_VERSION, "builder_version": BUILDER_VERSION, "source": cfg.source,
            "sr": cfg.sr, "fingerprint": fp,
            "shards": _shard_entries(shards),
            "docs": len({d for s in shards for d in s["docs"]}),
            "segments": sum(s["segments"] for s in shards),
            "seconds": round(sum(s["seconds"] for s in shards), 3),
            "rejects": dict(sorted(counts.items()))}


# ----------------------------------------------------------------------------- the build

def build(cfg: BuildConfig, console: Console | None = None) -> dict[str, Any]:
    """Build (or finish, or confirm) the shard set in ``cfg.out``; returns its index."""
    if not cfg.input.exists():
        raise BuildError(f"--input {cfg.input}: no such file or directory")
    fmt = sources.detect_format(cfg.input) if cfg.format == "auto" else cfg.format
    cfg = replace(cfg, source=cfg.source or Path(cfg.input.name.removesuffix(".gz")).stem)
    records = sources.read_records(cfg.input, fmt, cfg.audio_root)
    if not records:
        raise BuildError(f"--input {cfg.input}: no inputs found (read as {fmt})")
    tts = make_tts(cfg.tts, cfg.sr) if cfg.tts and fmt in sources.TEXT_FORMATS else None
    plan = make_plan(records, cfg.chunk_segments)
    rank, world = cfg.part
    if world > 1:
        plan = share_of_plan(plan, rank, world)
        if rank:   # inputs rejected before any work are reported once, by part 0
            records = [r for r in records if r.reject is None]
    fp = fingerprint(plan, cfg)
    done = trusted_shards(cfg.out, fp)
    index = _complete_index(cfg.out, fp, done)
    if index is not None:
        return index  # complete and unchanged: touch nothing
    writer = _start(cfg, fp, done)
    _run(plan, writer, cfg, tts, console or Console(stderr=True))
    return _finish(cfg, fp, records, done + writer.written, writer.rejects)


def _complete_index(out: Path, fp: str, done: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The existing index if it describes exactly the trusted shards of this plan, else None."""
    try:
        index = json.loads((out / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(index, dict) and index.get("fingerprint") == fp
    return index if same and index.get("shards") == _shard_entries(done) else None


def _start(cfg: BuildConfig, fp: str, done: list[dict[str, Any]]) -> ShardWriter:
    """Mark the set incomplete (no index), clear what a killed or different build left, resume after done."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / INDEX_NAME).unlink(missing_ok=True)
    _remove_stale(cfg.out, len(done))
    return ShardWriter(cfg.out, int(cfg.shard_size_mb * 2**20), fp, len(done),
                       done[-1]["next_chunk"] if done else 0)


def _finish(cfg: BuildConfig, fp: str, records: list[Record], shards: list[dict[str, Any]],
            trailing: list[tuple[str, str]]) -> dict[str, Any]:
    """Write rejects.jsonl (input order, then plan order), then index.json last."""
    rejects = ([(r.input, r.reject) for r in records if r.reject]
               + [tuple(r) for s in shards for r in s["rejects"]] + trailing)
    lines = "".join(json.dumps({"input": i, "reason": r}, ensure_ascii=False) + "\n" for i, r in rejects)
    _write_if_changed(cfg.out / REJECTS_NAME, lines.encode("utf-8"))
    if not shards and cfg.part[1] == 1:   # a part may be empty; merge_parts checks the whole
        raise BuildError(f"--input {cfg.input}: all {len(rejects)} inputs rejected "
                         f"({_reasons(Counter(r for _, r in rejects))}); see {cfg.out / REJECTS_NAME}")
    index = make_index(cfg, fp, shards, rejects)
    atomic_write_json(cfg.out / INDEX_NAME, index)
    return index


def _run(plan: list[PlannedChunk], writer: ShardWriter, cfg: BuildConfig, tts: TTS | None,
         console: Console) -> None:
    """Process the plan from the writer's resume point, with a progress bar over chunks."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[hours]:.2f} h"), TimeElapsedColumn())
    # the pool (if any) starts before the progress bar's thread: forking a process with threads is unsafe
    with (_results(plan[writer.next_chunk:], cfg, tts) as results,
          Progress(*columns, console=console, transient=True,
                   disable=not console.is_terminal) as progress):
        bar = progress.add_task(f"shards -> {cfg.out}", total=len(plan), completed=writer.next_chunk,
                                hours=0.0)
        hours = 0.0
        for result in results:
            writer.add(result)
            hours += result.seconds / 3600
            progress.update(bar, advance=1, hours=hours)
        writer.flush()


def _reasons(counts: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def summary(index: dict[str, Any], out: Path) -> str:
    rejects = index["rejects"]
    seconds = index["seconds"]
    audio = f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.1f} s"
    return (f"{out}: {len(index['shards'])} shards, {index['docs']} docs, {index['segments']} segments, "
            f"{audio} audio, {sum(rejects.values())} rejects ({_reasons(rejects)})")


# ----------------------------------------------------------------------------- command line

def _csv(kind: Callable[[str], Any]) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x]


def _number(text: str) -> int | float:
    """A speed as written: espeak-ng's words per minute are whole numbers, Kokoro's factors are not."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    p = argparse.ArgumentParser(prog="python -m shards.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True,
                   help="manifest .jsonl, LibriSpeech-style folder, lhotse cut manifest .jsonl.gz (LibriHeavy, "
                        "lhotse's Emilia recipe), Emilia .tar or folder of tars, .parquet or folder of them, or text "
                        "(.jsonl, .jsonl.gz, .txt)")
    p.add_argument("--out", type=Path, required=True, help="output folder of the shard set")
    p.add_argument("--sr", type=int, default=16000, help="sample rate of the shards' audio")
    p.add_argument("--format", choices=("auto", *sources.FORMATS), default="auto",
                   help="auto: by suffix, or a JSONL's first record (lhotse: a cut; a lhotse .json or .yaml "
                        "manifest needs --format lhotse)")
    p.add_argument("--audio-root", type=Path, default=None,
                   help="folder that relative audio paths of a manifest or cuts are under (default: its folder)")
    p.add_argument("--tts", choices=("espeak-ng", "command", "kokoro"), help="synthesize text-only input to speech")
    p.add_argument("--tts-voices", type=_csv(str), default=None,
                   help="comma-separated voices (default: espeak-ng en-us; kokoro af_heart)")
    p.add_argument("--tts-speeds", type=_csv(_number), default=None,
                   help="comma-separated speeds: espeak-ng words per minute (default 160), kokoro factors (1.0)")
    p.add_argument("--tts-pitches", type=_csv(int), default=[50], help="comma-separated pitches 0..99")
    p.add_argument("--tts-noise-snr-db", type=_csv(float), default=[],
                   help="comma-separated signal-to-noise ratios (dB) of white noise cycled over texts; default clean")
    p.add_argument("--tts-command", default="", help="command backend template, e.g. 'say -o {wav} {text}'")
    p.add_argument("--tts-long-lived", action="store_true",
                   help="command backend: one synthesizer process per worker, one JSON request per line on stdin")
    p.add_argument("--tts-model-path", default="",
                   help="kokoro: a local folder with config.json, the weights (*.pth) and voices/<voice>.pt")
    p.add_argument("--tts-device", default="auto", help="kokoro: auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--shard-size-mb", type=float, default=256.0, help="roll to a new shard at this size")
    p.add_argument("--max-seconds", type=float, default=None, help="reject longer segments")
    p.add_argument("--chunk-segments", type=int, default=16, help="segments per chunk (sample)")
    p.add_argument("--source", default="", help="source name stored in samples (default: input's name)")
    p.add_argument("--lang", default="en")
    p.add_argument("--seed", type=int, default=0, help="offsets the TTS voice/speed/pitch variants")
    p.add_argument("--align", default="", metavar="MODEL",
                   help="give spoken segments without word timings their words by forced alignment: mms_fa, a "
                        "transformers CTC checkpoint folder, or module:argument (e.g. toy.align:assets/toy/encoder)")
    p.add_argument("--align-device", default="auto", help="cpu, cuda, cuda:N; auto: a GPU when there is one")
    a = p.parse_args(argv)
    for name in ("sr", "workers", "shard_size_mb", "chunk_segments", "max_seconds"):
        value = getattr(a, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:
        tts = TTSConfig(backend=a.tts, voices=a.tts_voices, speeds=a.tts_speeds, pitches=a.tts_pitches,
                        noise_snr_db=a.tts_noise_snr_db, command=shlex.split(a.tts_command),
                        long_lived=a.tts_long_lived, model_path=a.tts_model_path,
                        device=a.tts_device) if a.tts else None
    except ValueError as exc:
        p.error(f"--tts: {exc}")
    return BuildConfig(input=a.input, out=a.out, sr=a.sr, format=a.format, audio_root=a.audio_root, tts=tts,
                       workers=a.workers, shard_size_mb=a.shard_size_mb, max_seconds=a.max_seconds,
                       chunk_segments=a.chunk_segments, source=a.source, lang=a.lang, seed=a.seed, align=a.align,
                       align_device=a.align_device)


PARTS_DIR = ".parts"   # inside a shard set built by several processes: one shard set per process, until merged


def build_texts(docs: list[tuple[str, str]], out: Path, tts: TTSConfig | None = None, sr: int = 16000,
                workers: int = 1, source: str = "", chunk_segments: int = 16, seed: int = 0,
                part: tuple[int, int] = (0, 1), barrier: Callable[[], None] = lambda: None) -> Path:
    """Build ``(doc id, text)`` pairs into the shard set ``out`` (consecutive pairs of one doc are its segments),
    spoken by ``tts`` or as text-only segments when it is None; nothing to do when ``out`` is complete, and
    resumable like every build.

    Split across processes: with ``part=(rank, world)`` every process of a job calls this with the same
    arguments and speaks every world-th document into its own folder under ``out/.parts``; ``barrier`` (the
    job's) waits for all of them, rank 0 merges the parts into ``out`` (``merge_parts``), and a second barrier
    releases the others. So no rank sits idle in a collective while one synthesizes everything."""
    if (out / INDEX_NAME).is_file():
        return out
    rank, world = part
    folder = out if world == 1 else part_folder(out, rank, world)
    with tempfile.TemporaryDirectory() as tmp:
        texts = Path(tmp) / "texts.jsonl"
        texts.write_text("".join(json.dumps({"text": text, "doc": doc}) + "\n" for doc, text in docs))
        build(BuildConfig(input=texts, out=folder, sr=sr, format="text", tts=tts, workers=workers,
                          chunk_segments=chunk_segments, source=source, seed=seed, part=part))
    if world > 1:
        barrier()
        error = None
        if rank == 0:
            try:
                merge_parts(out, [part_folder(out, r, world) for r in range(world)])
            except (BuildError, OSError) as exc:
                error = exc
        barrier()
        if error is not None:
            raise error
        if not (out / INDEX_NAME).is_file():
            raise BuildError(f"{out}: rank 0 did not merge the parts (see its error)")
    return out


def part_folder(out: Path, rank: int, world: int) -> Path:
    return out / PARTS_DIR / f"{rank:05d}-of-{world:05d}"


def merge_parts(out: Path, parts: list[Path]) -> dict[str, Any]:
    """One shard set in ``out`` from shard sets built apart (``BuildConfig.part``): their shards hard-linked under
    the set's own names in part order, their rejects added up, the index written last; then the parts removed.
    A merge killed halfway is done again from the parts."""
    indexes = [read_index(p) for p in parts]
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for folder, index in zip(parts, indexes, strict=True):
        for entry in index["shards"]:
            target = out / shard_name(len(shards))
            target.unlink(missing_ok=True)
            try:
                os.link(folder / entry["url"], target)
            except OSError:   # another file system, or no hard links there
                shutil.copyfile(folder / entry["url"], target)
            shards.append({**entry, "url": target.name})
    rejects = "".join((p / REJECTS_NAME).read_text() for p in parts if (p / REJECTS_NAME).is_file())
    _write_if_changed(out / REJECTS_NAME, rejects.encode("utf-8"))
    counts = Counter()
    for index in indexes:
        counts.update(index.get("rejects", {}))
    if not shards:
        raise BuildError(f"{out}: all {sum(counts.values())} inputs rejected ({_reasons(counts)}); "
                         f"see {out / REJECTS_NAME}")
    merged = {**indexes[0], "fingerprint": hashlib.sha256("".join(i["fingerprint"] for i in indexes).encode())
              .hexdigest(), "shards": shards, "docs": sum(i["docs"] for i in indexes),
              "segments": sum(i["segments"] for i in indexes),
              "seconds": round(sum(i["seconds"] for i in indexes), 3), "rejects": dict(sorted(counts.items()))}
    atomic_write_json(out / INDEX_NAME, merged)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return merged


def synthesize_texts(docs: list[tuple[str, str]], out: Path, tts: TTSConfig, sr: int, workers: int = 1,
                     source: str = "", part: tuple[int, int] = (0, 1),
                     barrier: Callable[[], None] = lambda: None) -> Path:
    """Speak ``(doc id, text)`` pairs into the shard set ``out``, one segment per document (spoken benchmark
    contexts, which are spoken whole); ``part``, ``barrier``: split across processes (``build_texts``)."""
    return build_texts(docs, out, tts, sr, workers, source, chunk_segments=1, part=part, barrier=barrier)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """A text's sentences, each keeping its final punctuation."""
    return [s.strip() for s in SENTENCE_END.split(text.strip()) if s.strip()]


def cut_pieces(text: str, rng: np.random.Generator, words: tuple[int, int] = (3, 10)) -> list[str]:
    """``text`` cut at random words into consecutive pieces of ``words`` words (a shorter last piece joins the
    one before), one segment each: about a sentence, most with a sentence boundary inside.

    Without word timings a speech span is made of whole segments (model.inputs), so a text spoken as one
    segment is all speech: nothing follows it to distil on. Pieces put speech-to-text switches everywhere, as in
    the benchmarks, where a spoken context ends mid-sentence and the answer follows as text. Pieces that cross
    sentence boundaries matter too: a benchmark context is one utterance of several sentences, and a student
    trained on one sentence per utterance lost the words after each full stop (toy narrative word error 0.25
    with sentences cut in two, 0.20 with pieces: docs/toy.md, "Natural speech").
    """
    lo, hi = words
    if not 1 <= lo <= hi:
        raise ValueError(f"cut_pieces: words must be 1 <= lo <= hi, got {words}")
    tokens = text.split()
    pieces, start = [], 0
    while start < len(tokens):
        end = start + int(rng.integers(lo, hi + 1))
        if len(tokens) - end < lo:
            end = len(tokens)
        pieces.append(" ".join(tokens[start:end]))
        start = end
    return pieces


def synthesize_documents(docs: list[tuple[str, str]], out: Path, tts: TTSConfig, sr: int, workers: int = 1,
                         source: str = "", seed: int = 0, part: tuple[int, int] = (0, 1),
                         barrier: Callable[[], None] = lambda: None) -> Path:
    """Speak ``(doc id, text)`` pairs as training documents: each text cut into segments (cut_pieces), so
    that training interleaves speech and text inside it as it does in natural speech; ``part``, ``barrier``:
    split across processes (``build_texts``)."""
    rng = np.random.default_rng([seed, 29])
    segments = [(doc, segment) for doc, text in docs for segment in cut_pieces(text, rng)]
    return build_texts(segments, out, tts, sr, workers, source, seed=seed, part=part, barrier=barrier)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    console = Console(stderr=True)
    try:
        index = build(cfg, console)
    except (BuildError, TTSError, OSError, sources.InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(index, cfg.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
