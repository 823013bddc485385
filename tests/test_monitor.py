"""Experiment tracking (train/monitor.py): what DeepSpeed's monitor writes, read back with TensorBoard's own reader."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError
from rounds.experiment import load_experiment
from train.monitor import Monitor, log_round, round_offset

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs/smoke.yaml"   # max_steps 20, stage2_steps 6: rounds start at global steps 0, 20, 26


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (every event file of the folder, restarts applied)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_csv(path: Path) -> list[tuple[int, float]]:
    with path.open(newline="") as f:
        return [(int(row[0]), float(row[1])) for row in csv.reader(f) if row[0] != "step"]


def experiment(tmp_path: Path, *overrides: str):
    return load_experiment(SMOKE, [f"run.dir={tmp_path}", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.monitor.backends=[tensorbord]"], r"train\.monitor\.backends\[0\]: must be one of \['tensorboard', "
                                              r"'csv', 'wandb'\], got 'tensorbord'"),
    (["train.monitor.backends=[csv,csv]"], r"train\.monitor\.backends: names a backend twice"),
    (["train.monitor.backends=tensorboard"], r"train\.monitor\.backends: expected a list"),
    (["train.monitor.wandb_mode=cloud"], r"train\.monitor\.wandb_mode: must be one of \['offline', 'online'\]"),
    (["train.monitor.tensorboard=true"], r"train\.monitor\.tensorboard: unknown key"),
    (["train.monitor.backends=[wandb]", "train.monitor.wandb_project="],
     r"train\.monitor\.wandb_project: must not be empty when backends has wandb"),
])
def test_bad_monitor_config_names_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        experiment(tmp_path, *overrides)


def test_off_by_default_in_the_toy_on_at_scale():
    assert load_experiment(REPO / "configs/toy.yaml").train.monitor.backends == []
    assert load_experiment(SMOKE).train.monitor.backends == []
    for name in ("qwen2.5-3b-mimi", "qwen2.5-7b-mimi"):
        assert load_experiment(REPO / f"configs/{name}.yaml").train.monitor.backends == ["tensorboard"]


def test_round_offsets_continue_across_stage_two_rounds(tmp_path):
    cfg = experiment(tmp_path)
    assert [round_offset(cfg.train, r) for r in range(4)] == [0, 20, 26, 32]


EVAL = {"tasks": {"smoke": {"teacher_text": 0.75, "student_text": 0.5, "student_speech": 0.25, "gap": 50.0,
                            "text_gap": 25.0, "n": 12, "ci95": {"gap": [30.0, 70.0]}, "M": 0.125}},
        "cascade": {"smoke": 0.375}, "M": 0.5, "F": 0.0625}
ALLOCATION = {"strategy": "active", "gamma": 5.0, "budget_s": 12.0,
              "spread": {"entropy": 0.5, "evenness": 0.25, "effective_clusters": 1.5},
              "clusters": [{"cluster": 0, "pool_texts": 10, "score": 0.2, "target_share": 0.1, "texts": 1,
                            "seconds": 2.0, "share": 0.125},
                           {"cluster": 1, "pool_texts": 20, "score": 0.9, "target_share": 0.9, "texts": 7,
                            "seconds": 14.0, "share": 0.875}]}


def test_round_figures_land_in_tensorboard_csv_and_offline_wandb(tmp_path):
    cfg = experiment(tmp_path, "train.monitor.backends=[tensorboard,csv,wandb]")
    run = cfg.run.folder()
    run.selection(1).mkdir(parents=True)
    (run.selection(1) / "allocation.json").write_text(json.dumps(ALLOCATION))
    run.eval_json(1).write_text(json.dumps(EVAL))
    before = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_NAME")}
    log_round(cfg, 1)
    assert {k: os.environ.get(k) for k in before} == before   # W&B's settings did not leak into later jobs

    got = read_scalars(run.monitor / "tensorboard" / "smoke")
    at_eval, at_selection = 26, 20   # round 1's training ends at 20 + 6, starts at 20
    expected = {"eval/smoke/gap": 50.0, "eval/smoke/student_speech": 0.25, "eval/smoke/student_text": 0.5,
                "eval/smoke/teacher_text": 0.75, "eval/smoke/text_gap": 25.0, "eval/smoke/n": 12.0,
                "eval/smoke/M": 0.125, "eval/smoke/ci95/gap/0": 30.0, "eval/smoke/ci95/gap/1": 70.0,
                "eval/cascade/smoke": 0.375, "eval/M": 0.5, "eval/F": 0.0625}
    for tag, value in expected.items():
        assert got[tag] == [(at_eval, pytest.approx(value))], tag
    assert got["selection/clusters/1/score"] == [(at_selection, pytest.approx(0.9))]
    assert got["selection/clusters/0/share"] == [(at_selection, pytest.approx(0.125))]
    assert got["selection/spread/effective_clusters"] == [(at_selection, pytest.approx(1.5))]
    assert got["selection/gamma"] == [(at_selection, 5.0)]
    assert not [t for t in got if "strategy" in t]   # text is not a scalar
    assert len(got) == len(expected) + 5 + 2 * 7   # gamma, budget_s, the spread's 3; 7 figures per cluster
    assert read_csv(run.monitor / "csv/smoke/eval_smoke_gap.csv") == [(26, 50.0)]

    offline = list((run.monitor / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    data = offline[0].read_bytes()
    assert b"eval/smoke/gap" in data and b"selection/clusters/1/score" in data and b"salad" in data


def test_a_restart_drops_what_a_killed_try_logged_past_its_checkpoint(tmp_path):
    cfg = experiment(tmp_path, "train.monitor.backends=[tensorboard,csv]")
    with Monitor(cfg.train.monitor, cfg.run, "first try") as monitor:
        for step in range(1, 6):
            monitor.write({"train/loss": float(step)}, step)
    with Monitor(cfg.train.monitor, cfg.run, "resumed at step 3") as monitor:
        monitor.purge(4)
        for step in (4, 5, 6):
            monitor.write({"train/loss": 10.0 * step}, step)
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert read_scalars(tmp_path / "smoke/monitor/tensorboard/smoke")["train/loss"] == want
    assert read_csv(tmp_path / "smoke/monitor/csv/smoke/train_loss.csv") == want
    lines = (tmp_path / "smoke/monitor/csv/smoke/train_loss.csv").read_text().splitlines()
    assert [line for line in lines if line.startswith("step")] == ["step,loss"]   # the second job adds no header


def test_the_rounds_driver_logs_each_new_eval_once(tmp_path, monkeypatch):
    """``python -m rounds`` logs a round's figures after its eval job, and not again when a rerun finds the eval."""
    import rounds.__main__ as driver

    overrides = [f"run.dir={tmp_path}", "train.monitor.backends=[tensorboard]", "rounds=1"]
    cfg = load_experiment(SMOKE, overrides)

    def fake_job(command, module, config, overrides, round_=None):
        if module == "eval":
            cfg.run.folder().round(round_).mkdir(parents=True, exist_ok=True)
            cfg.run.folder().eval_json(round_).write_text(json.dumps({"tasks": {"smoke": {"gap": 10.0 + round_}}}))

    monkeypatch.setattr(driver, "run_job", fake_job)
    driver.run_rounds(str(SMOKE), overrides, cfg)
    driver.run_rounds(str(SMOKE), overrides, cfg)   # a rerun: every eval exists, nothing is logged twice
    got = read_scalars(tmp_path / "smoke/monitor/tensorboard/smoke")
    assert got == {"eval/smoke/gap": [(20, 10.0), (26, 11.0)]}


