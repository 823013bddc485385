"""TTS backends: espeak-ng output, variants, shell-safety, the command backend (per utterance and long-lived),
errors, parallel runs. Kokoro: tests/test_tts_kokoro.py."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from config import ConfigError, from_dict
from shards.tts import PROBE_TEXT, TTSConfig, TTSError, make_tts, synthesize_many

SR = 16000
SENTENCE = "The quick brown fox jumps over the lazy dog."

# Writes a 0.5 s, 440 Hz stereo sine at 8 kHz to argv[2] and the text it got (argv[1]) to argv[3].
# Text "fail" exits 3 with a message, "sleep" hangs, "nothing" writes no file.
SCRIPT = """
import sys, time
import numpy as np, soundfile as sf
text, wav, log = sys.argv[1], sys.argv[2], sys.argv[3]
open(log, "w", encoding="utf-8").write(text)
if text == "fail":
    sys.exit("boom: cannot speak")
if text == "sleep":
    time.sleep(60)
if text != "nothing":
    t = np.arange(4000) / 8000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(wav, np.stack([tone, tone], axis=1), 8000)
"""


# The long-lived protocol's fake synthesizer: appends its pid to argv[1] when it starts and each text it gets (as
# JSON) to argv[2]; answers with the 0.5 s tone of SCRIPT. Texts: "fail" is refused, "crash" exits 7, "sleep"
# hangs, "garbage" answers a line that is not JSON, "nothing" answers ok without writing a file.
SERVER = """
import json, os, sys, time
import numpy as np, soundfile as sf
starts, received = sys.argv[1], sys.argv[2]
open(starts, "a").write(f"{os.getpid()}\\n")
for line in sys.stdin:
    request = json.loads(line)
    text = request["text"]
    open(received, "a", encoding="utf-8").write(json.dumps(text) + "\\n")
    if text == "crash":
        sys.exit(7)
    if text == "sleep":
        time.sleep(60)
    if text == "garbage":
        print("hello from a library", flush=True)
        continue
    if text not in ("fail", "nothing"):
        t = np.arange(4000) / 8000
        tone = 0.5 * np.sin(2 * np.pi * 440 * t)
        sf.write(request["wav"], np.stack([tone, tone], axis=1), 8000)
    answer = {"ok": False, "error": "boom: cannot speak"} if text == "fail" else {"ok": True}
    print(json.dumps(answer), flush=True)
