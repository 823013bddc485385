"""The toy world's word aligner: its phoneme CTC encoder (toy.speech_encoder) with words spelled by espeak-ng.

    python -m shards.build ... --align toy.align:assets/toy/encoder
"""

from __future__ import annotations

import torch

from model.toy_encoder import load_model
from shards.align import WordAligner
from toy.speech_encoder import TARGET_VOICE, phonemize_many


def aligner(path: str, device: str = "cpu") -> WordAligner:
    """A ``shards.align.WordAligner`` on the toy encoder saved in folder ``path``; a word is spelled as the
    encoder's training targets are (the reference voice's phonemes), symbols it does not know left out."""
    model = load_model(path).to(device)
    ids = {symbol: i + 1 for i, symbol in enumerate(model.phonemes)}   # 0 is the CTC blank

    def emissions(wave: torch.Tensor) -> torch.Tensor:
        logits, frames = model(wave[None].to(device), torch.tensor([len(wave)], device=device))
        return torch.log_softmax(logits[0, : int(frames[0])], -1).cpu()

    def spell(words: list[str]) -> list[list[int]]:
        return [[ids[p] for p in phonemes if p in ids] for phonemes in phonemize_many(words, TARGET_VOICE)]

    return WordAligner(model.sample_rate, model.frame_rate, emissions, spell)
