"""The inference CLI on a smoke export: prompt layout, batched decoding against full forwards, sampling, errors."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from eval.mcq import LM
from model.infer import generate, generate_ids, load, main, read_audio
from model.speech_lm import BEGIN, END
from shards.format import resample
from tests.test_train import REPO, env

FILE_RATE = 22050   # not the encoder's 16 kHz: the CLI resamples
PROMPT = "alice found"
N = 10


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """The smoke model as ``train.export`` writes it, with nothing trained: the seeded fresh adapter and
    boundaries, and LoRA (B = 0) merged into the smoke LLM. The real export path without a training run."""
    import train.export
    from rounds.experiment import load_experiment

    subprocess.run([sys.executable, "-m", "toy.smoke"], cwd=REPO, env=env(), check=True)   # reused if built
    run_dir = tmp_path_factory.mktemp("runs_infer")
    cfg = load_experiment(REPO / "configs/smoke.yaml", [f"run.dir={run_dir}"])
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.export, "trained_state", lambda ckpt_dir, tag: {})
        return train.export.export(cfg.model, run_dir, "final", run_dir / "export")


@pytest.fixture(scope="module")
def loaded(export_dir):
    return load(export_dir)


def write_wav(path, seconds: float, seed: int = 0):
    """Stereo tones and noise at 22.05 kHz, written as 16-bit PCM."""
    t = np.arange(int(seconds * FILE_RATE)) / FILE_RATE
    rng = np.random.default_rng(seed)
    left = 0.4 * np.sin(2 * np.pi * 220 * (1 + seed) * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + t))
    sf.write(path, np.stack([left, right], 1), FILE_RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    """0.8 s of stereo audio at 22.05 kHz."""
    return write_wav(tmp_path_factory.mktemp("audio") / "speech.wav", 0.8)


@pytest.fixture(scope="module")
def wav2(tmp_path_factory):
    """A second, shorter file: batched with ``wav`` it is padded."""
    return write_wav(tmp_path_factory.mktemp("audio") / "other.wav", 0.5, seed=1)


@pytest.fixture(scope="module")
def wave(loaded, wav):
    audio, rate = read_audio(wav)
    return resample(audio, rate, loaded[0].sampling_rate)


@pytest.fixture(scope="module")
def wave2(loaded, wav2):
    audio, rate = read_audio(wav2)
    return resample(audio, rate, loaded[0].sampling_rate)


def test_read_audio_mixes_to_mono_and_resamples(wav):
    audio, rate = read_audio(wav)
    stereo, _ = sf.read(wav, dtype="float32")
    assert rate == FILE_RATE and audio.dtype == np.float32
    np.testing.assert_allclose(audio, stereo.mean(1), atol=1e-7)
    at_16k = resample(audio, rate, 16000)
    assert abs(len(at_16k) - len(audio) * 16000 / FILE_RATE) <= 1
    assert resample(audio, rate, rate) is audio


def test_prompt_goes_first_then_the_speech_span_and_a_batch_is_left_padded(loaded, wave, wave2):
    model, processor = loaded
    lm, tokenizer = model.speech_lm, processor.tokenizer
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    embed = model.get_input_embeddings()
    inputs = processor([wave, wave2], model.sampling_rate, text=[PROMPT, ""])
    prefixes, mask = model.embed(inputs["input_values"], inputs["audio_attention_mask"], inputs["input_ids"],
                                 inputs["attention_mask"])
    text = embed(torch.tensor([tokenizer.bos_token_id, *ids]))
    n = len(text)
    first = prefixes[0][mask[0].bool()]
    assert first.shape == (n + lm.vectors_for(len(wave)) + 2, embed.embedding_dim) and bool(mask[0].all())
    torch.testing.assert_close(first[:n], text)
    torch.testing.assert_close(first[n], lm.boundary[BEGIN])
    torch.testing.assert_close(first[-1], lm.boundary[END])
    bare = prefixes[1][mask[1].bool()]            # no prompt: [bos] [begin] vectors [end], padded on the left
    assert len(bare) == lm.vectors_for(len(wave2)) + 3 and not mask[1, : len(first) - len(bare)].any()
    torch.testing.assert_close(bare[:2], torch.stack([text[0], lm.boundary[BEGIN]]))
    alone = processor(wave2, model.sampling_rate)
    torch.testing.assert_close(model.embed(alone["input_values"], alone["audio_attention_mask"])[0][0], bare,
                               atol=1e-5, rtol=1e-5)


def reference_greedy(model, prefix: torch.Tensor, n: int, stop: set[int]) -> list[int]:
    """Greedy decoding by a full forward over prefix + tokens so far at every step, no cache."""
    lm = LM.of(model.llm)
    ids: list[int] = []
    with torch.no_grad():
        while len(ids) < n:
            inputs = torch.cat([prefix, lm.embed(torch.tensor([ids], dtype=torch.long))], 1)
            token = int(lm.head(lm.decoder(inputs_embeds=inputs).last_hidden_state[0, -1]).argmax())
            if token in stop:
                break
            ids.append(token)
    return ids


def test_greedy_generate_equals_full_forwards_batched_or_not_and_stops_at_eos(loaded, wave, wave2):
    model, processor = loaded
    stop = set(model.generation_config.eos_token_id)
    assert processor.tokenizer.eos_token_id in stop
    inputs = processor(wave, model.sampling_rate, text=PROMPT)
    prefix, _ = model.embed(**{k: inputs[k] for k in ("input_values", "audio_attention_mask", "input_ids",
                                                       "attention_mask")})
    ids = generate_ids(model, processor, [wave], PROMPT, N)[0]
    assert ids == reference_greedy(model, prefix, N, stop)
    assert len(ids) == N and not stop & set(ids)
    assert generate(model, processor, [wave], PROMPT, N) == [processor.decode(ids, skip_special_tokens=True)]
    other = generate_ids(model, processor, [wave2], PROMPT, N)[0]
    assert generate_ids(model, processor, [wave, wave2], PROMPT, N) == [ids, other]   # padding changes nothing
    halt = ids[N // 2]                                                                 # a stop id the model emits
    out = model.generate(**inputs, max_new_tokens=N, do_sample=False, eos_token_id=[halt])[0].tolist()
    assert out == ids[: ids.index(halt) + 1]


def test_sampling_repeats_with_a_seed_and_top_p_keeps_the_nucleus(loaded, wave):
    model, processor = loaded
    draws = [generate_ids(model, processor, [wave], PROMPT, N, sample=True, temperature=2.0, seed=s)[0]
             for s in range(4)]
    assert generate_ids(model, processor, [wave], PROMPT, N, sample=True, temperature=2.0, seed=0)[0] == draws[0]
    assert len({tuple(d) for d in draws}) > 1                                  # other seeds, other draws
    greedy = generate_ids(model, processor, [wave], PROMPT, N)[0]
    assert draws[0] != greedy                                                   # hot sampling is not greedy
    assert generate_ids(model, processor, [wave], PROMPT, N, sample=True, top_p=1e-6, seed=1)[0] == greedy


def test_cli_prints_the_greedy_continuation_one_line_per_file(export_dir, wav, wav2, loaded, wave, wave2):
    cmd = [sys.executable, "-m", "model.infer", "--model", str(export_dir), "--audio", str(wav), str(wav2),
           "--prompt", PROMPT, "--max-new-tokens", str(N), "--batch-size", "1"]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = generate(*loaded, [wave, wave2], PROMPT, N)
    assert all(t.strip() for t in expected) and result.stdout == "".join(t + "\n" for t in expected)


def test_cli_samples_with_a_seed(export_dir, wav, loaded, wave, capsys):
    args = ["--model", str(export_dir), "--audio", str(wav), "--max-new-tokens", str(N), "--sample",
            "--temperature", "1.5", "--top-p", "0.9", "--seed", "7"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first
    assert first == generate(*loaded, [wave], "", N, sample=True, temperature=1.5, top_p=0.9, seed=7)[0] + "\n"


@pytest.mark.parametrize("case", ["missing", "not_audio", "empty", "too_short", "no_export", "top_p"])
def test_bad_input_exits_2_naming_the_problem(case, export_dir, wav, tmp_path, capsys):
    model, audio = str(export_dir), str(wav)
    extra = []
    if case == "missing":
        audio, reason = str(tmp_path / "nope.wav"), "no such audio file"
    elif case == "not_audio":
        (tmp_path / "text.wav").write_text("not a sound file")
        audio, reason = str(tmp_path / "text.wav"), "unreadable audio"
    elif case == "empty":
        sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
        audio, reason = str(tmp_path / "empty.wav"), "empty audio"
    elif case == "too_short":
        sf.write(tmp_path / "short.wav", np.full(40, 0.1, dtype=np.float32), 16000)
        audio, reason = str(tmp_path / "short.wav"), "too short"
    elif case == "no_export":
        model, reason = str(tmp_path), "not an exported SpeechLM directory"
    else:
        extra, reason = ["--sample", "--top-p", "0"], "--top-p must be in (0, 1]"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", model, "--audio", audio, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert reason in err
    if case not in ("too_short", "top_p"):
        assert (audio if case != "no_export" else model) in err