"""


@dataclass
class Server:
    cfg: TTSConfig
    starts: Path
    received: Path

    def pids(self) -> list[int]:
        return [int(x) for x in self.starts.read_text().split()] if self.starts.exists() else []

    def texts(self) -> list[str]:
        return [json.loads(x) for x in self.received.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def server(tmp_path: Path) -> Server:
    script = tmp_path / "fake_server.py"
    script.write_text(SERVER)
    starts, received = tmp_path / "starts.txt", tmp_path / "received.txt"
    cfg = TTSConfig(backend="command", long_lived=True, command=[sys.executable, str(script), str(starts),
                                                                 str(received)], timeout_s=20.0)
    return Server(cfg, starts, received)


@pytest.fixture
def command_cfg(tmp_path: Path) -> tuple[TTSConfig, Path]:
    script = tmp_path / "fake_tts.py"
    script.write_text(SCRIPT)
    log = tmp_path / "received.txt"
    cfg = TTSConfig(backend="command", command=[sys.executable, str(script), "{text}", "{wav}", str(log)],
                    timeout_s=20.0)
    return cfg, log


def test_espeak_rate_and_duration():
    native = make_tts(TTSConfig(), 22050).synthesize(SENTENCE)
    tts = make_tts(TTSConfig(), SR)
    audio = tts.synthesize(SENTENCE)
    assert tts.sample_rate == SR
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.0 < len(audio) / SR < 4.0
    assert abs(len(audio) - len(native) * SR / 22050) <= 1  # resampled, same duration
    assert np.abs(audio).max() > 0.1 and np.isfinite(audio).all()


def test_variants_are_distinct_and_deterministic():
    cfg = TTSConfig(voices=["en-us", "en-gb"], speeds=[140, 220], pitches=[30, 70])
    tts = make_tts(cfg, SR)
    audios = [tts.synthesize(SENTENCE, v) for v in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert len(audios[i]) != len(audios[j]) or not np.array_equal(audios[i], audios[j]), (i, j)
    # combinations are voices x speeds x pitches: variant 2 is en-us at 220 wpm, variant 0 at 140 wpm
    assert len(audios[2]) < 0.8 * len(audios[0])
    assert np.array_equal(tts.synthesize(SENTENCE, 8 + 3), audios[3])


def test_noise_at_the_asked_ratio_seeded_by_the_text():
    clean = make_tts(TTSConfig(), SR).synthesize(SENTENCE)
    noisy_tts = make_tts(TTSConfig(noise_snr_db=[10.0, 30.0]), SR)
    ten, thirty = noisy_tts.synthesize(SENTENCE, 0), noisy_tts.synthesize(SENTENCE, 1)
    for audio, snr in ((ten, 10.0), (thirty, 30.0)):
        noise = audio.astype(np.float64) - clean
        measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise ** 2))
        assert measured == pytest.approx(snr, abs=0.2)
    assert np.array_equal(noisy_tts.synthesize(SENTENCE, 0), ten)                 # the same bytes on a rebuild
    assert not np.array_equal(noisy_tts.synthesize(SENTENCE + " again", 0)[:1000], ten[:1000])   # text seeds it


@pytest.mark.parametrize("backend", ["espeak-ng", "command", "long-lived"])
def test_shell_metacharacters_are_not_executed(backend, tmp_path, monkeypatch, command_cfg, server):
    monkeypatch.chdir(tmp_path)
    keep = tmp_path / "keep"
    keep.mkdir()
    text = "$(touch PWNED); rm -rf keep; `touch PWNED2` | cat > pwned3 && touch PWNED4 & {wav} {text}"
    cfg = {"espeak-ng": TTSConfig(), "command": command_cfg[0], "long-lived": server.cfg}[backend]
    with make_tts(cfg, SR) as tts:
        audio = tts.synthesize(text)
    assert len(audio) > 0.2 * SR
    assert keep.is_dir()
    for name in ("PWNED", "PWNED2", "pwned3", "PWNED4"):
        assert not (tmp_path / name).exists(), name
    if backend == "command":
        assert command_cfg[1].read_text(encoding="utf-8") == text  # one argument, verbatim
    if backend == "long-lived":
        assert server.texts() == ["a", text]  # the probe, then the text verbatim


def test_leading_dash_is_spoken_not_parsed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tts = make_tts(TTSConfig(), SR)
    for text in ("--help", "-w evil.wav -v xx hello", "--version"):
        audio = tts.synthesize(text)
        assert 0.3 < len(audio) / SR < 6.0, text
    assert list(tmp_path.iterdir()) == []


def test_command_backend_reads_resamples_and_downmixes(command_cfg):
    cfg, log = command_cfg
    text = "It's {text} \"quoted\" and 'single' ; | & > < * ? ~ $HOME"
    audio = make_tts(cfg, SR).synthesize(text)
    assert log.read_text(encoding="utf-8") == text
    assert audio.dtype == np.float32 and audio.shape == (SR // 2,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SR / len(audio) - 440) <= 2  # the tone survived resampling
    assert 0.45 < np.abs(audio).max() < 0.55  # stereo averaged, not summed


def test_command_failures_are_tts_errors(command_cfg):
    tts = make_tts(command_cfg[0], SR)
    with pytest.raises(TTSError, match=r"command TTS of 'fail': exit status 1: boom: cannot speak"):
        tts.synthesize("fail")
    with pytest.raises(TTSError, match="wrote no audio file"):
        tts.synthesize("nothing")
    with pytest.raises(TTSError, match="text is empty"):
        tts.synthesize("  \n")
    with pytest.raises(TTSError, match="NUL"):
        tts.synthesize("a\0b")
    results = synthesize_many(command_cfg[0], SR, ["one", "fail", "two"])
    assert isinstance(results[1], TTSError) and "boom" in str(results[1])
    assert all(isinstance(r, np.ndarray) and r.shape == (SR // 2,) for r in (results[0], results[2]))


def test_timeout_is_a_tts_error(command_cfg):
    cfg = command_cfg[0]
    cfg.timeout_s = 1.0
    start = time.monotonic()
    with pytest.raises(TTSError, match="timed out after 1 s"):
        make_tts(cfg, SR).synthesize("sleep")
    assert time.monotonic() - start < 15


def test_long_lived_command_starts_once_for_many_texts(server):
    texts = ["one", 'two "quoted" {text} {wav}', "line\nbreak", "ünïcödé — ok", "five"]
    results = synthesize_many(server.cfg, SR, texts)
    assert all(isinstance(r, np.ndarray) and r.shape == (SR // 2,) for r in results), results
    assert len(server.pids()) == 1  # one process: the probe and all five texts
    assert server.texts() == [PROBE_TEXT, *texts]
    spectrum = np.abs(np.fft.rfft(results[0]))
    assert abs(np.argmax(spectrum) * SR / len(results[0]) - 440) <= 2  # resampled and mixed down
    parallel = synthesize_many(server.cfg, SR, texts, workers=2)
    assert len(server.pids()) == 1 + 3  # this process's probe, then one process per worker
    assert all(np.array_equal(a, b) for a, b in zip(results, parallel, strict=True))


def test_long_lived_failures_restart_only_what_died(server):
    tts = make_tts(server.cfg, SR)
    with pytest.raises(TTSError, match=r"command TTS of 'fail': boom: cannot speak"):
        tts.synthesize("fail")
    with pytest.raises(TTSError, match="wrote no audio file"):
        tts.synthesize("nothing")
    assert tts.synthesize("fine").shape == (SR // 2,)
    assert len(server.pids()) == 1  # a refused text leaves the process serving
    with pytest.raises(TTSError, match="exited with status 7 without answering.*next text starts a fresh one"):
        tts.synthesize("crash")
    assert tts.synthesize("after the crash").shape == (SR // 2,)
    with pytest.raises(TTSError, match="answered 'hello from a library', not"):
        tts.synthesize("garbage")
    assert tts.synthesize("after the garbage").shape == (SR // 2,)
    assert len(server.pids()) == 3
    tts.close()
    proc = tts.backend.server.proc
    assert proc.returncode == 0  # it exited when its stdin closed


def test_long_lived_timeout_kills_and_restarts(server):
    server.cfg.timeout_s = 1.0
    tts = make_tts(server.cfg, SR)
    start = time.monotonic()
    with pytest.raises(TTSError, match="timed out after 1 s"):
        tts.synthesize("sleep")
    assert time.monotonic() - start < 15
    hung = server.pids()[0]
    with pytest.raises(ProcessLookupError):
        os.kill(hung, 0)  # killed and reaped
    server.cfg.timeout_s = 20.0
    assert tts.synthesize("awake").shape == (SR // 2,)
    assert len(server.pids()) == 2
    tts.close()


def test_long_lived_probe_fails_early(tmp_path):
    quits = TTSConfig(backend="command", long_lived=True, command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(TTSError, match="probe 'a': long-lived synthesizer exited with status 3"):
        make_tts(quits, SR)
    with pytest.raises(TTSError, match="not found"):
        make_tts(TTSConfig(backend="command", long_lived=True, command=["/nonexistent/tts"]), SR)


def test_missing_program_and_unknown_voice_fail_early():
    with pytest.raises(TTSError, match="not found"):
        make_tts(TTSConfig(backend="command", command=["/nonexistent/tts", "{text}", "{wav}"]), SR)
    with pytest.raises(TTSError, match="voice 'xx-nonexistent'"):
        make_tts(TTSConfig(voices=["en-us", "xx-nonexistent"]), SR)
    with pytest.raises(TTSError, match="voice 'xx-nonexistent'"):
        synthesize_many(TTSConfig(voices=["xx-nonexistent"]), SR, ["hello"])


def test_synthesize_many_parallel_matches_serial():
    cfg = TTSConfig(voices=["en-us", "en-gb"], speeds=[150, 200])
    texts = ["One small step.", "", "A second sentence here.", "Third.", "Four and more words."]
    serial = synthesize_many(cfg, SR, texts)
    parallel = synthesize_many(cfg, SR, texts, workers=2)
    assert isinstance(serial[1], TTSError) and isinstance(parallel[1], TTSError)
    assert str(serial[1]) == str(parallel[1])
    for i in (0, 2, 3, 4):
        assert np.array_equal(serial[i], parallel[i]), i
    assert len(serial[2]) > len(serial[3])  # in input order
    variants = [1, 1, 1, 1, 1]
    fixed = synthesize_many(cfg, SR, texts, variants=variants, workers=2)
    assert np.array_equal(fixed[0], make_tts(cfg, SR).synthesize(texts[0], 1))
    with pytest.raises(ValueError, match="5 texts but 2 variants"):
        synthesize_many(cfg, SR, texts, variants=[0, 1])


@pytest.mark.parametrize(("data", "key"), [
    ({"voices": []}, "tts.voices"),
    ({"voices": ["--help"]}, "tts.voices"),
    ({"speeds": [20]}, "tts.speeds"),
    ({"pitches": [150]}, "tts.pitches"),
    ({"timeout_s": 0}, "tts.timeout_s"),
    ({"noise_snr_db": [0]}, "tts.noise_snr_db"),
    ({"backend": "command", "command": ["say", "{text}"]}, "tts.command"),
    ({"backend": "command"}, "tts.command"),
    ({"backend": "festival"}, "tts.backend"),
    ({"speeds": [160.5]}, "tts.speeds"),
    ({"backend": "command", "long_lived": True, "command": ["tts", "{text}", "{wav}"]}, "tts.command"),
    ({"backend": "command", "long_lived": True}, "tts.command"),
    ({"long_lived": True}, "tts.long_lived"),
    ({"backend": "kokoro"}, "tts.model_path"),
    ({"backend": "kokoro", "model_path": "m", "voices": ["en-us"]}, "tts.voices"),
    ({"backend": "kokoro", "model_path": "m", "voices": ["af_heart"], "speeds": [160]}, "tts.speeds"),
    ({"backend": "kokoro", "model_path": "m", "voices": ["af_heart"], "device": "gpu"}, "tts.device"),
    ({"backend": "kokoro", "model_path": "m", "voices": ["af_heart"], "g2p": "festival"}, "tts.g2p"),
])
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        from_dict(TTSConfig, data, "tts")


def test_voices_and_speeds_default_per_backend():
    espeak = from_dict(TTSConfig, {}, "tts")
    assert (espeak.voices, espeak.speeds) == (["en-us"], [160])
    kokoro = from_dict(TTSConfig, {"backend": "kokoro", "model_path": "m"}, "tts")
    assert (kokoro.voices, kokoro.speeds) == (["af_heart"], [1.0])
    assert from_dict(TTSConfig, {"backend": "kokoro", "model_path": "m", "voices": ["bf_emma"], "speeds": [0.9, 1]},
                     "tts").speeds == [0.9, 1]
