"""Warmup-stable-decay learning-rate schedule (SALAD.md: linear warmup, flat, linear decay to 0).

Stage II resumes from the checkpoint taken just before the decay starts, so that checkpoint is
named ``pre-decay`` and the step where decay starts is exposed.
"""

from __future__ import annotations


def decay_start(max_steps: int, decay_fraction: float) -> int:
    return max_steps - int(round(max_steps * decay_fraction))


def wsd_factor(step: int, max_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    start = decay_start(max_steps, decay_fraction)
    if step < start:
        return 1.0
    return max(0.0, (max_steps - step) / max(1, max_steps - start))
