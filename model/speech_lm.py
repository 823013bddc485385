"""SpeechLM: frozen speech encoder -> adapter -> causal LLM, and the text teacher beside it.

The student reads interleaved inputs (``model.inputs``); the teacher reads the same document as
text. With a frozen or LoRA-trained LLM the teacher is the same weights (adapters disabled, no
grad), so no second copy exists; with a fully trained LLM it is a frozen copy (``teacher``).
Methods return hidden states, never full logits: losses project the few positions they need.

CTC over the LLM's own vocabulary (optional; docs/toy.md: measured necessary for the CPU toy):
an adapter vector v scores token k by v . E[k] (E = the LLM's input embedding matrix, the space the adapter
maps into) and one extra class, blank, by v . blank (a learned vector, row BLANK of ``boundary``). The
alignment loss (``train.losses.ctc_alignment_loss``, weight ``loss.ctc_weight``) trains these scores;
``adapter.compress: ctc`` pools the vectors along their greedy CTC path (about one LLM input per spoken
token) and ``transcribe`` decodes that path to token ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.adapter import Adapter
from model.encoder import SpeechEncoder
from model.inputs import Batch, Document, Layout, pack
from model.masks import valid_mask

BEGIN, END, BLANK = 0, 1, 2    # rows of SpeechLM.boundary
BLANK_LABEL = -1               # greedy CTC label of a blank frame (token labels are ids >= 0)
GREEDY_CHUNK = 1 << 26         # logits (rows x vocabulary) that greedy decoding computes at once


class AdapterOutput(NamedTuple):
    """Adapter outputs of a batch's speech spans, before compression and layout."""

    vectors: Tensor        # [S, n, H], zero padded
    lengths: Tensor        # [S] valid vectors per span
    blank_logits: Tensor   # [S, n] vectors . blank: the CTC blank class's logit

    @staticmethod
    def stack(outputs: list[AdapterOutput]) -> AdapterOutput:
        """Spans encoded apart as one batch of spans, zero padded to the longest (what ``adapter_output`` gives
        for them together, up to float rounding): so that one encoding of an utterance serves several uses."""
        width = max(int(o.vectors.shape[1]) for o in outputs)

        def padded(t: Tensor) -> Tensor:   # [1, n, ...] -> [1, width, ...]
            return F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1]))

        return AdapterOutput(torch.cat([padded(o.vectors) for o in outputs]), torch.cat([o.lengths for o in outputs]),
                             torch.cat([padded(o.blank_logits) for o in outputs]))


def embedding_table(embed: nn.Module) -> Tensor:
    """The LLM's input embedding matrix [V, H], detached: CTC pulls adapter outputs toward the token
    embeddings, never the embeddings toward speech (with a fully trained LLM, E moves only with the LLM).

    Under ZeRO-3 the weight is partitioned (DeepSpeed marks it with ``ds_id``) and whole only inside the
    module's own forward, so every row is looked up through the module: ZeRO-3 gathers and releases the weight
    as for any call of it, and no DeepSpeed import is needed. That is a collective (every rank must make the
    same calls) and a copy of E. Unpartitioned, the weight itself."""
    weight = embed.weight
    if not hasattr(weight, "ds_id"):
        return weight.detach()
    with torch.no_grad():
        return embed(torch.arange(weight.ds_shape[0], device=weight.device))


