"""Training step rate of the toy default (configs/toy.yaml) on one CPU process: ZeRO-3 against ZeRO-2.

With one process ZeRO-3 has no rank to partition to, yet it still gathers and releases every module's
parameters around each forward and backward through hooks; for the toy's 2M-parameter student that
bookkeeping is as large as the step. This measures the real job (``python -m train``, stage I of the toy,
the same data and seed) under ``ds_configs/zero3_cpu.json`` (the baseline) and ``ds_configs/zero2_cpu.json``
(what configs/toy.yaml uses), skipping the first ``--warmup`` steps, and prints speech seconds trained per
wall second.

    python -m bench.toy_zero_stage [--steps 40 --warmup 10]

Needs the toy assets (``python -m toy.build``). Last line: ``RESULT toy_zero2_over_zero3 <ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"ZeRO-3 (baseline)": "ds_configs/zero3_cpu.json", "ZeRO-2": "ds_configs/zero2_cpu.json"}


def audio_rate(ds_config: str, steps: int, warmup: int, out: Path) -> float:
    """Mean speech seconds per wall second over steps ``warmup+1 .. steps`` of a stage-I toy run."""
    name = Path(ds_config).stem
    cmd = [sys.executable, "-m", "train", "--config", "configs/toy.yaml", f"run.dir={out}", f"run.name={name}",
           f"train.max_steps={steps}", f"train.save_every={steps}", "train.diagnostics_every=0", "data.assets=",
           f"train.ds_config={ds_config}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = (out / name / "round-0" / "metrics.jsonl").read_text().splitlines()
    return statistics.mean(json.loads(line)["audio_s_per_s"] for line in lines[warmup:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the mean")
    args = p.parse_args()
    if not 0 <= args.warmup < args.steps:
        p.error("need 0 <= --warmup < --steps")
    if not (ROOT / "assets/toy/assets.json").is_file():
        sys.exit("assets/toy is missing: build it first (python -m toy.build)")
    with tempfile.TemporaryDirectory() as tmp:
        rates = {label: audio_rate(cfg, args.steps, args.warmup, Path(tmp)) for label, cfg in STAGES.items()}
    base = rates["ZeRO-3 (baseline)"]
    table = Table(title=f"toy stage-I step rate, 1 process, {args.steps - args.warmup} steps measured")
    for column in ("DeepSpeed config", "speech s / wall s", "vs ZeRO-3"):
        table.add_column(column, justify="right" if column != "DeepSpeed config" else "left")
    for label, rate in rates.items():
        table.add_row(f"{label}: {STAGES[label]}", f"{rate:.1f}", f"{rate / base:.2f}x")
    console = Console()
    console.print(table)
    console.print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}; "
                  f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"RESULT toy_zero2_over_zero3 {rates['ZeRO-2'] / base:.3f}")


if __name__ == "__main__":
    main()
