"""Any lhotse cut manifest into shards (``--format lhotse``, detected for ``.jsonl``/``.jsonl.gz``): cuts built
with lhotse's own API, lhotse's Emilia recipe run on a tiny download, and manifests lhotse reads whole.
LibriHeavy's published manifests go the same way: tests/test_importers.py."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, MonoCut, MultiCut, Recording, RecordingSet, SupervisionSegment
from lhotse.recipes.emilia import prepare_emilia
from lhotse.supervision import AlignmentItem

from shards.format import read_index
from shards.sources import detect_format
from tests.test_build import build, chunks, tone
from tests.test_importers import emilia_meta, mp3, rejects


def wav(path: Path, audio: np.ndarray, sr: int) -> Recording:
    sf.write(path, audio, sr)
    return Recording.from_file(path)


def sup(cut_id: str, rec: Recording, start: float, duration: float, text: str,
        words: list[tuple[str, float, float]] | None = None) -> SupervisionSegment:
    """A supervision (times from the cut's start) and its word alignment (lhotse: times from the recording's)."""
    ali = {"word": [AlignmentItem(w, s, d) for w, s, d in words]} if words else None
    return SupervisionSegment(id=f"{cut_id}-{start}", recording_id=rec.id, start=start, duration=duration,
                              channel=0, text=text, speaker="spk", alignment=ali)


def mono(cut_id: str, rec: Recording, start: float, duration: float, sups: list, channel: int = 0) -> MonoCut:
    return MonoCut(id=cut_id, start=start, duration=duration, channel=channel, recording=rec, supervisions=sups)


def test_a_lhotse_cutset_becomes_shards_with_words_channels_and_rejects(tmp_path):
    left, right = tone(2.0, 16000, 300), tone(2.0, 16000, 700)
    a = wav(tmp_path / "a.wav", np.stack([left, right], axis=1), 16000)   # stereo
    b = wav(tmp_path / "b.wav", tone(1.0, 22050, 440), 22050)             # resampled to 16 kHz
    c = wav(tmp_path / "c.wav", tone(3.0, 16000), 16000)
    gone = wav(tmp_path / "gone.wav", tone(1.0, 16000), 16000)
    (tmp_path / "gone.wav").unlink()
    junk = wav(tmp_path / "junk.wav", tone(1.0, 16000), 16000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF, but not a wave file" * 40)
    cuts = [
        # LibriHeavy-like: the alignment is of the normalized text, the shard keeps the cased text's words
        mono("a-0", a, 0.0, 1.0, [sup("a-0", a, 0.0, 1.0, "Hello there, world.",
                                      [("HELLO", 0.1, 0.2), ("THERE", 0.35, 0.25), ("WORLD", 0.7, 0.25)])]),
        mono("a-1", a, 1.0, 1.0, [sup("a-1", a, 0.5, 0.5, "second half", [("second", 1.5, 0.2), ("half", 1.75, 0.2)]),
                                  sup("a-1", a, 0.0, 0.5, "first half", [("first", 1.05, 0.2), ("half", 1.3, 0.15)])],
             channel=1),
        MultiCut(id="a-mix", start=0.0, duration=0.5, channel=[0, 1], recording=a,   # both channels, mixed
                 supervisions=[sup("a-mix", a, 0.0, 0.5, "both channels", [("both", 0.0, 0.2)])]),
        mono("b-0", b, 0.0, 1.0, [sup("b-0", b, 0.0, 1.0, "resampled speech")]),
        mono("c-long", c, 0.0, 3.0, [sup("c-long", c, 0.0, 3.0, "too long")]),        # too_long
        mono("b-empty", b, 0.0, 0.5, [sup("b-empty", b, 0.0, 0.5, "   ")]),           # empty_text
        mono("gone-0", gone, 0.0, 1.0, [sup("gone-0", gone, 0.0, 1.0, "no file")]),   # missing_file
        mono("b-past", b, 0.5, 1.0, [sup("b-past", b, 0.0, 1.0, "past the end")]),    # bad_range
        mono("junk-0", junk, 0.0, 1.0, [sup("junk-0", junk, 0.0, 1.0, "garbled")]),   # unreadable_audio
        mono("a-0", a, 0.0, 1.0, [sup("a-0", a, 0.0, 1.0, "again")]),                # duplicate_key
    ]
    manifest = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(cuts).to_file(manifest)
    bad = {**cuts[3].to_dict(), "id": "b-bad", "start": "abc"}
    with gzip.open(manifest, "at") as f:   # a second gzip member, as appending to a manifest makes
        f.write(json.dumps(bad) + "\n")     # bad_record
    assert detect_format(manifest) == "lhotse"
    out = tmp_path / "out"
    assert build("--input", manifest, "--out", out, "--max-seconds", 2.5) == 0

    got = {c.doc: c.segments for c in chunks(out)}
    assert list(got) == ["a", "b"] and {c.source for c in chunks(out)} == {"cuts"}
    assert [s.text for s in got["a"]] == ["Hello there, world.", "both channels", "first half second half"]
    assert got["a"][0].words == [("Hello", 0.1, 0.3), ("there,", 0.35, 0.6), ("world.", 0.7, 0.95)]
    assert got["a"][1].words is None   # one aligned word for two: not the text's words
    assert got["a"][2].words == [("first", 0.05, 0.25), ("half", 0.3, 0.45), ("second", 0.5, 0.7), ("half", 0.75, 0.95)]
    stereo, _ = sf.read(tmp_path / "a.wav", dtype="float32")
    np.testing.assert_allclose(got["a"][0].audio, stereo[:16000, 0], atol=1e-4)             # channel 0
    np.testing.assert_allclose(got["a"][1].audio, stereo[:8000].mean(axis=1), atol=1e-4)     # mixed
    np.testing.assert_allclose(got["a"][2].audio, stereo[16000:32000, 1], atol=1e-4)         # channel 1
    [resampled] = got["b"]
    assert resampled.text == "resampled speech" and resampled.words is None and len(resampled.audio) == 16000

    where = {cut.id: f"{manifest}:{n} ({cut.id})" for n, cut in enumerate(cuts[:-1], 1)}
    assert {r["input"]: r["reason"] for r in rejects(out)} == {
        where["b-empty"]: "empty_text", where["gone-0"]: "missing_file", where["b-past"]: "bad_range",
        f"{manifest}:10 (a-0)": "duplicate_key", f"{manifest}:11 (b-bad)": "bad_record",
        where["c-long"]: "too_long", where["junk-0"]: "unreadable_audio"}
    assert read_index(out)["rejects"] == {"bad_range": 1, "bad_record": 1,
                                          "duplicate_key": 1, "empty_text": 1, "missing_file": 1, "too_long": 1,
                                          "unreadable_audio": 1}


def test_lhotses_emilia_recipe_output_groups_windows_into_talks(tmp_path):
    """``lhotse prepare emilia`` on a download (``raw/EN/EN_B00000.jsonl`` and its mp3s): a talk's windows are
    one document, in window order, as the reader of Emilia's tars makes them."""
    talk, other = "EN_B00000_S00000", "EN_B00000_S00001"
    lines = []
    for uid, seconds in [(f"{talk}_W000001", 0.5), (f"{other}_W000000", 0.25), (f"{talk}_W000000", 0.75)]:
        meta = json.loads(emilia_meta(uid, f" Window {uid[-1]} of {uid[10:16]}.", seconds))
        mp3_path = tmp_path / "raw/EN" / meta["wav"]
        mp3_path.parent.mkdir(parents=True, exist_ok=True)
        mp3_path.write_bytes(mp3(seconds, 300))
        lines.append(json.dumps(meta))
    (tmp_path / "raw/EN/EN_B00000.jsonl").write_text("\n".join(lines) + "\n")
    prepare_emilia(tmp_path, "en", num_jobs=1, output_dir=tmp_path)
    manifest = tmp_path / "emilia_cuts_EN.jsonl.gz"

    out = tmp_path / "out"
    assert build("--input", manifest, "--out", out, "--sr", 16000) == 0
    got = {c.doc: c.segments for c in chunks(out)}
    assert {doc: [s.text for s in segs] for doc, segs in got.items()} == {
        talk: ["Window 0 of S00000.", "Window 1 of S00000."], other: ["Window 0 of S00001."]}
    assert [len(s.audio) for s in got[talk]] == [12000, 8000]   # 24 kHz MP3 at 16 kHz


