"""Checkpoints of a round: DeepSpeed ZeRO shards without frozen weights, plus what resuming needs.

Layout: ``round-R/checkpoints/<tag>/`` with tags ``step-NNNNNNN`` (periodic), ``pre-decay`` (stage II
starts from it) and ``final``. The client state holds the step and every rank's data position, so a
killed run resumes exactly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from train import distributed

PERIODIC_PREFIX = "step-"


def save(engine, folder: Path, tag: str, step: int, consumed: dict[str, int]) -> None:
    """Collective: every rank writes its ZeRO partition; the data positions of all ranks go along."""
    positions = distributed.all_gather_object(consumed)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step, "consumed": positions},
                           exclude_frozen_parameters=True)


def resume(engine, folder: Path, tag: str | None = None) -> tuple[int, dict[str, int]] | None:
    """Load ``tag`` (default: the latest saved) if any; returns (step, this rank's data position)."""
    if not (folder / "latest").is_file() and tag is None:
        return None
    path, state = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False)
    if path is None:
        return None
    return state["step"], state["consumed"][distributed.rank()]


def prune(folder: Path, keep: int) -> None:
    """Drop the oldest periodic checkpoints beyond ``keep`` (rank 0 only, after a barrier)."""
    periodic = sorted(p for p in folder.glob(f"{PERIODIC_PREFIX}*") if p.is_dir())
    for old in periodic[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def start_from(engine, folder: Path, tag: str) -> None:
    """Stage II: the weights and optimizer moments of another round's checkpoint, with this round's own
    learning-rate schedule and data (same world size as the run that saved it)."""
    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{folder}/{tag}: no checkpoint to start stage II from")
