"""Frozen speech encoders: waves + lengths -> frames + frame lengths, one interface for every kind.

Kinds: ``mel`` (torchaudio log-mel, no weights), ``whisper`` (transformers WhisperEncoder), ``mimi``
(transformers MimiModel's encoder, continuous latents before quantisation) and ``toy`` (the toy world's
phonetic encoder, toy/speech_encoder.py). Adding a kind is one entry in ``ENCODERS``.

Every kind is padding-invariant: an item's valid frames are the same whether it is encoded alone or in a
batch padded to a longer item, whatever lies in the padding (samples past ``lengths`` are zeroed first).
``frames_for`` gives the exact valid frame count before encoding, so layouts can be planned ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from transformers import MimiConfig, MimiModel, PreTrainedModel, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from config import require
from model.masks import valid_mask


@dataclass
class EncoderConfig:
    kind: str = "mel"  # a key of ENCODERS: mel | whisper | mimi | toy
    path: str = ""  # local from_pretrained directory (whisper, mimi), checkpoint folder (toy)
    n_mels: int = 80  # mel only
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights of pretrained kinds

    def __post_init__(self) -> None:
        require(self.kind in ENCODERS, "kind", f"must be one of {sorted(ENCODERS)}, got {self.kind!r}")
        require(bool(self.path) or not ENCODERS[self.kind].pretrained, "path",
                f"encoder kind {self.kind!r} loads weights: give the local model directory")
        require(self.n_mels > 0, "n_mels", f"must be positive, got {self.n_mels}")


def _power_mel(waves: Tensor, window: Tensor, filters: Tensor, hop: int, center: bool) -> Tensor:
    """[B, n_mels, frames] mel power spectrogram in float32 (even when a parent cast the buffers to bf16);
    ``filters`` is [n_freqs, n_mels]."""
    spec = torch.stft(waves, window.numel(), hop, window=window.float(), center=center, return_complex=True)
    return filters.float().T @ spec.abs().pow(2)


def _require_dir(path: str) -> None:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"encoder.path: {path!r} is not a directory")


def _from_pretrained(cls: type[PreTrainedModel], path: str, **kwargs) -> PreTrainedModel:
    """``cls.from_pretrained`` from a local directory, refusing a checkpoint that leaves weights random."""
    _require_dir(path)
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    if bad:
        raise ValueError(f"encoder.path: {path} lacks {len(bad)} weights of {cls.__name__} (e.g. {bad[:3]})")
    return model


class SpeechEncoder(nn.Module):
    """Frozen encoder: parameters never train, always in eval mode, forward under no_grad."""

    pretrained: ClassVar[bool] = False  # needs EncoderConfig.path
    sample_rate: int  # rate the waves must have
    frame_rate: float  # output frames per second
    dim: int  # output feature size

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Valid frames for each length in samples (integer arithmetic, any shape)."""
        raise NotImplementedError

    def _encode(self, waves: Tensor, lengths: Tensor) -> Tensor:
        """[B, F', dim] with F' >= the longest item's frames; samples past ``lengths`` are zero."""
        raise NotImplementedError

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SpeechEncoder:
        """Stay in eval mode whatever a parent module asks: a frozen encoder never runs dropout."""
        return super().train(False)

    def frames_for(self, num_samples: int) -> int:
        """Exact number of valid frames ``forward`` gives for ``num_samples`` samples."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        return int(self.frame_lengths(torch.tensor([num_samples]))[0])

    @torch.no_grad()
    def forward(self, waves: Tensor, lengths: Tensor, num_frames: int | None = None) -> tuple[Tensor, Tensor]:
        """waves [B, T] at ``sample_rate``, lengths [B] in samples -> frames [B, F, dim], frame_lengths [B].

        F is ``num_frames`` when given (at least the longest item's count: the caller knows it, e.g. from the
        waves' width), else the longest item's frame count; frames past an item's length are zero. Lengths on
        the CPU are checked; on a GPU reading them back would stall its queue (the trainer's come from packing).
        """
        if waves.dim() != 2 or lengths.shape != (waves.shape[0],):
            raise ValueError(f"expected waves [B, T] and lengths [B], got {tuple(waves.shape)} "
                             f"and {tuple(lengths.shape)}")
        if lengths.device.type == "cpu" and len(lengths) and (int(lengths.min()) < 0
                                                              or int(lengths.max()) > waves.shape[1]):
            raise ValueError(f"lengths must lie in [0, {waves.shape[1]}], got {lengths.tolist()}")
        lengths = lengths.to(waves.device, torch.long)
        waves = waves.float().masked_fill(~valid_mask(lengths, waves.shape[1]), 0.0)
        frame_lengths = self.frame_lengths(lengths)
        if num_frames is None:
            num_frames = int(frame_lengths.max()) if len(lengths) else 0
        num = num_frames
        frames = self._encode(waves, lengths)[:, :num]
        return frames.masked_fill(~valid_mask(frame_lengths, num)[..., None], 0.0), frame_lengths


class MelEncoder(SpeechEncoder):
    """Log-mel filterbank (25 ms windows every 10 ms at 16 kHz, edges snipped as in Kaldi), normalised per
    utterance to zero mean and unit variance per mel bin over its valid frames."""

    win, hop = 400, 160

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.sample_rate, self.dim = 16_000, cfg.n_mels
        self.frame_rate = self.sample_rate / self.hop
        fbanks = torchaudio.functional.melscale_fbanks(self.win // 2 + 1, 0.0, self.sample_rate / 2, cfg.n_mels,
                                                       self.sample_rate)
        self.register_buffer("filters", fbanks, persistent=False)
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self._freeze()

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return ((lengths - self.win) // self.hop + 1).clamp(min=0)

    def _encode(self, waves: Tensor, lengths: Tensor) -> Tensor:
        waves = F.pad(waves, (0, max(0, self.win - waves.shape[1])))
        x = (_power_mel(waves, self.window, self.filters, self.hop, center=False) + 1e-6).log().transpose(1, 2)
        n = self.frame_lengths(lengths)
        mask = valid_mask(n, x.shape[1])[..., None]
        count = n.clamp(min=1)[:, None, None]
        mean = (x * mask).sum(1, keepdim=True) / count
        var = ((x - mean).pow(2) * mask).sum(1, keepdim=True) / count
        return (x - mean) * torch.rsqrt(var + 1e-5)


class _WhisperEncoderOnly(WhisperEncoder):
    """WhisperEncoder that loads quietly from a full Whisper checkpoint (decoder weights are skipped)."""

    _keys_to_ignore_on_load_unexpected = [r"decoder\.", r"^proj_out\."]


class WhisperSpeechEncoder(SpeechEncoder):
    """Whisper's encoder on windows as long as the batch's longest item, not Whisper's fixed 30 s.

    Whisper pads every input to 30 s and attends over the silence. Here the batch is cut after its longest
    item (plus two mel frames of silence, the conv context of the last frame), positions are the first
    ``embed_positions`` rows, and attention is masked to each item's own frames. So an item's frames do not
    depend on the batch, and they are not those of Whisper's 30 s forward: there every frame also attends to
    the padding silence. Features are WhisperFeatureExtractor's log-mel, with the clamp (max - 8) taken over
    valid frames only; dither is not applied.
    """

    pretrained = True
    stride = 2  # conv2

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.model = _from_pretrained(_WhisperEncoderOnly, cfg.path, dtype=getattr(torch, cfg.dtype),
                                      key_mapping={r"^model\.encoder\.": "", r"^encoder\.": ""})
        mels = self.model.config.num_mel_bins
        if (Path(cfg.path) / "preprocessor_config.json").is_file():
            extractor = WhisperFeatureExtractor.from_pretrained(cfg.path)
        else:
            extractor = WhisperFeatureExtractor(feature_size=mels)
        if extractor.feature_size != mels:
            raise ValueError(f"encoder.path: {cfg.path} feature extractor gives {extractor.feature_size} mel bins, "
                             f"the encoder takes {mels}")
        self.sample_rate, self.hop, self.n_fft = extractor.sampling_rate, extractor.hop_length, extractor.n_fft
        self.frame_rate = self.sample_rate / (self.hop * self.stride)
        self.dim = self.model.config.d_model
        self.max_mel = self.model.config.max_source_positions * self.stride
        self.register_buffer("filters", torch.from_numpy(extractor.mel_filters).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self._freeze()

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        if len(lengths) and int(lengths.max()) > self.max_mel * self.hop:
            raise ValueError(f"whisper encodes at most {self.max_mel * self.hop} samples "
                             f"({self.max_mel * self.hop / self.sample_rate:g} s), got {int(lengths.max())}")
        return (lengths // self.hop + 1) // self.stride

    def features(self, waves: Tensor, lengths: Tensor) -> Tensor:
        """[B, n_mels, L] Whisper log-mel of zero-padded waves: the valid frames and two frames after them."""
        n_mel = lengths // self.hop
        size = min(int(n_mel.max()) + 2, self.max_mel)
        # zeros up to the last needed window's end, so STFT's reflection at the right edge mirrors silence
        waves = waves[:, : size * self.hop]
        waves = F.pad(waves, (0, size * self.hop + self.n_fft // 2 - waves.shape[1]))
        log = _power_mel(waves, self.window, self.filters, self.hop, center=True)[..., :size]
        log = log.clamp(min=1e-10).log10()
        peak = log.masked_fill(~valid_mask(n_mel, size)[:, None], float("-inf")).amax(dim=(1, 2))
        return (torch.maximum(log, peak[:, None, None] - 8.0) + 4.0) / 4.0

    def encode_features(self, features: Tensor, frame_lengths: Tensor) -> Tensor:
        """WhisperEncoder.forward for any window up to 30 s, attention masked to ``frame_lengths`` frames.

        Submodules are called (never their weights read directly) so ZeRO-3 can gather them.
        """
        enc = self.model
        x = F.gelu(enc.conv1(features.to(enc.dtype)))
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        x = x + enc.embed_positions(torch.arange(x.shape[1], device=x.device))
        mask = torch.zeros(x.shape[0], 1, 1, x.shape[1], dtype=x.dtype, device=x.device)
        mask.masked_fill_(~valid_mask(frame_lengths, x.shape[1])[:, None, None], torch.finfo(x.dtype).min)
        for layer in enc.layers:
            x = layer(x, mask)
        return enc.layer_norm(x)

    def _encode(self, waves: Tensor, lengths: Tensor) -> Tensor:
        return self.encode_features(self.features(waves, lengths), self.frame_lengths(lengths))


class MimiSpeechEncoder(SpeechEncoder):
    """Mimi's continuous latents before quantisation (12.5 Hz at 24 kHz for the released model).

    Mimi is causal: frame k depends on samples < (k+1) * frame_size only. Each batch is zero-padded to whole
    frames, so a partial last frame is encoded as Mimi's streaming mode would (the item followed by silence)
    and the valid frames, ceil(length / frame_size), are exact whatever the batch.
    """

    pretrained = True

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        _require_dir(cfg.path)
        config = MimiConfig.from_pretrained(cfg.path)
        config.decoder_config = None  # encoder only: the decoder is never built nor loaded
        model = _from_pretrained(MimiModel, cfg.path, config=config, dtype=getattr(torch, cfg.dtype))
        self.model = model.encoder  # the quantizer goes with ``model``
        if config.audio_channels != 1 or self.model.downsample is None:
            raise ValueError(f"encoder.path: {cfg.path} must be a mono Mimi with a downsampling layer")
        self.sample_rate, self.frame_size, self.dim = config.sampling_rate, config.frame_size, config.hidden_size
        self.frame_rate = self.sample_rate / self.frame_size
        self._freeze()

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return (lengths + self.frame_size - 1) // self.frame_size

    def _encode(self, waves: Tensor, lengths: Tensor) -> Tensor:
        waves = F.pad(waves, (0, -waves.shape[1] % self.frame_size))
        latents = self.model(waves[:, None].to(self.model.dtype), use_streaming=False).latents
        return latents.transpose(1, 2)


class ToySpeechEncoder(SpeechEncoder):
    """The toy world's encoder (toy/speech_encoder.py, pre-trained with CTC on espeak-ng phonemes): log-mel,
    4x conv subsampling, a small Transformer; frames are its last hidden states at 25 Hz, not phoneme logits."""

    pretrained = True

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        from model.toy_encoder import load_model  # imported here: it builds on this module's MelEncoder

        _require_dir(cfg.path)
        self.model = load_model(cfg.path).to(getattr(torch, cfg.dtype))
        self.sample_rate, self.frame_rate, self.dim = self.model.sample_rate, self.model.frame_rate, self.model.dim
        self._freeze()

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return self.model.frame_lengths(lengths)

    def _encode(self, waves: Tensor, lengths: Tensor) -> Tensor:
        return self.model.hidden(waves, lengths)[0]


ENCODERS: dict[str, type[SpeechEncoder]] = {
    "mel": MelEncoder,
    "whisper": WhisperSpeechEncoder,
    "mimi": MimiSpeechEncoder,
    "toy": ToySpeechEncoder,
}


def build_encoder(cfg: EncoderConfig) -> SpeechEncoder:
    """The frozen encoder ``cfg`` names (weights from ``cfg.path`` for pretrained kinds)."""
    return ENCODERS[cfg.kind](cfg)