def test_manifests_lhotse_reads_whole_and_manifests_of_no_cuts(tmp_path, capsys):
    rec = wav(tmp_path / "a.wav", tone(1.0, 8000), 8000)
    cut = mono("a-0", rec, 0.25, 0.5, [sup("a-0", rec, 0.0, 0.5, "a json manifest")])
    CutSet.from_cuts([cut]).to_file(tmp_path / "cuts.json")
    assert build("--input", tmp_path / "cuts.json", "--out", tmp_path / "out", "--format", "lhotse") == 0
    [segment] = chunks(tmp_path / "out")[0].segments
    assert segment.text == "a json manifest" and len(segment.audio) == 8000   # 0.5 s at 16 kHz

    recordings = RecordingSet.from_recordings([rec])
    recordings.to_file(tmp_path / "recordings.jsonl.gz")
    assert build("--input", tmp_path / "recordings.jsonl.gz", "--out", tmp_path / "o1", "--format", "lhotse") == 1
    assert "all 1 inputs rejected (unsupported_cut 1)" in capsys.readouterr().err
    recordings.to_file(tmp_path / "recordings.json")
    assert build("--input", tmp_path / "recordings.json", "--out", tmp_path / "o2", "--format", "lhotse") == 1
    assert f"error: {tmp_path / 'recordings.json'}: not a lhotse cut manifest" in capsys.readouterr().err


@pytest.mark.parametrize("first", [{"type": "MonoCut"}, {"recording": {}, "supervisions": []}])
def test_detects_a_jsonl_of_cuts(tmp_path, first):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"id": "x", **first}) + "\n")
    assert detect_format(path) == "lhotse"
