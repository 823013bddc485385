"""Text-to-speech backends that turn text-only corpora into speech segments for shards.

Why subprocesses with argument lists: espeak-ng (and any other command-line synthesizer) is a separate
program. Running it without a shell means text with shell metacharacters is only ever spoken, and
giving espeak-ng its text on stdin means text that starts with '-' can never be read as an option.
Why several (voice, speed, pitch, noise) combinations: one fixed voice makes synthetic speech too easy to
recognise; ``variant`` spreads texts over the combinations deterministically.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio

from config import require

ESPEAK_SPEEDS = (80, 450)  # words per minute espeak-ng accepts (it clamps outside)
ESPEAK_PITCHES = (0, 99)
_VOICE_NAME = re.compile(r"[A-Za-z0-9][\w.+/-]*")
_PLACEHOLDER = re.compile(r"\{text\}|\{wav\}")


@dataclass
class TTSConfig:
    """Which synthesizer to run and the voice/speed/pitch combinations it cycles through."""

    backend: Literal["espeak-ng", "command"] = "espeak-ng"
    voices: list[str] = field(default_factory=lambda: ["en-us"])
    speeds: list[int] = field(default_factory=lambda: [160])  # words per minute
    pitches: list[int] = field(default_factory=lambda: [50])
    # light background noise: white noise at one of these signal-to-noise ratios (dB), cycled with the other
    # settings and seeded by the text, so a rebuild gives the same samples; empty: clean speech
    noise_snr_db: list[float] = field(default_factory=list)
    command: list[str] = field(default_factory=list)  # argument template with {text} and {wav}
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        require(bool(self.voices), "voices", "needs at least one voice")
        for voice in self.voices:
            require(bool(_VOICE_NAME.fullmatch(voice)), "voices",
                    f"{voice!r} is not a voice name (letters, digits, '_.+/-', not starting with '-')")
        lo, hi = ESPEAK_SPEEDS
        require(bool(self.speeds) and all(lo <= s <= hi for s in self.speeds), "speeds",
                f"needs at least one speed, each in {lo}..{hi} words per minute, got {self.speeds}")
        lo, hi = ESPEAK_PITCHES
        require(bool(self.pitches) and all(lo <= p <= hi for p in self.pitches), "pitches",
                f"needs at least one pitch, each in {lo}..{hi}, got {self.pitches}")
        require(self.timeout_s > 0, "timeout_s", f"must be positive, got {self.timeout_s}")
        require(all(0 < snr < 100 for snr in self.noise_snr_db), "noise_snr_db",
                f"signal-to-noise ratios must be in (0, 100) dB, got {self.noise_snr_db}")
        if self.backend == "command":
            for placeholder in ("{text}", "{wav}"):
                require(any(placeholder in arg for arg in self.command[1:]), "command",
                        f"backend 'command' needs an argument list whose arguments contain {placeholder}, "
                        f"got {self.command}")


class TTSError(RuntimeError):
    """Synthesis failed; the message names the backend, the text (shortened) and the reason."""


def _label(backend: str, text: str, limit: int = 60) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return f"{backend} TTS of {shown!r}"


def _run(argv: list[str], stdin: bytes | None, timeout: float, where: str) -> None:
    """Run one synthesizer process (no shell); on timeout kill its whole process group."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument
        raise TTSError(f"{where}: cannot start {argv[0]!r}: {exc}") from None
    try:
        _, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TTSError(f"{where}: timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()[-300:] or "no message"
        raise TTSError(f"{where}: exit status {proc.returncode}: {message}")


def _read_wav(path: str, sr: int, where: str) -> np.ndarray:
    """Read what the synthesizer wrote as float32 mono at ``sr``."""
    if not os.path.isfile(path):
        raise TTSError(f"{where}: the synthesizer wrote no audio file")
    try:
        audio, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except sf.SoundFileError as exc:
        raise TTSError(f"{where}: unreadable audio ({exc})") from None
    mono = audio.mean(axis=1)
    if mono.size == 0:
        raise TTSError(f"{where}: empty audio")
    if not np.isfinite(mono).all():
        raise TTSError(f"{where}: audio has NaN or Inf samples")
    if file_sr != sr:
        with torch.no_grad():
            mono = _resampler(file_sr, sr)(torch.from_numpy(mono)).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _resampler(source: int, target: int) -> torchaudio.transforms.Resample:
    """One resampling filter per rate pair, built once: building it took a third of the time of resampling a
    short utterance (torchaudio.functional.resample builds it on every call)."""
    return torchaudio.transforms.Resample(source, target)


class TTS:
    """A synthesizer producing float32 mono audio at ``sample_rate``; build it with ``make_tts``."""

    def __init__(self, cfg: TTSConfig, sr: int, program: str):
        self.cfg = cfg
        self.sample_rate = sr
        self.program = program
        self.combos = list(itertools.product(cfg.voices, cfg.speeds, cfg.pitches, cfg.noise_snr_db or [None]))

    def _argv(self, text: str, wav: str, variant: int) -> tuple[list[str], bytes | None]:
        """Arguments and stdin of one synthesis run."""
        if self.cfg.backend == "command":
            values = {"{text}": text, "{wav}": wav}  # one pass, so braces inside the text stay as they are
            args = [_PLACEHOLDER.sub(lambda m: values[m.group()], arg) for arg in self.cfg.command[1:]]
            return [self.program, *args], None
        voice, speed, pitch, _ = self.combos[variant % len(self.combos)]
        argv = [self.program, "-v", voice, "-s", str(speed), "-p", str(pitch), "-b", "1", "-w", wav]
        return [*argv, "--stdin"], text.encode("utf-8")

    def synthesize(self, text: str, variant: int = 0) -> np.ndarray:
        """Speak ``text`` with combination ``variant % len(combos)`` (the command backend uses only its noise)."""
        where = _label(self.cfg.backend, text)
        if not text.strip():
            raise TTSError(f"{where}: text is empty")
        if "\0" in text:
            raise TTSError(f"{where}: text contains a NUL character")
        with tempfile.TemporaryDirectory(prefix="tts-") as tmp:
            wav = os.path.join(tmp, "speech.wav")
            argv, stdin = self._argv(text, wav, variant)
            _run(argv, stdin, self.cfg.timeout_s, where)
            audio = _read_wav(wav, self.sample_rate, where)
        snr = self.combos[variant % len(self.combos)][3]
        return audio if snr is None else with_noise(audio, snr, np.random.default_rng([zlib.crc32(text.encode()),
                                                                                        variant]))


def with_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``audio`` plus white noise ``snr_db`` below its mean power (silent audio stays silent)."""
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noise = rng.standard_normal(audio.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def make_tts(cfg: TTSConfig, sr: int) -> TTS:
    """Check that the backend can run (program found, espeak voices known) before any text is spoken."""
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    name = "espeak-ng" if cfg.backend == "espeak-ng" else cfg.command[0]
    program = shutil.which(name)
    if program is None:
        hint = " (install it: apt-get install espeak-ng)" if cfg.backend == "espeak-ng" else ""
        raise TTSError(f"{cfg.backend} TTS: program {name!r} not found{hint}")
    if cfg.backend == "espeak-ng":
        for voice in cfg.voices:
            _run([program, "-v", voice, "-q", "--stdin"], b"a", cfg.timeout_s, f"espeak-ng voice {voice!r}")
    return TTS(cfg, sr, program)


def _attempt(tts: TTS, text: str, variant: int) -> np.ndarray | TTSError:
    try:
        return tts.synthesize(text, variant)
    except TTSError as exc:
        return exc


_worker_tts: TTS | None = None


def _init_worker(tts: TTS) -> None:
    global _worker_tts
    torch.set_num_threads(1)  # one process per core already
    _worker_tts = tts


def _worker_attempt(job: tuple[str, int]) -> np.ndarray | TTSError:
    assert _worker_tts is not None, "pool worker was not initialised"
    return _attempt(_worker_tts, *job)


def synthesize_many(cfg: TTSConfig, sr: int, texts: list[str], variants: list[int] | None = None,
                    workers: int = 1) -> list[np.ndarray | TTSError]:
    """Speak many texts, in input order; a text that fails gives its TTSError in its place.

    ``variants`` defaults to each text's index (so texts cycle through the combinations). With
    ``workers > 1`` a pool of forked processes runs one synthesizer each, one torch thread each (as
    torch's DataLoader does: forking starts in well under a second where spawning re-imports torch for
    many seconds); with ``workers=1`` everything runs in the calling process (so it also works inside
    a daemonic pool worker). A missing program or unknown voice raises TTSError here, before any text.
    """
    variants = list(range(len(texts))) if variants is None else list(variants)
    if len(variants) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(variants)} variants")
    tts = make_tts(cfg, sr)
    jobs = list(zip(texts, variants, strict=True))
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [_attempt(tts, text, variant) for text, variant in jobs]
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tts,)) as pool:
        return pool.map(_worker_attempt, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
