"""Export a trained round as a plain model directory that loads without DeepSpeed.

    export/llm/                  the LLM with LoRA merged (save_pretrained) and its tokenizer
    export/encoder/              a copy of the frozen encoder's folder (whisper, mimi; absent for mel)
    export/speech.safetensors    adapter and boundary embeddings
    export/speech_config.json    {"encoder": EncoderConfig, "adapter": AdapterConfig}

``model.build.load_export(dir)`` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.build import build_speech_lm, load_tokenizer
from train.experiment import ExperimentConfig

OBJECTIVE_PREFIX = "model."   # the engine wraps train.objective.Objective, whose SpeechLM is `.model`


def trained_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The trained (non-frozen) parameters of a ZeRO checkpoint, consolidated to fp32 on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)
    return {k.removeprefix(OBJECTIVE_PREFIX): v for k, v in state.items()}


def export(cfg: ExperimentConfig, ckpt_dir: Path, tag: str, out: Path) -> Path:
    """Rebuild the model on CPU in fp32, load the trained weights, merge LoRA, write ``out`` atomically."""
    model_cfg = dataclasses.replace(cfg.model, llm=dataclasses.replace(cfg.model.llm, dtype="float32"),
                                    gradient_checkpointing=False)
    model = build_speech_lm(model_cfg, with_teacher=False)   # the export holds the student only
    missing_trained = model.load_state_dict(trained_state(ckpt_dir, tag), strict=False).unexpected_keys
    if missing_trained:
        raise KeyError(f"{ckpt_dir}/{tag}: checkpoint has parameters the model lacks: {missing_trained[:5]}")
    llm = model.llm.merge_and_unload() if hasattr(model.llm, "merge_and_unload") else model.llm
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    llm.save_pretrained(str(tmp / "llm"))
    load_tokenizer(cfg.model).save_pretrained(str(tmp / "llm"))
    encoder_cfg = dataclasses.asdict(cfg.model.encoder)
    if encoder_cfg.get("path"):
        shutil.copytree(encoder_cfg["path"], tmp / "encoder")
        encoder_cfg["path"] = "encoder"
    speech = {f"adapter.{k}": v.contiguous() for k, v in model.adapter.state_dict().items()}
    speech["boundary"] = model.boundary.detach().contiguous()
    save_file(speech, str(tmp / "speech.safetensors"))
    config = {"encoder": encoder_cfg, "adapter": dataclasses.asdict(cfg.model.adapter)}
    (tmp / "speech_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


@torch.no_grad()
def probe_logits(model, batch) -> torch.Tensor:
    """Student logits at the valid positions of a batch (collective under ZeRO-3: all ranks call it)."""
    hidden, layout = model(batch)
    return model.student_head(hidden[layout.student_mask]).float()


def verify_export(engine_model, export_dir: Path, batch, rank: int) -> float | None:
    """Max |logit difference| between the engine's model and the exported one on ``batch``, relative to the
    largest logit (rank 0; None elsewhere)."""
    from model.build import load_export

    was_training = engine_model.training
    engine_model.eval()
    reference = probe_logits(engine_model, batch)
    engine_model.train(was_training)
    if rank != 0:
        return None
    exported, _ = load_export(export_dir)
    diff = (probe_logits(exported, batch.to("cpu")) - reference.cpu()).abs().max()
    return float(diff / reference.abs().max().clamp(min=1.0).cpu())
