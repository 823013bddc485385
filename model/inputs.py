"""How a document becomes the student's interleaved input and the teacher's all-text input.

A document chunk (segments with text and audio) is cut into alternating **text spans** and
**speech spans** (SALAD's pre-training style interleaving). The teacher reads every span as text;
the student reads text spans as token embeddings and each speech span as
``[begin] adapter vectors [end]``. Every text token that both models predict gives one aligned pair
of positions: the student position and the teacher position whose next token is that token.

Two stages, so that the expensive part stays vectorised and the data-dependent part is late:
1. ``interleave`` (per document, CPU, in the collate): choose spans, tokenize each span on its own
   (so the teacher's tokens are exactly the concatenation of span tokens), cut the speech audio.
2. ``Layout.build`` (per batch): given the number of vectors each speech span gets, compute every
   position with cumulative sums: no Python loop over tokens. ``batch_of_rows`` builds it on the CPU,
   where the data is made: without compression a span's vector count follows from its audio length,
   and a layout built on a GPU would stall its queue about twenty times per batch (every size it reads
   back). With CTC compression the counts are data dependent: the model builds the layout again on the
   device after the adapter ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from config import require
from model.masks import valid_mask
from shards.format import Chunk

TEXT, SPEECH = 0, 1
log = logging.getLogger(__name__)


@dataclass
class InputsConfig:
    text_words: list[int] = field(default_factory=lambda: [10, 30])    # min, max words per text span
    speech_words: list[int] = field(default_factory=lambda: [5, 15])   # min, max words per speech span
    context: int = 2048               # packed row length (student and teacher layouts each)
    speech_first_prob: float = 0.5    # probability that a document opens with a speech span
    word_margin_s: float = 0.05       # audio kept around a word-timed speech span

    def __post_init__(self) -> None:
        for name in ("text_words", "speech_words"):
            lo_hi = getattr(self, name)
            require(len(lo_hi) == 2 and 1 <= lo_hi[0] <= lo_hi[1], name, f"must be [min, max] with "
                    f"1 <= min <= max, got {lo_hi}")
        require(self.context >= 16, "context", f"must be >= 16, got {self.context}")
        require(0.0 <= self.speech_first_prob <= 1.0, "speech_first_prob", "must be in [0, 1]")
        require(self.word_margin_s >= 0, "word_margin_s", "must be >= 0")


@dataclass
class Span:
    kind: int                       # TEXT or SPEECH
    ids: list[int]                  # tokens (for speech: the transcript's tokens, what the teacher reads)
    audio: np.ndarray | None = None  # speech only, float32 at the encoder's rate


@dataclass
class Document:
    spans: list[Span]
    key: str = ""                   # the chunk's key (finds its cached teacher targets)

    def lengths(self, vectors_for: Callable[[int], int], bos: bool) -> tuple[int, int]:
        """(student, teacher) lengths, given the number of adapter vectors for n audio samples."""
        student = teacher = int(bos)
        for span in self.spans:
            teacher += len(span.ids)
            student += len(span.ids) if span.kind == TEXT else vectors_for(len(span.audio)) + 2
        return student, teacher


def _tokenize(tokenizer, text: str, first: bool) -> list[int]:
    """Tokens of one span; a leading space keeps word-initial tokens as in running text."""
    return tokenizer.encode(text if first else " " + text, add_special_tokens=False)


_Unit = tuple[str, np.ndarray | None, int, int]   # text, audio of its segment (or None), sample range


def _word_units(chunk: Chunk, margin_s: float) -> list[_Unit] | None:
    """Words with their sample range, when every spoken segment has word timings; else None."""
    units: list[_Unit] = []
    for seg in chunk.segments:
        if seg.audio is None:
            units.extend((w, None, 0, 0) for w in seg.text.split())
            continue
        if not seg.words:
            return None
        for word, start, end in seg.words:
            lo = max(0, int((start - margin_s) * seg.sr))
            hi = min(len(seg.audio), int(np.ceil((end + margin_s) * seg.sr)))
            units.append((word, seg.audio, lo, hi))
    return units


def _segment_units(chunk: Chunk) -> list[_Unit]:
    """Whole segments as units (no word timings): a speech span is one or more whole segments."""
    return [(seg.text.strip(), seg.audio, 0, 0 if seg.audio is None else len(seg.audio))
            for seg in chunk.segments if seg.text.strip()]


def interleave(chunk: Chunk, tokenizer, cfg: InputsConfig, rng: np.random.Generator) -> Document:
    """Cut a chunk into alternating text and speech spans with sampled word counts.

    Word timings give word-level spans; without them, spans are whole segments. Units without
    audio are always text. Consecutive units of one kind merge into one span; the audio of a
    speech span is cut as one contiguous range per segment (pauses between words kept).
    """
    units = _word_units(chunk, cfg.word_margin_s) or _segment_units(chunk)
    spans: list[tuple[int, list[str], list[list]]] = []   # kind, words, [audio, lo, hi] per segment
    kind = TEXT if rng.random() < cfg.speech_first_prob else SPEECH   # flipped to the first span's kind below
    budget = 0
    for text, audio, lo, hi in units:
        if budget <= 0:
            kind = TEXT if kind == SPEECH else SPEECH
            low, high = cfg.speech_words if kind == SPEECH else cfg.text_words
            budget = int(rng.integers(low, high + 1))
        unit_kind = kind if audio is not None and hi > lo else TEXT
        if not spans or spans[-1][0] != unit_kind:
            spans.append((unit_kind, [], []))
        spans[-1][1].append(text)
        if unit_kind == SPEECH:
            ranges = spans[-1][2]
            if ranges and ranges[-1][0] is audio:
                ranges[-1][2] = hi
            else:
                ranges.append([audio, lo, hi])
        budget -= len(text.split())
    out = []
    for i, (kind, words, ranges) in enumerate(spans):
        ids = _tokenize(tokenizer, " ".join(words), first=i == 0)
        if not ids:
            continue
        audio = np.concatenate([a[lo:hi] for a, lo, hi in ranges]).astype(np.float32) if ranges else None
        out.append(Span(kind, ids, audio))
    return Document(out, chunk.key)


TEXT_SPAN_WORDS = 64   # words per span of a text-only document: where packing may cut a long one


def text_document(chunk: Chunk, tokenizer) -> Document:
    """All segments as text (anti-forgetting text batches, text-mode evaluation), in spans of at most
    ``TEXT_SPAN_WORDS`` words: the same tokens as one span where the tokenizer splits words at spaces, and places
    where ``pack_rows`` can cut a document longer than the context at a word boundary."""
    words = " ".join(seg.text.strip() for seg in chunk.segments if seg.text.strip()).split()
    spans = [Span(TEXT, _tokenize(tokenizer, " ".join(words[i:i + TEXT_SPAN_WORDS]), first=i == 0))
             for i in range(0, len(words), TEXT_SPAN_WORDS)]
    return Document([s for s in spans if s.ids], chunk.key)


@dataclass
class Batch:
    """Documents packed into rows, as flat per-unit tensors (a unit = one text token or one speech span).

    Units are ordered by row, then by position. ``unit_target`` marks text units that are predicted
    (every text unit of a document but its first one). Documents are in the same order; ``teacher`` holds
    what the data side attached for them (``train.teacher_cache.CachedTargets``), or None.
    """

    unit_row: torch.Tensor       # [U] long
    unit_kind: torch.Tensor      # [U] long, TEXT or SPEECH
    unit_token: torch.Tensor     # [U] long, token id (text) or -1
    unit_span: torch.Tensor      # [U] long, speech span index or -1
    unit_target: torch.Tensor    # [U] bool
    span_tokens: torch.Tensor    # [K] long, transcript tokens of all speech spans, concatenated
    span_token_count: torch.Tensor  # [S] long
    waves: torch.Tensor          # [S, T] float32, zero padded
    wave_lengths: torch.Tensor   # [S] long
    rows: int
    doc_row: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [D] long
    doc_len: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [D] tokens
    doc_keys: list[str] = field(default_factory=list)   # [D] chunk keys
    teacher: Any = None
    layout: Layout | None = None   # built with the packing's vector counts (exact without compression)

    @property
    def num_speech(self) -> int:
        return int(self.wave_lengths.numel())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**_moved(vars(self), device))


def _moved(fields: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Every tensor (and thing with ``to``) in ``fields`` on ``device``. To a GPU through pinned memory without
    blocking: a copy from pageable memory would make the host wait until the GPU's queue reaches it."""
    gpu = torch.device(device).type == "cuda"

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and gpu and v.device.type == "cpu":
            return v.pin_memory().to(device, non_blocking=True)
        return v.to(device) if hasattr(v, "to") else v

    return {k: move(v) for k, v in fields.items()}