def ctc_runs(labels: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy CTC collapse of per-frame labels [S, n] valid up to ``lengths`` [S]: the first frame of every
    run of one token (runs of blank dropped, so "a blank a" emits a twice), and the valid frames; both [S, n]."""
    valid = valid_mask(lengths, labels.shape[1])
    previous = F.pad(labels[:, :-1], (1, 0), value=BLANK_LABEL - 1)
    return valid & (labels != BLANK_LABEL) & (labels != previous), valid


def ctc_pool(vectors: Tensor, labels: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """One vector per emitted token: the mean of each run of frames that share a non-blank greedy label.

    vectors [S, n, H], labels [S, n], lengths [S] -> pooled [sum counts, H] in span then time order, and
    counts [S] (<= lengths). A span whose frames are all blank keeps one vector, the mean of its frames, so
    that the LLM still sees it. Gradients flow through the means; the path itself (argmax) has none.
    """
    starts, valid = ctc_runs(labels, lengths)
    silent = valid & ~starts.any(1, keepdim=True)
    keep = (valid & (labels != BLANK_LABEL)) | silent
    starts = starts | (silent & (torch.arange(labels.shape[1], device=labels.device) == 0))
    run = torch.cumsum(starts[keep].long(), 0) - 1          # run of every kept frame (runs are contiguous)
    total = int(starts.sum())
    sums = vectors.new_zeros(total, vectors.shape[-1]).index_add(0, run, vectors[keep])
    sizes = torch.bincount(run, minlength=total).to(vectors.dtype)
    return sums / sizes[:, None], starts.sum(1)


@dataclass
class LM:
    """What scoring needs of a causal LM: its decoder (hidden states), token embeddings and head."""

    decoder: nn.Module
    embed: nn.Module
    head: nn.Module

    @staticmethod
    def of(llm: nn.Module) -> LM:
        return LM(llm.get_decoder(), llm.get_input_embeddings(), llm.get_output_embeddings())


class SpeechLM(nn.Module):
    def __init__(self, llm: nn.Module, encoder: SpeechEncoder, adapter: Adapter,
                 teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.llm = llm
        # The frozen encoder is held outside the module tree (nn.Module does not register an attribute set this
        # way): a training engine would partition it and cast it to the training precision (Mimi in bf16 is
        # numerically fragile), and it needs neither (no gradient, tens of millions of weights). It keeps its own
        # dtype (``encoder.dtype``) and follows the model's moves between devices (``_apply``).
        object.__setattr__(self, "encoder", encoder)
        self.adapter = adapter
        self.teacher = teacher
        hidden = llm.get_input_embeddings().embedding_dim
        # Learned vectors beside the LLM's vocabulary, on the scale of token embeddings: the [begin, end]
        # markers around every speech span and the CTC blank class (rows BEGIN, END, BLANK). One parameter of
        # this module, so that ZeRO-3 gathers all three during forward and exports carry them together.
        std = float(getattr(llm.config, "initializer_range", 0.02))
        self.boundary = nn.Parameter(torch.randn(3, hidden) * std)

    # ---- modes and devices ------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        """``to``/``cuda``/``cpu``/casts: the encoder goes to the device the rest goes to, in its own dtype."""
        self.encoder.to(fn(torch.empty(0)).device)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> SpeechLM:
        """What trains is in train mode (LLM, adapter: dropout, activation checkpointing); a separate teacher and
        the encoder always stay in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # ---- pieces -------------------------------------------------------------------------------
    def vectors_for(self, samples: int) -> int:
        """Adapter vectors for a speech span of ``samples`` samples (an upper bound with compression)."""
        return self.adapter.output_length(self.encoder.frames_for(samples))

    @property
    def student_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    @property
    def teacher_head(self) -> nn.Module:
        return (self.teacher or self.llm).get_output_embeddings()

    def _decoder(self, teacher: bool) -> nn.Module:
        model = self.teacher if teacher and self.teacher is not None else self.llm
        return model.get_decoder()

    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """No grad; when the teacher is the student's own weights, LoRA adapters off and the LLM in eval mode
        (no dropout) for the block."""
        if self.teacher is not None:
            with torch.no_grad():
                yield
            return
        disable = self.llm.disable_adapter() if hasattr(self.llm, "disable_adapter") else contextlib.nullcontext()
        was_training = self.llm.training
        self.llm.eval()
        try:
            with torch.no_grad(), disable:
                yield
        finally:
            self.llm.train(was_training)

    def speech_vectors(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and adapt every speech span of a batch at once: [S, n, H] and vectors per span [S]. The frames
        are sized by the waves' width (packed batches are as wide as their longest span), not by reading the
        lengths back from the device."""
        frames, frame_lengths = self.encoder(waves, lengths, self.encoder.frames_for(waves.shape[1]))
        return self.adapter(frames.to(self.boundary.dtype), frame_lengths)

    def adapter_output(self, waves: Tensor, lengths: Tensor) -> AdapterOutput:
        """``speech_vectors`` with each vector's blank logit (read here: under ZeRO-3 ``boundary`` is whole only
        inside this module's forward, while the CTC loss runs outside it)."""
        vectors, counts = self.speech_vectors(waves, lengths)
        return AdapterOutput(vectors, counts, vectors @ self.boundary[BLANK].to(vectors.dtype))

    # ---- CTC over the LLM's vocabulary ---------------------------------------------------------
    def token_logits(self, hidden: Tensor, table: Tensor | None = None) -> Tensor:
        """hidden [n, H] -> [n, V]: scores against the LLM's token embeddings (the CTC vocabulary, blank apart).
        A head for ``train.losses``: safe to call outside this module's forward, also under ZeRO-3."""
        if table is None:
            table = embedding_table(self.llm.get_input_embeddings())
        return hidden @ table.to(hidden.dtype).T

    @torch.no_grad()
    def greedy_labels(self, out: AdapterOutput) -> Tensor:
        """Best CTC class of every valid vector [S, n]: a token id, or BLANK_LABEL (also at padding).

        E is fetched once (one collective under ZeRO-3, whatever the batch) and projected a chunk of rows at a
        time, so that [vectors, vocabulary] logits never exist at once."""
        table = embedding_table(self.llm.get_input_embeddings())
        valid = valid_mask(out.lengths, out.vectors.shape[1])
        rows = out.vectors[valid]
        parts = [self.token_logits(part, table).float().max(1)
                 for part in rows.split(max(1, GREEDY_CHUNK // table.shape[0]))]   # at least one part
        score, best = torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])
        best = torch.where(out.blank_logits[valid].float() > score, BLANK_LABEL, best)
        return torch.full_like(valid, BLANK_LABEL, dtype=torch.long).index_put((valid,), best)

    def llm_vectors(self, out: AdapterOutput) -> tuple[Tensor, Tensor]:
        """What the LLM reads for the speech spans: [sum counts, H] in span then time order, and counts [S].

        Every adapter vector, or with ``adapter.compress: ctc`` one vector per token emitted along the greedy
        CTC path: the frames of each emitted token are pooled (``ctc_pool``) and the LLM reads the pool's
        expected token embedding under its CTC posterior, softmax(v E^T) E (blank excluded). Why not the pool
        itself: the CTC scores v . E reward a large norm, and the toy's pools grew to 18x the embeddings' norm,
        which drowned the LLM's own computation (narrative speech accuracy 0.32 with the pools, 0.73 with their
        expected embeddings, same trained adapter). Meant for ``loss.ctc_weight > 0``, which trains the path;
        off in the paper's configs."""
        if self.adapter.cfg.compress != "ctc":
            return out.vectors[valid_mask(out.lengths, out.vectors.shape[1])], out.lengths
        pooled, counts = ctc_pool(out.vectors, self.greedy_labels(out), out.lengths)
        table = embedding_table(self.llm.get_input_embeddings())
        rows = max(1, GREEDY_CHUNK // table.shape[0])
        expected = [torch.softmax(self.token_logits(part, table).float(), -1).to(table.dtype) @ table
                    for part in pooled.split(rows)]
        return (torch.cat(expected) if expected else pooled), counts

    @torch.no_grad()
    def transcribe(self, waves: Tensor, lengths: Tensor) -> list[list[int]]:
        """Greedy CTC decoding of each utterance to LLM token ids (the cascade reference: the decoded words read
        by the teacher as text). Meaningful after training with ``loss.ctc_weight > 0``."""
        return self.decode(self.adapter_output(waves, lengths))

    @torch.no_grad()
    def decode(self, out: AdapterOutput) -> list[list[int]]:
        """``transcribe`` from adapter outputs already computed."""
        labels = self.greedy_labels(out)
        starts, _ = ctc_runs(labels, out.lengths)
        return [ids.tolist() for ids in labels[starts].split(starts.sum(1).tolist())]

    # ---- layouts ------------------------------------------------------------------------------
    def _student(self, batch: Batch, speech: AdapterOutput | None = None) -> tuple[Tensor, Layout, AdapterOutput]:
        """``speech``: the adapter outputs of the batch's spans when already computed (eval reuses them)."""
        embed = self.llm.get_input_embeddings()
        if speech is None and batch.num_speech:
            speech = self.adapter_output(batch.waves, batch.wave_lengths)
        elif speech is None:
            # A text-only batch still runs the encoder, adapter (and compression) on a silent dummy: under ZeRO-3
            # every rank must run the same modules and collectives (each forward gathers parameters) and get
            # every gradient.
            dummy = batch.waves.new_zeros(1, self.encoder.sample_rate // 4)
            speech = self.adapter_output(dummy, torch.full((1,), dummy.shape[1], device=dummy.device))
        layout, cfg = batch.layout, self.adapter.cfg
        if layout is not None and cfg.compress == "none" and layout.end_marker == cfg.end_marker:
            # the packing's layout: every vector of every span (no device read to size anything)
            vectors = speech.vectors[layout.vector_span, layout.vector_index] if batch.num_speech else speech.vectors
        else:
            vectors, counts = self.llm_vectors(speech)
            layout = Layout.build(batch, counts if batch.num_speech else batch.wave_lengths, cfg.end_marker)
        if not batch.num_speech:
            speech = AdapterOutput(*(t[:0] for t in speech))
        rows, hidden = batch.rows, self.boundary.shape[1]
        text = embed(layout.text_token)
        out = text.new_zeros(rows, layout.student_len, hidden)
        out = out.index_put((layout.text_row, layout.text_pos), text)
        if not batch.num_speech:
            return out + (vectors.sum() + self.boundary.sum()).to(out.dtype) * 0.0, layout, speech
        out = out.index_put((layout.vector_row, layout.vector_pos), vectors.to(out.dtype))
        for row, pos in ((BEGIN, layout.begin_pos), (END, layout.end_pos)):
            out = out.index_put((layout.span_row[: len(pos)], pos),
                                self.boundary[row].to(out.dtype).expand(len(pos), hidden))
        return out, layout, speech

    def student_embeddings(self, batch: Batch, speech: AdapterOutput | None = None) -> tuple[torch.Tensor, Layout]:
        """Token embeddings at text positions, [begin] vectors [end] at speech spans."""
        embeds, layout, _ = self._student(batch, speech)
        return embeds, layout

    def prompt_embeddings(self, doc: Document, bos_id: int | None, speech: AdapterOutput | None = None) -> Tensor:
        """[1, P, H] input embeddings of one prompt (text and speech spans), never truncated: for scoring and
        generation, which run the LLM on them. ``speech``: its spans' adapter outputs, in span order, when
        already computed."""
        budget = max(doc.lengths(self.vectors_for, bos_id is not None))
        batch = pack([doc], self.vectors_for, budget, bos_id).to(self.boundary.device)
        return self.student_embeddings(batch, speech)[0]

    def forward(self, batch: Batch, with_speech: bool = False) \
            -> tuple[Tensor, Layout] | tuple[Tensor, Layout, AdapterOutput]:
        """Last hidden states of the student on the interleaved layout: [B, Ts, H], the layout and, with
        ``with_speech``, the adapter outputs the layout was built from (for the CTC loss; no recomputation).

        Call the module (``model(batch)``), not a method: under ZeRO-3 the forward hook is what gathers
        the boundary embeddings, which belong to this module itself."""
        embeds, layout, speech = self._student(batch)
        out = self._decoder(teacher=False)(inputs_embeds=embeds, attention_mask=layout.student_mask.long())
        return (out.last_hidden_state, layout, speech) if with_speech else (out.last_hidden_state, layout)

    def text_hidden(self, ids: torch.Tensor, mask: torch.Tensor | None, teacher: bool,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states on an all-text layout, as the teacher (no grad) or as the student. With
        ``position_ids`` that restart and no ``mask``, transformers keeps attention inside each packed document."""
        def run() -> torch.Tensor:
            return self._decoder(teacher)(input_ids=ids, attention_mask=None if mask is None else mask.long(),
                                          position_ids=position_ids, use_cache=False).last_hidden_state

        if teacher:
            with self.teacher_mode():
                return run()
        return run()
