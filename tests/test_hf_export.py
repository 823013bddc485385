"""The export as a Hugging Face artifact: plain transformers loads it with trust_remote_code in a fresh process
outside the repository and continues a wav as ``python -m model.infer`` does, batched and with the usual generation
arguments; re-saved, it loads again; exports from before config.json still load; the card takes the eval table."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from config import to_dict
from model.build import load_export
from model.card import main as card_main
from model.card import write_model_card
from model.hf import AUTO_MAP, LEGACY_CONFIG, MODEL_TYPE, PROJECT_PACKAGES, code_files
from model.infer import generate_ids, read_audio
from shards.format import resample
from tests.test_infer import PROMPT, export_dir, loaded, wav, wav2, wave  # noqa: F401 (fixtures)
from tests.test_train import REPO, env

N = 10

FRESH = r"""
import importlib.util, json, sys
import soundfile as sf
from transformers import AutoFeatureExtractor, AutoModelForCausalLM, AutoProcessor

assert importlib.util.find_spec("model") is None and importlib.util.find_spec("train") is None   # no repository
export, resaved, prompt, n, *wavs = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
extractor = AutoFeatureExtractor.from_pretrained(export, trust_remote_code=True)
waves = []
for path in wavs:
    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    waves.append(audio.mean(1))
greedy = dict(max_new_tokens=int(n), do_sample=False)
one = model.generate(**processor(waves[0], rate, text=prompt), **greedy)
both = model.generate(**processor(waves, rate, text=prompt), **greedy)
raw = model.generate(audio=waves[0], sampling_rate=rate, prompt=prompt, **greedy)
beams = model.generate(**processor(waves, rate, text=prompt), max_new_tokens=int(n), num_beams=3)
model.save_pretrained(resaved)
again = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True)
print(json.dumps({"classes": [type(x).__name__ for x in (model.config, model, processor, extractor)],
                  "module": type(model).__module__, "rate": extractor.sampling_rate,
                  "text": processor.batch_decode(one, skip_special_tokens=True)[0], "one": one.tolist(),
                  "both": both.tolist(), "raw": raw.tolist(), "beams": list(beams.shape),
                  "again": again.generate(audio=waves[0], sampling_rate=rate, prompt=prompt, **greedy).tolist()}))
