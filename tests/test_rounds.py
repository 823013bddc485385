"""Rounds end to end with ./run.sh on the smoke config: selection, stage II, eval, report, resume."""

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from selection.probe import cluster_scores, probe_texts, split_text
from tests.conftest import kill_tree  # noqa: E402
from train.data import DataConfig, ShardSetRef, append_speech_set, plays, round_speech_sets, shares, speech_draws
from train.engine import TrainConfig
from train.schedule import wsd_factor

REPO = Path(__file__).resolve().parent.parent


def test_split_text_and_probe_choice():
    assert split_text("one") is None
    assert split_text("a b c d e") == ("a b", "c d e")
    long = " ".join(f"w{i}" for i in range(1000))   # a FineWeb-Edu document: speak a span, score what follows
    spoken, text = split_text(long, speech_words=15, text_words=30)
    assert spoken.split() == [f"w{i}" for i in range(15)] and text.split() == [f"w{i}" for i in range(15, 45)]
    scores = {0: {"M": 2.0, "positions": 40}, 1: {"M": 0.0, "positions": 0}, 2: {"M": 1.0, "positions": 40}}
    values, unscored = cluster_scores(scores, "M", min_positions=8)
    assert unscored == [1] and values.tolist() == [2.0, 1.5, 1.0]   # reported, and the mean of the others
    import numpy as np

    labels = np.array([0, 0, 0, 1, 1, 2])
    probes = probe_texts(labels, 2, seed=0)
    assert sorted(probes) == [0, 1, 2] and [len(v) for v in probes.values()] == [2, 2, 1]
    assert all(labels[i] == c for c, idx in probes.items() for i in idx)
    assert probes == probe_texts(labels, 2, seed=0)


def test_data_yaml_appends_once_and_rounds_see_their_sets(tmp_path):
    cfg = DataConfig(speech=[ShardSetRef("natural")], selected_share=0.4)
    assert [r.path for r in round_speech_sets(tmp_path, cfg, 3)] == ["natural"]
    append_speech_set(tmp_path, ShardSetRef("sel1", 30.0), 1, cfg)
    append_speech_set(tmp_path, ShardSetRef("sel1", 30.0), 1, cfg)     # a re-run after a crash: no duplicate
    append_speech_set(tmp_path, ShardSetRef("sel2", 10.0), 2, cfg)
    written = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert [e["path"] for e in written["speech"]] == ["sel1", "sel2"]
    assert [r.path for r in round_speech_sets(tmp_path, cfg, 0)] == ["natural"]
    assert [r.path for r in round_speech_sets(tmp_path, cfg, 1)] == ["natural", "sel1"]
    round_2 = shares(round_speech_sets(tmp_path, cfg, 2))
    assert round_2 == pytest.approx({"natural": 0.6, "sel1": 0.3, "sel2": 0.1})   # selected: 0.4, by documents
    assert {e["path"]: e["share"] for e in written["speech"] + written["natural"]} == pytest.approx(round_2)


def test_selected_speech_gets_its_share_whatever_the_natural_sets_weigh(tmp_path):
    """The real-scale configs weigh the natural sets in hours (LibriHeavy 50, Emilia 91): the selected set must
    still give ``selected_share`` of the documents the stream draws, not 0.01 / 141 of them."""
    from shards.build import build_texts
    from shards.stream import ShardStream

    for name in ("libriheavy", "emilia", "selected"):
        build_texts([(f"{name}-{i}", f"a text of {name} number {i}") for i in range(40)], tmp_path / name)
    cfg = DataConfig(speech=[ShardSetRef(str(tmp_path / "libriheavy"), 50.0),
                             ShardSetRef(str(tmp_path / "emilia"), 91.0)])   # the default share, 0.5
    append_speech_set(tmp_path, ShardSetRef(str(tmp_path / "selected"), 40.0), 1, cfg)
    sets = round_speech_sets(tmp_path, cfg, 1)
    stream = ShardStream([(r.path, r.weight) for r in sets], seed=0, decode_audio=False)
    drawn = [chunk.doc.split("-")[0] for chunk, _ in zip(stream, range(4000), strict=False)]
    realised = {name: drawn.count(name) / len(drawn) for name in ("libriheavy", "emilia", "selected")}
    assert realised["selected"] == pytest.approx(0.5, abs=0.03), realised
    assert realised["emilia"] / realised["libriheavy"] == pytest.approx(91 / 50, rel=0.1), realised
    expected = plays(sets, len(drawn))   # what train logs as the plays per selected text
    assert expected[str(tmp_path / "selected")] == pytest.approx(drawn.count("selected") / 40, rel=0.06)
    assert expected[str(tmp_path / "emilia")] == pytest.approx(drawn.count("emilia") / 40, rel=0.1)


