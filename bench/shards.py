"""Shard build and stream read+decode throughput, beside reading the same audio as WAV files.

Generates a manifest of synthetic speech-like WAV files (16 kHz, 2-8 s each), then measures:
  - the baseline: every WAV read with soundfile in a loop (one process);
  - ``python -m shards.build`` on that manifest (``--workers`` processes), end to end and without
    the interpreter's start-up (timed separately with ``--help``, which imports the same modules);
  - ``ShardStream`` reading and decoding (FLAC -> float32) the built shards, in this process and
    through a DataLoader with ``--workers`` processes;
  - forced alignment (``shards.align``, what ``shards.build --align`` runs per spoken segment) of espeak-ng
    sentences: an MMS_FA-shaped wav2vec2 (random weights: the bundle's are not downloadable here; the compute
    is the same) and the toy encoder's architecture (random weights), one process, one thread.

Throughput is x real time per core: audio-seconds per core-second. Two ways to count core-seconds are
shown: wall time x the processes doing the work, and the CPU time they used (this process plus its
waited-for children). On an idle machine the two agree; on a shared one (these 2-core hosts run
several jobs at once) wall time includes waiting for a core, so the RESULT lines use CPU time.

    python -m bench.shards [--minutes 60] [--seconds 4] [--workers 2]

The last lines are ``RESULT stream_rt_per_core <x>`` (in-process stream), ``RESULT build_rt_per_core <x>``
(build without start-up) and ``RESULT align_mms_rt_per_core <x>``. Goal: stream >= 1000x real time per core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
import webdataset
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0]).resolve() == ROOT / "bench":  # run as a script, this file would shadow the package
    sys.path[0] = str(ROOT)

from shards.stream import ShardStream, StreamConfig, stream_loader  # noqa: E402

SR = 16000
GOAL = 1000.0


@dataclass
class Measure:
    name: str
    audio_s: float
    wall_s: float
    cpu_s: float
    cores: int

    @property
    def rt_wall(self) -> float:
        """Audio-seconds per wall-second per process doing the work."""
        return self.audio_s / self.wall_s / self.cores

    @property
    def rt_cpu(self) -> float:
        """Audio-seconds per CPU-second."""
        return self.audio_s / self.cpu_s


def cpu_seconds() -> float:
    """CPU time of this process and of every child it has waited for (build workers included)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Harmonics of a gliding pitch (90-250 Hz), gated into syllables at 3-6 Hz, over a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = rng.uniform(90, 220) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 16))
    syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)), 0, None) ** 0.5
    audio = 0.25 * voiced * syllables / np.abs(voiced).max() + 0.01 * rng.standard_normal(len(t))
    return audio.astype(np.float32)


def make_manifest(folder: Path, minutes: float, seed: int = 0) -> tuple[Path, list[Path], float]:
    """WAV files of 2-8 s adding up to ``minutes``, eight utterances per document. Each file is a random
    cut of one of 16 generated voices (generating every second afresh would dominate the run)."""
    rng = np.random.default_rng(seed)
    voices = [speech_like(rng, 8.0) for _ in range(16)]
    wavs, lines, total = [], [], 0.0
    while total < minutes * 60:
        i = len(wavs)
        voice = voices[rng.integers(len(voices))]
        length = int(rng.uniform(2, 8) * SR)
        start = int(rng.integers(0, len(voice) - length + 1))
        path = folder / f"utt{i:05d}.wav"
        sf.write(path, voice[start:start + length], SR, subtype="PCM_16")
        wavs.append(path)
        lines.append(json.dumps({"audio": path.name, "text": f"utterance {i} of document {i // 8}",
                                 "doc": f"doc{i // 8:04d}", "pos": i % 8}))
        total += length / SR
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, wavs, total


def measure_wavs(wavs: list[Path], budget: float) -> Measure:
    """The baseline: read the files one by one with soundfile, pass after pass for ``budget`` seconds."""
    audio = 0.0
    cpu, start = cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < budget:
        for path in wavs:
            data, sr = sf.read(path, dtype="float32")
            audio += len(data) / sr
    return Measure("baseline: WAV files, soundfile loop", audio, time.perf_counter() - start,
                   cpu_seconds() - cpu, 1)


