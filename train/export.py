"""Export a trained round as a Hugging Face model folder that loads without DeepSpeed (nor this repository).

The layout is ``model.hf``'s: config.json (``SpeechLMConfig``, with auto_map), generation_config.json, llm/ (LoRA
merged, with its tokenizer), encoder/ (whisper, mimi, toy), speech.safetensors, the processor (feature extractor +
tokenizer), the model code (modeling_salad.py and the project modules it imports) and the model card README.md.
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it; ``model.build.load_export(dir)``
reads it back as a ``SpeechLM`` for evaluation and selection.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch

from model.build import ModelConfig, build_speech_lm, load_tokenizer
from model.card import write_model_card
from model.hf import LLM_DIR, SpeechLMForCausalLM
from train import distributed
from train.engine import TrainConfig, train_dtype

OBJECTIVE_PREFIX = "model."   # the engine wraps train.objective.Objective, whose SpeechLM is `.model`


def trained_state(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The trained (non-frozen) parameters of a ZeRO checkpoint, consolidated to fp32 on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=True)
    return {k.removeprefix(OBJECTIVE_PREFIX): v for k, v in state.items()}


def export(cfg: ModelConfig, ckpt_dir: Path, tag: str, out: Path) -> Path:
    """Rebuild the model on CPU in fp32, load the trained weights, merge LoRA, write ``out`` atomically."""
    model_cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, dtype="float32"),
                                    gradient_checkpointing=False)
    model = build_speech_lm(model_cfg, with_teacher=False)   # the export holds the student only
    missing_trained = model.load_state_dict(trained_state(ckpt_dir, tag), strict=False).unexpected_keys
    if missing_trained:
        raise KeyError(f"{ckpt_dir}/{tag}: checkpoint has parameters the model lacks: {missing_trained[:5]}")
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    tokenizer = load_tokenizer(cfg)
    hf = SpeechLMForCausalLM.from_speech_lm(model, cfg.encoder, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)   # mkdtemp's 0700 would keep the model from the other users of a shared run folder
    hf.save_pretrained(tmp)
    tokenizer.save_pretrained(str(tmp / LLM_DIR))   # llm/ stays a whole causal-LM folder
    hf.processor.save_pretrained(str(tmp))
    # the round's config (train writes it before training) names the data; without it, the model section alone
    write_model_card(tmp, round_dir=out.parent, fallback={"model": dataclasses.asdict(cfg)})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


EXPORT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}   # relative logit difference, engine vs export
CHECK_POSITIONS = 256   # positions whose logits the check compares: [positions, vocabulary] floats at most
CHECK_CHUNK = 32        # positions projected to the vocabulary at once


@torch.no_grad()
def sampled_logits(model, batch, positions: int = CHECK_POSITIONS) -> torch.Tensor:
    """float32 student logits at up to ``positions`` valid positions spread evenly over the batch, projected a
    chunk at a time (on the CPU): never [all positions, vocabulary] at once. Collective under ZeRO-3: every rank
    makes the same number of head calls, however many positions its batch has."""
    hidden, layout = model(batch)
    valid = hidden[layout.student_mask]
    pick = torch.linspace(0, len(valid) - 1, min(positions, len(valid)), device=valid.device).round().long()
    parts = valid[pick].tensor_split(-(-positions // CHECK_CHUNK))
    return torch.cat([model.student_head(part).float().cpu() for part in parts])


def check_export(engine_model, export_dir: Path, batch, cfg: TrainConfig, rank: int) -> dict:
    """Compare the exported model (reloaded on rank 0, in the engine's dtype) with the engine's on ``batch``.

    Returns the verdict every rank writes into ``DONE``; raises on every rank when the largest logit difference,
    relative to the largest logit, exceeds the tolerance. The round's final checkpoint stays, so a rerun exports
    and checks again without training; ``train.export_tolerance`` accepts a larger difference."""
    from model.build import load_export
    from train.objective import evaluating

    dtype = train_dtype(cfg)
    with evaluating(engine_model):
        reference = sampled_logits(engine_model, batch)
    verdict = None
    if rank == 0:
        exported, _ = load_export(export_dir, dtype=dtype)
        got = sampled_logits(exported.to(batch.unit_token.device), batch)
        del exported
        error = (got - reference).abs()
        worst = int(error.max(1).values.argmax())
        verdict = {"export_max_logit_diff": float(error.max() / reference.abs().max().clamp(min=1.0)),
                   "export_tolerance": cfg.export_tolerance or EXPORT_TOLERANCE[dtype], "export_dtype": dtype,
                   "export_positions": len(reference),
                   "worst_position": {"index": worst, "engine_top": reference[worst].topk(5).indices.tolist(),
                                      "export_top": got[worst].topk(5).indices.tolist()}}
    verdict = distributed.broadcast_object(verdict)
    if verdict["export_max_logit_diff"] > verdict["export_tolerance"]:
        raise RuntimeError(
            f"{export_dir}: the exported model's logits differ from the trained model's by "
            f"{verdict['export_max_logit_diff']:.3g} (relative to the largest logit; tolerance "
            f"{verdict['export_tolerance']:g} in {dtype}) over {verdict['export_positions']} positions; at the worst "
            f"one the top tokens are {verdict['worst_position']['engine_top']} (engine) vs "
            f"{verdict['worst_position']['export_top']} (export). Training is complete and its final checkpoint "
            f"kept: rerun to export and check again, or accept the export with train.export_tolerance=<larger>.")
    return verdict