def test_speech_draws_count_only_speech_micro_batches():
    cfg = DataConfig(speech=[ShardSetRef("natural")], text=[ShardSetRef("text")], text_ratio=0.25, docs_per_batch=6)
    assert speech_draws(cfg, steps=100, grad_accum=2, world=4) == 100 * 2 * 4 * 6 * 0.75
    assert speech_draws(dataclasses.replace(cfg, text=[]), steps=100, grad_accum=1, world=1) == 600


def test_stage_two_decays_over_its_whole_length_from_stage_one():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, decay_fraction=0.2, stage2_steps=40)
    stage2 = cfg.for_round(1)
    assert (stage2.max_steps, stage2.warmup_steps, stage2.decay_fraction) == (40, 0, 1.0)
    factors = [wsd_factor(s, stage2.max_steps, stage2.warmup_steps, stage2.decay_fraction) for s in range(40)]
    assert factors[0] == 1.0 and factors[-1] == 1 / 40
    assert all(a > b for a, b in zip(factors, factors[1:], strict=False))
    assert [cfg.stage2_start(r) for r in (1, 2, 3)] == [0, 0, 0]   # no stable phase: every round from stage I
    kept = dataclasses.replace(cfg, stage2_decay_fraction=0.2)      # the other option: a stable phase first
    assert kept.for_round(2).decay_fraction == 0.2 and [kept.stage2_start(r) for r in (1, 2, 3)] == [0, 1, 2]


def run_sh(run_dir: Path, **kw) -> subprocess.Popen:
    args = ["./run.sh", "configs/smoke.yaml", f"run.dir={run_dir}", "train.max_steps=6", "train.save_every=3",
            "train.stage2_steps=3", "train.diagnostics_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, **kw)


@pytest.mark.slow
def test_run_sh_two_rounds_resume_after_interruption(tmp_path):
    out = tmp_path / "smoke"
    proc = run_sh(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "round-1/selection/DONE"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before round 1's selection finished"
    kill_tree(proc.pid)        # interrupt during round 1 (after its selection)
    proc.wait()
    stamps = {p: p.stat().st_mtime for p in [out / "round-0/DONE", out / "round-0/eval.json", marker,
                                                out / "round-1/selection/chosen.jsonl"]}
    done = subprocess.run(["./run.sh", "configs/smoke.yaml", f"run.dir={tmp_path}", "train.max_steps=6",
                           "train.save_every=3", "train.stage2_steps=3", "train.diagnostics_every=0"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(p.stat().st_mtime == t for p, t in stamps.items()), "finished steps must not be redone"
    for r in (0, 1, 2):
        assert (out / f"round-{r}/DONE").is_file() and (out / f"round-{r}/eval.json").is_file()
    for r in (1, 2):
        sel = out / f"round-{r}/selection"
        for name in ("clusters.json", "probe.json", "allocation.json", "chosen.jsonl", "score_vs_share.png",
                     "shards/index.json"):
            assert (sel / name).is_file(), sel / name
        chosen = [json.loads(x) for x in (sel / "chosen.jsonl").read_text().splitlines()]
        seconds = json.loads((sel / "shards/index.json").read_text())
        assert chosen and seconds["shards"]
    chosen_1 = {json.loads(x)["index"] for x in (out / "round-1/selection/chosen.jsonl").read_text().splitlines()}
    chosen_2 = {json.loads(x)["index"] for x in (out / "round-2/selection/chosen.jsonl").read_text().splitlines()}
    assert not chosen_1 & chosen_2, "texts are never drawn twice"
    entries = yaml.safe_load((out / "data.yaml").read_text())["speech"]
    assert [e["round"] for e in entries] == [1, 2]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert (out / "report.md").is_file()
    # stage II started from stage I's pre-decay checkpoint (every round: it decays over its whole length) and ran
    # its own schedule
    log = [json.loads(x) for x in (out / "round-1/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["lr"] == 0.0
    for r in (1, 2):
        started = json.loads((out / f"round-{r}/DONE").read_text())["started_from"]
        assert started == str(out / "round-0/checkpoints/pre-decay"), started
        assert not (out / f"round-{r}/checkpoints/pre-decay").exists()
    mix = json.loads((out / "round-2/data_mix.json").read_text())["speech_shares"]
    assert sum(v for p, v in mix.items() if "selection" in p) == pytest.approx(0.5)
