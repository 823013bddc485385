"""Forced alignment gives corpora without word timings (LibriHeavy, Emilia) their words, so that speech spans
are 5-15 words inside an utterance instead of whole utterances."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.toy_encoder import ToyEncoderArch, ToySpeechNet, save_checkpoint
from shards.align import MMS_FA, Unaligned, WordAligner, load_aligner
from shards.format import read_shard, shard_urls
from tests.test_build import build, write_jsonl

SR = 16000


def oracle(frame_tokens: list[int], classes: int, frame_rate: float = 50.0) -> WordAligner:
    """An aligner whose model 'hears' exactly ``frame_tokens`` (one label per frame, 0 = blank), spelling a word
    as its characters' ids: forced alignment must find the frames that carry each word."""
    log_probs = torch.full((len(frame_tokens), classes), -20.0)
    log_probs[torch.arange(len(frame_tokens)), torch.tensor(frame_tokens)] = 0.0
    vocab = {c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    return WordAligner(SR, frame_rate, lambda wave: log_probs.log_softmax(-1),
                       lambda words: [[vocab[c] for c in w if c in vocab] for w in words])


def test_word_times_are_the_frames_that_carry_each_word():
    # "ab" on frames 5-7, silence, "cab" on frames 20-25 (0.02 s per frame)
    frames = [0] * 5 + [1, 1, 2] + [0] * 12 + [3, 3, 1, 1, 2, 2] + [0] * 4
    aligner = oracle(frames, 27)
    words = aligner.align(np.zeros(SR), SR, "ab cab")
    assert words == [["ab", 0.1, 0.16], ["cab", 0.4, 0.52]]


def test_what_cannot_be_aligned_says_why():
    aligner = oracle([0, 1, 0], 27)
    with pytest.raises(Unaligned, match="no alignable characters"):
        aligner.align(np.zeros(SR), SR, "a 1984")
    with pytest.raises(Unaligned, match="3 frames are too few for 4 tokens"):
        aligner.align(np.zeros(SR), SR, "ab cd")
    assert aligner.align(np.zeros(SR), SR, "") == []


@pytest.fixture(scope="module")
def toy_encoder(tmp_path_factory) -> Path:
    """A toy phoneme CTC encoder (untrained: these tests check the plumbing, the oracle test the timing)."""
    out = tmp_path_factory.mktemp("toy_encoder")
    torch.manual_seed(0)
    phonemes = ["a", "b", "k", "t", "s", "m", "D", "@2", "n", "O2", "eI", "r", "d", "aI", "I", "l", "w", "z"]
    save_checkpoint(ToySpeechNet(ToyEncoderArch(dim=32, layers=1, heads=2, ffn=64), phonemes).eval(), out, {})
    return out


def test_toy_aligner_times_every_word_within_the_audio(toy_encoder):
    from shards.tts import TTSConfig, make_tts

    audio = make_tts(TTSConfig(), SR).synthesize("the cat sat on the mat")
    words = load_aligner(f"toy.align:{toy_encoder}").align(audio, SR, "the cat sat on the mat")
    assert [w for w, _, _ in words] == "the cat sat on the mat".split()
    times = [t for _, start, end in words for t in (start, end)]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= len(audio) / SR + 0.05
    assert all(start < end for _, start, end in words)


def test_a_transformers_ctc_checkpoint_aligns_characters(tmp_path):
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    vocab = {"<pad>": 0, "|": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(sampling_rate=SR).save_pretrained(tmp_path)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 4),
                            num_feat_extract_layers=2, pad_token_id=0)
    torch.manual_seed(0)
    Wav2Vec2ForCTC(config).save_pretrained(tmp_path)
    aligner = load_aligner(str(tmp_path))
    assert aligner.frame_rate == SR / 20 and aligner.blank == 0
    words = aligner.align(np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1, SR, "It's a Cat.")
    assert [w for w, _, _ in words] == ["It's", "a", "Cat."] and all(s < e <= 1.0 for _, s, e in words)


def test_bad_aligner_names_are_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"checkpoints/model\.pt"):
        load_aligner(MMS_FA)   # never downloads: the weights must be in the torch hub cache
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_aligner(str(tmp_path))
    with pytest.raises(ValueError, match="module:argument"):
        load_aligner("not a model")


def test_shards_build_align_writes_words_and_counts_what_it_cannot(toy_encoder, tmp_path):
    from shards.tts import TTSConfig, make_tts

    tts = make_tts(TTSConfig(), SR)
    rows = []
    for i, text in enumerate(["the cat sat on the mat", "a bat and a rat", "many more words than frames"]):
        audio = tts.synthesize(text)
        sf.write(tmp_path / f"{i}.wav", audio[: SR // 10] if i == 2 else audio, SR)   # 0.1 s: 2 frames
        rows.append({"audio": f"{i}.wav", "text": text, "doc": "talk"})
    out = tmp_path / "shards"
    assert build("--input", write_jsonl(tmp_path / "m.jsonl", rows), "--out", out, "--sr", SR,
                 "--align", f"toy.align:{toy_encoder}") == 0
    segments = [s for url in shard_urls(out) for c in read_shard(url) for s in c.segments]
    assert [[w for w, _, _ in s.words] for s in segments[:2]] == [t.split() for t in ("the cat sat on the mat",
                                                                                      "a bat and a rat")]
    assert segments[2].words is None and segments[2].audio is not None   # kept, as a whole-segment span
    index = json.loads((out / "index.json").read_text())
    assert index["rejects"] == {"unaligned": 1} and index["segments"] == 3
