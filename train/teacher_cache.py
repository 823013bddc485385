"""Cached teacher targets: the frozen teacher's top-k next-token log-probabilities, once per shard set.

    python -m train.teacher_cache --config CONFIG [--round R] [--set SHARD_SET_DIR ...] [--top-k K]
        [--dtype float16|float32] [--device DEVICE] [--batch-tokens N] [key=value ...]

Why: the teacher (the config's LLM in teacher mode: its base weights, LoRA or not) never changes, yet the
live distillation loss runs it over every batch of every epoch. This runs it once over the text of every
chunk and stores beside the shards what the loss needs of it at every position: the top-k token ids, their
log-probabilities and the log of the remaining mass (``train.losses.topk_log_probs``, at
``loss.temperature``). Training then skips the teacher's forward pass and head, and
``train.losses.topk_distillation_loss`` takes the KL over those k tokens plus one bin for the rest (exact
for k = vocabulary size, a lower bound below it).

Per document, not per packed row: training packs several documents into a row, and a teacher reading the
row attends across them, so a document's targets depend on what happens to be packed before it (the toy
teacher's moved by 0.35 nats of KL on average, bench/teacher_cache.py). A cache cannot know the packing, so it
holds each document read alone, and training uses it only with ``loss.teacher_context: document``, where the
live teacher reads each document alone too: cached and live targets are then the same.

On disk, beside the shards of each set (default: every set the round trains on, speech and text):

    <set>/teacher-topk/stamp.json                what produced the cache (model, tokenizer, temperature, k)
    <set>/teacher-topk/<shard-stem>.safetensors  per shard, its chunks in order: ids (int32, the teacher's
        tokens) and token_offsets; topk_ids [rows, k] (int32), topk_logp [rows, k], rest_logp [rows]
        (float32) and row_offsets, where a chunk's row j is the distribution after its token j (j < n - 1).
        Metadata: keys (the chunk keys), shard_sha256, stamp.

Files are written whole (temp + rename); a shard whose file exists for the same shard sha256 is skipped, so a
killed run resumes. A stamp that differs from this run's settings is refused, naming the file and the field.
With RANK / WORLD_SIZE set (torchrun), each process takes every WORLD_SIZE-th shard of a set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor

from model.build import resolve_dtype
from model.inputs import Batch, Document, InputsConfig, interleave, text_document
from model.masks import valid_mask
from shards.format import (
    ShardFormatError,
    atomic_write_bytes,
    atomic_write_json,
    read_index,
    read_shard,
    shard_urls,
)
from train import distributed
from train.losses import topk_log_probs

log = logging.getLogger(__name__)

CACHE_DIR = "teacher-topk"
STAMP_NAME = "stamp.json"
VERSION = 1
LOGP_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Stamp fields that must equal the run's for the targets to be its teacher's. ``model`` (the path) is only
# informative: a moved copy of the same weights is the same teacher. ``context`` may exceed the run's.
IDENTITY = ("version", "model_config_sha256", "weights", "llm_dtype", "tokenizer_sha256", "bos_token_id",
            "temperature")
Targets = tuple[Tensor, Tensor, Tensor]   # top-k ids [n, k], their log-probs [n, k], rest log-mass [n]


class TeacherCacheError(ValueError):
    """A cache is stale, incomplete or does not fit the run; the message names the file and the field."""


# ---- what the teacher reads ------------------------------------------------------------------------------
def teacher_ids(chunk, tokenizer, inputs: InputsConfig, text: bool) -> list[int]:
    """The teacher's tokens for a chunk as training builds them, cut to the context.

    Text sets: ``text_document``'s. Speech sets: ``interleave``'s with every unit read as text (one span).
    Training tokenizes span by span, which gives the same tokens when the tokenizer splits words at spaces;
    training compares the tokens before it uses a document's targets."""
    if text:
        doc = text_document(chunk, tokenizer)
    else:
        one_span = dataclasses.replace(inputs, text_words=[1 << 30, 1 << 30], speech_first_prob=0.0)
        doc = interleave(chunk, tokenizer, one_span, np.random.default_rng(0))
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return (bos + [t for span in doc.spans for t in span.ids])[: inputs.context]


