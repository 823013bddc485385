"""The SALAD training objective as one module, so that the DeepSpeed engine wraps the whole step.

Student on the interleaved layout, teacher on the all-text layout, losses at the aligned positions
(``model.inputs.Layout``): L = alpha * KL(teacher || student) + (1 - alpha) * NLL + ctc_weight * CTC, where
CTC is the optional alignment of the adapter outputs to the LLM's token embeddings (``losses.ctc_alignment_loss``).

The teacher reads each packed row whole (``teacher_context: row``: a document's targets see the documents
packed before it) or each document alone (``document``: positions restart per document, attention stays
inside it). With ``document``, cached top-k targets (``train.teacher_cache``) replace the teacher's forward
pass for batches that carry them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from config import require
from model.inputs import Batch, Layout, document_positions
from model.speech_lm import SpeechLM
from train import distributed
from train.losses import (
    chunked_kl,
    combine,
    ctc_alignment_loss,
    distillation_loss,
    forgetting,
    misalignment,
    nll_loss,
    topk_distillation_loss,
)


@dataclass
class LossConfig:
    alpha: float = 1.0          # weight of the distillation KL; SALAD uses 1 in both stages
    temperature: float = 1.0
    chunk_size: int = 1024      # positions projected to the vocabulary at once
    ctc_weight: float = 0.0     # CTC of adapter outputs vs the LLM's token embeddings; 0 (off) in the paper's setup
    # What the teacher reads before a token: its packed row, or its own document only (what a cache holds).
    teacher_context: Literal["row", "document"] = "row"
    # Cached top-k teacher targets (python -m train.teacher_cache), with teacher_context: document: used when
    # present, never, or an error when missing.
    teacher_cache: Literal["auto", "off", "required"] = "auto"

    def __post_init__(self) -> None:
        require(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        require(self.ctc_weight >= 0, "ctc_weight", f"must be >= 0, got {self.ctc_weight}")
        require(self.teacher_cache != "required" or self.teacher_context == "document", "teacher_cache",
                "'required' needs teacher_context: document (the cache holds each document read alone)")


class Objective(nn.Module):
    def __init__(self, model: SpeechLM, cfg: LossConfig, distributed: bool = False) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.distributed = distributed

    def teacher_head(self, hidden: torch.Tensor) -> torch.Tensor:
        with self.model.teacher_mode():
            return self.model.teacher_head(hidden)

    def teacher_hidden(self, batch: Batch, layout: Layout) -> Tensor:
        """The live teacher's last hidden states on the all-text layout, per ``teacher_context``."""
        if self.cfg.teacher_context == "row":
            return self.model.text_hidden(layout.teacher_ids, layout.teacher_mask, teacher=True)
        # No attention mask and positions that restart: transformers then keeps attention inside each
        # document (its packed-sequence path); padding follows the documents, so causal attention ignores it.
        _, positions = document_positions(batch, layout.teacher_len)
        return self.model.text_hidden(layout.teacher_ids, None, teacher=True, position_ids=positions)

    def cached_targets(self, batch: Batch, layout: Layout) -> tuple[Tensor, Tensor, Tensor] | None:
        """Top-k ids, log-probs and rest log-mass at the aligned positions from the batch's cached targets,
        or None (live teacher). Every rank takes the same branch: the live teacher's forward is a collective
        under ZeRO-3, so one rank without targets sends them all to the live teacher."""
        cfg = self.cfg
        if cfg.teacher_cache == "off" or cfg.teacher_context != "document":
            return None
        targets = batch.teacher
        usable = torch.tensor(float(targets is not None))
        if self.distributed:
            distributed.all_reduce(usable, "min")
        if not usable:
            return None
        doc, pos = document_positions(batch, layout.teacher_len)
        valid = layout.teacher_mask
        if not torch.equal(targets.ids[doc[valid], pos[valid]], layout.teacher_ids[valid]):
            raise RuntimeError(f"cached teacher targets of {batch.doc_keys} do not line up with the batch")
        doc, pos = doc[layout.map_row, layout.map_teacher], pos[layout.map_row, layout.map_teacher]
        return targets.topk_ids[doc, pos], targets.topk_logp[doc, pos], targets.rest_logp[doc, pos]

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        hidden, layout, speech = self.model(batch, with_speech=True)
        student_at = hidden[layout.map_row, layout.map_student]
        cached = self.cached_targets(batch, layout)
        if cached is None:
            teacher = self.teacher_hidden(batch, layout)
            teacher_at = teacher[layout.map_row, layout.map_teacher]
        distill = nll = None
        if cfg.alpha > 0 and cached is not None:
            distill = topk_distillation_loss(student_at, self.model.student_head, *cached, cfg.temperature,
                                          cfg.chunk_size, sync_ranks=self.distributed)
        elif cfg.alpha > 0:
            distill = distillation_loss(student_at, teacher_at, self.model.student_head, self.teacher_head,
                                     cfg.temperature, cfg.chunk_size, sync_ranks=self.distributed)
        if cfg.alpha < 1:
            nll = nll_loss(student_at, self.model.student_head, layout.map_target, cfg.chunk_size,
                           sync_ranks=self.distributed)
        # With nothing to predict the loss is 0, and it still runs through the (empty) head chunks: under ZeRO-3
        # backward recomputes them, gathering the head as the other ranks do. Never replace it by a constant.
        loss = combine(distill, nll, cfg.alpha)
        ctc = None
        if cfg.ctc_weight > 0:   # every rank, speech or not: the head calls are collectives under ZeRO-3
            ctc = ctc_alignment_loss(speech.vectors, speech.blank_logits, speech.lengths, batch.span_tokens,
                                     batch.span_token_count, self.model.token_logits, cfg.chunk_size,
                                     sync_ranks=self.distributed)
            loss = loss + cfg.ctc_weight * ctc
        zero = loss.detach() * 0
        return {"loss": loss, "kl": distill.detach() if distill is not None else zero,
                "nll": nll.detach() if nll is not None else zero, "ctc": ctc.detach() if ctc is not None else zero,
                # torch.full: a fill on the device, where torch.tensor would copy from the host and wait
                "tokens": torch.full((), float(layout.map_row.numel()), device=loss.device),
                "cached": torch.full((), float(cached is not None), device=loss.device)}

    @torch.no_grad()
    def diagnostics(self, batch: Batch) -> torch.Tensor:
        """Sums on a held-out batch, in the order of ``DIAGNOSTIC_SUMS`` (float64, on the model's device).

        M = KL(student(text) || student(speech)) and D = KL(teacher(text) || student(speech)) at the aligned
        positions of the interleaved layout; F = KL(teacher(text) || student(text)) at every text position.
        Sums, so that ranks, batches and probe documents add up; ``diagnostic_means`` turns them into M, F, D.
        Evaluated in eval mode (no dropout), whatever mode the model is in.
        """
        with evaluating(self.model):
            hidden, layout = self.model(batch)
            student_text = self.model.text_hidden(layout.teacher_ids, layout.teacher_mask, teacher=False)
            teacher_text = self.model.text_hidden(layout.teacher_ids, layout.teacher_mask, teacher=True)
        chunk, sync = self.cfg.chunk_size, self.distributed
        speech = hidden[layout.map_row, layout.map_student]
        head = self.model.student_head
        m = misalignment(student_text[layout.map_row, layout.map_teacher], speech, head, chunk, reduction="sum",
                         sync_ranks=sync)
        d = chunked_kl(teacher_text[layout.map_row, layout.map_teacher], speech, self.teacher_head, head, 1.0, chunk,
                       "sum", sync_ranks=sync)
        mask = layout.teacher_mask
        f = forgetting(teacher_text[mask], student_text[mask], self.teacher_head, head, chunk, reduction="sum",
                       sync_ranks=sync)
        sums = {"M": m, "aligned": layout.map_row.numel(), "F": f, "text": mask.sum(), "D": d}
        return torch.stack([torch.as_tensor(sums[name], dtype=torch.float64, device=hidden.device)
                            for name in DIAGNOSTIC_SUMS])


DIAGNOSTIC_SUMS = ("M", "aligned", "F", "text", "D")   # Objective.diagnostics: KL sums and their position counts
DIAGNOSTIC_MEANS = {"M": "aligned", "F": "text", "D": "aligned"}   # each diagnostic: its sum over its count


def diagnostic_means(sums: torch.Tensor) -> dict[str, float]:
    """M, F and D from (rank-summed) ``Objective.diagnostics`` sums; 0 where a count is 0."""
    named = dict(zip(DIAGNOSTIC_SUMS, sums.tolist(), strict=True))
    return {name: named[name] / max(named[count], 1.0) for name, count in DIAGNOSTIC_MEANS.items()}


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
