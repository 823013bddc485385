"""SpeechLM: frozen speech encoder -> adapter -> causal LLM, and the text teacher beside it.

The student reads interleaved inputs (``model.inputs``); the teacher reads the same document as
text. With a frozen or LoRA-trained LLM the teacher is the same weights (adapters disabled, no
grad), so no second copy exists; with a fully trained LLM it is a frozen copy (``teacher``).
Methods return hidden states, never full logits: losses project the few positions they need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from model.adapter import Adapter
from model.encoder import SpeechEncoder
from model.inputs import Batch, Layout


class SpeechLM(nn.Module):
    def __init__(self, llm: nn.Module, encoder: SpeechEncoder, adapter: Adapter,
                 teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.llm = llm
        self.encoder = encoder
        self.adapter = adapter
        self.teacher = teacher
        hidden = llm.get_input_embeddings().embedding_dim
        # Learned [begin, end] markers around every speech span, on the scale of token embeddings.
        std = float(getattr(llm.config, "initializer_range", 0.02))
        self.boundary = nn.Parameter(torch.randn(2, hidden) * std)

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
        """No grad, and LoRA adapters off when the teacher is the student's own weights."""
        disable = (self.llm.disable_adapter() if self.teacher is None and hasattr(self.llm, "disable_adapter")
                   else contextlib.nullcontext())
        with torch.no_grad(), disable:
            yield

    def speech_vectors(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and adapt every speech span of a batch at once: [S, n, H] and vectors per span [S]."""
        frames, frame_lengths = self.encoder(waves, lengths)
        return self.adapter(frames.to(self.boundary.dtype), frame_lengths)

    # ---- layouts ------------------------------------------------------------------------------
    def student_embeddings(self, batch: Batch) -> tuple[torch.Tensor, Layout]:
        """Token embeddings at text positions, [begin] vectors [end] at speech spans."""
        embed = self.llm.get_input_embeddings()
        if batch.num_speech:
            vectors, counts = self.speech_vectors(batch.waves, batch.wave_lengths)
        else:
            # A text-only batch still runs the encoder and adapter on a silent dummy: under ZeRO-3 every
            # rank must run the same modules (each forward gathers parameters) and get every gradient.
            dummy = batch.waves.new_zeros(1, self.encoder.sample_rate // 4)
            vectors, _ = self.speech_vectors(dummy, torch.tensor([dummy.shape[1]], device=dummy.device))
            counts = batch.wave_lengths
        layout = Layout.build(batch, counts)
        rows, hidden = batch.rows, self.boundary.shape[1]
        text = embed(layout.text_token)
        out = text.new_zeros(rows, layout.student_len, hidden)
        out = out.index_put((layout.text_row, layout.text_pos), text)
        if not batch.num_speech:
            return out + (vectors.sum() + self.boundary.sum()).to(out.dtype) * 0.0, layout
        if batch.num_speech:
            span = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
            offset = layout.vector_pos - torch.repeat_interleave(layout.begin_pos + 1, counts)
            out = out.index_put((layout.vector_row, layout.vector_pos), vectors[span, offset].to(out.dtype))
            out = out.index_put((layout.span_row, layout.begin_pos), self.boundary[0].to(out.dtype).expand(
                len(counts), hidden))
            out = out.index_put((layout.span_row, layout.end_pos), self.boundary[1].to(out.dtype).expand(
                len(counts), hidden))
        return out, layout

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Layout]:
        """Last hidden states of the student on the interleaved layout: [B, Ts, H].

        Call the module (``model(batch)``), not a method: under ZeRO-3 the forward hook is what gathers
        the boundary embeddings, which belong to this module itself."""
        embeds, layout = self.student_embeddings(batch)
        out = self._decoder(teacher=False)(inputs_embeds=embeds, attention_mask=layout.student_mask.long())
        return out.last_hidden_state, layout

    def text_hidden(self, ids: torch.Tensor, mask: torch.Tensor, teacher: bool) -> torch.Tensor:
        """Last hidden states on an all-text layout, as the teacher (no grad) or as the student."""
        if teacher:
            with self.teacher_mode():
                return self._decoder(teacher=True)(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return self._decoder(teacher=False)(input_ids=ids, attention_mask=mask.long()).last_hidden_state