def read_text(url: str) -> list:
    """A shard's chunks without decoding their audio, which the teacher never hears. A one-sample stand-in
    marks each spoken segment: ``interleave`` takes words from timings for spoken segments only."""
    chunks = list(read_shard(url, decode_audio=False))
    for seg in (seg for chunk in chunks for seg in chunk.segments):
        if seg.sr:
            seg.audio = np.zeros(1, dtype=np.float32)
    return chunks


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha256(backend.to_str().encode())
    return _sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())


def teacher_stamp(cfg, tokenizer, top_k: int | None = None, logp_dtype: str | None = None) -> dict:
    """What a cache made now with ``cfg`` (an ExperimentConfig) records. Weights are named with their
    sizes, not hashed: reading a 7B model through sha256 at every training start would cost minutes."""
    folder = Path(cfg.model.llm.path)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: the teacher LLM's config is missing (model.llm.path)")
    weights = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
               if p.suffix in (".safetensors", ".bin")}
    return {"version": VERSION, "model": str(folder.resolve()),
            "model_config_sha256": _sha256(config.read_bytes()), "weights": weights,
            "llm_dtype": str(resolve_dtype(cfg.model.llm.dtype)).removeprefix("torch."),
            "tokenizer_sha256": tokenizer_hash(tokenizer),
            "bos_token_id": tokenizer.bos_token_id, "temperature": cfg.loss.temperature,
            "context": cfg.inputs.context, "top_k": top_k, "logp_dtype": logp_dtype}


def check_stamp(where: Path, have: dict, want: dict, fields: Sequence[str]) -> None:
    for name in fields:
        if have.get(name) != want.get(name):
            raise TeacherCacheError(
                f"{where}: field {name!r} is {have.get(name)!r} there but {want.get(name)!r} for this run: "
                "rebuild the cache (python -m train.teacher_cache) or delete it")


# ---- computing targets -----------------------------------------------------------------------------------
@torch.inference_mode()
def compute_targets(llm, docs: list[list[int]], top_k: int, temperature: float, chunk_size: int,
                    batch_tokens: int, device: torch.device) -> list[Targets]:
    """Per document, each read alone from position 0: its targets at positions 0..n-2, on the CPU.

    Documents run longest first in padded batches of about ``batch_tokens`` tokens; the head projects at
    most ``chunk_size`` positions at once (never [batch, time, vocabulary] logits)."""
    decoder, head = llm.get_decoder(), llm.get_output_embeddings()
    out: list[Targets] = [None] * len(docs)  # type: ignore[list-item]
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))
    start = 0
    while start < len(order):
        width = max(1, len(docs[order[start]]))
        group = order[start: start + max(1, batch_tokens // width)]
        start += len(group)
        lengths = torch.tensor([len(docs[i]) for i in group])
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(docs[i])] = torch.tensor(docs[i], dtype=torch.long)
        mask = valid_mask(lengths, width)
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.long().to(device),
                         use_cache=False).last_hidden_state
        predicting = valid_mask(lengths - 1, width)   # positions followed by a token
        parts = [topk_log_probs(head(part), top_k, temperature)
                 for part in hidden[predicting.to(device)].split(chunk_size)]
        merged = [torch.cat([p[j] for p in parts]).cpu() for j in range(3)] if parts else \
            [torch.zeros(0, top_k, dtype=torch.long), torch.zeros(0, top_k), torch.zeros(0)]
        for i, *part in zip(group, *(t.split(predicting.sum(1).tolist()) for t in merged), strict=True):
            out[i] = tuple(part)
    return out


def _offsets(counts: Sequence[int]) -> Tensor:
    return torch.tensor([0, *np.cumsum(counts, dtype=np.int64).tolist()], dtype=torch.int64)


def shard_file_bytes(keys: list[str], ids: list[list[int]], targets: list[Targets], shard_sha256: str,
                     stamp: dict) -> bytes:
    """One shard's cache file (safetensors) with its chunks in order."""
    empty = (torch.zeros(0, stamp["top_k"]), torch.zeros(0, stamp["top_k"]), torch.zeros(0))
    top_ids, top_logp, rest = (torch.cat([t[j] for t in targets]) if targets else empty[j] for j in range(3))
    tensors = {"ids": torch.tensor([t for doc in ids for t in doc], dtype=torch.int32),
               "token_offsets": _offsets([len(d) for d in ids]),
               "row_offsets": _offsets([len(t[0]) for t in targets]),
               "topk_ids": top_ids.to(torch.int32),
               "topk_logp": top_logp.to(LOGP_DTYPES[stamp["logp_dtype"]]), "rest_logp": rest.float()}
    meta = {"keys": json.dumps(keys), "shard_sha256": shard_sha256, "stamp": json.dumps(stamp)}
    return save_safetensors(tensors, metadata=meta)


