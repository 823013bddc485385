"""torch.distributed helpers for the jobs that need no DeepSpeed (evaluation, selection)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_ranks() -> tuple[int, int]:
    """Join a launcher's process group when there is one (torchrun, deepspeed); else one rank."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather(values: list) -> list:
    """Concatenate every rank's list (in rank order)."""
    if not dist.is_initialized():
        return values
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
