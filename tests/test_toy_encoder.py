"""The toy speech encoder: espeak-ng phoneme targets, exact frame counts, a tiny CTC pre-training, and loading the
checkpoint back through build_encoder (kind "toy")."""

import copy
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from config import ConfigError
from model.encoder import EncoderConfig, SpeechEncoder, build_encoder
from model.toy_encoder import CONFIG, WEIGHTS, ToyEncoderArch, ToySpeechNet, load_model, save_checkpoint
from shards.tts import TTSConfig
from toy.speech_encoder import (
    phoneme_error_rate,
    phonemize,
    phonemize_many,
    pretrain_encoder,
    progress_bar,
    random_word_strings,
    read_texts,
    speak,
)

torch.set_num_threads(1)

SENTENCES = ["alice found a red ball near the park", "bob painted two green apples near the river",
             "carol lost the old book near the market", "dave bought a blue cup near the school",
             "erin wanted seven stones near paris", "frank carried a small dog near rome"]
LENGTHS = [0, 399, 400, 559, 560, 1039, 1040, 16_000, 23_456]  # samples: around the mel and conv edges


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 120-step pre-training of a small network on a few sentences in one voice (plus random word strings)."""
    out = tmp_path_factory.mktemp("toy_encoder")
    texts = SENTENCES + random_word_strings(SENTENCES, 10, seed=0)
    model, metrics = pretrain_encoder(texts, out, steps=120, voices=["en-us"], speeds=[175], heldout=2, batch=4,
                                      lr=3e-3, eval_every=30, arch=ToyEncoderArch(dim=64, heads=2, ffn=128),
                                      workers=2, show_progress=False)
    return out, model, metrics


@pytest.fixture(scope="module")
def random_init(tmp_path_factory):
    """A checkpoint of the default architecture, randomly initialised (frame counts do not depend on training)."""
    out = tmp_path_factory.mktemp("toy_random")
    torch.manual_seed(0)
    save_checkpoint(ToySpeechNet(ToyEncoderArch(), ["a", "b", "tS"]).eval(), out, training={})
    return out


def _noisy_batch(lengths: list[int], extra: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.1 * torch.randn(len(lengths), max(lengths) + extra), torch.tensor(lengths)


def test_phonemize_symbols_and_determinism():
    text = "alice found two green apples near the market"
    symbols = phonemize(text, "en-us")
    assert len(symbols) > 20 and symbols == phonemize(text, "en-us")
    assert all(s and not set(s) & set("'%=_ ,") for s in symbols)  # no stress marks, pauses or separators
    found = symbols.index("f")
    assert symbols[found : found + 4] == ["f", "aU", "n", "d"]  # espeak-ng's multi-character phoneme stays whole
    assert phonemize(text, "en-gb-scotland") != symbols  # targets follow the voice's accent


def test_phonemize_many_matches_one_by_one():
    """One espeak-ng process for many texts gives what one process per text gives, clauses and all."""
    texts = ["Mr. Smith met Dr. Who, then left.", "!!!", "a... b", "  the end,\nreally  ", "-v xx --help",
             "hello \u2014 world"]
    many = phonemize_many(texts, "en-gb")
    assert many == [phonemize(t, "en-gb") for t in texts]
    assert many[1] == [] and all(many[i] for i in (0, 2, 3, 4, 5))  # text starting with '-' is spoken, not an option
    assert phonemize_many([], "en-gb") == []


def test_targets_follow_the_target_voice_whoever_speaks():
    """One label sequence per text (en-us), or the speaking voice's own pronunciation when asked for."""
    tts = TTSConfig(voices=["en-gb-scotland"], speeds=[160])
    texts = ["near the market", "!!!"]
    with progress_bar(False) as bar:
        audio, reference, dropped = speak(texts, tts, "en-us", 1, bar, "speech")
        _, own, _ = speak(texts, tts, None, 1, bar, "speech")
    assert len(audio) == 1 and dropped == 1 and audio[0].dtype == np.float32 and len(audio[0]) > 8_000
    assert reference == [phonemize(texts[0], "en-us")] and own == [phonemize(texts[0], "en-gb-scotland")]
    assert reference != own


def test_phoneme_error_rate():
    assert phoneme_error_rate([["a", "b", "tS"]], [["a", "b", "tS"]]) == 0.0
    assert phoneme_error_rate([["a", "b", "tS", "d"]], [["a", "tS", "x"]]) == 0.5  # one deletion, one substitution
    assert phoneme_error_rate([["a", "b"]], [[]]) == 1.0


def test_model_size_and_arch_validation():
    model = ToySpeechNet(ToyEncoderArch(), ["a"] * 40)
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.0e6
    assert (model.sample_rate, model.frame_rate, model.dim) == (16_000, 25.0, 144)
    with pytest.raises(ConfigError, match="dim"):
        ToyEncoderArch(dim=100, heads=4)


def test_frames_for_and_padding_invariance(random_init):
    enc = build_encoder(EncoderConfig(kind="toy", path=str(random_init)))
    assert isinstance(enc, SpeechEncoder) and (enc.frame_rate, enc.dim) == (25.0, 144)
    assert enc.frames_for(10 * 16_000) == 250  # 998 mel frames (edges snipped), then ceil(n / 2) twice
    waves, lengths = _noisy_batch(LENGTHS)
    frames, frame_lengths = enc(waves, lengths)
    expected = [enc.frames_for(n) for n in LENGTHS]
    assert expected[:3] == [0, 0, 1] and frame_lengths.tolist() == expected
    assert frames.shape == (len(LENGTHS), max(expected), 144) and torch.isfinite(frames).all()
    for i, n in enumerate(LENGTHS):
        assert not frames[i, expected[i] :].any()  # padding frames are zero
        alone, alone_lengths = enc(waves[i : i + 1, :n], lengths[i : i + 1])
        assert alone.shape[1] == alone_lengths[0] == expected[i]  # forward alone agrees with frames_for
        torch.testing.assert_close(frames[i, : expected[i]], alone[0], atol=1e-4, rtol=1e-4)


