"""The in-process Kokoro backend on a RANDOM model (Kokoro's real weights are not here: no network): the real
kokoro code path from a local folder in the published layout, phonemes from espeak-ng, resampling, batching,
determinism, long phoneme strings, and the errors for missing or wrong files.

The model is kokoro's own KModel with the published config's decoder (its channel counts are fixed in kokoro's
code) and a smaller PL-BERT and prosody stack, so that a text takes a fraction of a second on a CPU; every phoneme
gets exactly 2 frames of 600 samples at 24 kHz (``write_random_model``), so each text's length is known.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.kokoro_tts import KOKORO_82M_CONFIG, KOKORO_SR, make_g2p, split_phonemes, write_random_model
from shards.tts import TTSConfig, TTSError, make_tts, synthesize_many

SR = 16000
FRAMES = 2
TEXTS = ["Hi.", "Good morning to you.", "Are we there yet?"]

SMALL = copy.deepcopy(KOKORO_82M_CONFIG)
SMALL["plbert"].update(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=1)
SMALL["n_layer"] = 1
SMALL["istftnet"].update(resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = write_random_model(tmp_path_factory.mktemp("kokoro"), SMALL, voices=["af_heart", "bm_george"],
                                frames_per_phoneme=FRAMES)
    torch.save(0.3 * torch.randn(24, 1, 256), folder / "voices" / "af_short.pt")  # 24 rows: long texts split
    return folder


def kokoro(model_dir: Path, **kwargs) -> TTSConfig:
    return TTSConfig(backend="kokoro", model_path=str(model_dir), g2p="espeak", device="cpu", **kwargs)


def tokens(phonemes: str) -> int:
    """Kokoro's tokens for a phoneme string: the symbols in its vocabulary and two boundary tokens."""
    return sum(p in SMALL["vocab"] for p in phonemes) + 2


def test_speaks_each_text_at_the_shard_rate(model_dir):
    with make_tts(kokoro(model_dir, voices=["af_heart", "bm_george"], speeds=[1.0, 2.0]), SR) as tts:
        assert tts.backend.g2p_name == "espeak"
        audio = [tts.synthesize(text) for text in TEXTS]  # variants 0: af_heart at speed 1
        for text, a in zip(TEXTS, audio, strict=True):
            assert a.dtype == np.float32 and a.ndim == 1 and np.isfinite(a).all() and np.abs(a).max() > 0
            # FRAMES frames of 600 samples per token at 24 kHz, resampled to 16 kHz: 400 samples per frame
            assert len(a) == FRAMES * 400 * tokens(tts.backend.g2p[False](text)), text
        assert len({len(a) for a in audio}) == len(TEXTS)
        fast = tts.synthesize(TEXTS[1], variant=1)  # af_heart at speed 2: one frame per token
        assert len(fast) == len(audio[1]) // 2
        british = tts.synthesize(TEXTS[1], variant=2)
        assert len(british) == FRAMES * 400 * tokens(tts.backend.g2p[True](TEXTS[1]))
        assert not np.array_equal(british[:1000], audio[1][:1000])
    with make_tts(kokoro(model_dir), KOKORO_SR) as native:  # at Kokoro's own rate: no resampling
        assert len(native.synthesize(TEXTS[0])) == FRAMES * 600 * tokens(native.backend.g2p[False](TEXTS[0]))


def test_batch_equals_one_by_one_and_keeps_the_callers_rng(model_dir):
    cfg = kokoro(model_dir, voices=["af_heart", "bm_george"], noise_snr_db=[20.0])
    texts = [TEXTS[0], "", TEXTS[2], TEXTS[0]]
    batch = synthesize_many(cfg, SR, texts, variants=[0, 0, 1, 1], workers=2)  # in this process all the same
    assert isinstance(batch[1], TTSError) and "text is empty" in str(batch[1])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with make_tts(cfg, SR) as tts:
        for i in (0, 2, 3):
            assert np.array_equal(batch[i], tts.synthesize(texts[i], [0, 0, 1, 1][i])), i
    assert torch.equal(torch.get_rng_state(), state)  # seeded per utterance under a forked RNG
    assert not np.array_equal(batch[0], batch[3])  # the same text in another voice


def test_long_phoneme_strings_are_split_and_joined(model_dir):
    text = "Hello there. How are you today? Fine, thanks."
    with make_tts(kokoro(model_dir, voices=["af_short"]), SR) as tts:
        assert tts.backend.limit == 24  # the voice file's rows
        phonemes = tts.backend.g2p[False](text)
        pieces = split_phonemes(phonemes, 24)
        assert len(pieces) > 1 and all(len(p) <= 24 for p in pieces)
        audio = tts.synthesize(text)
    assert len(audio) == FRAMES * 400 * sum(tokens(p) for p in pieces)


