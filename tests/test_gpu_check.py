"""bench/gpu_check.sh and bench/gpu_wheels.sh: what can be checked without a GPU, a network or built wheels.

The scripts' real work (offline install, the smoke config on the GPU, the benches) needs the lent GPU machine;
here: syntax, help, argument errors, and that the check refuses cleanly, with its log under $OUT and a
``RESULT gpu_check_ok 0`` line, when there is no torch, no wheels or no GPU.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "bench" / "gpu_check.sh"
WHEELS = ROOT / "bench" / "gpu_wheels.sh"


def run(script: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script", [CHECK, WHEELS])
def test_scripts_parse_and_are_executable(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert script.stat().st_mode & stat.S_IXUSR


@pytest.mark.parametrize("script, words", [
    (CHECK, ["--cpu-dry-run", "gpu_wheels.sh", "smoke_gpu_ok", "teacher_cache", "--budget"]),
    (WHEELS, ["--profile", "--python", "espeak", "minilm-config"]),
])
def test_help_says_what_it_does(script, words):
    done = run(script, "--help")
    assert done.returncode == 0, done.stderr
    for word in words:
        assert word in done.stdout


@pytest.mark.parametrize("script, args, message", [
    (CHECK, ["--bogus"], "unknown argument"),
    (CHECK, ["--only", "smoke,nonsense"], "no stage 'nonsense'"),
    (CHECK, ["--budget", "soon"], "--budget needs seconds"),
    (WHEELS, ["--profile", "everything"], "--profile must be image or bare"),
    (WHEELS, ["--python", "3"], "--python"),
    (WHEELS, ["--frobnicate"], "unknown argument"),
])
def test_bad_arguments_exit_2_with_a_reason(script, args, message):
    done = run(script, *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_without_torch_or_wheels_it_explains_and_fails_with_a_log(tmp_path):
    fake = tmp_path / "python-without-torch"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    done = run(CHECK, "--python", str(fake), "--wheels", str(tmp_path / "no-wheels"),
               env={"OUT": str(out), "SALAD_GPU_CHECK_DIR": str(tmp_path / "run")})
    assert done.returncode == 1
    assert "bench/gpu_wheels.sh" in done.stdout           # where the missing wheels come from
    assert "cannot import torch" in done.stdout
    assert "RESULT gpu_check_ok 0" in done.stdout
    log = (out / "gpu_check.log").read_text()              # everything printed is in the log under $OUT
    assert "cannot import torch" in log and "RESULT gpu_check_ok 0" in log


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_points_to_the_dry_run(tmp_path):
    done = run(CHECK, "--python", sys.executable, "--only", "install",
               env={"OUT": str(tmp_path / "out"), "SALAD_GPU_CHECK_DIR": str(tmp_path / "run")})
    assert done.returncode == 1
    assert "--cpu-dry-run" in done.stdout
    assert "RESULT smoke_gpu_ok 0" in done.stdout and "RESULT gpu_check_ok 0" in done.stdout
    assert not (tmp_path / "run" / "smoke").exists()       # nothing ran
