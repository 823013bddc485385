"""Word timings by forced alignment, for corpora that give text per utterance only (LibriHeavy, Emilia).

Why: SALAD's speech spans are 5-15 words inside an utterance; without word timings ``model.inputs`` can only
make whole utterances (up to 30 s, ~75 words) into speech spans. A CTC model's frame log-probabilities and the
transcript give, through ``torchaudio.functional.forced_align``, the frames of every token, hence of every word.

Aligners (``load_aligner(spec)``):
  ``mms_fa``            torchaudio's MMS_FA bundle (characters a-z and '; 16 kHz). Its weights are read from the
                        torch hub cache (``torch.hub.get_dir()``/checkpoints/); nothing is downloaded here.
  a folder              a transformers CTC checkpoint (e.g. Wav2Vec2ForCTC with its tokenizer), characters.
  ``module:argument``   ``module.aligner(argument, device)`` builds one: e.g. ``toy.align:assets/toy/encoder`` (the toy
                        world's phoneme CTC encoder, words spelled by espeak-ng).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchaudio

MMS_FA = "mms_fa"


class Unaligned(ValueError):
    """A transcript that cannot be aligned to its audio: the message says why."""


@dataclass
class WordAligner:
    """Word start/end times of an utterance from a CTC model and its transcript."""

    sample_rate: int                                    # what ``emissions`` takes
    frame_rate: float                                   # emission frames per second
    emissions: Callable[[torch.Tensor], torch.Tensor]   # wave [T] -> log-probabilities [frames, classes]
    spell: Callable[[list[str]], list[list[int]]]       # words -> the model's token ids of each word
    blank: int = 0

    @torch.no_grad()
    def align(self, audio: np.ndarray, sr: int, text: str) -> list[list]:
        """``[[word, start s, end s], ...]`` for the words of ``text`` (as ``str.split`` gives them)."""
        words = text.split()
        if not words:
            return []
        spelled = self.spell(words)
        empty = [w for w, ids in zip(words, spelled, strict=True) if not ids]
        if empty:
            raise Unaligned(f"no alignable characters in {empty[:3]}")
        wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if sr != self.sample_rate:
            wave = torchaudio.functional.resample(wave, sr, self.sample_rate)
        log_probs = self.emissions(wave).float()
        targets = [t for ids in spelled for t in ids]
        repeats = sum(a == b for a, b in zip(targets, targets[1:], strict=False))
        if len(targets) + repeats > len(log_probs):
            raise Unaligned(f"{len(log_probs)} frames are too few for {len(targets)} tokens")
        labels, scores = torchaudio.functional.forced_align(log_probs[None], torch.tensor([targets], dtype=torch.int32),
                                                            blank=self.blank)
        spans = torchaudio.functional.merge_tokens(labels[0], scores[0].exp(), blank=self.blank)
        out, k = [], 0
        for word, ids in zip(words, spelled, strict=True):
            first, last = spans[k], spans[k + len(ids) - 1]
            out.append([word, round(first.start / self.frame_rate, 3), round(last.end / self.frame_rate, 3)])
            k += len(ids)
        return out


def _characters(words: list[str], vocab: dict[str, int], lower: bool = True) -> list[list[int]]:
    """Each word's characters that the vocabulary has (punctuation and the like dropped)."""
    return [[vocab[c] for c in (w.lower() if lower else w) if c in vocab] for w in words]


def mms_fa(device: str = "cpu") -> WordAligner:
    """torchaudio's MMS_FA (wav2vec2, 1130 languages romanized; characters), weights from the torch hub cache."""
    bundle = torchaudio.pipelines.MMS_FA
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(bundle._path).name
    if not cached.is_file():
        raise FileNotFoundError(f"--align {MMS_FA}: its weights are not in {cached} (download {bundle._path} "
                                "there on a machine with access)")
    return mms_fa_aligner(bundle.get_model(with_star=False, dl_kwargs={"weights_only": True}), device)


def mms_fa_aligner(model: torch.nn.Module, device: str = "cpu") -> WordAligner:
    """An aligner on an MMS_FA-shaped model (the bundle's, which ends with log_softmax)."""
    bundle = torchaudio.pipelines.MMS_FA
    model = model.to(device).eval()
    vocab = bundle.get_dict(star=None)

    def emissions(wave: torch.Tensor) -> torch.Tensor:
        log_probs, _ = model(wave[None].to(device))
        return log_probs[0].cpu()

    return WordAligner(bundle.sample_rate, bundle.sample_rate / 320, emissions,
                       lambda words: _characters(words, vocab), blank=vocab["-"])


def ctc_folder(path: str | Path, device: str = "cpu") -> WordAligner:
    """A transformers CTC checkpoint (AutoModelForCTC, its feature extractor's rate, its tokenizer's characters)."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer

    folder = Path(path)
    model = AutoModelForCTC.from_pretrained(str(folder)).to(device).eval()
    extractor = AutoFeatureExtractor.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = AutoConfig.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    delimiter = getattr(tokenizer, "word_delimiter_token", None)
    vocab = {k: v for k, v in vocab.items() if len(k) == 1 and k != delimiter}
    lower = not any(c.isupper() for c in vocab)
    frames_per_second = extractor.sampling_rate / int(np.prod(config.conv_stride))

    def emissions(wave: torch.Tensor) -> torch.Tensor:
        inputs = extractor(wave.numpy(), sampling_rate=extractor.sampling_rate, return_tensors="pt")
        logits = model(inputs.input_values.to(device)).logits
        return torch.log_softmax(logits[0], -1).cpu()

    return WordAligner(extractor.sampling_rate, frames_per_second, emissions,
                       lambda words: _characters(words, vocab, lower), blank=config.pad_token_id)


def load_aligner(spec: str, device: str = "cpu") -> WordAligner:
    """The aligner ``spec`` names (the module docstring lists them)."""
    if spec == MMS_FA:
        return mms_fa(device)
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise FileNotFoundError(f"--align {spec}: not a transformers CTC checkpoint (no config.json)")
        return ctc_folder(spec, device)
    module, sep, argument = spec.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", module):
        raise ValueError(f"--align {spec!r}: expected {MMS_FA}, a CTC checkpoint folder, or module:argument")
    return importlib.import_module(module).aligner(argument, device)

