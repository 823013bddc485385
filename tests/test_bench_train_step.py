"""bench/train_step.py in its smallest mode: both variants run and the RESULT lines come out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow   # three Python processes with DeepSpeed: about 40 s on 2 cores


def test_train_step_bench_prints_results():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}   # the CPU benchmark
    cmd = [sys.executable, "-m", "bench.train_step", "--steps", "1", "--warmup", "0", "data.docs_per_batch=2"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    results = dict(line.split()[1:] for line in lines if line.startswith("RESULT "))
    assert lines[-1].startswith("RESULT zero3_cpu_scaling ")
    assert set(results) == {f"{v}_{m}" for v in ("zero3", "plain")
                            for m in ("tokens_per_s", "audio_s_per_s", "peak_rss_mib")} | {
                                "zero3_cputime_scaling", "zero3_cpu_scaling", "host_reads_per_micro_step"}
    assert all(float(v) > 0 for k, v in results.items() if k != "host_reads_per_micro_step"), results
    assert "deepspeed" in done.stdout and "2 x 1" in done.stdout   # machine line, thread settings
