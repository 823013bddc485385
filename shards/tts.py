"""Text-to-speech backends that turn text-only corpora into speech segments for shards.

Backends (``tts.backend``):
  - ``espeak-ng``: one espeak-ng process per utterance;
  - ``command``: any synthesizer program, either one process per utterance (an argument template with {text} and
    {wav}) or, with ``long_lived: true``, one process per worker that answers requests (PROTOCOL below);
  - ``kokoro``: Kokoro-82M in this process, weights from ``model_path``, on the GPU when there is one
    (``shards/kokoro_tts.py``).

Why subprocesses with argument lists: espeak-ng (and any other command-line synthesizer) is a separate
program. Running it without a shell means text with shell metacharacters is only ever spoken, and
giving espeak-ng its text on stdin means text that starts with '-' can never be read as an option.
Why several (voice, speed, pitch, noise) combinations: one fixed voice makes synthetic speech too easy to
recognise; ``variant`` spreads texts over the combinations deterministically.

PROTOCOL of a long-lived ``command`` synthesizer (why: a neural TTS loads its model in seconds, so starting it
once per utterance costs more than the speech). It is started once per process that synthesizes, with the
argument list ``command`` (no shell, no placeholders), stdin and stdout as pipes, stderr passed through.
  - request: one line on stdin, a JSON object ``{"text": "...", "wav": "/abs/path.wav"}`` (UTF-8; JSON escapes
    newlines, so one request is one line);
  - answer: one line on stdout, ``{"ok": true}`` once the wav file is written and closed (any rate soundfile
    reads, mono or more channels: it is mixed down and resampled), or ``{"ok": false, "error": "why"}`` when it
    cannot speak this text (it keeps serving); flush after each line; stdout carries answers only (log to
    stderr);
  - one request at a time: the next is sent after the answer;
  - end: when stdin closes, exit.
A text whose answer does not come within ``timeout_s`` (the first one's includes the start), a process that exits
or writes a line that is not an answer: that text fails with a TTSError, the process (its whole process group)
is killed, and the next text starts a fresh one. ``make_tts`` starts it and speaks a probe text ("a"), so a
synthesizer that cannot start or answer fails before any text. ``serve`` is this protocol's server side.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import multiprocessing as mp
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Literal, NoReturn, Protocol

import numpy as np
import soundfile as sf
import torch
import torchaudio

from config import require

ESPEAK_SPEEDS = (80, 450)  # words per minute espeak-ng accepts (it clamps outside)
ESPEAK_PITCHES = (0, 99)
KOKORO_SPEEDS = (0.5, 2.0)  # Kokoro's speed factor (1.0: the voice's own rate)
_VOICE_NAME = re.compile(r"[A-Za-z0-9][\w.+/-]*")
_KOKORO_VOICE = re.compile(r"[ab][fm]_[a-z0-9]+")  # English voices: a(merican)/b(ritish), f(emale)/m(ale)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_PLACEHOLDER = re.compile(r"\{text\}|\{wav\}")
PROBE_TEXT = "a"

Combo = tuple[str, int | float, int, float | None]  # voice, speed, pitch, noise SNR (None: clean)


@dataclass
class TTSConfig:
    """Which synthesizer to run and the voice/speed/pitch combinations it cycles through."""

    backend: Literal["espeak-ng", "command", "kokoro"] = "espeak-ng"
    voices: list[str] | None = None  # espeak-ng voices (default [en-us]); kokoro: af_heart (the default), bm_george...
    # espeak-ng: words per minute (default [160]); kokoro: speed factors (default [1.0])
    speeds: list[int | float] | None = None
    pitches: list[int] = field(default_factory=lambda: [50])  # espeak-ng only
    # light background noise: white noise at one of these signal-to-noise ratios (dB), cycled with the other
    # settings and seeded by the text, so a rebuild gives the same samples; empty: clean speech
    noise_snr_db: list[float] = field(default_factory=list)
    command: list[str] = field(default_factory=list)  # argument template with {text} and {wav}
    long_lived: bool = False  # command: one process per worker answering requests (PROTOCOL in shards/tts.py)
    model_path: str = ""  # kokoro: a folder with config.json, one *.pth and voices/<voice>.pt
    device: str = "auto"  # kokoro: auto (cuda when torch sees a GPU), cpu, cuda, cuda:N
    g2p: Literal["auto", "misaki", "espeak"] = "auto"  # kokoro's phonemes; auto: misaki when spaCy's model is here
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        kokoro = self.backend == "kokoro"
        if self.voices is None:
            self.voices = ["af_heart"] if kokoro else ["en-us"]
        if self.speeds is None:
            self.speeds = [1.0] if kokoro else [160]
        require(bool(self.voices), "voices", "needs at least one voice")
        for voice in self.voices:
            if kokoro:
                require(bool(_KOKORO_VOICE.fullmatch(voice)), "voices",
                        f"{voice!r} is not an English Kokoro voice (like af_heart: a American or b British, "
                        "f or m, '_', its name)")
            else:
                require(bool(_VOICE_NAME.fullmatch(voice)), "voices",
                        f"{voice!r} is not a voice name (letters, digits, '_.+/-', not starting with '-')")
        if kokoro:
            lo, hi = KOKORO_SPEEDS
            require(bool(self.speeds) and all(lo <= s <= hi for s in self.speeds), "speeds",
                    f"needs at least one Kokoro speed factor, each in {lo}..{hi}, got {self.speeds}")
        else:
            lo, hi = ESPEAK_SPEEDS
            require(bool(self.speeds) and all(isinstance(s, int) and lo <= s <= hi for s in self.speeds), "speeds",
                    f"needs at least one speed, each in {lo}..{hi} words per minute, got {self.speeds}")
        lo, hi = ESPEAK_PITCHES
        require(bool(self.pitches) and all(lo <= p <= hi for p in self.pitches), "pitches",
                f"needs at least one pitch, each in {lo}..{hi}, got {self.pitches}")
        require(self.timeout_s > 0, "timeout_s", f"must be positive, got {self.timeout_s}")
        require(all(0 < snr < 100 for snr in self.noise_snr_db), "noise_snr_db",
                f"signal-to-noise ratios must be in (0, 100) dB, got {self.noise_snr_db}")
        require(not self.long_lived or self.backend == "command", "long_lived",
                f"only the command backend has a long-lived mode, not {self.backend!r}")
        if self.backend == "command" and self.long_lived:
            require(bool(self.command) and not any(_PLACEHOLDER.search(arg) for arg in self.command), "command",
                    "a long-lived synthesizer gets its texts on stdin: an argument list without {text} or {wav}, "
                    f"got {self.command}")
        elif self.backend == "command":
            for placeholder in ("{text}", "{wav}"):
                require(any(placeholder in arg for arg in self.command[1:]), "command",
                        f"backend 'command' needs an argument list whose arguments contain {placeholder}, "
                        f"got {self.command}")
        if kokoro:
            require(bool(self.model_path), "model_path",
                    "backend 'kokoro' needs a folder with config.json, the weights (*.pth) and voices/<voice>.pt")
            require(bool(_DEVICE.fullmatch(self.device)), "device",
                    f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


class TTSError(RuntimeError):
    """Synthesis failed; the message names the backend, the text (shortened) and the reason."""


def _label(backend: str, text: str, limit: int = 60) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return f"{backend} TTS of {shown!r}"


def _kill(proc: subprocess.Popen) -> None:
    """Kill a synthesizer's whole process group (it was started in a session of its own) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _popen(argv: list[str], where: str, **kwargs) -> subprocess.Popen:
    try:
        return subprocess.Popen(argv, start_new_session=True, **kwargs)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in an argument
        raise TTSError(f"{where}: cannot start {argv[0]!r}: {exc}") from None


