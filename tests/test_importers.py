"""Importers for the paper's corpora: LibriHeavy cut manifests (through lhotse), Emilia WebDataset tars, and text
corpora as the ``datasets`` library writes them (parquet, JSONL, gzipped JSONL), on tiny fixtures in those formats."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from selection.pool import index_pool
from shards.format import read_index
from shards.sources import detect_format
from tests.test_build import build, chunks, tone

BOOK = "small/100/sea_fairies_0812_librivox_64kb_mp3"
OTHER = "medium/200/oz_1204_librivox_64kb_mp3"


def read_pool(path: Path) -> list[str]:
    """Every text of a selection pool, streamed through its index."""
    return list(index_pool(path).stream())


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- LibriHeavy (lhotse cuts)

def cut(recording: str, source: str, start: float, duration: float, text: str, n: int, sr: int = 16000,
        num_samples: int = 48000) -> dict:
    """A MonoCut as LibriHeavy's ``libriheavy_cuts_*.jsonl.gz`` stores it (fields of its README's example)."""
    cut_id = f"{recording}_{n}"
    return {
        "id": cut_id, "start": start, "duration": duration, "channel": 0,
        "supervisions": [{
            "id": cut_id, "recording_id": recording, "start": 0, "duration": duration, "channel": 0,
            "language": "English", "speaker": recording.split("/")[1],
            "custom": {"texts": [text, text.upper().replace(",", "").replace(".", "")],
                       "pre_texts": ["...before.", "BEFORE"], "begin_byte": 100 * n, "end_byte": 100 * n + 80}}],
        "recording": {"id": recording, "sources": [{"type": "file", "channels": [0], "source": source}],
                      "sampling_rate": sr, "num_samples": num_samples, "duration": num_samples / sr,
                      "channel_ids": [0]},
        "custom": {"text_path": "download/librilight_text/output_text_small_cleaned/Sea Fairies/text.txt"},
        "type": "MonoCut",
    }


def write_gz(path: Path, lines: list) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    return path


def test_libriheavy_cuts_become_books_cut_from_their_chapters(tmp_path):
    sr = 16000
    audio = {}  # recording id -> samples, at download/librilight/<id>.flac as LibriHeavy's manifests expect
    for i, rec in enumerate([f"{BOOK}/01_baum_sea_fairies_64kb", f"{BOOK}/02_baum_sea_fairies_64kb",
                             f"{OTHER}/01_baum_oz_64kb"]):
        audio[rec] = tone(3.0005, sr, 150 + 100 * i)  # 48008 samples: a duration lhotse rounds to ms
        (tmp_path / "download/librilight" / rec).parent.mkdir(parents=True, exist_ok=True)
        sf.write(tmp_path / f"download/librilight/{rec}.flac", audio[rec], sr, subtype="PCM_24")
    ch1, ch2, oz = audio
    absolute = str(tmp_path / f"download/librilight/{oz}.flac")
    rel = lambda rec: f"download/librilight/{rec}.flac"  # noqa: E731
    padding = {"id": "pad", "duration": 0.5, "sampling_rate": sr, "feat_value": -23.0, "num_samples": 8000,
               "type": "PaddingCut"}  # a lhotse cut without a recording
    lines = [
        cut(ch2, rel(ch2), 0.5, 1.0, "Chapter two begins.", 3),
        cut(oz, absolute, 2.0, 1.001, "Dorothy lived in Kansas.", 1, num_samples=48008),  # ends 0.5 ms late
        cut(ch1, rel(ch1), 1.25, 0.75, "\"But why do folks dive?\" she asked.", 2),
        cut(ch1, rel(ch1), 0.0, 1.0, "The little girl was thoughtful.", 1),
        cut(ch1, "download/librilight/gone.flac", 2.0, 0.5, "No audio.", 9),                       # missing_file
        '{"id": "broken", "start": 1.0,',                                                          # bad JSON
        cut(ch2, rel(ch2), 2.0, 0.5, "   ", 4),                                                   # empty_text
        padding,                                                                                  # unsupported_cut
        cut(ch1, rel(ch1), 0.0, 1.0, "The little girl was thoughtful.", 1),                      # duplicate_key
    ]
    manifest = write_gz(tmp_path / "libriheavy_cuts_small.jsonl.gz", lines)
    out = tmp_path / "out"
    assert detect_format(manifest) == "lhotse"
    assert build("--input", manifest, "--out", out, "--chunk-segments", 2) == 0

    got = chunks(out)
    assert [c.doc for c in got] == [BOOK, BOOK, OTHER] and got[0].source == "libriheavy_cuts_small"
    book = [s for c in got if c.doc == BOOK for s in c.segments]
    assert [s.text for s in book] == ["The little girl was thoughtful.", "\"But why do folks dive?\" she asked.",
                                      "Chapter two begins."]
    spans = [(ch1, 0, 16000), (ch1, 20000, 32000), (ch2, 8000, 24000), (oz, 32000, 48008)]
    segs = [*book, got[2].segments[0]]
    assert [len(s.audio) for s in segs] == [b - a for _, a, b in spans]
    for seg, (rec, a, b) in zip(segs, spans, strict=True):
        np.testing.assert_allclose(seg.audio, audio[rec][a:b], atol=1e-4)  # the cut span, not another
    index = read_index(out)
    assert index["docs"] == 2 and index["segments"] == 4
    assert index["rejects"] == {"duplicate_key": 1, "empty_text": 1, "missing_file": 1, "undecodable_text": 1,
                                "unsupported_cut": 1}
    listed = {r["input"]: r["reason"] for r in rejects(out)}
    assert listed[f"{manifest}:6"] == "undecodable_text"   # no cut id to name: the line is not JSON
    assert listed[f"{manifest}:5 ({ch1}_9)"] == "missing_file" and listed[f"{manifest}:8 (pad)"] == "unsupported_cut"
    assert listed[f"{manifest}:9 ({ch1}_1)"] == "duplicate_key"


def test_libriheavy_extracted_cuts_with_audio_root(tmp_path):
    """The extracted manifests (``cases_and_punc/lhotse/``) carry ``supervisions[].text``, no ``custom``, and
    live two folders below the audio's root."""
    sr = 8000
    rec = f"{BOOK}/01_baum_sea_fairies_64kb"
    (tmp_path / "download/librilight" / rec).parent.mkdir(parents=True)
    sf.write(tmp_path / f"download/librilight/{rec}.flac", tone(2.0, sr), sr)
    lines = []
    for n, (start, text) in enumerate([(1.0, "Second, later."), (0.0, "First.")]):
        c = cut(rec, f"download/librilight/{rec}.flac", start, 1.0, "", n, sr=sr, num_samples=2 * sr)
        del c["supervisions"][0]["custom"], c["custom"]
        c["supervisions"][0]["text"] = text
        lines.append(c)
    (tmp_path / "cases_and_punc/lhotse").mkdir(parents=True)
    manifest = write_gz(tmp_path / "cases_and_punc/lhotse/libriheavy_cuts_small.jsonl.gz", lines)

    assert build("--input", manifest, "--out", tmp_path / "bad") == 1  # paths resolve under the manifest's folder
    assert not (tmp_path / "bad/index.json").exists()
    assert [r["reason"] for r in rejects(tmp_path / "bad")] == ["missing_file", "missing_file"]

    out = tmp_path / "out"
    assert build("--input", manifest, "--out", out, "--format", "lhotse", "--audio-root", tmp_path,
                 "--sr", 16000) == 0
    segs = chunks(out)[0].segments
    assert [s.text for s in segs] == ["First.", "Second, later."] and [len(s.audio) for s in segs] == [16000] * 2


