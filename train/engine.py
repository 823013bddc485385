"""DeepSpeed set-up: the merged DeepSpeed config, parameter groups, the engine.

The DeepSpeed JSON files hold what only DeepSpeed needs (ZeRO stage, offload, buckets); the YAML
owns learning rates, batch, accumulation, clipping and precision, which are merged in here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from config import require
from train.monitor import MonitorConfig
from train.schedule import decay_start, wsd_factor

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
    # Stage II's decay: the paper decays to 0 over the whole of stage II (1.0). Below 1, stage II keeps a stable
    # phase and saves its own pre-decay checkpoint, which the next round then starts from.
    stage2_decay_fraction: float = 1.0
    export_tolerance: float = 0.0    # largest relative logit difference, engine vs export; 0: by dtype (export.py)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)   # TensorBoard / CSV / W&B (train/monitor.py)

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every", "save_every", "keep_checkpoints"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.diagnostics_every >= 0, "diagnostics_every", "must be >= 0")
        require(self.stage2_steps >= 0, "stage2_steps", "must be >= 0")
        require(self.export_tolerance >= 0, "export_tolerance", "must be >= 0")
        require(0.0 <= self.decay_fraction <= 1.0, "decay_fraction", "must be in [0, 1]")
        require(0.0 <= self.stage2_decay_fraction <= 1.0, "stage2_decay_fraction", "must be in [0, 1]")
        require(self.lr_adapter >= 0 and self.lr_llm >= 0, "lr_adapter", "learning rates must be >= 0")

    def for_round(self, round_: int) -> TrainConfig:
        """Stage I (round 0) as configured; stage II continues from a pre-decay checkpoint (``stage2_start``):
        no warmup, ``stage2_steps`` steps, the last ``stage2_decay_fraction`` of them decaying to 0."""
        if round_ == 0:
            return self
        return dataclasses.replace(self, max_steps=self.stage2_steps or self.max_steps, warmup_steps=0,
                                   decay_fraction=self.stage2_decay_fraction)

    def stage2_start(self, round_: int) -> int:
        """The round whose pre-decay checkpoint stage II of ``round_`` (>= 1) starts from: the latest earlier round
        that has a stable phase before its decay. With the default full decay of stage II that is stage I (round
        0) for every round: each round's stage II runs on all the speech selected so far, from the same point."""
        for earlier in range(round_ - 1, 0, -1):
            schedule = self.for_round(earlier)
            if decay_start(schedule.max_steps, schedule.decay_fraction) > 0:
                return earlier
        return 0


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


def train_dtype(cfg: TrainConfig) -> Literal["bfloat16", "float32"]:
    """The dtype of every weight in the engine: ZeRO-3 partitions what it loads in the precision's dtype and
    requires every trained weight to share it, so the LLM, LoRA, adapter and boundaries are all built in it."""
    return "bfloat16" if use_bf16(cfg) else "float32"


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


def build_model(model_cfg, cfg: TrainConfig, world: int):
    """The SpeechLM to train (``model.build.build_speech_lm``): every weight in the engine's dtype (``train_dtype``,
    whatever ``model.llm.dtype`` says), the LLM partitioned as it loads under ZeRO-3 (``llm_init``)."""
    from model.build import build_speech_lm

    llm = dataclasses.replace(model_cfg.llm, dtype=train_dtype(cfg))
    return build_speech_lm(dataclasses.replace(model_cfg, llm=llm), llm_init(cfg, world))


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


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, torch.Tensor]]:
    """(full name, owner, name in owner, tensor) of every parameter and buffer, the frozen encoder's included
    (``SpeechLM`` holds it beside its module tree)."""
    from model.speech_lm import SpeechLM

    for prefix, module_ in module.named_modules():
        owners = [(prefix, module_)]
        if isinstance(module_, SpeechLM):
            owners += module_.encoder.named_modules(prefix=f"{prefix}.encoder" if prefix else "encoder")
        for owner_name, owner in owners:
            for store in (owner._parameters, owner._buffers):
                for name, tensor in store.items():
                    if tensor is not None:
                        yield f"{owner_name}.{name}" if owner_name else name, owner, name, tensor


def place(module: torch.nn.Module, device: torch.device) -> None:
    """Move every buffer and every parameter ZeRO-3 has not partitioned to ``device``.

    Why: DeepSpeed never calls ``module.to(device)`` on a model built under ``zero.Init`` (it moves the
    partitioned parameters itself), so what was built outside it (adapter, boundaries, LoRA, the encoder, and
    buffers such as the mel window or rotary frequencies) would stay on the CPU and fail the first GPU forward.
    """
    for _, owner, name, tensor in _tensors(module):
        if hasattr(tensor, "ds_id") or tensor.device == device:
            continue
        if name in owner._buffers:
            owner._buffers[name] = tensor.to(device)
        else:   # the same Parameter object (optimizer groups and tied weights keep pointing at it), moved
            torch.utils.swap_tensors(tensor, torch.nn.Parameter(tensor.detach().to(device), tensor.requires_grad))


def check_placement(module: torch.nn.Module, device: torch.device) -> None:
    """Raise, naming them, if parameters or buffers lie off ``device`` (partitioned parameters are DeepSpeed's)."""
    stray = [f"{name} ({tensor.device})" for name, _, _, tensor in _tensors(module)
             if not hasattr(tensor, "ds_id") and tensor.device != device]
    if stray:
        raise RuntimeError(f"{len(stray)} tensors are not on the engine's device {device}: {', '.join(stray[:8])}")


def build_engine(objective: torch.nn.Module, cfg: TrainConfig, world: int):
    """The DeepSpeed engine around the whole objective, with the WSD schedule per optimizer step, every tensor on
    the engine's device, and the model in train mode (``from_pretrained`` gives eval mode, in which transformers
    skips activation checkpointing; the frozen encoder and a separate teacher stay in eval mode)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    place(objective, device)
    factor = partial(wsd_factor, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                     decay_fraction=cfg.decay_fraction)
    engine, _, _, _ = deepspeed.initialize(
        model=objective, model_parameters=param_groups(objective, cfg), config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: LambdaLR(opt, factor))
    check_placement(engine.module, engine.device)
    engine.train()
    return engine
