"""Build a SpeechLM from config: LLM from a local path, LoRA via peft, the freeze policy."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from config import require
from model.adapter import Adapter, AdapterConfig
from model.encoder import EncoderConfig, build_encoder
from model.speech_lm import SpeechLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
LoadContext = Callable[[], AbstractContextManager]   # entered around each from_pretrained of the LLM


@dataclass
class LLMConfig:
    path: str = ""                                     # local folder readable by from_pretrained
    mode: Literal["frozen", "lora", "full"] = "lora"   # what of the LLM trains
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # The dtype the LLM is loaded in outside training (eval, selection, the teacher cache; its teacher alike):
    # auto is bfloat16 on GPUs that have it, else float32. Training loads it in train.precision's dtype.
    dtype: DtypeName = "auto"

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "a local model folder is required")
        require(self.lora_r > 0, "lora_r", "must be positive")
        require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(path="assets/smoke/llm"))
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    gradient_checkpointing: bool = False


def resolve_dtype(name: DtypeName) -> torch.dtype:
    """A dtype name of the configs; ``auto``: bfloat16 on a GPU that has it, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_tokenizer(cfg: ModelConfig):
    return AutoTokenizer.from_pretrained(cfg.llm.path)


def load_llm(cfg: LLMConfig, context: LoadContext = nullcontext) -> torch.nn.Module:
    """The causal LM from its local folder, read inside ``context()`` (the trainer's one partitions it)."""
    with context():
        return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=resolve_dtype(cfg.dtype))


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def build_speech_lm(cfg: ModelConfig, llm_context: LoadContext = nullcontext, with_teacher: bool = True) -> SpeechLM:
    """LLM + frozen encoder + new adapter, with the LLM trained as ``cfg.llm.mode`` says.

    ``llm_context`` is entered around each load of the LLM: the student and, in ``full`` mode, the frozen
    teacher, a second load of the same folder rather than a copy (a partitioned model cannot be deep-copied).
    Under ZeRO-3 the trainer passes ``train.engine.llm_init``, whose context makes from_pretrained partition
    the weights over the ranks as it reads them, so no rank ever holds a whole 7B LLM (nor its teacher).
    The encoder (frozen, tens of millions of parameters) and the new adapter are built whole on every rank,
    outside that context, by the plain loading path and its checks; deepspeed.initialize partitions them
    with the rest of the engine's module. ``with_teacher=False`` skips ``full`` mode's teacher where nothing
    reads it (the export: a second fp32 copy of a 7B LLM is 28 GB).
    """
    llm = load_llm(cfg.llm, llm_context)
    teacher = None
    if cfg.llm.mode == "full":
        teacher = _frozen(load_llm(cfg.llm, llm_context)) if with_teacher else None
    elif cfg.llm.mode == "lora":
        from peft import LoraConfig, get_peft_model

        _frozen(llm)
        lora = LoraConfig(r=cfg.llm.lora_r, lora_alpha=cfg.llm.lora_alpha, lora_dropout=cfg.llm.lora_dropout,
                          target_modules=cfg.llm.lora_targets, bias="none")
        # LoRA weights in the LLM's dtype (peft would upcast them to float32): under ZeRO-3 every trained weight
        # must have the engine's one dtype
        llm = get_peft_model(llm, lora, autocast_adapter_dtype=False)
    else:
        _frozen(llm)
    if cfg.gradient_checkpointing:   # recomputes only in train mode (model.train(); the trainer's engine does it)
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    encoder = build_encoder(cfg.encoder)
    hidden = llm.get_input_embeddings().embedding_dim
    dtype = resolve_dtype(cfg.llm.dtype)
    adapter = Adapter(cfg.adapter, in_dim=encoder.dim, out_dim=hidden).to(dtype)
    if cfg.gradient_checkpointing:
        adapter.set_gradient_checkpointing(True)
    model = SpeechLM(llm, encoder, adapter, teacher=teacher)
    model.boundary.data = model.boundary.data.to(dtype)
    return model


def load_export(folder: str | Path, teacher_path: str | None = None,
                dtype: DtypeName = "float32") -> tuple[SpeechLM, object]:
    """A model directory written by ``train.export`` (``model.hf``'s layout), as the ``SpeechLM`` that evaluation
    and selection score with: plain torch + transformers, no DeepSpeed, every module frozen in eval mode.

    With ``teacher_path`` (the original LLM), the model gets it as its frozen teacher (evaluation's
    teacher_text, the diagnostics F and D); the export's own LLM has LoRA merged, so it cannot be it.
    LLM, adapter and teacher are in ``dtype`` (one dtype for both sides, so that a gap or a KL between them
    never measures precision); the encoder keeps its own (``encoder.dtype``)."""
    from model.hf import LLM_DIR, SpeechLMForCausalLM

    torch_dtype = resolve_dtype(dtype)
    model = SpeechLMForCausalLM.from_pretrained(folder, dtype=torch_dtype).speech_lm
    if teacher_path:
        model.teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch_dtype)
    return _frozen(model), AutoTokenizer.from_pretrained(str(Path(folder) / LLM_DIR))