@pytest.mark.slow
def test_training_logs_every_metrics_figure_to_tensorboard_and_csv(tmp_path):
    """A 3-step smoke run: every figure of metrics.jsonl, at its step and value, as train/<name>."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "toy.smoke"], cwd=REPO, env=env, check=True)   # reused if built
    subprocess.run([sys.executable, "-m", "train", "--config", "configs/smoke.yaml", "train.max_steps=3",
                    "train.diagnostics_every=2", "train.save_every=100", "train.ds_config=ds_configs/zero2_cpu.json",
                    "train.monitor.backends=[tensorboard,csv]", f"run.dir={tmp_path}"],
                   cwd=REPO, env=env, check=True, timeout=900)
    records = [json.loads(line) for line in (tmp_path / "smoke/round-0/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    want: dict[str, list] = {}
    for record in records:
        for name, value in record.items():
            if name != "step":
                want.setdefault(f"train/{name}", []).append((record["step"], value))
    assert {"train/loss", "train/kl", "train/nll", "train/ctc", "train/lr", "train/tokens_per_s",
            "train/audio_s_per_s", "train/M", "train/F"} <= set(want)
    assert want["train/M"] == [(2, records[1]["M"])]   # diagnostics at step 2 only
    got = read_scalars(tmp_path / "smoke/monitor/tensorboard/smoke")
    assert set(got) == set(want)
    for tag, points in want.items():
        assert got[tag] == [(step, pytest.approx(value, rel=1e-6, abs=1e-12)) for step, value in points], tag
        rows = read_csv(tmp_path / f"smoke/monitor/csv/smoke/{tag.replace('/', '_')}.csv")
        assert rows == [(step, pytest.approx(value, rel=1e-9, abs=1e-12)) for step, value in points], tag