# ----------------------------------------------------------------------------- Emilia (WebDataset tars)

def mp3(seconds: float, freq: float, sr: int = 24000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone(seconds, sr, freq), sr, format="MP3")
    return buf.getvalue()


def emilia_meta(uid: str, text: str, seconds: float, speaker: str | None = None, yodas: bool = False) -> bytes:
    """The JSON beside each MP3 in amphion/Emilia-Dataset (Emilia-YODAS spells the id ``_id`` and has no wav)."""
    meta = {"_id" if yodas else "id": uid, "text": text, "duration": seconds,
            "speaker": speaker or uid.rsplit("_W", 1)[0], "language": "en", "dnsmos": 3.21}
    if not yodas:
        meta["wav"] = f"{uid[:9]}/{uid.rsplit('_W', 1)[0]}/mp3/{uid}.mp3"
    return json.dumps(meta).encode()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def peak_hz(audio: np.ndarray, sr: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(audio))) * sr / len(audio))


def test_emilia_tars_become_talks_of_mp3_windows(tmp_path):
    s0, s1 = "EN_B00000_S00000", "EN_B00000_S00001"
    windows = {f"{s0}_W000001": (0.75, 300), f"{s0}_W000000": (1.5, 600), f"{s1}_W000000": (0.375, 900),
               f"{s1}_W000002": (0.75, 1200)}
    first = []
    for uid, (seconds, freq) in windows.items():
        first += [(f"{uid}.json", emilia_meta(uid, f" Window {uid[-1]} of {uid[10:16]}.", seconds)),
                  (f"{uid}.mp3", mp3(seconds, freq))]
    first += [(f"{s1}_W000003.json", emilia_meta(f"{s1}_W000003", "no audio", 1.0)),      # missing_file
              (f"{s1}_W000004.mp3", mp3(0.5, 400)),                                     # bad_record (no JSON)
              (f"{s1}_W000005.json", b'{"id": "EN_B00000_S00001_W000005", "te'),         # undecodable_text
              (f"{s1}_W000005.mp3", mp3(0.5, 400)),
              (f"{s1}_W000006.json", emilia_meta(f"{s1}_W000006", " ", 0.5)),            # empty_text
              (f"{s1}_W000006.mp3", mp3(0.5, 400)),
              (f"{s1}_W000007.json", emilia_meta(f"{s1}_W000007", "garbled", 0.5)),      # unreadable_audio
              (f"{s1}_W000007.mp3", b"\xff\xfb not an mpeg frame" * 8)]
    write_tar(tmp_path / "Emilia/EN/EN-B000000.tar", first)
    yodas = "DE_B000000_S00109"
    write_tar(tmp_path / "Emilia/EN/EN-B000001.tar", [   # the talk S00001 goes on in the next tar
        (f"{s1}_W000001.json", emilia_meta(f"{s1}_W000001", "Window 1 of S00001.", 0.375)),
        (f"{s1}_W000001.mp3", mp3(0.375, 1500)),
        (f"{yodas}_W000023.mp3", mp3(0.75, 450)),
        (f"{yodas}_W000023.json", emilia_meta(f"{yodas}_W000023", "und das ist gut so", 0.75,
                                              speaker="DE_wSq11gYbUgU_SPEAKER_04", yodas=True))])
    assert detect_format(tmp_path / "Emilia") == "emilia"
    out = tmp_path / "out"
    assert build("--input", tmp_path / "Emilia", "--out", out, "--sr", 16000) == 0

    got = {c.doc: c.segments for c in chunks(out)}
    assert list(got) == [s0, s1, yodas]
    assert [s.text for s in got[s0]] == ["Window 0 of S00000.", "Window 1 of S00000."]
    assert [s.text for s in got[s1]] == ["Window 0 of S00001.", "Window 1 of S00001.", "Window 2 of S00001."]
    order = [f"{s0}_W000000", f"{s0}_W000001", f"{s1}_W000000", f"{s1}_W000001", f"{s1}_W000002"]
    spec = {**windows, f"{s1}_W000001": (0.375, 1500)}
    segs = [*got[s0], *got[s1]]
    assert [len(s.audio) for s in segs] == [round(spec[u][0] * 16000) for u in order]  # 24 kHz MP3 -> 16 kHz
    assert [peak_hz(s.audio, 16000) for s in segs] == pytest.approx([spec[u][1] for u in order], abs=3)
    assert [s.text for s in got[yodas]] == ["und das ist gut so"] and len(got[yodas][0].audio) == 12000
    index = read_index(out)
    assert index["rejects"] == {"bad_record": 1, "empty_text": 1, "missing_file": 1, "undecodable_text": 1,
                                "unreadable_audio": 1}
    tar = tmp_path / "Emilia/EN/EN-B000000.tar"
    assert {r["input"]: r["reason"] for r in rejects(out)}[f"{tar}:{s1}_W000004"] == "bad_record"


