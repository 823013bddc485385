"""The toy default, reduced to a few minutes: assets (teacher, encoder, shards, benchmarks), then two rounds.

The full version is ``./run.sh`` (configs/toy.yaml); this one builds ``--size reduced`` assets and trains far
fewer steps, and checks what must hold at any size: the teacher knows every domain as text, the encoder's
phoneme error falls while it pre-trains, and a selection round lowers the student's average gap.
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
# Stage II draws half its speech from the selected sets, the system's default (the paper's mixture); the toy
# default keeps 1/6, what its measured results had. At 1/6 this reduced round ties round 0 exactly (average gap
# 0.7182 both, on the code before and after the stage-II mixture became a share); at 1/2 it lowers the gap to
# 0.7114, M from 1.685 to 1.594 and the non-narrative word error from 0.908 to 0.861.
REDUCED = ["train.max_steps=150", "train.warmup_steps=10", "train.stage2_steps=100", "train.save_every=100",
           "train.diagnostics_every=0", "rounds=1", "selection.clusters=8", "selection.probes=3",
           "eval.bootstrap=100", "eval.heldout_docs=11", "data.selected_share=0.5"]


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
    accuracy = json.loads((assets / "llm" / "accuracy.json").read_text())["accuracy"]
    assert set(accuracy) == set(DOMAINS)
    assert min(accuracy.values()) >= 0.9, accuracy


def test_encoder_phoneme_error_falls(assets):
    history = json.loads((assets / "encoder" / "encoder.json").read_text())["training"]["per_history"]
    assert len(history) >= 2 and history[-1]["per"] < history[0]["per"] and history[-1]["per"] < 0.6, history


def test_a_selection_round_lowers_the_average_gap(assets, tmp_path):
    config = tmp_path / "toy-reduced.yaml"
    text = (ROOT / "configs" / "toy.yaml").read_text().replace("assets/toy", str(assets))
    config.write_text(text.replace("assets: toy.build", "assets: ''"))
    subprocess.run([str(ROOT / "run.sh"), str(config), f"run.dir={tmp_path / 'run'}", *REDUCED], cwd=ROOT, env=ENV,
                   check=True)
    gaps, errors = [], []
    for r in (0, 1):
        result = json.loads((tmp_path / "run" / "toy" / f"round-{r}" / "eval.json").read_text())
        assert set(result["tasks"]) == set(DOMAINS) and "cascade" in result
        gaps.append(sum(t["gap"] for t in result["tasks"].values()) / len(result["tasks"]))
        selected = [wer for task, wer in result["cascade_wer"].items() if task != "narrative"]
        errors.append(sum(selected) / len(selected))
    assert gaps[1] < gaps[0], gaps
    assert errors[1] < errors[0] - 0.02, errors   # the selected domains' words are heard better