def pack(docs: Sequence[Document], vectors_for: Callable[[int], int], context: int,
         bos_id: int | None) -> Batch:
    """Pack documents into rows of at most ``context`` positions (student and teacher layouts)."""
    return batch_of_rows(pack_rows(docs, vectors_for, context, bos_id), vectors_for, bos_id)


def pack_rows(docs: Sequence[Document], vectors_for: Callable[[int], int], context: int,
              bos_id: int | None) -> list[list[Document]]:
    """Group documents into rows of at most ``context`` positions.

    Greedy first fit in order; a document longer than the context is cut into pieces that fit
    (``pieces``), each packed as a document of its own. ``vectors_for(samples)`` is an upper bound of
    the adapter vectors a speech span gets (exact without compression).
    """
    rows: list[list[Document]] = []
    room: list[tuple[int, int]] = []
    for doc in [piece for whole in docs for piece in pieces(whole, vectors_for, context, bos_id is not None)]:
        s_len, t_len = doc.lengths(vectors_for, bos_id is not None)
        for r, (s_used, t_used) in enumerate(room):
            if s_used + s_len <= context and t_used + t_len <= context:
                rows[r].append(doc)
                room[r] = (s_used + s_len, t_used + t_len)
                break
        else:
            rows.append([doc])
            room.append((s_len, t_len))
    return rows


