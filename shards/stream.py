"""Streaming reads of shard sets (placeholder until the streaming pipeline lands)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StreamConfig:
    """How training and evaluation read shards."""

    workers: int = 0
    skip_corrupt: bool = False
