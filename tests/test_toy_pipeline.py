"""The toy default, reduced to a few minutes: assets (teacher, encoder, shards, benchmarks), then two rounds.

The full version is ``./run.sh`` (configs/toy.yaml); this one builds ``--size reduced`` assets and trains far
fewer steps, and checks what must hold at any size: the teacher knows every domain as text, the encoder's
phoneme error falls while it pre-trains, and a selection round trains on its selected speech without misaligning
the student, and hears the selected texts better in voices it never trained on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toy.world import DOMAINS

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# The reduced natural speech is 60 documents: a budget of a quarter of it gives each selected text about five
# plays in the 100 stage-II steps, as the full default's 2.5% does in its 300. Stage II decays over its whole
# length (the paper's schedule): over the last 20% it left the reduced student less aligned than stage I.
REDUCED = ["train.max_steps=150", "train.warmup_steps=10", "train.stage2_steps=100", "train.save_every=100",
           "train.diagnostics_every=0", "rounds=1", "selection.clusters=8", "selection.probes=3",
           "eval.bootstrap=100", "eval.heldout_docs=11", "selection.budget_fraction=0.25",
           "train.stage2_decay_fraction=1.0"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "assets"
    subprocess.run([sys.executable, "-m", "toy.build", "--out", str(out), "--size", "reduced"], cwd=ROOT, env=ENV,
                   check=True)
    return out


def test_assets_are_complete(assets):
    for part in ("llm", "encoder", "speech", "text", "heldout", "bench", "pool.jsonl"):
        assert (assets / part).exists(), part
    assert sorted(p.stem for p in (assets / "bench").glob("*.jsonl")) == sorted(DOMAINS)
    domains = {json.loads(line)["domain"] for line in (assets / "pool.jsonl").read_text().splitlines()}
    assert domains == set(DOMAINS)
    speech = json.loads((assets / "speech" / "index.json").read_text())
    assert speech["sr"] == 16000 and speech["segments"] > 0


def test_teacher_meets_its_text_target(assets):
    recorded = json.loads((assets / "llm" / "accuracy.json").read_text())
    accuracy = recorded["accuracy"]
    assert set(accuracy) == set(DOMAINS) and recorded["target"] == 0.9 and 0 <= recorded["top_ups"] <= 4
    assert min(accuracy.values()) >= 0.9, accuracy


def test_encoder_phoneme_error_falls(assets):
    history = json.loads((assets / "encoder" / "encoder.json").read_text())["training"]["per_history"]
    assert len(history) >= 2 and history[-1]["per"] < history[0]["per"] and history[-1]["per"] < 0.6, history


def heard_errors(run: Path, pool: Path, out: Path) -> dict[str, dict[int, np.ndarray]]:
    """How well each round hears what selection chose: "selected" (round 1's selected texts) and "other" (3 times
    as many pool texts it did not select) -> round -> (word errors, words) per text, summed over the text spoken
    in each of the benchmarks' 4 unseen voices and transcribed by that round's student."""
    from eval.cascade import transcribe_contexts, word_errors
    from eval.mcq import encode_contexts
    from eval.spoken import load_spoken
    from model.build import load_export
    from shards.build import synthesize_texts
    from shards.tts import TTSConfig
    from toy.build import UNSEEN_VOICES

    texts = [json.loads(line)["text"] for line in pool.read_text().splitlines()]
    chosen = [json.loads(line) for line in (run / "round-1/selection/chosen.jsonl").read_text().splitlines()]
    assert all(texts[c["index"]] == c["text"] for c in chosen)
    picked = {c["index"] for c in chosen}
    others = np.random.default_rng(0).choice(sorted(set(range(len(texts))) - picked), 3 * len(picked), replace=False)
    sets = {"selected": sorted(picked), "other": sorted(int(i) for i in others)}
    docs = [(f"text-{i}", texts[i]) for i in sets["selected"] + sets["other"]]
    students = {r: load_export(run / f"round-{r}" / "export") for r in (0, 1)}
    rate = students[0][0].encoder.sample_rate
    audio = {voice: load_spoken(synthesize_texts(docs, out / voice, TTSConfig(voices=[voice]), rate, workers=2))
             for voice in UNSEEN_VOICES}
    errors = {name: {} for name in sets}
    for r, (student, tokenizer) in students.items():
        per_text = {key: np.zeros(2) for key, _ in docs}
        for spoken in audio.values():
            heard = transcribe_contexts(student, tokenizer, encode_contexts(student, spoken, sorted(spoken)))
            for key, text in docs:
                per_text[key] += word_errors(text, heard[key])
        for name, indices in sets.items():
            errors[name][r] = np.array([per_text[f"text-{i}"] for i in indices])
    return errors


def change_in_word_error(errors: dict[int, np.ndarray], resample: np.ndarray) -> np.ndarray:
    """Round 1's word error minus round 0's, over each row of text indices in ``resample``."""
    words = errors[0][:, 1][resample].sum(axis=-1)
    return (errors[1][:, 0][resample].sum(axis=-1) - errors[0][:, 0][resample].sum(axis=-1)) / words


def test_a_selection_round_trains_on_the_selected_speech_and_hears_it_better(assets, tmp_path):
    """Round 1 hears each selected text at least 3 times, leaves the student at least as well aligned (M on the
    held-out speech within 5% of round 0's, the cascade's word error no higher +0.01), and beats round 0 where
    selection spent its budget: spoken in the 4 unseen voices, the selected texts' word error falls by more than
    that of pool texts it did not select (the bootstrap's 95% interval of the difference below 0), so the gain is
    the selected speech's, not stage II's extra steps.

    Measured (this machine, 53 selected and 159 other texts): selected 0.830 -> 0.771, -0.058 [-0.071, -0.045];
    other 0.805 -> 0.781, -0.025 [-0.031, -0.020]; the difference -0.033 [-0.048, -0.018]. The benchmarks cannot
    carry the claim at this size: 40 items per task near chance, +-13 points per task, gap 71.1 -> 68.9, M 1.358
    -> 1.346, cascade word error 0.802 -> 0.789. Rounds that beat stage I on the full benchmarks are issue 17's
    open part."""
    config = tmp_path / "toy-reduced.yaml"
    text = (ROOT / "configs" / "toy.yaml").read_text().replace("assets/toy", str(assets))
    config.write_text(text.replace("assets: toy.build", "assets: ''"))
    subprocess.run([str(ROOT / "run.sh"), str(config), f"run.dir={tmp_path / 'run'}", *REDUCED], cwd=ROOT, env=ENV,
                   check=True)
    run = tmp_path / "run" / "toy"
    plays = json.loads((run / "round-1" / "data_mix.json").read_text())["plays"]
    assert plays[str(run / "round-1" / "selection" / "shards")] >= 3, plays
    misalignment, errors = [], []
    for r in (0, 1):
        result = json.loads((run / f"round-{r}" / "eval.json").read_text())
        assert set(result["tasks"]) == set(DOMAINS) and "cascade" in result
        assert all(t["M"] > 0 for t in result["tasks"].values())   # per task, at the answer
        misalignment.append(result["M"])
        errors.append(sum(result["cascade_wer"].values()) / len(result["cascade_wer"]))
    assert misalignment[1] < 1.05 * misalignment[0], misalignment
    assert errors[1] < errors[0] + 0.01, errors

    heard = heard_errors(run, assets / "pool.jsonl", tmp_path / "heard")
    rng = np.random.default_rng(0)
    change = {name: change_in_word_error(e, np.arange(len(e[0]))) for name, e in heard.items()}
    resampled = {name: change_in_word_error(e, rng.integers(0, len(e[0]), (2000, len(e[0]))))
                 for name, e in heard.items()}
    beyond = resampled["selected"] - resampled["other"]
    assert len(heard["selected"][0]) >= 20 and np.percentile(beyond, 97.5) < 0, (change, np.percentile(beyond, 2.5))