def batch_of_rows(rows: Sequence[Sequence[Document]], vectors_for: Callable[[int], int], bos_id: int | None) -> Batch:
    """The tensors of documents already grouped into rows (``pack_rows``)."""
    unit_row, unit_kind, unit_token, unit_span, unit_target = [], [], [], [], []
    span_tokens: list[int] = []
    span_count, waves = [], []
    doc_row, doc_len = [], []
    for r, row_docs in enumerate(rows):
        for doc in row_docs:
            doc_row.append(r)
            doc_len.append(doc.lengths(vectors_for, bos_id is not None)[1])
            first = True
            if bos_id is not None:
                unit_row.append(r), unit_kind.append(TEXT), unit_token.append(bos_id)
                unit_span.append(-1), unit_target.append(False)
            for span in doc.spans:
                if span.kind == TEXT:
                    n = len(span.ids)
                    unit_row += [r] * n
                    unit_kind += [TEXT] * n
                    unit_token += span.ids
                    unit_span += [-1] * n
                    unit_target += [not (first and i == 0 and bos_id is None) for i in range(n)]
                else:
                    unit_row.append(r), unit_kind.append(SPEECH), unit_token.append(-1)
                    unit_span.append(len(waves)), unit_target.append(False)
                    span_tokens += span.ids
                    span_count.append(len(span.ids))
                    waves.append(span.audio)
                first = False
    longest = max((len(w) for w in waves), default=0)
    wave_tensor = torch.zeros(len(waves), longest)
    for i, w in enumerate(waves):
        wave_tensor[i, : len(w)] = torch.from_numpy(w)
    long = torch.long
    batch = Batch(
        unit_row=torch.tensor(unit_row, dtype=long), unit_kind=torch.tensor(unit_kind, dtype=long),
        unit_token=torch.tensor(unit_token, dtype=long), unit_span=torch.tensor(unit_span, dtype=long),
        unit_target=torch.tensor(unit_target, dtype=torch.bool),
        span_tokens=torch.tensor(span_tokens, dtype=long), span_token_count=torch.tensor(span_count, dtype=long),
        waves=wave_tensor, wave_lengths=torch.tensor([len(w) for w in waves], dtype=long), rows=len(rows),
        doc_row=torch.tensor(doc_row, dtype=long), doc_len=torch.tensor(doc_len, dtype=long),
        doc_keys=[doc.key for row_docs in rows for doc in row_docs])
    batch.layout = Layout.build(batch, torch.tensor([vectors_for(len(w)) for w in waves], dtype=long))
    return batch


