"""Kokoro-82M in process: the paper's TTS (hexgrad/Kokoro-82M, voice af_heart) as ``tts.backend: kokoro``.

Why in process: the model loads once per process (seconds) and stays on the GPU when there is one, where a
command run per utterance would load it for every text. ``synthesize_many`` runs it in the calling process, never
in forked workers. Utterances go through the model one forward each: kokoro 0.9.4's ``KModel`` takes one phoneme
string (its alignment is built for a single sequence) and its decoder's instance norms normalise over the whole
time axis, so a padded batch would change every shorter utterance's audio.

Weights come from a local folder laid out as the hexgrad/Kokoro-82M repository: ``config.json``, one ``*.pth``
(``kokoro-v1_0.pth``) and ``voices/<voice>.pt``; nothing is downloaded. Both are read with
``torch.load(weights_only=True)``, and every part of the model must load completely (kokoro's own loader falls
back to a non-strict load that would leave a mismatched checkpoint's weights random without a word).

Phonemes: misaki's English G2P (its lexicon, spaCy's ``en_core_web_sm``, espeak-ng for the words it lacks) when
``g2p`` is misaki, or auto and that spaCy model is installed; otherwise espeak-ng alone through misaki's
``EspeakFallback`` (espeak-ng's phonemes mapped to Kokoro's set; the library espeakng-loader ships, in process).
``Kokoro.g2p_name`` says which. Phoneme strings longer than the model's 510 are cut at sentence, clause or word
boundaries and the pieces' audio joined.

Why seeded: Kokoro's vocoder draws random phases and noise, so each utterance runs under a seed made of its text,
voice and speed (the caller's RNG state is restored): a rebuild gives the same samples, and so does a batch.

    python -m shards.kokoro_tts --model-path DIR --text "Hello." --wav hello.wav   # one utterance, 24 kHz
    python -m shards.kokoro_tts --model-path DIR --serve   # the long-lived command PROTOCOL (shards/tts.py)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import sys
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

from config import ConfigError
from shards.tts import Combo, TTSConfig, TTSError, make_tts, serve

if TYPE_CHECKING:
    from kokoro import KModel

KOKORO_SR = 24000
REPO_ID = "hexgrad/Kokoro-82M"
PARTS = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")  # the weight file's top-level keys
PHONEME_LIMIT = 510  # Kokoro's context (512) less its two boundary tokens; also a voice file's rows
STYLE_WIDTH = 256  # a voice row: 128 numbers for the decoder, 128 for the prosody predictor
SPACY_MODEL = "en_core_web_sm"
_BREAKS = (".!?…", ":;", ",—", " ")  # where to cut long phoneme strings, best first

# hexgrad/Kokoro-82M's config.json, to build random models for tests and benchmarks (the real one comes with the
# weights). Its vocabulary maps Kokoro's phoneme symbols to token ids.
KOKORO_82M_CONFIG: dict = {
    "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                 "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                 "resblock_kernel_sizes": [3, 7, 11], "upsample_initial_channel": 512},
    "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50, "multispeaker": True,
    "n_layer": 3, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 2048,
               "max_position_embeddings": 512, "num_hidden_layers": 12, "dropout": 0.1},
    "vocab": {
        ";": 1, ":": 2, ",": 3, ".": 4, "!": 5, "?": 6, "—": 9, "…": 10, '"': 11, "(": 12, ")": 13, "“": 14,
        "”": 15, " ": 16, "\u0303": 17, "ʣ": 18, "ʥ": 19, "ʦ": 20, "ʨ": 21, "ᵝ": 22, "\uab67": 23, "A": 24,
        "I": 25, "O": 31, "Q": 33, "S": 35, "T": 36, "W": 39, "Y": 41, "ᵊ": 42, "a": 43, "b": 44, "c": 45,
        "d": 46, "e": 47, "f": 48, "h": 50, "i": 51, "j": 52, "k": 53, "l": 54, "m": 55, "n": 56, "o": 57,
        "p": 58, "q": 59, "r": 60, "s": 61, "t": 62, "u": 63, "v": 64, "w": 65, "x": 66, "y": 67, "z": 68,
        "ɑ": 69, "ɐ": 70, "ɒ": 71, "æ": 72, "β": 75, "ɔ": 76, "ɕ": 77, "ç": 78, "ɖ": 80, "ð": 81, "ʤ": 82,
        "ə": 83, "ɚ": 85, "ɛ": 86, "ɜ": 87, "ɟ": 90, "ɡ": 92, "ɥ": 99, "ɨ": 101, "ɪ": 102, "ʝ": 103, "ɯ": 110,
        "ɰ": 111, "ŋ": 112, "ɳ": 113, "ɲ": 114, "ɴ": 115, "ø": 116, "ɸ": 118, "θ": 119, "œ": 120, "ɹ": 123,
        "ɾ": 125, "ɻ": 126, "ʁ": 128, "ɽ": 129, "ʂ": 130, "ʃ": 131, "ʈ": 132, "ʧ": 133, "ʊ": 135, "ʋ": 136,
        "ʌ": 138, "ɣ": 139, "ɤ": 140, "χ": 142, "ʎ": 143, "ʒ": 147, "ʔ": 148, "ˈ": 156, "ˌ": 157, "ː": 158,
        "ʰ": 162, "ʲ": 164, "↓": 169, "→": 171, "↗": 172, "↘": 173, "ᵻ": 177,
    },
}


def model_files(model_path: str, voices: Iterable[str]) -> tuple[Path, Path, dict[str, Path]]:
    """config.json, the weights and each voice's file in ``model_path``; a TTSError names what is missing."""
    folder = Path(model_path)
    layout = "config.json, one weights file *.pth and voices/<voice>.pt, as in hexgrad/Kokoro-82M"
    if not folder.is_dir():
        raise TTSError(f"kokoro TTS: model_path {str(folder)!r} is not a folder (it needs {layout})")
    config = folder / "config.json"
    if not config.is_file():
        raise TTSError(f"kokoro TTS: {config} not found (model_path needs {layout})")
    weights = sorted(folder.glob("*.pth"))
    if len(weights) != 1:
        raise TTSError(f"kokoro TTS: {folder} needs exactly one weights file *.pth, found "
                       f"{[w.name for w in weights] or 'none'}")
    paths = {voice: folder / "voices" / f"{voice}.pt" for voice in voices}
    for voice, path in paths.items():
        if not path.is_file():
            raise TTSError(f"kokoro TTS: voice {voice!r}: {path} not found")
    return config, weights[0], paths