"""


def until_eos(row: list[int], eos: list[int]) -> list[int]:
    return row[: next((i for i, t in enumerate(row) if t in eos), len(row))]


def test_the_export_is_a_transformers_folder_with_its_code(export_dir):  # noqa: F811
    config = json.loads((export_dir / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["SpeechLMForCausalLM"] and config["text_config"]["model_type"] == "qwen2"
    assert config["encoder"]["kind"] == "mel" and config["adapter"]["stack"] == 8
    processor = json.loads((export_dir / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
    assert processor["feature_extractor"]["sampling_rate"] == 16000
    for name in ("generation_config.json", "tokenizer.json", "speech.safetensors", "llm/model.safetensors",
                 "llm/tokenizer.json", "README.md"):
        assert (export_dir / name).is_file(), name
    assert not list(export_dir.rglob("*.bin")) and not list(export_dir.rglob("*.pt"))   # safetensors only
    code = sorted(p.name for p in export_dir.glob("*.py"))
    assert code == sorted(code_files()) and "modeling_salad.py" in code
    for name in code:   # self-contained: the project's modules are imported relatively, as the copied files
        tree = ast.parse((export_dir / name).read_text())
        absolute = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0]
        assert not {m.split(".")[0] for m in absolute} & set(PROJECT_PACKAGES), name


def test_transformers_alone_loads_it_in_a_fresh_process_and_continues_as_model_infer(
        export_dir, loaded, wav, wav2, tmp_path):  # noqa: F811
    fresh_env = {k: v for k, v in env().items() if k != "PYTHONPATH"} | {"HF_MODULES_CACHE": str(tmp_path / "mods")}
    cmd = [sys.executable, "-c", FRESH, str(export_dir), str(tmp_path / "resaved"), PROMPT, str(N), str(wav),
           str(wav2)]
    done = subprocess.run(cmd, cwd=tmp_path, env=fresh_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["classes"] == ["SpeechLMConfig", "SpeechLMForCausalLM", "SpeechLMProcessor",
                              "SpeechLMFeatureExtractor"]
    assert got["module"].startswith("transformers_modules.") and got["rate"] == 16000

    infer = subprocess.run([sys.executable, "-m", "model.infer", "--model", str(export_dir), "--audio", str(wav),
                            "--prompt", PROMPT, "--max-new-tokens", str(N)],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert got["text"].strip() and infer.stdout == got["text"] + "\n"

    model, processor = loaded
    eos = model.generation_config.eos_token_id
    waves = [resample(*read_audio(p), model.sampling_rate) for p in (wav, wav2)]
    expected = [generate_ids(model, processor, [w], PROMPT, N)[0] for w in waves]
    assert until_eos(got["one"][0], eos) == expected[0]
    assert [until_eos(row, eos) for row in got["both"]] == expected          # a batch: each row as alone
    assert got["raw"] == got["one"] and got["again"] == got["one"]          # raw audio; re-saved and reloaded
    assert got["beams"][0] == 2



def test_forward_scores_the_layout_that_generate_continues_and_trains_the_adapter(loaded, wave):  # noqa: F811
    model, processor = loaded
    inputs = processor(wave, model.sampling_rate, text=PROMPT)
    out = model(**inputs)
    first = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert int(out.logits[0, -1].argmax()) == int(first[0, 0])
    out.logits[0, -1].logsumexp(-1).backward()   # a loss on the speech layout reaches the adapter
    grads = [p.grad for p in model.speech_lm.adapter.parameters()]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)
    model.zero_grad(set_to_none=True)

def test_an_export_from_before_config_json_loads_as_before(export_dir, tmp_path):  # noqa: F811
    legacy = shutil.copytree(export_dir, tmp_path / "legacy")
    config = json.loads((legacy / "config.json").read_text())
    (legacy / LEGACY_CONFIG).write_text(json.dumps({"encoder": config["encoder"], "adapter": config["adapter"]}))
    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", *(p.name for p in legacy.glob("*.py"))):
        (legacy / name).unlink()
    old, old_tokenizer = load_export(legacy)
    new, tokenizer = load_export(export_dir)
    assert old_tokenizer.get_vocab() == tokenizer.get_vocab() and old.training is False
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_the_model_card_names_the_data_and_takes_the_eval_table_when_it_exists(export_dir, tmp_path, capsys):  # noqa: F811
    from rounds.experiment import load_experiment

    round_dir = tmp_path / "smoke" / "round-1"
    export = shutil.copytree(export_dir, round_dir / "export")
    experiment = to_dict(load_experiment(REPO / "configs/smoke.yaml", []))
    (round_dir / "config.json").write_text(json.dumps(experiment))
    (round_dir / "data_mix.json").write_text(json.dumps({
        "speech_shares": {"assets/smoke/speech": 0.5, "runs/smoke/round-1/selection/shards": 0.5},
        "text_ratio": 0.25, "speech_draws": 60.0, "plays": {"assets/smoke/speech": 2.0,
                                                            "runs/smoke/round-1/selection/shards": None}}))
    card = write_model_card(export).read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "# smoke round 1" in card
    assert "base `assets/smoke/llm` (qwen2, 2 layers, hidden 64" in card and "LoRA r 4, alpha 8, merged" in card
    assert "| speech | `runs/smoke/round-1/selection/shards` | 50.0% of speech documents |" in card
    assert "`assets/smoke/speech` | 50.0% of speech documents, each heard 2x" in card
    assert "| text | `assets/smoke/text` | weight 1.0 |" in card and "max_steps: 20" in card
    assert "Not evaluated yet" in card
    task = {"teacher_text": 0.9, "student_text": 0.8, "student_speech": 0.55, "gap": 0.35, "text_gap": 0.1,
            "n": 40, "ci95": {"gap": [0.2, 0.5], "text_gap": [0.0, 0.2]}, "M": 0.123}
    (round_dir / "eval.json").write_text(json.dumps({"tasks": {"smoke": task}, "M": 0.5, "F": 0.01}))
    assert card_main([str(export)]) == 0 and str(export / "README.md") in capsys.readouterr().out
    card = (export / "README.md").read_text()
    assert "| smoke | 40 | 90.0 | 80.0 | 55.0 | 35.0 | 0.123 |" in card and "Held-out M 0.5, F 0.01." in card
    assert "Not evaluated yet" not in card and not [p for p in os.listdir(export) if p.endswith(".tmp")]



def test_an_encoder_with_weights_travels_in_the_export_and_loads_in_bfloat16(tmp_path):
    """Mimi (24 kHz, a folder of weights): copied into encoder/, its path relative in config.json, the processor at
    its rate; loaded through the Auto classes in bfloat16 with the encoder in its own float32."""
    from transformers import AutoModelForCausalLM, AutoProcessor, MimiModel

    import train.export
    from rounds.experiment import load_experiment
    from tests.test_encoder import MIMI

    torch.manual_seed(0)
    MimiModel(MIMI).eval().save_pretrained(tmp_path / "mimi")
    cfg = load_experiment(REPO / "configs/smoke.yaml", ["model.encoder.kind=mimi",
                                                        f"model.encoder.path={tmp_path / 'mimi'}"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.export, "trained_state", lambda ckpt_dir, tag: {})
        out = train.export.export(cfg.model, tmp_path, "final", tmp_path / "round-0" / "export")
    assert json.loads((out / "config.json").read_text())["encoder"]["path"] == "encoder"
    assert (out / "encoder" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "mimi")   # the export needs nothing outside itself
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert processor.feature_extractor.sampling_rate == model.sampling_rate == 24000
    assert model.dtype == torch.bfloat16 and {p.dtype for p in model.speech_lm.adapter.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.speech_lm.encoder.parameters()} == {torch.float32}
    ids = model.generate(**processor(torch.randn(12_000).numpy(), 24000, text=PROMPT), max_new_tokens=4,
                         do_sample=False)
    assert ids.shape[0] == 1 and 1 <= ids.shape[1] <= 4