def run_build(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``python -m shards.build`` run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cpu, start = cpu_seconds(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "shards.build", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"python -m shards.build {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return wall, cpu_seconds() - cpu


def measure_build(manifest: Path, out: Path, workers: int) -> tuple[Measure, Measure, dict]:
    """End to end, and without the start-up that ``--help`` (same imports, no work) takes."""
    startup_wall, startup_cpu = run_build(["--help"])
    wall, cpu = run_build(["--input", str(manifest), "--out", str(out), "--sr", str(SR),
                           "--workers", str(workers), "--shard-size-mb", "1"])
    index = json.loads((out / "index.json").read_text())
    cores = min(workers, os.cpu_count() or 1)
    return (Measure("python -m shards.build, end to end", index["seconds"], wall, cpu, cores),
            Measure(f"python -m shards.build, minus start-up ({startup_wall:.1f} s)", index["seconds"],
                    wall - startup_wall, cpu - startup_cpu, cores), index)


def measure_stream(folder: Path, epochs: int, workers: int) -> Measure:
    """Chunks (audio decoded to float32) of ``epochs`` passes over the shards, every one consumed (so no
    prefetched work goes uncounted)."""
    loader = stream_loader(ShardStream([(folder, 1.0)], StreamConfig(workers=workers), epochs=epochs))
    cpu, start = cpu_seconds(), time.perf_counter()
    audio = sum(chunk.seconds for chunk in loader)
    wall = time.perf_counter() - start
    del loader
    gc.collect()  # the workers have been joined: their CPU time is counted
    where = f"{workers} DataLoader workers" if workers else "in process"
    return Measure(f"ShardStream, {where}", audio, wall, cpu_seconds() - cpu, max(workers, 1))


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{models[0] if models else platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(load average {load}); Python {platform.python_version()}, torch {torch.__version__}, "
            f"webdataset {webdataset.__version__}, soundfile {sf.__version__} (libsndfile "
            f"{sf.__libsndfile_version__})")


def measure_alignment(sentences: int) -> list[Measure]:
    """Alignment of ``sentences`` espeak-ng sentences by each aligner, timed apart from the synthesis."""
    from model.toy_encoder import ToyEncoderArch, ToySpeechNet, save_checkpoint
    from shards.align import mms_fa_aligner
    from shards.tts import TTSConfig, make_tts
    from toy.align import aligner as toy_aligner
    from toy.smoke import sentences as texts
    from toy.speech_encoder import phonemize_many

    lines = texts(sentences, seed=0)
    tts = make_tts(TTSConfig(), 16000)
    audio = [tts.synthesize(line) for line in lines]
    seconds = sum(len(a) for a in audio) / 16000
    with tempfile.TemporaryDirectory() as toy:
        phonemes = sorted({p for word in phonemize_many(" ".join(lines).split()) for p in word})
        save_checkpoint(ToySpeechNet(ToyEncoderArch(), phonemes), toy, {})
        bundle = torchaudio.pipelines.MMS_FA
        aligners = {"MMS_FA shape (wav2vec2, random weights)":
                    mms_fa_aligner(torchaudio.models.wav2vec2_model(**bundle._params)),
                    "toy encoder architecture (random weights)": toy_aligner(toy)}
        out = []
        for name, aligner in aligners.items():
            aligner.align(audio[0], 16000, lines[0])   # warm-up
            cpu, start = cpu_seconds(), time.perf_counter()
            for wave, line in zip(audio, lines, strict=True):
                aligner.align(wave, 16000, line)
            out.append(Measure(f"forced alignment: {name}", seconds, time.perf_counter() - start,
                               cpu_seconds() - cpu, 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="minutes of generated audio")
    p.add_argument("--seconds", type=float, default=4.0, help="time spent on each read measurement")
    p.add_argument("--workers", type=int, default=2, help="build processes and DataLoader workers")
    p.add_argument("--align-sentences", type=int, default=8, help="espeak-ng sentences aligned (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(1)
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        tmp = Path(tmp)
        (tmp / "wav").mkdir()
        start = time.perf_counter()
        manifest, wavs, total = make_manifest(tmp / "wav", args.minutes)
        console.print(f"generated {len(wavs)} WAV files, {total:.0f} s of audio, in "
                      f"{time.perf_counter() - start:.1f} s")
        baseline = measure_wavs(wavs, args.seconds)
        build_all, build, index = measure_build(manifest, tmp / "shards", args.workers)
        console.print(f"built {len(index['shards'])} shards: {index['docs']} docs, {index['segments']} "
                      f"segments, {index['seconds']:.0f} s of audio, rejects {index['rejects'] or 'none'}")
        first = measure_stream(tmp / "shards", 1, 0)  # also warms the page cache
        epochs = max(1, round(args.seconds / first.wall_s))
        stream = measure_stream(tmp / "shards", epochs, 0)
        stream_workers = measure_stream(tmp / "shards", epochs * max(args.workers, 1), args.workers)
    aligned = measure_alignment(args.align_sentences) if args.align_sentences else []

    table = Table(title="Shards: build and stream throughput, x real time per core")
    for column in ("measurement", "audio s", "wall s", "processes", "CPU s", "per core (wall)",
                   "per core (CPU)", "vs baseline (CPU)"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    for m in (baseline, build_all, build, stream, stream_workers, *aligned):
        table.add_row(m.name, f"{m.audio_s:.0f}", f"{m.wall_s:.2f}", str(m.cores), f"{m.cpu_s:.2f}",
                      f"{m.rt_wall:.0f}x" if m.wall_s > 0 else "(noise)", f"{m.rt_cpu:.0f}x",
                      f"{m.rt_cpu / baseline.rt_cpu:.3f}")
    console.print(table)
    verdict = "met" if stream.rt_cpu >= GOAL else "NOT met"
    console.print(f"goal: stream read+decode >= {GOAL:.0f}x real time per core: {verdict} "
                  f"({stream.rt_cpu:.0f}x per CPU-second, {stream.rt_wall:.0f}x per wall-second)")
    print(f"RESULT stream_rt_per_core {stream.rt_cpu:.1f}")
    print(f"RESULT build_rt_per_core {build.rt_cpu:.1f}")
    if aligned:
        print(f"RESULT align_mms_rt_per_core {aligned[0].rt_cpu:.1f}")
        print(f"RESULT align_toy_rt_per_core {aligned[1].rt_cpu:.1f}")

if __name__ == "__main__":
    main()