def test_split_phonemes_prefers_sentence_then_clause_then_space():
    assert split_phonemes("ab cd. ef, gh ij", 10) == ["ab cd.", "ef, gh ij"]
    assert split_phonemes("ab, cd ef gh", 8) == ["ab,", "cd ef gh"]
    assert split_phonemes("abcd efgh ijkl", 6) == ["abcd", "efgh", "ijkl"]
    assert split_phonemes("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert split_phonemes("  ", 4) == []


def test_espeak_g2p_speaks_kokoros_symbols():
    name, us = make_g2p("espeak", british=False)
    _, gb = make_g2p("espeak", british=True)
    assert name == "espeak"
    assert us("water") != gb("water")
    assert all(p in KOKORO_82M_CONFIG["vocab"] for p in us("The quick brown fox, jumping; over it?"))


@pytest.mark.skipif(importlib.util.find_spec("en_core_web_sm") is not None, reason="spaCy's model is installed")
def test_misaki_g2p_without_spacys_model_says_so_and_does_not_download(model_dir):
    with pytest.raises(TTSError, match="g2p 'misaki' needs spaCy's en_core_web_sm"):
        make_tts(TTSConfig(backend="kokoro", model_path=str(model_dir), g2p="misaki"), SR)
    with make_tts(TTSConfig(backend="kokoro", model_path=str(model_dir), device="cpu"), SR) as auto:
        assert auto.backend.g2p_name == "espeak"


def test_missing_or_wrong_files_name_the_path(model_dir, tmp_path):
    with pytest.raises(TTSError, match=f"model_path '{tmp_path / 'absent'}' is not a folder"):
        make_tts(kokoro(tmp_path / "absent"), SR)
    with pytest.raises(TTSError, match=f"voice 'af_nobody': {model_dir / 'voices' / 'af_nobody.pt'} not found"):
        make_tts(kokoro(model_dir, voices=["af_heart", "af_nobody"]), SR)
    broken = tmp_path / "broken"
    (broken / "voices").mkdir(parents=True)
    with pytest.raises(TTSError, match=f"{broken / 'config.json'} not found"):
        make_tts(kokoro(broken), SR)
    (broken / "config.json").write_text((model_dir / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(TTSError, match=r"exactly one weights file \*.pth, found none"):
        make_tts(kokoro(broken), SR)
    state = torch.load(model_dir / "kokoro-v1_0.pth", weights_only=True)
    del state["decoder"]["module.generator.conv_post.bias"]
    torch.save(state, broken / "kokoro-v1_0.pth")
    torch.save(torch.randn(510, 256), broken / "voices" / "af_heart.pt")
    with pytest.raises(TTSError, match=f"(?s)cannot load {broken / 'kokoro-v1_0.pth'}.*conv_post.bias"):
        make_tts(kokoro(broken), SR)
    torch.save({"net": state}, broken / "kokoro-v1_0.pth")
    with pytest.raises(TTSError, match=r"expected the parts \['bert'.*got \['net'\]"):
        make_tts(kokoro(broken), SR)
    (broken / "kokoro-v1_0.pth").unlink()
    (broken / "kokoro-v1_0.pth").hardlink_to(model_dir / "kokoro-v1_0.pth")
    with pytest.raises(TTSError, match=r"af_heart.pt is not a voice: expected a \[rows, 1, 256\] tensor, got \[510, "
                                       r"256\]"):
        make_tts(kokoro(broken), SR)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu_is_a_tts_error(model_dir):
    with make_tts(TTSConfig(backend="kokoro", model_path=str(model_dir), g2p="espeak", device="cuda"), SR) as tts:
        with pytest.raises(TTSError, match="device 'cuda', but torch sees no GPU"):
            tts.synthesize("Hi.")


@pytest.mark.slow
def test_kokoro_as_a_long_lived_command(model_dir, tmp_path):
    """``python -m shards.kokoro_tts --serve`` speaks the long-lived protocol; the one-shot CLI writes the same."""
    cli = [sys.executable, "-m", "shards.kokoro_tts", "--model-path", str(model_dir), "--g2p", "espeak",
           "--device", "cpu"]
    cfg = TTSConfig(backend="command", long_lived=True, command=[*cli, "--serve"], timeout_s=120.0)
    served = synthesize_many(cfg, KOKORO_SR, TEXTS[:2])
    with make_tts(kokoro(model_dir), KOKORO_SR) as tts:  # the same up to float rounding (other thread counts)
        for audio, text in zip(served, TEXTS[:2], strict=True):
            np.testing.assert_allclose(audio, tts.synthesize(text), atol=1e-5)
    once = TTSConfig(backend="command", command=[*cli, "--text", "{text}", "--wav", "{wav}"], timeout_s=120.0)
    assert np.array_equal(synthesize_many(once, KOKORO_SR, [TEXTS[0]])[0], served[0])