def test_truncated_tar_and_gzip_stop_the_build_naming_the_file(tmp_path, capsys):
    uid = "EN_B00000_S00000_W000000"
    tar = write_tar(tmp_path / "EN-B000000.tar", [(f"{uid}.json", emilia_meta(uid, "hi", 1.0)),
                                                   (f"{uid}.mp3", mp3(1.0, 300))])
    tar.write_bytes(tar.read_bytes()[:700])
    assert build("--input", tar, "--out", tmp_path / "o1") == 1
    assert f"error: {tar}: unreadable tar" in capsys.readouterr().err
    gz = write_gz(tmp_path / "cuts.jsonl.gz", [{"text": f"line {i}"} for i in range(200)])
    gz.write_bytes(gz.read_bytes()[:-30])
    assert build("--input", gz, "--out", tmp_path / "o2", "--format", "text") == 1
    assert f"error: {gz}: unreadable gzip" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unreadable gzip"):
        read_pool(gz)
    assert not (tmp_path / "o1/index.json").exists() and not (tmp_path / "o2/index.json").exists()


# ----------------------------------------------------------------------------- text corpora (datasets' formats)

def fineweb_edu(path: Path, texts: list[str | None], ids: list[str]) -> Path:
    """A FineWeb-Edu parquet file: its columns, as ``datasets`` writes them (small row groups)."""
    n = len(texts)
    table = pa.table({
        "text": pa.array(texts, pa.string()), "id": ids, "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)], "date": ["2024-02-21T12:00:00Z"] * n,
        "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n, "language": ["en"] * n,
        "language_score": pa.array([0.97] * n, pa.float64()), "token_count": pa.array([50] * n, pa.int64()),
        "score": pa.array([3.1] * n, pa.float64()), "int_score": pa.array([3] * n, pa.int64())})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2)
    return path


