"""The offline shard builder: inputs, rejects, determinism, resuming after a kill, TTS."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shards.build import main, make_plan, parse_args
from shards.format import read_index, read_shard, shard_urls
from shards.sources import Record

ROOT = Path(__file__).resolve().parents[1]


def tone(seconds: float, sr: int, freq: float = 220.0, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def librispeech_tree(root: Path, chapters: dict[str, list[float]], sr: int = 22050) -> dict[str, list[str]]:
    """``chapters``: "spk-chap" -> utterance lengths in seconds; returns chapter -> texts in order."""
    texts = {}
    for chapter, lengths in chapters.items():
        folder = root / chapter.replace("-", "/")
        folder.mkdir(parents=True)
        lines = []
        for i, seconds in enumerate(lengths):
            uttid = f"{chapter}-{i:04d}"
            sf.write(folder / f"{uttid}.flac", tone(seconds, sr, 200 + 20 * i, channels=1 + i % 2), sr)
            lines.append(f"{uttid} WORDS OF {chapter} NUMBER {i}")
        (folder / f"{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
        texts[chapter] = [line.split(" ", 1)[1] for line in lines]
    return texts


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chunks(out: Path) -> list:
    return [c for url in shard_urls(out) for c in read_shard(url)]


def build(*args) -> int:
    return main([str(a) for a in args])


def test_librispeech_round_trip(tmp_path):
    chapters = {"19-198": [0.4, 0.7, 0.5, 0.3, 0.6], "19-227": [0.5, 0.2], "26-495": [0.3, 0.4, 0.9]}
    texts = librispeech_tree(tmp_path / "ls", chapters)
    out = tmp_path / "out"
    assert build("--input", tmp_path / "ls", "--out", out, "--chunk-segments", 2, "--shard-size-mb", 0.02) == 0

    got = chunks(out)
    docs = list(dict.fromkeys(c.doc for c in got))
    assert docs == list(chapters)
    for doc, lengths in chapters.items():
        segs = [s for c in got if c.doc == doc for s in c.segments]
        assert [s.text for s in segs] == texts[doc]
        assert [len(s.audio) for s in segs] == [math.ceil(round(n * 22050) * 16000 / 22050) for n in lengths]
        assert all(s.sr == 16000 and s.audio.ndim == 1 for s in segs)
    assert all(len(c.segments) <= 2 for c in got)
    assert len({c.key for c in got}) == len(got) == 3 + 1 + 2
    index = read_index(out)
    assert len(index["shards"]) > 1 and index["sr"] == 16000 and index["rejects"] == {}
    assert sum(s["segments"] for s in index["shards"]) == 10 and index["docs"] == 3
    assert index["seconds"] == pytest.approx(sum(map(sum, chapters.values())), abs=1e-3)
    for entry in index["shards"]:
        assert hashlib.sha256((out / entry["url"]).read_bytes()).hexdigest() == entry["sha256"]
    assert (out / "rejects.jsonl").read_text() == ""


def test_manifest_round_trip(tmp_path):
    sf.write(tmp_path / "talk.wav", tone(3.0, 8000), 8000)
    sf.write(tmp_path / "solo.flac", tone(0.5, 16000, channels=2), 16000)
    words = [["first", 0.0, 0.4], ["part", 0.4, 1.0]]
    write_jsonl(tmp_path / "m.jsonl", [
        {"audio": "talk.wav", "text": "second part", "doc": "talk", "pos": 2, "start": 1.0, "end": 2.5},
        {"audio": str(tmp_path / "solo.flac"), "text": "on its own"},
        {"audio": "talk.wav", "text": "first part", "doc": "talk", "pos": 1, "end": 1.0, "words": words},
    ])
    out = tmp_path / "out"
    assert build("--input", tmp_path / "m.jsonl", "--out", out, "--sr", 24000, "--source", "talks") == 0

    got = chunks(out)
    assert [c.doc for c in got] == ["talk", "solo"] and got[0].source == "talks"
    talk = got[0].segments
    assert [s.text for s in talk] == ["first part", "second part"]
    assert [len(s.audio) for s in talk] == [24000, 36000]
    assert talk[0].words == [tuple(w) for w in words] and talk[1].words is None
    assert len(got[1].segments[0].audio) == 12000
    assert read_index(out)["source"] == "talks"


def test_every_reject_reason_is_counted_and_listed(tmp_path):
    sr = 16000
    sf.write(tmp_path / "good.wav", tone(1.0, sr), sr)
    sf.write(tmp_path / "long.wav", tone(3.0, sr), sr)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), sr)
    bad = tone(1.0, sr)
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, sr, subtype="FLOAT")
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC but not really" * 20)
    good = {"audio": "good.wav", "text": "fine"}
    rows = [
        good,                                                            # line 1: kept
        {"audio": "nowhere.wav", "text": "x"},                           # missing_file
        {"audio": "corrupt.flac", "text": "x"},                          # unreadable_audio
        {"audio": "empty.wav", "text": "x"},                             # zero_length
        {"audio": "nan.wav", "text": "x"},                               # non_finite
        {"audio": "long.wav", "text": "x"},                              # too_long
        {"audio": "good.wav", "text": "  \t "},                          # empty_text
        '{"audio": "good.wav", "text": ',                                # undecodable_text (bad JSON)
        {"audio": "good.wav", "text": "fine", "doc": "good", "pos": 1},  # duplicate_key (same doc+pos)
        {"audio": "good.wav", "text": "x", "start": 0.5, "end": 1.5},    # bad_range (past the end)
        {"audio": "good.wav", "text": "x", "start": 0.6, "end": 0.2},    # bad_range (start >= end)
        {"audio": "good.wav", "text": "x", "start": "soon"},             # bad_record
        {"audio": "long.wav", "text": "cut short", "doc": "long", "start": 0.5, "end": 1.5},  # kept
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    with open(manifest, "ab") as f:
        f.write(b'{"audio": "good.wav", "text": "caf\xe9"}\n')         # undecodable_text (not UTF-8)
    out = tmp_path / "out"
    assert build("--input", manifest, "--out", out, "--max-seconds", 2) == 0

    expected = {"missing_file": 1, "unreadable_audio": 1, "zero_length": 1, "non_finite": 1, "too_long": 1,
                "empty_text": 1, "undecodable_text": 2, "duplicate_key": 1, "bad_range": 2, "bad_record": 1}
    assert read_index(out)["rejects"] == dict(sorted(expected.items()))
    listed = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["input"] for r in listed) == sorted(f"{manifest}:{n}" for n in [*range(2, 13), 14])
    by_line = {int(r["input"].rsplit(":", 1)[1]): r["reason"] for r in listed}
    assert by_line[2] == "missing_file" and by_line[5] == "non_finite" and by_line[9] == "duplicate_key"
    got = chunks(out)
    assert [(c.doc, c.segments[0].text, len(c.segments[0].audio)) for c in got] == [
        ("good", "fine", sr), ("long", "cut short", sr)]


def test_librispeech_rejects(tmp_path):
    librispeech_tree(tmp_path / "ls", {"1-10": [0.3, 0.3], "2-20": [0.3]})
    (tmp_path / "ls/1/10/1-10-0001.flac").rename(tmp_path / "ls/2/20/1-10-0000.flac")
    with open(tmp_path / "ls/2/20/2-20.trans.txt", "ab") as f:
        f.write(b"1-10-0000 SAME ID AGAIN\n2-20-0009 \xff\xfe\n2-20-0010   \n")
    out = tmp_path / "out"
    assert build("--input", tmp_path / "ls", "--out", out) == 0
    assert read_index(out)["rejects"] == {"duplicate_key": 1, "empty_text": 1, "missing_file": 1,
                                          "undecodable_text": 1}
    assert [s.text for c in chunks(out) for s in c.segments] == ["WORDS OF 1-10 NUMBER 0", "WORDS OF 2-20 NUMBER 0"]


def test_rerun_is_idempotent_and_rewrites_nothing(tmp_path):
    librispeech_tree(tmp_path / "ls", {"1-10": [0.3] * 6, "2-20": [0.4] * 3})
    out = tmp_path / "out"
    args = ("--input", tmp_path / "ls", "--out", out, "--chunk-segments", 2, "--shard-size-mb", 0.01)
    assert build(*args) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert len([n for n in before if n.endswith(".tar")]) >= 3
    time.sleep(0.01)
    assert build(*args) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_changed_settings_rebuild_and_drop_stale_shards(tmp_path):
    librispeech_tree(tmp_path / "ls", {"1-10": [0.3] * 6})
    out = tmp_path / "out"
    args = ("--input", tmp_path / "ls", "--out", out, "--chunk-segments", 1)
    assert build(*args, "--shard-size-mb", 0.001) == 0
    assert len(read_index(out)["shards"]) == 6
    assert build(*args, "--shard-size-mb", 1, "--sr", 8000) == 0
    index = read_index(out)
    assert [e["url"] for e in index["shards"]] == ["shard-000000.tar"] and index["sr"] == 8000
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "rejects.jsonl", "shard-000000.json",
                                                     "shard-000000.tar"]
    assert [len(s.audio) for c in chunks(out) for s in c.segments] == [math.ceil(round(0.3 * 22050) * 8000 / 22050)] * 6


def test_workers_do_not_change_the_output(tmp_path):
    librispeech_tree(tmp_path / "ls", {"1-10": [0.3, 0.5, 0.2, 0.4], "2-20": [0.6, 0.1, 0.3]})
    outs = [tmp_path / f"w{w}" for w in (1, 2)]
    for w, out in zip((1, 2), outs, strict=True):
        assert build("--input", tmp_path / "ls", "--out", out, "--workers", w, "--chunk-segments", 1,
                     "--shard-size-mb", 0.01) == 0
    files = [{p.name: p.read_bytes() for p in out.iterdir()} for out in outs]
    assert files[0] == files[1] and len(files[0]) > 4


def _cli(*args: object, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "shards.build", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kw)


@pytest.mark.slow
def test_kill_mid_build_then_rerun_gives_complete_identical_shards(tmp_path):
    """A FIFO in place of one audio file blocks the build right there (opening it waits for a writer),
    so the kill lands at a known point with earlier shards written; then the file is put back."""
    sr = 16000
    rows = []
    for i in range(40):
        sf.write(tmp_path / f"a{i}.wav", tone(0.25, 8000, 100 + 10 * i), 8000)
        rows.append({"audio": f"a{i}.wav", "text": f"segment {i}", "doc": f"d{i // 4}", "pos": i})
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    blocked = tmp_path / "a30.wav"
    blocked.unlink()
    os.mkfifo(blocked)
    out = tmp_path / "out"
    args = ("--input", manifest, "--out", out, "--sr", sr, "--chunk-segments", 2, "--shard-size-mb", 0.01)
    proc = _cli(*args)
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-000004.json").exists():  # shards hold 2 chunks: a30 is in shard 7
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended or stalled early"
            time.sleep(0.01)
        time.sleep(0.3)
        assert proc.poll() is None, "the build should be blocked on the FIFO"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert not (out / "index.json").exists()
    assert not (out / "shard-000007.tar").exists()
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / "shard-000002.tar").write_bytes((out / "shard-000002.tar").read_bytes()[:3000])  # a torn write
    (out / ".shard-000003.tar.x1y2.tmp").write_bytes(b"partial")

    blocked.unlink()
    sf.write(blocked, tone(0.25, 8000, 400), 8000)
    assert build(*args) == 0
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept  # trusted, not rebuilt
    assert not (out / ".shard-000003.tar.x1y2.tmp").exists()
    index = read_index(out)
    for entry in index["shards"]:
        assert hashlib.sha256((out / entry["url"]).read_bytes()).hexdigest() == entry["sha256"]
    texts = [s.text for c in chunks(out) for s in c.segments]
    assert texts == [f"segment {i}" for i in range(40)]
    assert all(len(s.audio) == sr // 4 for c in chunks(out) for s in c.segments)

    fresh = tmp_path / "fresh"
    assert build(*args[:2], "--out", fresh, *args[4:]) == 0
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    assert all((fresh / n).read_bytes() == (out / n).read_bytes() for n in names)


def test_missing_input_exits_with_one_line(tmp_path, capsys):
    assert build("--input", tmp_path / "nope", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: --input {tmp_path / 'nope'}: no such file or directory"]
    assert not (tmp_path / "out").exists()


def test_all_inputs_rejected_exits_nonzero(tmp_path, capsys):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": "gone.wav", "text": "x"}, {"text": "no audio"}])
    out = tmp_path / "out"
    assert build("--input", manifest, "--out", out, "--format", "manifest") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "all 2 inputs rejected" in err[0]
    assert "missing_file 2" in err[0]
    assert not (out / "index.json").exists() and len((out / "rejects.jsonl").read_text().splitlines()) == 2


def test_text_only_build(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/book.txt").write_text("It was a dark night.\n\nThe end.\n")
    write_jsonl(tmp_path / "in/pool.jsonl", [{"text": "alone"}, {"text": "b2", "doc": "q", "pos": 2},
                                          {"text": "b1", "doc": "q", "pos": 1}, {"text": ""}])
    out = tmp_path / "out"
    assert build("--input", tmp_path / "in", "--out", out, "--format", "text") == 0
    got = chunks(out)
    assert [(c.doc, [s.text for s in c.segments]) for c in got] == [
        ("book", ["It was a dark night.", "The end."]), ("pool-000001", ["alone"]), ("q", ["b1", "b2"])]
    assert all(s.audio is None for c in got for s in c.segments)
    assert read_index(out)["rejects"] == {"empty_text": 2}


def test_auto_format_reads_a_text_jsonl_as_text(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello there", "doc": "a"}])
    assert build("--input", tmp_path / "t.jsonl", "--out", tmp_path / "out") == 0
    assert [c.segments[0].text for c in chunks(tmp_path / "out")] == ["hello there"]


def test_plan_keys_stay_unique_when_doc_names_collide():
    recs = [Record(input=str(i), uid=str(i), doc=d, pos=i, text="t") for i, d in enumerate(["a b", "a_b", "a/b"])]
    keys = [c.key for c in make_plan(recs, 4)]
    assert keys[0] == "a_b-00000" and len(set(keys)) == 3


def test_tts_espeak_speaks_text_input(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world", "doc": "d", "pos": 0},
                                       {"text": "good morning", "doc": "d", "pos": 1}])
    out = tmp_path / "out"
    assert build("--input", tmp_path / "t.jsonl", "--out", out, "--tts", "espeak-ng",
                 "--tts-voices", "en-us,en-gb") == 0
    segs = chunks(out)[0].segments
    assert [s.text for s in segs] == ["hello world", "good morning"]
    assert all(s.sr == 16000 and 0.3 * 16000 < len(s.audio) < 3 * 16000 and np.abs(s.audio).max() > 0.01
               for s in segs)
    assert read_index(out)["seconds"] > 0.6


def test_tts_failure_is_a_reject(tmp_path):
    script = tmp_path / "say.py"
    script.write_text("import sys, numpy, soundfile\n"
                      "if 'FAIL' in sys.argv[1]: sys.exit(3)\n"
                      "soundfile.write(sys.argv[2], numpy.full(800, 0.1, 'float32'), 8000)\n")
    (tmp_path / "lines.txt").write_text("speak this\nplease FAIL here\n$(touch pwned); rm -rf x\n")
    out = tmp_path / "out"
    assert build("--input", tmp_path / "lines.txt", "--out", out, "--tts", "command",
                 "--tts-command", f"{sys.executable} {script} {{text}} {{wav}}") == 0
    segs = chunks(out)[0].segments
    assert [s.text for s in segs] == ["speak this", "$(touch pwned); rm -rf x"]
    assert [len(s.audio) for s in segs] == [1600, 1600]
    assert read_index(out)["rejects"] == {"tts_failed": 1}
    assert json.loads((out / "rejects.jsonl").read_text()) == {"input": f"{tmp_path / 'lines.txt'}:2",
                                                               "reason": "tts_failed"}
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()


def test_a_build_split_across_ranks_equals_the_whole_build(tmp_path):
    """Each rank speaks every world-th document into its own part, rank 0 merges: the same samples (keys, texts,
    audio: the voice variants follow the plan-wide segment index) as one process speaking everything."""
    import threading

    from shards.build import PARTS_DIR, synthesize_documents
    from shards.format import read_index, read_shard, shard_urls
    from shards.tts import TTSConfig

    tts = TTSConfig(voices=["en-us", "en-gb"], speeds=[150, 200])
    docs = [(f"d{i}", f"text number {i} has a few more words in it than the pieces") for i in range(5)]
    args = (tts, 16000)
    whole = synthesize_documents(docs, tmp_path / "whole", *args, seed=3)
    barrier = threading.Barrier(2)
    errors = []

    def rank(r: int) -> None:
        try:
            synthesize_documents(docs, tmp_path / "split", *args, seed=3, part=(r, 2), barrier=barrier.wait)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors

    def samples(folder):
        return sorted((c.key, [(s.text, s.audio.tobytes()) for s in c.segments])
                      for url in shard_urls(folder) for c in read_shard(url))

    assert samples(tmp_path / "split") == samples(whole)
    split, full = read_index(tmp_path / "split"), read_index(whole)
    assert {k: split[k] for k in ("docs", "segments", "rejects", "sr")} == \
        {k: full[k] for k in ("docs", "segments", "rejects", "sr")}
    assert split["seconds"] == pytest.approx(full["seconds"], abs=0.01)   # sums of per-shard rounded seconds
    assert not (tmp_path / "split" / PARTS_DIR).exists()
    assert synthesize_documents(docs, tmp_path / "split", *args, seed=3, part=(1, 2)) == tmp_path / "split"  # done


def test_the_command_line_reaches_every_tts_backend(tmp_path):
    """--tts kokoro and the long-lived command backend are reachable without a YAML; speeds keep their kind."""
    base = ["--input", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "out")]
    kokoro = parse_args([*base, "--tts", "kokoro", "--tts-model-path", "/models/Kokoro-82M", "--tts-speeds", "0.9,1.1",
                         "--tts-device", "cuda:1"]).tts
    assert (kokoro.backend, kokoro.voices, kokoro.speeds, kokoro.model_path, kokoro.device) == (
        "kokoro", ["af_heart"], [0.9, 1.1], "/models/Kokoro-82M", "cuda:1")
    espeak = parse_args([*base, "--tts", "espeak-ng", "--tts-speeds", "140,180"]).tts
    assert (espeak.voices, espeak.speeds) == (["en-us"], [140, 180]) and all(type(s) is int for s in espeak.speeds)
    served = parse_args([*base, "--tts", "command", "--tts-command", "my-tts --serve", "--tts-long-lived"]).tts
    assert served.long_lived and served.command == ["my-tts", "--serve"]
    with pytest.raises(SystemExit):   # a long-lived synthesizer gets its texts on stdin, not as {text}
        parse_args([*base, "--tts", "command", "--tts-command", "my-tts {text} {wav}", "--tts-long-lived"])
    with pytest.raises(SystemExit):   # kokoro needs its weights' folder
        parse_args([*base, "--tts", "kokoro"])
