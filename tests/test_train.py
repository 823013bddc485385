"""End-to-end training on the smoke config: 2-rank ZeRO-3 (torchrun), kill-and-resume, export."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import kill_tree  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COMMON = ["--config", "configs/smoke.yaml", "train.max_steps=8", "train.save_every=4", "data.text_ratio=0.25",
          "train.diagnostics_every=4"]

pytestmark = pytest.mark.slow


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def train_cmd(run_dir: Path) -> list[str]:
    return [*TORCHRUN, "-m", "train", *COMMON, f"run.dir={run_dir}"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "smoke/round-0/metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    subprocess.run([sys.executable, "-m", "toy.smoke"], cwd=REPO, env=env(), check=True)   # reused if built
    run_dir = tmp_path_factory.mktemp("runs_full")
    subprocess.run(train_cmd(run_dir), cwd=REPO, env=env(), check=True, timeout=600)
    return run_dir


def test_two_rank_zero3_trains_and_partitions(full_run):
    out = full_run / "smoke/round-0"
    done = json.loads((out / "DONE").read_text())
    assert done["step"] == 8
    log = metrics(full_run)
    assert [r["step"] for r in log] == list(range(1, 9))
    speech = [r["loss"] for r in log if r["audio_s_per_s"] > 0]
    assert len(speech) >= 4 and sum(speech[-2:]) / 2 < sum(speech[:2]) / 2, speech
    assert log[-1]["lr"] == 0.0 and log[0]["lr"] > 0          # warmup-stable-decay ends at 0
    assert [r["step"] for r in log if "M" in r] == [4, 8]     # M and F on held-out speech every 4 steps
    assert all(r["M"] > 0 and r["F"] >= 0 for r in log if "M" in r)
    engine = json.loads((out / "engine.json").read_text())
    assert engine["world_size"] == 2
    assert all(n < 0.6 * engine["params_total"] for n in engine["params_per_rank"]), engine
    for tag in ("pre-decay", "final"):
        assert sorted(p.name for p in (out / "checkpoints" / tag).glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not any((out / "checkpoints").glob("*.tmp"))


def test_export_reloads_without_deepspeed_and_reproduces_logits(full_run):
    out = full_run / "smoke/round-0"
    assert json.loads((out / "DONE").read_text())["export_max_logit_diff"] < 1e-4
    code = f"""
import sys, torch
from model.build import load_export
model, tok = load_export({str(out / 'export')!r})
ids = torch.tensor([tok.encode('alice found a red ball')])
with torch.no_grad():
    logits = model.llm(input_ids=ids).logits
assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
assert 'deepspeed' not in sys.modules, 'export must load without deepspeed'
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_kill_and_resume_gives_the_same_losses(full_run, tmp_path):
    run_dir = tmp_path / "runs"
    proc = subprocess.Popen(train_cmd(run_dir), cwd=REPO, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "smoke/round-0/checkpoints/latest"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == "step-0000004":
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    kill_tree(proc.pid)
    proc.wait()
    assert not (run_dir / "smoke/round-0/DONE").exists()
    # resume through the deepspeed launcher, with activation checkpointing on: same numbers
    deepspeed = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                 str(29500 + os.getpid() % 1000), "--module", "train", *COMMON, f"run.dir={run_dir}",
                 "model.gradient_checkpointing=true"]
    subprocess.run(deepspeed, cwd=REPO, env=env(), check=True, timeout=600, stdout=subprocess.DEVNULL)
    resumed, reference = metrics(run_dir), metrics(full_run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed[4:], reference[4:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a, b)


def test_rerun_of_a_finished_round_does_nothing(full_run):
    stamp = (full_run / "smoke/round-0/DONE").stat().st_mtime
    result = subprocess.run([sys.executable, "-m", "train", *COMMON, f"run.dir={full_run}"], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "nothing to do" in result.stderr
    assert (full_run / "smoke/round-0/DONE").stat().st_mtime == stamp


def test_bad_override_names_the_key():
    result = subprocess.run([sys.executable, "-m", "train", "--config", "configs/smoke.yaml", "train.max_stepz=3"],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "train.max_stepz: unknown key" in result.stderr
    assert torch.__version__  # the interpreter under test is the project's


def test_eval_writes_gap_and_diagnostics_deterministically(full_run):
    cmd = [sys.executable, "-m", "eval", "--config", "configs/smoke.yaml", "--round", "0", "--force",
           f"run.dir={full_run}"]
    results = []
    for _ in range(2):   # a fresh process each time: the same checkpoint must give the same numbers
        subprocess.run(cmd, cwd=REPO, env=env(), check=True, timeout=600, capture_output=True)
        results.append(json.loads((full_run / "smoke/round-0/eval.json").read_text()))
    assert results[0] == results[1]
    task = results[0]["tasks"]["smoke"]
    assert task["n"] == 12
    for mode in ("teacher_text", "student_text", "student_speech"):
        assert 0.0 <= task[mode] <= 1.0
        lo, hi = task["ci95"][mode]
        assert lo <= task[mode] <= hi
    assert task["gap"] == pytest.approx(task["teacher_text"] - task["student_speech"])
    assert task["text_gap"] == pytest.approx(task["teacher_text"] - task["student_text"])
    assert results[0]["M"] > 0 and results[0]["F"] >= 0
    assert (full_run / "smoke/spoken/smoke/index.json").is_file()     # spoken benchmark built once, reused

    report = subprocess.run([sys.executable, "-m", "eval.report", "--config", "configs/smoke.yaml",
                             f"run.dir={full_run}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    rounds = json.loads((full_run / "smoke/report.json").read_text())["rounds"]
    assert rounds[0]["round"] == 0 and rounds[0]["tasks"]["smoke"]["n"] == 12
    assert (full_run / "smoke/gap_per_task.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
