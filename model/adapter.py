"""Adapter: maps frozen speech-encoder frames into the LLM's embedding space (SALAD.md, "The model").

Frame stacking (k consecutive frames concatenated) lowers the frame rate towards the LLM's token rate,
a linear layer projects to the adapter width, a causal Transformer decoder stack (transformers'
Qwen2Model fed with ``inputs_embeds``, its final RMSNorm included) mixes context, and a last linear
layer maps to the LLM's hidden size.

Padding: batches are right-padded, and the stack is causal, so a valid output position only ever
attends to valid positions; no padding mask is needed. Leaving it out keeps SDPA on its ``is_causal``
fast path (flash kernels on GPU) and avoids NaN rows for empty items. Padded input frames are zeroed
before stacking (the last, partial stack of an item must not depend on what the padding holds) and
padded outputs are zeroed after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeVar

import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Qwen2Config, Qwen2Model

from config import require
from model.masks import valid_mask

N = TypeVar("N", int, Tensor)


@dataclass
class AdapterConfig:
    """Adapter shape. The Qwen configs use the paper's 12 layers, width 960, MLP 2560, 15/5 heads."""

    stack: int = 4
    layers: int = 2
    width: int = 256
    mlp: int = 1024
    heads: int = 4
    kv_heads: int = 4
    dropout: float = 0.0
    # "ctc": one LLM input vector per emitted token, the adapter outputs pooled along their greedy CTC path
    # (SpeechLM.llm_vectors). Meant for loss.ctc_weight > 0, which trains that path; off in the paper's configs.
    compress: Literal["none", "ctc"] = "none"
    # False: a speech span is "[begin] vectors" and its last vector predicts the next text token. The toy's
    # student predicted the text after [end] badly (held-out KL 4.9 there vs 1.2 elsewhere; narrative speech
    # accuracy 0.27 with [end], 0.67 with the same model's [end] dropped at evaluation).
    end_marker: bool = True

    def __post_init__(self) -> None:
        for key in ("stack", "layers", "width", "mlp", "heads", "kv_heads"):
            require(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        require(self.width % self.heads == 0, "width", f"{self.width} is not divisible by heads={self.heads}")
        require((self.width // self.heads) % 2 == 0, "width",
                f"head size width/heads = {self.width // self.heads} must be even (rotary embeddings)")
        require(self.heads % self.kv_heads == 0, "kv_heads",
                f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")

    def backbone_config(self) -> Qwen2Config:
        """Qwen2 config of the decoder stack; vocab_size=1 because token embeddings are never used."""
        return Qwen2Config(
            vocab_size=1,
            hidden_size=self.width,
            intermediate_size=self.mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            attention_dropout=self.dropout,
            use_cache=False,
            attn_implementation="sdpa",
        )


class Adapter(nn.Module):
    """Encoder frames [B, F, in_dim] -> LLM input vectors [B, ceil(F/k), out_dim]."""

    def __init__(self, cfg: AdapterConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        self.proj_in = nn.Linear(in_dim * cfg.stack, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.backbone = Qwen2Model(cfg.backbone_config())
        self.backbone.embed_tokens = None  # inputs arrive as embeddings: no unused (and un-sharded) table
        self.proj_out = nn.Linear(cfg.width, out_dim)

    def output_length(self, num_frames: N) -> N:
        """Output vectors for ``num_frames`` input frames (int or tensor): ceil(num_frames / k)."""
        return (num_frames + self.cfg.stack - 1) // self.cfg.stack

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in the backward pass instead of keeping its activations."""
        if enabled:
            self.backbone.activation_checkpointing_enable()
        else:
            self.backbone.activation_checkpointing_disable()

    def forward(self, frames: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """frames [B, F, in_dim] right-padded, lengths [B] -> out [B, ceil(F/k), out_dim], out_lengths [B]."""
        if frames.dim() != 3 or frames.shape[-1] != self.in_dim:
            raise ValueError(f"adapter: frames must be [batch, frames, {self.in_dim}], "
                             f"got {tuple(frames.shape)}")
        if lengths.shape != frames.shape[:1]:
            raise ValueError(f"adapter: lengths must be [{frames.shape[0]}], got {tuple(lengths.shape)}")
        batch, num_frames, _ = frames.shape
        k = self.cfg.stack
        steps = self.output_length(num_frames)
        valid = valid_mask(lengths, num_frames)
        frames = frames.to(self.proj_in.weight.dtype).masked_fill(~valid[..., None], 0.0)
        stacked = F.pad(frames, (0, 0, 0, steps * k - num_frames)).reshape(batch, steps, k * self.in_dim)
        hidden = self.backbone(inputs_embeds=self.drop(self.proj_in(stacked))).last_hidden_state
        out_lengths = self.output_length(lengths)
        out_valid = valid_mask(out_lengths, steps)
        return self.proj_out(hidden).masked_fill(~out_valid[..., None], 0.0), out_lengths