def _build(config: dict) -> KModel:
    """Kokoro's model with freshly initialised weights (the caller's RNG state left as it was): kokoro's loader
    reads an empty state here (it would download the weights if given none), ``load_model`` loads the real ones
    strictly."""
    from kokoro import KModel

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torch's weight_norm deprecation, dropout on one-layer LSTMs
        return KModel(repo_id=REPO_ID, config=config, model=empty)


def load_model(config_path: Path, weights_path: Path) -> KModel:
    """The model of ``config_path`` with every weight of ``weights_path`` (on the CPU, in eval mode)."""
    try:
        model = _build(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TTSError(f"kokoro TTS: {config_path} is not a Kokoro config ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or set(state) != set(PARTS):
            got = list(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"expected the parts {list(PARTS)}, got {got}")
        for part in PARTS:  # published weights carry DataParallel's "module." prefix
            getattr(model, part).load_state_dict({k.removeprefix("module."): v for k, v in state[part].items()})
    except (OSError, RuntimeError, ValueError, AttributeError, pickle.UnpicklingError) as exc:
        raise TTSError(f"kokoro TTS: cannot load {weights_path} into the model of {config_path}: "
                       f"{str(exc)[:500]}") from None
    return model.eval()


def load_voice(path: Path) -> torch.Tensor:
    """A voice: one reference style row per phoneme count, [rows, 1, 256]."""
    try:
        pack = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise TTSError(f"kokoro TTS: cannot read voice {path}: {exc}") from None
    if not isinstance(pack, torch.Tensor) or pack.ndim != 3 or pack.shape[1:] != (1, STYLE_WIDTH):
        shape = list(pack.shape) if isinstance(pack, torch.Tensor) else type(pack).__name__
        raise TTSError(f"kokoro TTS: {path} is not a voice: expected a [rows, 1, {STYLE_WIDTH}] tensor, got {shape}")
    return pack.float()


def _spacy_model_installed() -> bool:
    """misaki's own test: without the package its G2P would download it."""
    import spacy

    return bool(spacy.util.is_package(SPACY_MODEL))


def make_g2p(choice: str, british: bool) -> tuple[str, Callable[[str], str]]:
    """("misaki" or "espeak", text -> Kokoro phonemes) for American or British English (module docstring).
    Never downloads: misaki's G2P would fetch a missing spaCy model from the network."""
    from misaki import espeak

    fallback = espeak.EspeakFallback(british=british)
    installed = choice != "espeak" and _spacy_model_installed()
    if choice == "misaki" and not installed:
        raise TTSError(f"kokoro TTS: g2p 'misaki' needs spaCy's {SPACY_MODEL} (python -m spacy download "
                       f"{SPACY_MODEL}), which is not installed; g2p 'espeak' needs only espeak-ng")
    if choice == "espeak" or not installed:
        return "espeak", lambda text: fallback(SimpleNamespace(text=text))[0] or ""
    from misaki import en

    g2p = en.G2P(trf=False, british=british, fallback=fallback, unk="")
    return "misaki", lambda text: g2p(text)[0]


def split_phonemes(phonemes: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` symbols, cut after the last sentence end, else clause mark, else space."""
    pieces, rest = [], phonemes.strip()
    while len(rest) > limit:
        cut = next((at + 1 for marks in _BREAKS if (at := max(rest.rfind(m, 0, limit) for m in marks)) > 0), limit)
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    return [p for p in (*pieces, rest) if p]


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when torch sees one. Decided in the process that speaks (a parent that touched CUDA could
    not fork workers that use it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TTSError(f"kokoro TTS: device {name!r}, but torch sees no GPU")
    return device


class Kokoro:
    """The ``kokoro`` backend: files checked and loaded on the CPU by ``make_tts``; moved to the device on the
    first text, in the process that speaks."""

    in_process = True

    def __init__(self, cfg: TTSConfig):
        config, weights, voices = model_files(cfg.model_path, cfg.voices)
        self.model = load_model(config, weights)
        self.packs = {voice: load_voice(path) for voice, path in voices.items()}
        g2ps = {british: make_g2p(cfg.g2p, british) for british in {v.startswith("b") for v in cfg.voices}}
        self.g2p_name = next(iter(g2ps.values()))[0]
        self.g2p = {british: fn for british, (_, fn) in g2ps.items()}
        self.limit = min(PHONEME_LIMIT, self.model.context_length - 2, *(len(p) for p in self.packs.values()))
        self.device_name = cfg.device
        self.device: torch.device | None = None
        self.owner = os.getpid()

    def _on_device(self, where: str) -> torch.device:
        if self.device is None:
            device = resolve_device(self.device_name)
            try:
                self.model.to(device)
                self.packs = {voice: pack.to(device) for voice, pack in self.packs.items()}
            except RuntimeError as exc:
                raise TTSError(f"{where}: cannot move the model to {device}: {exc}") from None
            self.device, self.owner = device, os.getpid()
        elif self.device.type == "cuda" and self.owner != os.getpid():
            raise TTSError(f"{where}: the model is on {self.device} of process {self.owner}; a forked process "
                           "cannot use it (make the TTS in the process that speaks)")
        return self.device

    def speak(self, text: str, combo: Combo, where: str) -> tuple[np.ndarray, int]:
        voice, speed, _, _ = combo
        pieces = split_phonemes(self.g2p[voice.startswith("b")](" ".join(text.split())), self.limit)
        if not pieces:
            raise TTSError(f"{where}: no phonemes ({self.g2p_name} G2P)")
        device = self._on_device(where)
        cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
        pack = self.packs[voice]
        try:
            with torch.random.fork_rng(devices=cuda), torch.inference_mode():
                torch.manual_seed(zlib.crc32(f"{voice}\0{speed}\0{text}".encode()))
                audio = torch.cat([self.model(ps, pack[len(ps) - 1], float(speed)).reshape(-1) for ps in pieces])
        except RuntimeError as exc:  # out of memory, among others: this text fails, the next may not
            raise TTSError(f"{where}: {str(exc)[:300]}") from None
        return audio.float().numpy(), KOKORO_SR

    def close(self) -> None:
        pass


def write_random_model(folder: Path, config: dict = KOKORO_82M_CONFIG, voices: Iterable[str] = ("af_heart",),
                       seed: int = 0, frames_per_phoneme: int = 3) -> Path:
    """FOR TESTS AND BENCHMARKS, IT DOES NOT SPEAK: a model folder in the published layout (config.json;
    kokoro-v1_0.pth with each part's weights under DataParallel's "module." names; voices/<voice>.pt of
    [510, 1, 256]) with random weights, its duration predictor set to give each phoneme ``frames_per_phoneme``
    frames of 25 ms (3: about real speech's phoneme rate), so the compute per second of audio is realistic."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(config)
        with torch.no_grad():
            duration = model.predictor.duration_proj.linear_layer
            share = frames_per_phoneme / config["max_dur"]  # durations are a sum of max_dur sigmoids
            duration.weight.zero_()
            duration.bias.fill_(math.log(share / (1 - share)))
        packs = {voice: 0.3 * torch.randn(PHONEME_LIMIT, 1, STYLE_WIDTH) for voice in voices}
    (folder / "voices").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    torch.save({part: {f"module.{k}": v for k, v in getattr(model, part).state_dict().items()} for part in PARTS},
               folder / "kokoro-v1_0.pth")
    for voice, pack in packs.items():
        torch.save(pack, folder / "voices" / f"{voice}.pt")
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Kokoro-82M from a local folder: one text to a 24 kHz wav, or --serve "
                                            "the long-lived command protocol of shards/tts.py on stdin/stdout")
    p.add_argument("--model-path", required=True, help="config.json, one *.pth, voices/<voice>.pt")
    p.add_argument("--voice", default="af_heart")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--g2p", choices=("auto", "misaki", "espeak"), default="auto")
    p.add_argument("--serve", action="store_true", help="answer JSON requests, one per line, until stdin closes")
    p.add_argument("--text")
    p.add_argument("--wav")
    a = p.parse_args(argv)
    if a.serve == (a.text is not None and a.wav is not None):
        p.error("give --serve, or --text and --wav")
    answers = sys.stdout
    if a.serve:  # stdout carries answers only: whatever else writes to it (a library's print) goes to stderr
        answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        cfg = TTSConfig(backend="kokoro", voices=[a.voice], speeds=[a.speed], model_path=a.model_path,
                        device=a.device, g2p=a.g2p)
        with make_tts(cfg, KOKORO_SR) as tts:
            if a.serve:
                serve(tts, KOKORO_SR, sys.stdin, answers)
            else:
                sf.write(a.wav, tts.synthesize(a.text), KOKORO_SR, subtype="FLOAT")
    except (ConfigError, TTSError) as exc:
        sys.exit(f"kokoro: {exc}")


if __name__ == "__main__":
    main()
