"""bench/gpu_train.py: the tiny shape runs both variants on CPU and prints the RESULT lines; its pieces."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.gpu_train import causal_pairs, peak_flops, synthetic_document
from model.inputs import SPEECH, TEXT, InputsConfig

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
       "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}   # the CPU path


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.gpu_train", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow   # two DeepSpeed/PyTorch worker processes: about 35 s on 2 shared cores
def test_tiny_shape_prints_results():
    done = run_bench("--shape", "tiny", "--steps", "3")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    results = {k: float(v) for k, v in (line.split()[1:] for line in lines if line.startswith("RESULT "))}
    assert set(results) == {"mfu", "mfu_vs_baseline", "baseline_mfu", "zero3_tokens_per_s", "plain_tokens_per_s",
                            "zero3_peak_mem_mib", "plain_peak_mem_mib"}
    assert lines[-1].startswith("RESULT mfu ")
    assert all(v > 0 for v in results.values()), results
    assert results["mfu_vs_baseline"] == pytest.approx(results["mfu"] / results["baseline_mfu"], rel=0.01)
    ratio = results["zero3_tokens_per_s"] / results["plain_tokens_per_s"]   # same work: MFU ratio = speed ratio
    assert results["mfu_vs_baseline"] == pytest.approx(ratio, rel=0.01)
    assert "nominal CPU peak" in done.stdout and "deepspeed" in done.stdout


def test_3b_shape_needs_a_gpu():
    done = run_bench("--shape", "3b")
    assert done.returncode != 0
    assert "needs a CUDA GPU" in done.stderr


def test_causal_pairs():
    assert causal_pairs(torch.tensor([1, 2, 3])) == 1 + 3 + 6


def test_synthetic_document_fills_the_row():
    inputs = InputsConfig(context=512)
    frame = 1920   # samples per adapter vector (Mimi at 24 kHz, 12.5 Hz, no stacking)

    def vectors_for(samples: int) -> int:
        return -(-samples // frame)

    doc = synthetic_document(np.random.default_rng(0), inputs, 1000, 24_000, vectors_for)
    student, teacher = doc.lengths(vectors_for, bos=False)
    assert student == inputs.context and 0 < teacher < student
    kinds = [span.kind for span in doc.spans]
    assert SPEECH in kinds and TEXT in kinds
    assert all(0 <= i < 1000 for span in doc.spans for i in span.ids)
    speech = [span for span in doc.spans if span.kind == SPEECH]
    assert all(span.audio.dtype == np.float32 and len(span.audio) > 0 for span in speech)


def test_peak_flops_by_device_name():
    args = argparse.Namespace(peak_tflops=None, threads=2)
    assert peak_flops(args, "NVIDIA H100 80GB HBM3")[0] == 989e12
    assert peak_flops(args, "NVIDIA H100 PCIe")[0] == 756e12
    assert peak_flops(args, "NVIDIA H200")[0] == 989e12
    assert peak_flops(args, "NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert peak_flops(args, "CPU")[0] == 2 * 0.1e12
    with pytest.raises(SystemExit, match="--peak-tflops"):
        peak_flops(args, "Tesla T4")
    assert peak_flops(argparse.Namespace(peak_tflops=500.0, threads=1), "Tesla T4")[0] == 500e12