def pieces(doc: Document, vectors_for: Callable[[int], int], context: int, bos: bool) -> list[Document]:
    """``doc`` as consecutive documents that each fit ``context``, cut between spans: spans are at most a few
    dozen words, so a long document loses nothing and is cut at word boundaries. A text span longer than the
    context on its own is cut between tokens; a speech span that is (minutes of audio, more vectors than the
    context holds) is left out with a warning. Pieces after the first get the key ``<key>#<n>``: their teacher
    reads them alone, which a cache of whole documents does not hold."""
    out: list[list[Span]] = [[]]
    used = (int(bos), int(bos))   # (student, teacher) positions of the piece being filled
    for span in doc.spans:
        n = len(span.ids)
        size = (n, n) if span.kind == TEXT else (vectors_for(len(span.audio)) + 2, n)
        if max(size) + int(bos) > context:
            if span.kind == SPEECH:
                log.warning("a speech span of %d samples needs %d positions, more than the context (%d): "
                            "left out of document %r", len(span.audio), size[0], context, doc.key)
                continue
            room = context - int(bos)
            parts = [Span(TEXT, span.ids[i:i + room]) for i in range(0, n, room)]
        else:
            parts = [span]
        for part in parts:
            size = (len(part.ids), len(part.ids)) if part.kind == TEXT else size
            if out[-1] and max(used[0] + size[0], used[1] + size[1]) > context:
                out.append([])
                used = (int(bos), int(bos))
            out[-1].append(part)
            used = (used[0] + size[0], used[1] + size[1])
    return [Document(spans, doc.key if i == 0 else f"{doc.key}#{i}") for i, spans in enumerate(out) if spans]