def _run(argv: list[str], stdin: bytes | None, timeout: float, where: str) -> None:
    """Run one synthesizer process (no shell); on timeout kill its whole process group."""
    proc = _popen(argv, where, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.communicate()
        raise TTSError(f"{where}: timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()[-300:] or "no message"
        raise TTSError(f"{where}: exit status {proc.returncode}: {message}")


def _via_wav(write: Callable[[str], None], where: str) -> tuple[np.ndarray, int]:
    """Let ``write`` put a wav file into a fresh temporary folder; return it as float32 mono and its rate."""
    with tempfile.TemporaryDirectory(prefix="tts-") as tmp:
        path = os.path.join(tmp, "speech.wav")
        write(path)
        if not os.path.isfile(path):
            raise TTSError(f"{where}: the synthesizer wrote no audio file")
        try:
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
        except sf.SoundFileError as exc:
            raise TTSError(f"{where}: unreadable audio ({exc})") from None
    return audio.mean(axis=1), rate


def _conform(mono: np.ndarray, rate: int, sr: int, where: str) -> np.ndarray:
    """The synthesizer's mono audio, checked (not empty, finite), at ``sr``."""
    if mono.size == 0:
        raise TTSError(f"{where}: empty audio")
    if not np.isfinite(mono).all():
        raise TTSError(f"{where}: audio has NaN or Inf samples")
    if rate != sr:
        with torch.no_grad():
            mono = _resampler(rate, sr)(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _resampler(source: int, target: int) -> torchaudio.transforms.Resample:
    """One resampling filter per rate pair, built once: building it took a third of the time of resampling a
    short utterance (torchaudio.functional.resample builds it on every call)."""
    return torchaudio.transforms.Resample(source, target)


class Backend(Protocol):
    """Speaks one text with one combination; ``in_process``: synthesize_many never forks workers for it."""

    in_process: bool

    def speak(self, text: str, combo: Combo, where: str) -> tuple[np.ndarray, int]:
        """Float32 mono audio and its sample rate; raises TTSError."""
        ...

    def close(self) -> None:
        ...


class _Espeak:
    in_process = False

    def __init__(self, program: str, timeout: float):
        self.program, self.timeout = program, timeout

    def speak(self, text: str, combo: Combo, where: str) -> tuple[np.ndarray, int]:
        voice, speed, pitch, _ = combo
        argv = [self.program, "-v", voice, "-s", str(speed), "-p", str(pitch), "-b", "1"]
        return _via_wav(lambda wav: _run([*argv, "-w", wav, "--stdin"], text.encode("utf-8"), self.timeout,
                                         where), where)

    def close(self) -> None:
        pass


class _Command:
    """One process per utterance; its arguments with {text} and {wav} filled in."""

    in_process = False

    def __init__(self, program: str, template: list[str], timeout: float):
        self.program, self.template, self.timeout = program, template, timeout

    def speak(self, text: str, combo: Combo, where: str) -> tuple[np.ndarray, int]:
        def write(wav: str) -> None:
            values = {"{text}": text, "{wav}": wav}  # one pass, so braces inside the text stay as they are
            args = [_PLACEHOLDER.sub(lambda m: values[m.group()], arg) for arg in self.template]
            _run([self.program, *args], None, self.timeout, where)

        return _via_wav(write, where)

    def close(self) -> None:
        pass


def _stop(proc: subprocess.Popen, owner: int, grace: float = 5.0) -> None:
    """Close a long-lived synthesizer's stdin so it exits; kill it after ``grace`` seconds. Only the process that
    started it may: a forked worker that inherited the object must leave its parent's synthesizer alone."""
    if os.getpid() != owner:
        return
    if proc.returncode is None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _kill(proc)
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            pipe.close()


class _Server:
    """One running long-lived synthesizer (PROTOCOL in the module docstring)."""

    def __init__(self, argv: list[str], where: str):
        self.proc = _popen(argv, where, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.owner = os.getpid()
        self.pending = b""
        self.dead = False
        self.stop = weakref.finalize(self, _stop, self.proc, self.owner)

    def request(self, text: str, wav: str, timeout: float, where: str) -> None:
        """Send one request and wait for its answer; a refusal is a TTSError, anything else kills the process."""
        line = json.dumps({"text": text, "wav": wav}) + "\n"  # ASCII: \u escapes, whatever the reader's locale
        try:
            self.proc.stdin.write(line.encode("utf-8"))
            self.proc.stdin.flush()
        except OSError:
            self._fail(where, self._exited())
        answer = self._read_line(time.monotonic() + timeout, where, timeout)
        if self.pending:
            self._fail(where, f"answered more than one line ({self.pending[:200]!r} after {answer[:200]!r})")
        try:
            reply = json.loads(answer)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            self._fail(where, f"answered {answer[:200]!r}, not {{\"ok\": ...}} (stdout carries answers only; "
                              "log to stderr)")
        if not reply["ok"]:
            raise TTSError(f"{where}: {str(reply.get('error') or 'no message')[-300:]}")

    def _read_line(self, deadline: float, where: str, timeout: float) -> str:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(where, f"timed out after {timeout:g} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self._fail(where, self._exited())
                self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode("utf-8", errors="replace")

    def _exited(self) -> str:
        try:
            status = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "closed its output without answering"
        return f"exited with status {status} without answering"

    def _fail(self, where: str, reason: str) -> NoReturn:
        self.dead = True
        if self.proc.returncode is None:
            _kill(self.proc)
        self.stop()
        raise TTSError(f"{where}: long-lived synthesizer {reason} (the next text starts a fresh one)")


class _LongLived:
    """One long-lived synthesizer per process that speaks, started on its first text, restarted after a failure."""

    in_process = False

    def __init__(self, argv: list[str], timeout: float):
        self.argv, self.timeout = argv, timeout
        self.server: _Server | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "server": None}  # a pickled copy (a spawned worker) starts its own

    def speak(self, text: str, combo: Combo, where: str) -> tuple[np.ndarray, int]:
        if self.server is None or self.server.dead or self.server.owner != os.getpid():
            self.server = _Server(self.argv, where)
        server = self.server
        return _via_wav(lambda wav: server.request(text, wav, self.timeout, where), where)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


class TTS:
    """A synthesizer producing float32 mono audio at ``sample_rate``; build it with ``make_tts``, close it (or use
    it as a context manager) to stop a long-lived synthesizer."""

    def __init__(self, cfg: TTSConfig, sr: int, backend: Backend):
        self.cfg = cfg
        self.sample_rate = sr
        self.backend = backend
        self.combos: list[Combo] = list(itertools.product(cfg.voices, cfg.speeds, cfg.pitches,
                                                          cfg.noise_snr_db or [None]))

    def synthesize(self, text: str, variant: int = 0) -> np.ndarray:
        """Speak ``text`` with combination ``variant % len(combos)`` (the command backend uses only its noise)."""
        where = _label(self.cfg.backend, text)
        if not text.strip():
            raise TTSError(f"{where}: text is empty")
        if "\0" in text:
            raise TTSError(f"{where}: text contains a NUL character")
        combo = self.combos[variant % len(self.combos)]
        audio = _conform(*self.backend.speak(text, combo, where), self.sample_rate, where)
        snr = combo[3]
        return audio if snr is None else with_noise(audio, snr, np.random.default_rng([zlib.crc32(text.encode()),
                                                                                        variant]))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> TTS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``audio`` plus white noise ``snr_db`` below its mean power (silent audio stays silent)."""
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noise = rng.standard_normal(audio.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def _program(cfg: TTSConfig) -> str:
    name = "espeak-ng" if cfg.backend == "espeak-ng" else cfg.command[0]
    program = shutil.which(name)
    if program is None:
        hint = " (install it: apt-get install espeak-ng)" if cfg.backend == "espeak-ng" else ""
        raise TTSError(f"{cfg.backend} TTS: program {name!r} not found{hint}")
    return program


def make_tts(cfg: TTSConfig, sr: int) -> TTS:
    """Check that the backend can run (program found, espeak voices known, a long-lived synthesizer answers,
    Kokoro's files load) before any text is spoken."""
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    backend: Backend
    if cfg.backend == "kokoro":
        from shards.kokoro_tts import Kokoro

        backend = Kokoro(cfg)
    elif cfg.backend == "espeak-ng":
        program = _program(cfg)
        for voice in cfg.voices:
            _run([program, "-v", voice, "-q", "--stdin"], b"a", cfg.timeout_s, f"espeak-ng voice {voice!r}")
        backend = _Espeak(program, cfg.timeout_s)
    elif cfg.long_lived:
        backend = _LongLived([_program(cfg), *cfg.command[1:]], cfg.timeout_s)
        try:
            backend.speak(PROBE_TEXT, (cfg.voices[0], 0, 0, None), f"long-lived command TTS probe {PROBE_TEXT!r}")
        except TTSError:
            backend.close()
            raise
    else:
        backend = _Command(_program(cfg), cfg.command[1:], cfg.timeout_s)
    return TTS(cfg, sr, backend)


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
    a daemonic pool worker). Kokoro always runs in the calling process: one model, on the GPU when there is
    one, rather than a copy per forked worker. A missing program or unknown voice raises TTSError here, before
    any text.
    """
    variants = list(range(len(texts))) if variants is None else list(variants)
    if len(variants) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(variants)} variants")
    jobs = list(zip(texts, variants, strict=True))
    with make_tts(cfg, sr) as tts:
        workers = 1 if tts.backend.in_process else min(workers, len(jobs))
        if workers <= 1:
            return [_attempt(tts, text, variant) for text, variant in jobs]
        tts.close()  # this process's long-lived synthesizer (the probe's): each worker starts its own
        with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tts,)) as pool:
            return pool.map(_worker_attempt, jobs, chunksize=max(1, len(jobs) // (4 * workers)))


def serve(tts: TTS, rate: int, requests: Iterable[str], answers: IO[str]) -> None:
    """The server side of the long-lived PROTOCOL: speak each request's text (variant 0) into its wav at ``rate``
    until the requests end."""
    for line in requests:
        try:
            request = json.loads(line)
            sf.write(request["wav"], tts.synthesize(request["text"]), rate, subtype="FLOAT")  # the samples as made
            reply: dict = {"ok": True}
        except (TTSError, ValueError, KeyError, TypeError, sf.SoundFileError) as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()
