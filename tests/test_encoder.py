"""Frozen speech encoders: tiny random Whisper and Mimi saved with save_pretrained and loaded back through
build_encoder (the real from_pretrained path)."""

import copy
import math

import pytest
import torch
import torchaudio
from safetensors.torch import load_file, save_file
from transformers import (
    MimiConfig,
    MimiModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperModel,
)

from config import ConfigError
from model.encoder import EncoderConfig, SpeechEncoder, build_encoder

torch.set_num_threads(1)

WHISPER = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                        max_source_positions=1500, max_target_positions=32, vocab_size=100, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
MIMI = MimiConfig(hidden_size=16, num_filters=4, num_hidden_layers=2, intermediate_size=32, num_attention_heads=2,
                  num_key_value_heads=2, codebook_size=16, codebook_dim=8, num_quantizers=2,
                  vector_quantization_hidden_dimension=8, upsample_groups=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random checkpoints in the layouts real ones have, with the models that wrote them."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("encoders")
    models = {"whisper": WhisperForConditionalGeneration(WHISPER), "whisper_model": WhisperModel(WHISPER),
              "mimi": MimiModel(MIMI)}
    for name, model in models.items():
        model.eval().save_pretrained(root / name)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")  # whisper_model has none
    return root, models


@pytest.fixture(scope="module")
def encoders(saved):
    root, _ = saved
    return {"mel": build_encoder(EncoderConfig()),
            "whisper": build_encoder(EncoderConfig("whisper", str(root / "whisper"))),
            "mimi": build_encoder(EncoderConfig("mimi", str(root / "mimi")))}


LENGTHS = {  # samples: empty, just short of / at / past one frame, whole seconds, odd tails
    "mel": [0, 399, 400, 559, 560, 16_000, 23_456],
    "whisper": [0, 159, 160, 320, 321, 16_000, 32_080, 48_123],
    "mimi": [1, 1919, 1920, 1921, 24_000, 48_000],
}


def _noisy_batch(lengths: list[int], extra: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Random waves with random junk (not zeros) past each length: the encoder must ignore it."""
    return 0.1 * torch.randn(len(lengths), max(lengths) + extra), torch.tensor(lengths)


def test_config_validation():
    with pytest.raises(ConfigError, match="kind"):
        EncoderConfig("wav2vec")
    with pytest.raises(ConfigError, match="path"):
        EncoderConfig("whisper")
    with pytest.raises(ConfigError, match="n_mels"):
        EncoderConfig(n_mels=0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_encoder(EncoderConfig("mimi", "/nowhere"))


def test_checkpoint_missing_weights_is_refused(saved, tmp_path):
    """A checkpoint that would leave encoder weights randomly initialised stops the build."""
    root, models = saved
    models["whisper"].save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.encoder.conv1.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="conv1"):
        build_encoder(EncoderConfig("whisper", str(tmp_path)))


@pytest.mark.parametrize("kind", ["mel", "whisper", "mimi"])
def test_frozen_eval_no_grad(encoders, kind):
    enc = encoders[kind]
    assert isinstance(enc, SpeechEncoder)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not any(m.training for m in enc.modules())
    waves = torch.randn(1, enc.sample_rate, requires_grad=True)
    frames, _ = enc(waves, torch.tensor([enc.sample_rate]))
    assert not frames.requires_grad and frames.grad_fn is None


@pytest.mark.parametrize("kind,rate,dim", [("mel", 100.0, 80), ("whisper", 50.0, 64), ("mimi", 12.5, 16)])
def test_shapes_rates_and_frames_for(encoders, kind, rate, dim):
    enc = encoders[kind]
    assert (enc.frame_rate, enc.dim) == (rate, dim)
    assert abs(enc.frames_for(10 * enc.sample_rate) - 10 * rate) <= 2  # mel snips 1.5 windows at the edges
    waves, lengths = _noisy_batch(LENGTHS[kind])
    frames, frame_lengths = enc(waves, lengths)
    expected = [enc.frames_for(n) for n in LENGTHS[kind]]
    assert frame_lengths.tolist() == expected
    assert frames.shape == (len(expected), max(expected), dim)
    assert frames.dtype == torch.float32 and torch.isfinite(frames).all()
    for item, n in zip(frames, expected, strict=True):
        assert not item[n:].any()  # padding frames are zero
        assert n < 2 or item[:n].abs().amax(-1).min() > 0  # valid ones are not (mel's single frame is: CMVN)


@pytest.mark.parametrize("kind", ["mel", "whisper", "mimi"])
def test_padding_invariance(encoders, kind):
    """Each item's valid frames, encoded alone, equal the same item inside a padded batch with junk padding."""
    enc = encoders[kind]
    lengths = [n for n in LENGTHS[kind] if enc.frames_for(n)]
    waves, lengths_t = _noisy_batch(lengths)
    batched, _ = enc(waves, lengths_t)
    for i, n in enumerate(lengths):
        alone, frame_lengths = enc(waves[i : i + 1, :n], lengths_t[i : i + 1])
        assert alone.shape[1] == frame_lengths[0] == enc.frames_for(n)
        # mel and whisper: float rounding only; mimi's convolutions round differently per batch size (~1e-6)
        torch.testing.assert_close(batched[i, : alone.shape[1]], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mel", "whisper"])
def test_runs_after_parent_casts_to_bfloat16(encoders, kind):
    """Cast to bf16 (``encoder.dtype: bfloat16``, or by hand): features stay float32, weights run in bf16. Not
    Mimi: in bf16 its latents drift far from fp32 (cosine 0.62 on an Intel Xeon, above 0.99 on an AMD EPYC), so
    it runs in fp32 by default, and a bf16 training engine never casts it (tests/test_engine.py)."""
    enc = copy.deepcopy(encoders[kind]).to(torch.bfloat16)
    waves, lengths = _noisy_batch(LENGTHS[kind])
    frames, frame_lengths = enc(waves, lengths)
    reference, _ = encoders[kind](waves, lengths)
    assert frame_lengths.tolist() == [enc.frames_for(n) for n in LENGTHS[kind]]
    cosine = torch.nn.functional.cosine_similarity(frames.float().flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize("kind", ["whisper", "mimi"])
def test_dtype_config_loads_bfloat16_weights(saved, kind):
    enc = build_encoder(EncoderConfig(kind, str(saved[0] / kind), dtype="bfloat16"))
    assert {p.dtype for p in enc.parameters()} == {torch.bfloat16}
    frames, frame_lengths = enc(*_noisy_batch([enc.sample_rate, enc.sample_rate // 2]))
    assert frames.dtype == torch.bfloat16 and frame_lengths.tolist() == [enc.frames_for(enc.sample_rate),
                                                                         enc.frames_for(enc.sample_rate // 2)]


def test_bad_inputs(encoders):
    enc = encoders["mel"]
    with pytest.raises(ValueError, match="waves"):
        enc(torch.zeros(1000), torch.tensor([1000]))
    with pytest.raises(ValueError, match="lengths"):
        enc(torch.zeros(2, 1000), torch.tensor([1000, 1001]))
    with pytest.raises(ValueError, match="num_samples"):
        enc.frames_for(-1)
    with pytest.raises(ValueError, match="at most 480000"):
        encoders["whisper"](torch.zeros(1, 480_001), torch.tensor([480_001]))


def test_mel_is_normalised_torchaudio_log_mel(encoders):
    enc = encoders["mel"]
    waves, lengths = _noisy_batch([16_000, 7_000])
    waves[:, :4000] *= 20  # loud start: the statistics must be those of each item's own valid frames
    frames, frame_lengths = enc(waves, lengths)
    for item, n in zip(frames, frame_lengths.tolist(), strict=True):
        torch.testing.assert_close(item[:n].mean(0), torch.zeros(80), atol=1e-4, rtol=0)
        torch.testing.assert_close(item[:n].var(0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)
    # the same as torchaudio's MelSpectrogram (25 ms / 10 ms, no centring), log, standardised
    spec = torchaudio.transforms.MelSpectrogram(16_000, n_fft=400, hop_length=160, n_mels=80, center=False)
    log = (spec(waves[1, :7000]) + 1e-6).log().T
    reference = (log - log.mean(0)) / (log.var(0, unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(frames[1, : frame_lengths[1]], reference, atol=1e-4, rtol=1e-4)
    # per-utterance normalisation removes the gain
    louder, _ = enc(waves * 10, lengths)
    torch.testing.assert_close(louder, frames, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("layout", ["whisper", "whisper_model"])
def test_whisper_loads_encoder_only(saved, layout):
    """Both checkpoint layouts (ForConditionalGeneration, bare WhisperModel) load the encoder's exact weights,
    with or without a saved feature extractor, and nothing of the decoder."""
    root, models = saved
    enc = build_encoder(EncoderConfig("whisper", str(root / layout)))
    reference = models[layout].get_encoder().state_dict()
    state = enc.model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert enc.sample_rate == 16_000


def test_whisper_features_and_forward_match_transformers(encoders):
    """Our log-mel equals WhisperFeatureExtractor's, and on a full 30 s window our forward equals
    WhisperEncoder.forward (the only length it accepts)."""
    enc = encoders["whisper"]
    extractor = WhisperFeatureExtractor(feature_size=80)
    wave = 0.1 * torch.randn(480_000)
    reference = torch.from_numpy(extractor(wave[:32_000].numpy(), sampling_rate=16_000,
                                           return_tensors="np").input_features)  # padded to 30 s
    ours = enc.features(wave[None, :32_000], torch.tensor([32_000]))
    assert ours.shape == (1, 80, 202)  # 2 s of frames plus the two the last conv window reads
    torch.testing.assert_close(ours, reference[..., :202], atol=1e-5, rtol=1e-5)

    full = torch.from_numpy(extractor(wave.numpy(), sampling_rate=16_000, return_tensors="np").input_features)
    with torch.no_grad():
        expected = enc.model(full).last_hidden_state
    torch.testing.assert_close(enc.encode_features(full, torch.tensor([1500])), expected, atol=1e-5, rtol=1e-5)


def test_whisper_short_window(encoders):
    """2 s runs on a 2 s window, not 30 s, and gives the valid frames of the same 2 s padded to 30 s.

    Not those of Whisper's own 30 s forward: there every frame also attends to the 28 s of padding, so no
    shorter window can reproduce it; padding is masked here instead (see WhisperSpeechEncoder).
    """
    enc = encoders["whisper"]
    seen = []
    hook = enc.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    wave = 0.1 * torch.randn(1, 480_000)
    try:
        short, short_lengths = enc(wave[:, :32_000], torch.tensor([32_000]))
        padded, _ = enc(wave.masked_fill(torch.arange(480_000) >= 32_000, 0.0), torch.tensor([32_000]))
    finally:
        hook.remove()
    assert short.shape == (1, 100, 64) and short_lengths.tolist() == [100]
    assert seen == [101, 101]  # 100 frames + one of right context, however long the input tensor
    torch.testing.assert_close(padded, short, atol=1e-5, rtol=1e-5)


def test_mimi_latents_equal_full_model(saved, encoders):
    """Encoder-only load: the pre-quantisation latents of the full MimiModel, without decoder or quantizer."""
    root, models = saved
    enc = encoders["mimi"]
    assert enc.frame_size == 1920 and enc.sample_rate == 24_000
    assert not any("decoder" in n or "quantizer" in n for n, _ in enc.named_modules())
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in models["mimi"].encoder.parameters())
    reference = MimiModel.from_pretrained(root / "mimi").eval()
    lengths = torch.tensor([1, 1919, 1920, 1921, 24_000, 48_000])
    assert reference.get_encoded_length(lengths).tolist() == [enc.frames_for(int(n)) for n in lengths]
    wave = 0.1 * torch.randn(1, 5 * 1920)
    with torch.no_grad():
        expected = reference.encoder(wave[:, None]).latents.transpose(1, 2)
    frames, frame_lengths = enc(wave, torch.tensor([5 * 1920]))
    assert frame_lengths.tolist() == [5] and math.isclose(enc.frame_rate, 12.5)
    torch.testing.assert_close(frames, expected, atol=1e-5, rtol=1e-5)
