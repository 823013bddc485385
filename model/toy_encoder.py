"""The toy world's speech encoder network: a small phonetic model standing where Mimi stands in the paper.

Architecture: ``model.encoder``'s 80-dim log-mel at 16 kHz -> two stride-2 convolutions (4x subsampling) ->
sinusoidal positions -> a 3-layer pre-norm Transformer (d 144, 0.86M parameters) -> CTC head over the phonemes
plus blank (index 0). Training masks random mel bands and frame spans (SpecAugment). It lives here, beside the
other encoders (``model.encoder``'s kind ``toy`` loads it); how it is pre-trained on espeak-ng speech, its
phonemizer and command line are in ``toy/speech_encoder.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor, nn

from config import ConfigError, require
from model.encoder import EncoderConfig, MelEncoder
from model.masks import valid_mask
from shards.format import atomic_write_bytes, atomic_write_json

WEIGHTS, CONFIG = "encoder.safetensors", "encoder.json"
FORMAT = "salad-toy-encoder-v1"
SAMPLE_RATE = 16_000  # model.encoder.MelEncoder's rate


@dataclass
class ToyEncoderArch:
    """Sizes of the network; saved in encoder.json."""

    n_mels: int = 80
    dim: int = 144
    layers: int = 3
    heads: int = 4
    ffn: int = 576
    dropout: float = 0.0  # SpecAugment regularises; dropout 0.1 gave the same held-out error, ~15% slower steps

    def __post_init__(self) -> None:
        for key in ("n_mels", "dim", "layers", "heads", "ffn"):
            require(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key,
                    f"must be a positive integer, got {getattr(self, key)!r}")
        require(self.dim % (2 * self.heads) == 0, "dim", f"must be a multiple of 2 * heads, got {self.dim}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must lie in [0, 1), got {self.dropout}")


def _sinusoids(length: int, dim: int, like: Tensor) -> Tensor:
    """[length, dim] fixed positions (no length limit, no weights)."""
    pos = torch.arange(length, device=like.device, dtype=torch.float32)[:, None]
    angles = pos * torch.exp(torch.arange(0, dim, 2, device=like.device) * (-math.log(10_000.0) / dim))
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(like.dtype)


def _random_spans(limit: Tensor, size: int, width: int) -> Tensor:
    """[B, size] bool: per row one span of 0..``width`` positions inside [0, limit)."""
    w = torch.randint(0, width + 1, limit.shape, device=limit.device)[:, None]
    start = (torch.rand(limit.shape, device=limit.device)[:, None] * (limit[:, None] - w + 1).clamp(min=1)).long()
    pos = torch.arange(size, device=limit.device)
    return (pos >= start) & (pos < start + w)


class ToySpeechNet(nn.Module):
    """waves -> log-mel -> 4x conv subsampling -> Transformer -> hidden states (and CTC logits)."""

    augment = (2, 15, 10)  # SpecAugment while training: masks of each kind, max mel bins, max mel frames

    def __init__(self, arch: ToyEncoderArch, phonemes: list[str]) -> None:
        super().__init__()
        self.arch, self.phonemes = arch, list(phonemes)
        self.mel = MelEncoder(EncoderConfig(n_mels=arch.n_mels))
        self.sample_rate, self.dim = self.mel.sample_rate, arch.dim
        self.subsample = nn.ModuleList([nn.Conv1d(arch.n_mels, arch.dim, 3, stride=2, padding=1),
                                        nn.Conv1d(arch.dim, arch.dim, 3, stride=2, padding=1)])
        self.frame_rate = self.mel.frame_rate / 2 ** len(self.subsample)
        layer = nn.TransformerEncoderLayer(arch.dim, arch.heads, arch.ffn, arch.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, arch.layers, norm=nn.LayerNorm(arch.dim),
                                                 enable_nested_tensor=False)
        self.head = nn.Linear(arch.dim, len(self.phonemes) + 1)  # index 0 is the CTC blank

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        n = self.mel.frame_lengths(lengths)
        for _ in self.subsample:  # kernel 3, stride 2, padding 1: ceil(n / 2)
            n = (n + 1) // 2
        return n

    def hidden(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """waves [B, T], lengths [B] in samples -> last hidden states [B, F, dim], frame lengths [B].

        Every layer sees zeros past an item's frames (and attention ignores them), so valid frames do not
        depend on the padding; frames past an item's length are not zeroed here. While training, random bands
        of mel bins and spans of frames are zeroed (SpecAugment), so that features rely on no single band or
        instant of the few training voices.
        """
        x, n = self.mel(waves, lengths)  # zero past each item's mel frames
        x = x.transpose(1, 2).to(self.head.weight.dtype)
        masks, bins, frames = self.augment
        for _ in range(masks if self.training else 0):
            band = _random_spans(torch.full_like(n, x.shape[1]), x.shape[1], bins)
            x = x.masked_fill(band[:, :, None] | _random_spans(n, x.shape[2], frames)[:, None], 0.0)
        x = F.pad(x, (0, max(0, 1 - x.shape[2])))  # a batch of clips too short for one frame
        for conv in self.subsample:
            n = (n + 1) // 2
            x = F.gelu(conv(x))
            x = x * valid_mask(n, x.shape[2])[:, None].to(x.dtype)
        x = x.transpose(1, 2)
        x = x + _sinusoids(x.shape[1], self.dim, x)
        return self.transformer(x, src_key_padding_mask=~valid_mask(n, x.shape[1])), n

    def forward(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """CTC logits [B, F, phonemes + 1] and frame lengths [B]."""
        x, n = self.hidden(waves, lengths)
        return self.head(x), n

    def decode(self, waves: Tensor, lengths: Tensor) -> list[list[str]]:
        """Greedy CTC: best symbol per frame, repeats merged, blanks dropped."""
        logits, n = self(waves, lengths)
        best = logits.argmax(-1).tolist()
        out = []
        for ids, k in zip(best, n.tolist(), strict=True):
            ids = ids[:k]
            out.append([self.phonemes[i - 1] for j, i in enumerate(ids) if i and (j == 0 or ids[j - 1] != i)])
        return out


def save_checkpoint(model: ToySpeechNet, out_dir: str | Path, training: dict[str, Any]) -> None:
    """encoder.safetensors, then encoder.json naming the weights' hash: a reader never pairs a config with
    weights it was not written with, and each file is replaced atomically."""
    out = Path(out_dir)
    data = save({k: v.detach().float().contiguous() for k, v in model.state_dict().items()})
    atomic_write_bytes(out / WEIGHTS, data)
    atomic_write_json(out / CONFIG, {"format": FORMAT, "arch": asdict(model.arch), "phonemes": model.phonemes,
                                     "sample_rate": model.sample_rate, "frame_rate": model.frame_rate,
                                     "weights_sha256": hashlib.sha256(data).hexdigest(), "training": training})


def _read_config(path: Path) -> tuple[ToyEncoderArch, list[str], str]:
    """Architecture, phonemes and the weights' hash from encoder.json, every field checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no toy encoder config (train one: python -m toy.speech_encoder)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}")
    phonemes, arch = meta.get("phonemes"), meta.get("arch")
    if not isinstance(phonemes, list) or not phonemes or not all(isinstance(p, str) and p for p in phonemes):
        raise ValueError(f"{path}: field 'phonemes' must be a non-empty list of symbols")
    if len(set(phonemes)) != len(phonemes):
        raise ValueError(f"{path}: field 'phonemes' repeats a symbol")
    if not isinstance(arch, dict):
        raise ValueError(f"{path}: field 'arch' must be a mapping")
    try:
        parsed = ToyEncoderArch(**arch)
    except (TypeError, ConfigError) as exc:
        raise ValueError(f"{path}: field 'arch': {exc}") from None
    if meta.get("sample_rate") != SAMPLE_RATE:
        raise ValueError(f"{path}: field 'sample_rate' must be {SAMPLE_RATE}, got {meta.get('sample_rate')!r}")
    if not isinstance(meta.get("weights_sha256"), str):
        raise ValueError(f"{path}: field 'weights_sha256' is missing")
    return parsed, phonemes, meta["weights_sha256"]


def load_model(path: str | Path) -> ToySpeechNet:
    """The network saved in folder ``path`` by ``save_checkpoint``, in eval mode; errors name the file."""
    folder = Path(path)
    arch, phonemes, sha = _read_config(folder / CONFIG)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: toy encoder weights are missing")
    data = weights.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise ValueError(f"{weights}: does not match {folder / CONFIG} (weights_sha256 differs: "
                         f"written by another run, or damaged)")
    try:
        state = load(data)
    except SafetensorError as exc:
        raise ValueError(f"{weights}: not a safetensors file ({exc})") from None
    model = ToySpeechNet(arch, phonemes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{weights}: does not fit the architecture in {CONFIG}: {exc}") from None
    return model.eval()