def test_parquet_corpora_build_text_shards_and_feed_the_pool(tmp_path):
    data = tmp_path / "fineweb-edu/data/CC-MAIN-2024-10"
    fineweb_edu(data / "000_00000.parquet", ["Photosynthesis turns light into sugar.", None, "Cells divide. "],
                ["<urn:uuid:a1>", "<urn:uuid:a2>", "<urn:uuid:a3>"])
    fineweb_edu(data / "001_00000.parquet", ["  ", "The Nile is long.", "Cells divide again."],
                ["<urn:uuid:b1>", "<urn:uuid:b2>", "<urn:uuid:a3>"])
    root = tmp_path / "fineweb-edu"
    assert detect_format(root) == "parquet"
    out = tmp_path / "out"
    assert build("--input", root, "--out", out) == 0
    got = chunks(out)
    assert [(c.doc, [s.text for s in c.segments]) for c in got] == [
        ("<urn:uuid:a1>", ["Photosynthesis turns light into sugar."]), ("<urn:uuid:a3>", ["Cells divide."]),
        ("<urn:uuid:b2>", ["The Nile is long."])]
    assert all(s.audio is None for c in got for s in c.segments)
    assert read_index(out)["rejects"] == {"duplicate_key": 1, "empty_text": 2}
    listed = {r["input"]: r["reason"] for r in rejects(out)}
    assert listed[f"{data / '000_00000.parquet'}:2"] == "empty_text"
    assert listed[f"{data / '001_00000.parquet'}:3"] == "duplicate_key"

    # SmolLM-Corpus (cosmopedia-v2): no id column, so a row is named by its file and row number
    smol = tmp_path / "smollm/cosmopedia-v2/train-00000-of-00104.parquet"
    smol.parent.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["Write a story", "Explain"], "text": ["Once upon a time.", "Atoms."],
                             "token_length": [4, 1], "audience": ["kids", "general"],
                             "format": ["story", "textbook"], "seed_data": ["stories", "web"]}), smol)
    assert build("--input", smol, "--out", tmp_path / "smol") == 0
    assert [(c.doc, c.segments[0].text) for c in chunks(tmp_path / "smol")] == [
        ("train-00000-of-00104-0000001", "Once upon a time."), ("train-00000-of-00104-0000002", "Atoms.")]

    texts = ["Photosynthesis turns light into sugar.", "Cells divide.", "The Nile is long.", "Cells divide again."]
    assert read_pool(root) == texts and read_pool(data / "001_00000.parquet") == texts[2:]
    assert read_pool(smol) == ["Once upon a time.", "Atoms."]