def test_runs_after_parent_casts_to_bfloat16(random_init):
    enc = build_encoder(EncoderConfig(kind="toy", path=str(random_init)))
    waves, lengths = _noisy_batch([16_000, 8_000])
    reference, _ = enc(waves, lengths)
    frames, frame_lengths = copy.deepcopy(enc).to(torch.bfloat16)(waves, lengths)
    assert frame_lengths.tolist() == [enc.frames_for(16_000), enc.frames_for(8_000)]
    cosine = torch.nn.functional.cosine_similarity(frames.float().flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99
    enc = build_encoder(EncoderConfig(kind="toy", path=str(random_init), dtype="bfloat16"))
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    frames, _ = enc(waves, lengths)
    assert frames.dtype == torch.bfloat16 and frames.shape == reference.shape


def test_pretraining_lowers_ctc_loss_and_saves(trained):
    out, model, metrics = trained
    losses = [entry["loss"] for entry in metrics["loss"]]
    pers = [entry["per"] for entry in metrics["per_history"]]
    assert [entry["step"] for entry in metrics["loss"]] == [30, 60, 90, 120]
    assert losses[-1] < 0.6 * losses[0], losses
    assert metrics["train_utterances"] == 14 and metrics["heldout_utterances"] == 2
    # the held-out voice speaks held-out texts: all blank at first, then phonemes come through
    assert [entry["step"] for entry in metrics["per_history"]] == [30, 60, 90, 120]
    assert pers[-1] < pers[0] - 0.2 and metrics["per"] == pers[-1], pers
    meta = json.loads((out / CONFIG).read_text())
    assert meta["phonemes"] == model.phonemes and "aU" in meta["phonemes"] and meta["sample_rate"] == 16_000
    assert meta["arch"]["dim"] == 64 and meta["training"]["steps"] == 120
    assert (out / WEIGHTS).stat().st_size > 4 * sum(p.numel() for p in model.parameters())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_build_encoder_loads_frozen_and_same_features(trained):
    out, model, _ = trained
    enc = build_encoder(EncoderConfig(kind="toy", path=str(out)))
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.modules())
    waves, lengths = _noisy_batch([24_000, 17_000])
    frames, frame_lengths = enc(waves.requires_grad_(), lengths)
    assert frames.grad_fn is None and frames.shape[-1] == 64
    with torch.no_grad():
        hidden, n = model.eval().hidden(waves, lengths)
    assert frame_lengths.tolist() == n.tolist()
    for i, k in enumerate(n.tolist()):
        torch.testing.assert_close(frames[i, :k], hidden[i, :k])
    assert model.decode(waves[:1], lengths[:1]) == load_model(out).decode(waves[:1], lengths[:1])


def _corrupt(src, dst, name: str, data: bytes):
    shutil.copytree(src, dst)
    (dst / name).write_bytes(data)
    return dst


def test_bad_checkpoints_name_the_file(random_init, tmp_path):
    with pytest.raises(ConfigError, match="path"):
        EncoderConfig(kind="toy")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_encoder(EncoderConfig(kind="toy", path=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=CONFIG):
        build_encoder(EncoderConfig(kind="toy", path=str(tmp_path)))
    bad = _corrupt(random_init, tmp_path / "json", CONFIG, b"{not json")
    with pytest.raises(ValueError, match=f"{bad / CONFIG}: not valid JSON"):
        load_model(bad)
    meta = json.loads((random_init / CONFIG).read_text())
    meta["arch"]["dim"] = 160
    bad = _corrupt(random_init, tmp_path / "arch", CONFIG, json.dumps(meta).encode())
    with pytest.raises(ValueError, match=f"{bad / WEIGHTS}: does not fit"):
        load_model(bad)
    del meta["phonemes"]
    bad = _corrupt(random_init, tmp_path / "phonemes", CONFIG, json.dumps(meta).encode())
    with pytest.raises(ValueError, match="'phonemes'"):
        load_model(bad)
    bad = _corrupt(random_init, tmp_path / "weights", WEIGHTS, b"garbage")
    with pytest.raises(ValueError, match=f"{bad / WEIGHTS}: does not match"):
        load_model(bad)
    meta = json.loads((random_init / CONFIG).read_text())
    meta["weights_sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (bad / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{bad / WEIGHTS}: not a safetensors file"):
        load_model(bad)
    (bad / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"{bad / WEIGHTS}"):
        build_encoder(EncoderConfig(kind="toy", path=str(bad)))


def test_read_texts(tmp_path):
    plain = tmp_path / "texts.txt"
    plain.write_text("one two\n\n three \n")
    assert read_texts(plain) == ["one two", "three"]
    lines = tmp_path / "texts.jsonl"
    lines.write_text('{"text": "one two"}\n{"doc": 3}\n')
    with pytest.raises(ValueError, match=f"{lines}:2"):
        read_texts(lines)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_texts(tmp_path / "missing.txt")
    strings = random_word_strings(["One two, three", "four"], 50, seed=1)
    assert strings == random_word_strings(["One two, three", "four"], 50, seed=1)
    assert {w for s in strings for w in s.split()} == {"one", "two", "three", "four"}
