"""Every process-group concern of the project in one module: ranks for every launcher, joining the group, the
device each rank works on, and the collectives.

Why one module: NCCL accepts only tensors on the rank's own GPU, gloo only CPU tensors. ``join`` makes, beside
the main group (NCCL on GPUs), a gloo group over the same ranks, and every helper sends a tensor through the group
of the device it lives on: a GPU tensor through NCCL, a CPU tensor (a counter, a flag, a chunk count) through
gloo, without a copy to the GPU and back that would wait for the GPU's queue. Python objects and barriers go
through gloo too. Launchers name ranks
differently (torchrun and deepspeed set RANK, OpenMPI/MPICH/Slurm their own variables); ``rank_env`` maps them
all, for the jobs that join a group and for those that only need to know their share (``launcher_ranks``).
Every rank must pin its GPU (``torch.cuda.set_device``) before any CUDA work, or all of a node's ranks land on
cuda:0; ``join`` does it before the group exists. No other module calls ``torch.distributed``
(tests/test_distributed.py scans the tree).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_MINUTES = 60.0   # a rank may wait this long in a collective (export, synthesis on other ranks)

# Where MPI-style launchers (deepspeed --launcher openmpi|mpich|mvapich|slurm, mpirun, srun) put a process's
# rank, world size and local rank; torchrun and the deepspeed/pdsh launcher set RANK themselves.
LAUNCHER_RANK_VARS = {
    "OMPI_COMM_WORLD_RANK": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "PMI_RANK": ("PMI_SIZE", "MPI_LOCALRANKID"),
    "SLURM_PROCID": ("SLURM_NTASKS", "SLURM_LOCALID"),
}
OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK variables torch.distributed needs, from whichever launcher started this
    process; a one-rank world on a free local port when none did."""
    if "RANK" in env:
        return {}
    for rank_var, (size_var, local_var) in LAUNCHER_RANK_VARS.items():
        if rank_var in env:
            if "MASTER_ADDR" not in env:
                raise RuntimeError(f"{rank_var} is set (an MPI/Slurm launcher) but MASTER_ADDR is not: export "
                                   "MASTER_ADDR (the first node's address) and MASTER_PORT to every rank, e.g. "
                                   "in .deepspeed_env (README: Scale-out)")
            return {"RANK": env[rank_var], "WORLD_SIZE": env.get(size_var, "1"),
                    "LOCAL_RANK": env.get(local_var, "0"), "MASTER_PORT": env.get("MASTER_PORT", "29500")}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def launcher_ranks(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them, without joining a group (jobs whose ranks work
    apart, e.g. the teacher cache); (0, 1, 0) without a launcher."""
    env = os.environ if env is None else env
    for rank_var, (size_var, local_var) in LAUNCHER_RANK_VARS.items():
        if "RANK" not in env and rank_var in env:
            return int(env[rank_var]), int(env.get(size_var, 1)), int(env.get(local_var, 0))
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def device() -> torch.device:
    """This rank's compute device: its own GPU (the launcher's local rank), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", launcher_ranks()[2])
    return torch.device("cpu")


_cpu_group: dist.ProcessGroup | None = None   # gloo over the main group's ranks (the main group itself on CPUs)


def join(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, deepspeed: bool = False) -> tuple[int, int]:
    """Join the launcher's process group (torchrun, deepspeed, mpirun, srun), or make a one-rank group when no
    launcher started this process; returns (rank, world size). The rank's GPU is pinned first. ``deepspeed``:
    for DeepSpeed's comm layer too, which its engine needs. Without a launcher the group is this process alone,
    on an in-memory store."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        alone = "RANK" not in os.environ and not any(v in os.environ for v in LAUNCHER_RANK_VARS)
        os.environ.update(rank_env(os.environ))
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        if alone:   # an in-memory store: no port to pick, none another process can take first
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    if deepspeed:   # DeepSpeed's comm layer wraps the group that exists
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend, timeout=timeout)
    global _cpu_group
    if _cpu_group is None:
        gpu = dist.get_backend() == "nccl"
        _cpu_group = dist.new_group(backend="gloo", timeout=timeout) if gpu else dist.group.WORLD
    return dist.get_rank(), dist.get_world_size()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def _group_of(tensor: torch.Tensor) -> dist.ProcessGroup | None:
    """The group whose backend takes ``tensor`` where it lies (None: the main group)."""
    return _cpu_group if tensor.device.type == "cpu" else None


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max", "min"] = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over the ranks in place, on the device where it lies (see the module's docstring);
    returns it. Without a group, or with one rank, the tensor is left as it is."""
    if world() > 1:
        dist.all_reduce(tensor, op=OPS[op], group=_group_of(tensor))
    return tensor


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (picklable values of this program's own making)."""
    if world() == 1:
        return [value]
    parts: list = [None] * world()
    dist.all_gather_object(parts, value, group=_cpu_group)
    return parts


def gather_lists(values: list) -> list:
    """Every rank's list concatenated, in rank order."""
    return [v for part in all_gather_object(values) for v in part]


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=_cpu_group)
    return box[0]


def barrier() -> None:
    if world() > 1:
        dist.barrier(group=_cpu_group)


def finish() -> None:
    global _cpu_group
    if active():
        dist.destroy_process_group()
    _cpu_group = None
