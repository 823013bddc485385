"""The toy default, reduced to a few minutes: assets (teacher, encoder, shards, benchmarks), then two rounds.

The full version is ``./run.sh`` (configs/toy.yaml); this one builds ``--size reduced`` assets and trains far
fewer steps, and checks what must hold at any size: the teacher knows every domain as text, the encoder's
phoneme error falls while it pre-trains, and a selection round trains on its selected speech without misaligning
the student.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_a_selection_round_trains_on_the_selected_speech_without_misaligning(assets, tmp_path):
    """Round 1 hears each selected text at least 3 times, and leaves the student at least as well aligned: M on the
    held-out speech within 5% of round 0's and the cascade's word error no higher (+0.01).

    Not "round 1 beats round 0": on these reduced assets (150 + 100 steps, accuracy near chance, +-13 points per
    task) no measure moved by a margin its noise cannot flip. Measured with stage II decaying over its whole length:
    gap 71.1 -> 68.9, M 1.358 -> 1.346, word error 0.802 -> 0.789; decaying over its last 20% (the full toy's): gap
    71.1 -> 74.3, M 1.358 -> 1.379, word error 0.802 -> 0.762. Making rounds beat stage I is issue 17's open part."""
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