def cache_file(set_dir: str | Path, shard_url: str) -> Path:
    """``<set>/teacher-topk/<shard-stem>.safetensors`` for a shard as its set's index names it."""
    name = shard_url.rsplit("/", 1)[-1]
    return Path(set_dir) / CACHE_DIR / f"{name.removesuffix('.tar')}.safetensors"


def _file_meta(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:   # safetensors raises its own error types for a damaged header
        raise TeacherCacheError(f"{path}: not a readable safetensors file ({exc})") from None


def _is_done(path: Path, shard_sha256: str, stamp: dict) -> bool:
    """The shard's cache file exists, for this version of the shard and this stamp."""
    if not path.is_file():
        return False
    meta = _file_meta(path)
    return meta.get("shard_sha256") == shard_sha256 and json.loads(meta.get("stamp", "{}")) == stamp


def build_cache(cfg, sets: list[tuple[str, bool]], top_k: int, logp_dtype: str, device: torch.device,
                batch_tokens: int, rank: int = 0, world: int = 1, progress: bool = True) -> dict[str, int]:
    """Write the cache of every ``(set folder, is text set)``: counts of shard files written and skipped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from model.build import load_llm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    stamp = teacher_stamp(cfg, tokenizer, top_k, logp_dtype)
    vocab = json.loads((Path(cfg.model.llm.path) / "config.json").read_text()).get("vocab_size", top_k)
    if top_k > vocab:
        raise TeacherCacheError(f"--top-k {top_k}: more than the vocabulary of {cfg.model.llm.path} "
                                f"({vocab})")
    todo, mine = [], 0   # todo: (is text, shard url, sha256, cache file, chunks, the set's stamp)
    for set_dir, is_text in sets:
        stamp_path = Path(set_dir) / CACHE_DIR / STAMP_NAME
        have = stamp   # files carry their set's stamp.json, the first run's (its model path may differ)
        if stamp_path.is_file():
            have = json.loads(stamp_path.read_text())
            check_stamp(stamp_path, have, stamp, [k for k in stamp if k != "model"])
        elif rank == 0:
            atomic_write_json(stamp_path, stamp)
        entries = read_index(set_dir)["shards"]
        for i, (url, entry) in enumerate(zip(shard_urls(set_dir), entries, strict=True)):
            if i % world != rank:
                continue
            mine += 1
            path, sha = cache_file(set_dir, entry["url"]), entry.get("sha256") or ""
            if not _is_done(path, sha, have):
                todo.append((is_text, url, sha, path, int(entry.get("chunks", 0)), have))
    if todo:
        llm = load_llm(cfg.model.llm).to(device).eval()
        bar = Progress(TextColumn("[bold]teacher cache[/]"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), TextColumn("{task.fields[shard]}"), disable=not progress)
        with bar:
            task = bar.add_task("chunks", total=sum(t[4] for t in todo), shard="")
            for is_text, url, sha, path, _, have in todo:
                bar.update(task, shard=f"{path.parent.parent.name}/{path.name}")
                chunks = read_text(url)
                ids = [teacher_ids(c, tokenizer, cfg.inputs, is_text) for c in chunks]
                targets = compute_targets(llm, ids, top_k, cfg.loss.temperature, cfg.loss.chunk_size,
                                          batch_tokens, device)
                atomic_write_bytes(path, shard_file_bytes([c.key for c in chunks], ids, targets, sha, have))
                bar.advance(task, len(chunks))
    return {"written": len(todo), "skipped": mine - len(todo)}


# ---- reading targets in training -------------------------------------------------------------------------
@dataclass
class CachedTargets:
    """Cached targets of a batch's documents (``Batch.doc_keys`` order), padded to its longest document."""

    ids: Tensor         # [D, L] long: each document's teacher tokens, -1 past its end
    topk_ids: Tensor    # [D, L, k] int32: row j = the distribution after token j
    topk_logp: Tensor   # [D, L, k]
    rest_logp: Tensor   # [D, L] float32

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.ids, self.topk_ids, self.topk_logp, self.rest_logp

    def to(self, device: torch.device | str) -> CachedTargets:
        return CachedTargets(*(t.to(device) for t in self.tensors()))


@lru_cache(maxsize=64)
def _open(path: str):
    """A memory-mapped cache file: a slice reads only its rows."""
    return safe_open(path, framework="pt")


class TeacherCache:
    """The cached targets of some shard sets, found by chunk key and checked against the tokens."""

    def __init__(self, files: list[Path], index: dict[str, list[tuple[int, int]]], required: bool) -> None:
        self.files, self.index, self.required = files, index, required
        self.misses = 0

    @classmethod
    def open(cls, set_dirs: Sequence[str], want: dict, required: bool) -> TeacherCache | None:
        """The index of every set that has a cache; None if none has.

        A stamp that does not fit ``want`` (``teacher_stamp`` of the run), or a missing or stale shard file,
        is an error. A set without a cache is an error when ``required``, else warned about: micro-batches
        with its documents run the live teacher."""
        files: list[Path] = []
        index: dict[str, list[tuple[int, int]]] = {}
        bare = []
        for set_dir in set_dirs:
            stamp_path = Path(set_dir) / CACHE_DIR / STAMP_NAME
            if not stamp_path.is_file():
                bare.append(str(set_dir))
                continue
            stamp = json.loads(stamp_path.read_text())
            check_stamp(stamp_path, stamp, want, IDENTITY)
            if stamp.get("context", 0) < want["context"]:
                raise TeacherCacheError(f"{stamp_path}: field 'context' is {stamp.get('context')} there, "
                                        f"shorter than this run's {want['context']}: rebuild the cache")
            for entry in read_index(set_dir)["shards"]:
                path = cache_file(set_dir, entry["url"])
                if not path.is_file():
                    raise TeacherCacheError(f"{path}: missing (the cache of {set_dir} is incomplete): run "
                                            "python -m train.teacher_cache again, it resumes")
                meta = _file_meta(path)
                if meta.get("shard_sha256") != (entry.get("sha256") or ""):
                    raise TeacherCacheError(
                        f"{path}: field 'shard_sha256' differs from {set_dir}/index.json (the shard was "
                        "rebuilt): run python -m train.teacher_cache again")
                if json.loads(meta.get("stamp", "{}")) != stamp:
                    raise TeacherCacheError(f"{path}: field 'stamp' differs from {stamp_path}")
                for j, key in enumerate(json.loads(meta["keys"])):
                    index.setdefault(key, []).append((len(files), j))
                files.append(path)
        if bare and (required or files):
            message = f"no teacher cache for {', '.join(bare)} (python -m train.teacher_cache)"
            if required:
                raise TeacherCacheError(f"loss.teacher_cache=required: {message}")
            log.warning("%s: micro-batches with its documents run the live teacher", message)
        return cls(files, index, required) if files else None

    def _lookup(self, key: str, ids: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """The cached entry of ``key`` whose tokens start with ``ids`` (a key may be in several sets)."""
        for file, j in self.index.get(key, []):
            f = _open(str(self.files[file]))
            t0, t1 = f.get_slice("token_offsets")[j: j + 2].tolist()
            r0, r1 = f.get_slice("row_offsets")[j: j + 2].tolist()
            cached = f.get_slice("ids")[t0:t1]   # read once: checked, then returned
            if t1 - t0 >= len(ids) and cached[: len(ids)].tolist() == ids:
                return (cached.long(), f.get_slice("topk_ids")[r0:r1], f.get_slice("topk_logp")[r0:r1],
                        f.get_slice("rest_logp")[r0:r1])
        return None

    def targets(self, docs: Sequence[Document], batch: Batch, bos_id: int | None) -> CachedTargets | None:
        """The targets of the documents that ``pack(docs)`` put in ``batch``; None when one has none (after a
        warning, or an error when required)."""
        bos = [] if bos_id is None else [bos_id]
        tokens = {d.key: bos + [t for s in d.spans for t in s.ids] for d in docs}
        found = []
        for key, length in zip(batch.doc_keys, batch.doc_len.tolist(), strict=True):
            # a later piece of a document cut to the context (model.inputs.pieces) is not in the cache
            entry = self._lookup(key, tokens[key][:length]) if key in tokens else None
            if entry is None:
                self.misses += 1
                message = f"chunk {key!r}: no cached teacher targets with its tokens"
                if self.required:
                    raise TeacherCacheError(f"loss.teacher_cache=required: {message}")
                if self.misses <= 3:
                    log.warning("%s: this micro-batch runs the live teacher%s", message,
                                " (further misses are not reported)" if self.misses == 3 else "")
                return None
            found.append(entry)
        width, k = int(batch.doc_len.max()), found[0][1].shape[-1]
        out = CachedTargets(torch.full((len(found), width), -1, dtype=torch.long),
                            torch.zeros(len(found), width, k, dtype=torch.int32),
                            torch.zeros(len(found), width, k, dtype=found[0][2].dtype),
                            torch.zeros(len(found), width))
        for d, entry in enumerate(found):
            for tensor, value in zip(out.tensors(), entry, strict=True):
                tensor[d, : min(len(value), width)] = value[:width]
        return out


def open_cache(cfg, set_dirs: Sequence[str], tokenizer) -> TeacherCache | None:
    """The cache a run uses, per ``loss.teacher_cache`` and ``loss.teacher_context``; None: live teacher."""
    if cfg.loss.teacher_cache == "off":
        return None
    if cfg.loss.teacher_context != "document":   # "required" with "row" is refused by LossConfig
        cached = [s for s in set_dirs if (Path(s) / CACHE_DIR / STAMP_NAME).is_file()]
        if cached:
            log.warning("teacher cache of %s not used: it holds per-document targets and "
                        "loss.teacher_context is 'row' (set it to 'document' to use it)", ", ".join(cached))
        return None
    return TeacherCache.open(set_dirs, teacher_stamp(cfg, tokenizer), cfg.loss.teacher_cache == "required")


# ---- command ---------------------------------------------------------------------------------------------
def default_sets(cfg, round_: int) -> list[tuple[str, bool]]:
    """Every set the round trains on: its speech sets (selected ones included) and the text sets. Text sets
    too: under ZeRO-3 a micro-batch uses the cache only when every rank's batch has it."""
    from train.data import round_speech_sets

    return ([(r.path, False) for r in round_speech_sets(cfg.run.path(), cfg.data, round_)]
            + [(r.path, True) for r in cfg.data.text])


def main(argv: list[str] | None = None) -> int:
    from rounds.experiment import job_parser, parse_job

    parser = job_parser("python -m train.teacher_cache", __doc__,
                        "round whose selected speech sets (runs/<name>/data.yaml) are included (default 0)")
    parser.add_argument("--set", action="append", metavar="SHARD_SET_DIR",
                        help="a shard set to cache (repeatable; default: the round's speech and text sets)")
    parser.add_argument("--top-k", type=int, default=64, help="tokens kept per position (default 64)")
    parser.add_argument("--dtype", choices=sorted(LOGP_DTYPES), default="float16",
                        help="of the stored log-probabilities (default float16)")
    parser.add_argument("--device", default=None, help="default: this rank's GPU (its local rank), else the CPU")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    args, cfg = parse_job(parser, argv)
    if args.top_k < 1 or args.batch_tokens < 1:
        parser.error("--top-k and --batch-tokens must be >= 1")
    text_sets = {str(Path(r.path).resolve()) for r in cfg.data.text}
    sets = ([(s, str(Path(s).resolve()) in text_sets) for s in args.set] if args.set
            else default_sets(cfg, args.round))
    rank, world, _ = distributed.launcher_ranks()   # ranks work apart: no process group
    device = torch.device(args.device) if args.device else distributed.device()
    try:
        counts = build_cache(cfg, sets, args.top_k, args.dtype, device, args.batch_tokens, rank, world,
                             progress=rank == 0)
    except (TeacherCacheError, ShardFormatError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    done = f"wrote {counts['written']} shard file(s)" if counts["written"] else "nothing to do"
    print(f"teacher cache: {done}; {counts['skipped']} already cached "
          f"({', '.join(str(Path(s) / CACHE_DIR) for s, _ in sets)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