def test_parquet_without_a_string_text_column_is_an_error(tmp_path, capsys):
    code = tmp_path / "python-edu.parquet"
    pq.write_table(pa.table({"blob_id": ["x"], "repo_name": ["r"], "path": ["a.py"]}), code)
    assert build("--input", code, "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {code}: column 'text' is missing (columns: blob_id, repo_name, path); "
                   "a string 'text' column is required")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": pa.array([1, 2], pa.int64())}), numbers)
    with pytest.raises(ValueError, match=r"numbers\.parquet: column 'text' is int64"):
        read_pool(numbers)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk\.parquet: unreadable parquet"):
        read_pool(tmp_path / "junk.parquet")


def test_jsonl_gz_as_datasets_writes_it(tmp_path):
    """``Dataset.to_json`` writes JSON lines (here gzipped): one document per line, named by its ``id``."""
    rows = [{"text": "Alpha text.", "id": "doc-1", "url": "u1", "score": 3.5},
            {"text": "", "id": "doc-2", "url": "u2", "score": 2.0},
            {"text": "Gamma text.", "id": 7, "url": "u3", "score": 4.0}]
    src = write_gz(tmp_path / "fineweb-sample.jsonl.gz", [*rows, "{not json"])
    assert detect_format(src) == "text"
    out = tmp_path / "out"
    assert build("--input", src, "--out", out) == 0
    assert [(c.doc, c.segments[0].text) for c in chunks(out)] == [
        ("doc-1", "Alpha text."), ("fineweb-sample-000003", "Gamma text.")]
    assert {r["input"]: r["reason"] for r in rejects(out)} == {f"{src}:2": "empty_text",
                                                                f"{src}:4": "undecodable_text"}
    good = write_gz(tmp_path / "pool.jsonl.gz", rows)
    assert read_pool(good) == ["Alpha text.", "Gamma text."]
    with pytest.raises(ValueError, match=r"fineweb-sample\.jsonl\.gz:4: invalid JSON"):
        read_pool(src)


def test_parquet_rows_are_spoken_by_tts(tmp_path):
    script = tmp_path / "say.py"
    script.write_text("import sys, numpy, soundfile\n"
                      "soundfile.write(sys.argv[2], numpy.full(400 * len(sys.argv[1]), 0.1, 'float32'), 8000)\n")
    src = fineweb_edu(tmp_path / "pool.parquet", ["hi", "hello"], ["a", "b"])
    out = tmp_path / "out"
    assert build("--input", src, "--out", out, "--sr", 8000, "--tts", "command",
                 "--tts-command", f"{sys.executable} {script} {{text}} {{wav}}") == 0
    assert [(c.doc, c.segments[0].text, len(c.segments[0].audio)) for c in chunks(out)] == [
        ("a", "hi", 800), ("b", "hello", 2000)]