def _row_starts(lengths: torch.Tensor, unit_row: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start of every unit within its row, and each row's total length (exclusive cumsum per row)."""
    ends = torch.cumsum(lengths, 0)
    starts = ends - lengths
    totals = torch.zeros(rows, dtype=lengths.dtype, device=lengths.device).index_add_(0, unit_row, lengths)
    row_offset = torch.cumsum(totals, 0) - totals
    return starts - row_offset[unit_row], totals


def _offsets_within(counts: torch.Tensor) -> torch.Tensor:
    """[0..c0-1, 0..c1-1, ...]: the index of each element within its group."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(starts, counts)


def document_positions(batch: Batch, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position of the teacher layout ([rows, length]): its document (index into the batch's
    documents, -1 at padding) and its position within that document (padding: its column). The teacher
    layout holds each document's tokens contiguously, documents in order, as ``Layout.build`` places them."""
    device = batch.doc_len.device
    starts, _ = _row_starts(batch.doc_len, batch.doc_row, batch.rows)
    token_doc = torch.repeat_interleave(torch.arange(batch.doc_len.numel(), device=device), batch.doc_len)
    within = _offsets_within(batch.doc_len)
    row, col = batch.doc_row[token_doc], starts[token_doc] + within
    doc = torch.full((batch.rows, length), -1, dtype=torch.long, device=device)
    pos = torch.arange(length, device=device).repeat(batch.rows, 1)
    return doc.index_put_((row, col), token_doc), pos.index_put_((row, col), within)


@dataclass
class Layout:
    """Positions of both layouts for one batch, given the adapter vectors per speech span."""

    student_len: int
    teacher_len: int
    student_mask: torch.Tensor     # [B, Ts] bool, valid positions
    teacher_mask: torch.Tensor     # [B, Tt] bool
    teacher_ids: torch.Tensor      # [B, Tt] long (0 at padding)
    text_row: torch.Tensor         # [Nt] rows of student text positions
    text_pos: torch.Tensor         # [Nt]
    text_token: torch.Tensor       # [Nt]
    begin_pos: torch.Tensor        # [S] (rows in span_row)
    end_pos: torch.Tensor          # [S] ([0] without end markers)
    span_row: torch.Tensor         # [S]
    vector_row: torch.Tensor       # [sum n] rows of speech vectors
    vector_pos: torch.Tensor       # [sum n]
    map_row: torch.Tensor          # [M] aligned pairs: row,
    map_student: torch.Tensor      # [M] student position and
    map_teacher: torch.Tensor      # [M] teacher position that predict
    map_target: torch.Tensor       # [M] this token
    vector_span: torch.Tensor      # [sum n] speech span of each vector, and its index in the span's adapter
    vector_index: torch.Tensor     # [sum n] outputs: vectors[vector_span, vector_index] in layout order
    end_marker: bool = True

    def to(self, device: torch.device | str) -> Layout:
        return Layout(**_moved(vars(self), device))

    @staticmethod
    def build(batch: Batch, vectors: torch.Tensor, end_marker: bool = True) -> Layout:
        """``vectors[s]`` = number of adapter vectors speech span s got. Without ``end_marker`` a speech span is
        ``[begin] vectors`` and its last vector predicts the text that follows."""
        kind, span = batch.unit_kind, batch.unit_span
        is_speech = kind == SPEECH
        safe_span = span.clamp(min=0)
        ones = torch.ones_like(kind)
        s_len = torch.where(is_speech, vectors[safe_span] + 1 + end_marker, ones) if batch.num_speech else ones
        t_len = torch.where(is_speech, batch.span_token_count[safe_span], ones) if batch.num_speech else ones
        s_start, s_total = _row_starts(s_len, batch.unit_row, batch.rows)
        t_start, t_total = _row_starts(t_len, batch.unit_row, batch.rows)
        student_len, teacher_len = (int(s_total.max()), int(t_total.max())) if batch.rows else (0, 0)
        device = kind.device
        student_mask, teacher_mask = valid_mask(s_total, student_len), valid_mask(t_total, teacher_len)

        teacher_ids = torch.zeros(batch.rows, teacher_len, dtype=torch.long, device=device)
        text = ~is_speech
        teacher_ids[batch.unit_row[text], t_start[text]] = batch.unit_token[text]
        sp_units = torch.nonzero(is_speech).squeeze(1)
        sp_order = span[sp_units]                           # speech units in span order
        sp_units = sp_units[torch.argsort(sp_order)]
        span_row = batch.unit_row[sp_units]
        count = batch.span_token_count
        tok_row = torch.repeat_interleave(span_row, count)
        tok_offset = _offsets_within(count)
        teacher_ids[tok_row, torch.repeat_interleave(t_start[sp_units], count) + tok_offset] = batch.span_tokens

        begin_pos = s_start[sp_units]
        end_pos = begin_pos + vectors + 1 if end_marker else begin_pos[:0]
        vector_row = torch.repeat_interleave(span_row, vectors)
        vector_span = torch.repeat_interleave(torch.arange(len(vectors), device=device), vectors)
        vec_offset = _offsets_within(vectors)
        vector_pos = torch.repeat_interleave(begin_pos + 1, vectors) + vec_offset

        target = torch.nonzero(batch.unit_target).squeeze(1)
        prev = target - 1
        return Layout(
            student_len=student_len, teacher_len=teacher_len, student_mask=student_mask,
            teacher_mask=teacher_mask, teacher_ids=teacher_ids,
            text_row=batch.unit_row[text], text_pos=s_start[text], text_token=batch.unit_token[text],
            begin_pos=begin_pos, end_pos=end_pos, span_row=span_row,
            vector_row=vector_row, vector_pos=vector_pos,
            map_row=batch.unit_row[target], map_student=s_start[prev] + s_len[prev] - 1,
            map_teacher=t_start[target] - 1, map_target=batch.unit_token[target],
            vector_span=vector_span, vector_index=vec_offset, end_marker=end_marker)
