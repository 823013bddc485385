"""DeepSpeed set-up: distributed init, the merged DeepSpeed config, parameter groups, the engine.

The DeepSpeed JSON files hold what only DeepSpeed needs (ZeRO stage, offload, buckets); the YAML
owns learning rates, batch, accumulation, clipping and precision, which are merged in here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from train.config import require
from train.schedule import wsd_factor

REPO = Path(__file__).resolve().parent.parent


@dataclass
class TrainConfig:
    max_steps: int = 100             # optimizer steps of this round
    lr_adapter: float = 1e-3         # adapter and boundary embeddings
    lr_llm: float = 5e-5             # LoRA or full LLM
    weight_decay: float = 0.1
    warmup_steps: int = 10
    decay_fraction: float = 0.2      # last fraction of steps decays linearly to 0 (WSD)
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPUs that have it, fp32 on CPU
    ds_config: str = "auto"          # auto: ds_configs/zero3.json on GPU, zero3_cpu.json on CPU
    log_every: int = 1
    save_every: int = 50
    keep_checkpoints: int = 2        # periodic checkpoints kept (pre-decay and final are always kept)
    diagnostics_every: int = 0       # log M and F on a held-out batch (eval.heldout) every N steps; 0: off
    stage2_steps: int = 0            # optimizer steps of each stage-II round (>= 1); 0: max_steps

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every", "save_every", "keep_checkpoints"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.diagnostics_every >= 0, "diagnostics_every", "must be >= 0")
        require(self.stage2_steps >= 0, "stage2_steps", "must be >= 0")
        require(0.0 <= self.decay_fraction <= 1.0, "decay_fraction", "must be in [0, 1]")
        require(self.lr_adapter >= 0 and self.lr_llm >= 0, "lr_adapter", "learning rates must be >= 0")

    def for_round(self, round_: int) -> TrainConfig:
        """Stage I (round 0) as configured; stage II continues from a pre-decay checkpoint: no warmup,
        ``stage2_steps`` steps ending with the decay to 0."""
        if round_ == 0:
            return self
        return dataclasses.replace(self, max_steps=self.stage2_steps or self.max_steps, warmup_steps=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where MPI-style launchers (deepspeed --launcher openmpi|mpich|mvapich|slurm, mpirun, srun) put a process's
# rank, world size and local rank; torchrun and the deepspeed/pdsh launcher set RANK themselves.
LAUNCHER_RANK_VARS = {
    "OMPI_COMM_WORLD_RANK": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "PMI_RANK": ("PMI_SIZE", "MPI_LOCALRANKID"),
    "SLURM_PROCID": ("SLURM_NTASKS", "SLURM_LOCALID"),
}


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
            "MASTER_PORT": str(_free_port())}


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group (torchrun, deepspeed, mpirun, srun), or make a one-rank group when
    no launcher started this process."""
    import deepspeed

    os.environ.update(rank_env(os.environ))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with the values the YAML owns merged in."""
    name = cfg.ds_config
    if name == "auto":
        name = "ds_configs/zero3.json" if torch.cuda.is_available() else "ds_configs/zero3_cpu.json"
    path = Path(name) if Path(name).is_file() else REPO / name
    if not path.is_file():
        raise FileNotFoundError(f"train.ds_config: {name} not found")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = 1          # one packed Batch per micro-step
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.grad_accum * world
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {"enabled": use_bf16(cfg)}
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=cfg.lr_adapter, weight_decay=cfg.weight_decay)
    return ds


@contextlib.contextmanager
def _zero3_loading(ds: dict) -> Iterator[None]:
    """transformers' ZeRO-3 integration switched on for the ``with`` block only (see ``llm_init``)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hold = HfDeepSpeedConfig(ds)   # transformers keeps a weak reference only: this one keeps it alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hold


def llm_init(cfg: TrainConfig, world: int) -> Callable[[], AbstractContextManager]:
    """The context ``model.build.build_speech_lm`` enters around each load of the LLM (on every rank).

    Under ZeRO-3 it holds a transformers ``HfDeepSpeedConfig`` of the merged DeepSpeed config. While that
    lives, from_pretrained builds the model inside ``deepspeed.zero.Init``: each parameter is partitioned over
    the ranks as it is created, in the config's precision (bf16 when enabled), on the accelerator or, with
    ``offload_param``, in CPU memory. It then fills the model one module at a time: rank 0 reads the
    checkpoint into host memory, each module's parameters are gathered, filled and partitioned again. So no
    accelerator holds more than its partition plus one module of a 7B model. Leaving the context unsets the
    config: later loads in the process (the export, on rank 0 alone) are plain, not collectives. Other ZeRO
    stages load plainly.
    """
    ds = deepspeed_config(cfg, world)
    if ds.get("zero_optimization", {}).get("stage") != 3:
        return contextlib.nullcontext
    return lambda: _zero3_loading(ds)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Adapter and boundaries at ``lr_adapter``, LLM (LoRA or full) at ``lr_llm``; no decay on 1-d params."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_llm = name.startswith("model.llm.")
        groups.setdefault((is_llm, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": cfg.lr_llm if is_llm else cfg.lr_adapter,
             "weight_decay": cfg.weight_decay if decay else 0.0, "name": f"{'llm' if is_llm else 'adapter'}"}
            for (is_llm, decay), ps in sorted(groups.items())]


def build_engine(objective: torch.nn.Module, cfg: TrainConfig, world: int):
    """The DeepSpeed engine around the whole objective, with the WSD schedule per optimizer step."""
    import deepspeed

    factor = partial(wsd_factor, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                     decay_fraction=cfg.decay_fraction)
    engine, _, _, _ = deepspeed.initialize(
        model=objective, model_parameters=param_groups(objective, cfg), config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: LambdaLR(opt, factor))
    return engine
