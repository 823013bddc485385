"""The trained speech LLM as a Hugging Face artifact: config, model, feature extractor and processor.

An export (``train.export``) is a folder that plain ``transformers`` loads, with the code saved beside the
weights (``trust_remote_code=True``; the repository need not be on the path)::

    config.json                  SpeechLMConfig: model_type salad_speech_lm, encoder, adapter, the LLM's config,
                                 auto_map (AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoFeatureExtractor)
    generation_config.json       the LLM's, with the tokenizer's EOS among the stop ids and a pad id
    llm/                         the LLM (LoRA merged) and its tokenizer: a plain causal LM folder
    encoder/                     the frozen encoder's folder (whisper, mimi, toy; absent for mel)
    speech.safetensors           adapter and boundary embeddings
    processor_config.json, tokenizer files     SpeechLMProcessor (feature extractor + tokenizer)
    modeling_salad.py, salad_*.py              this module and the project modules it imports (``write_code``)
    README.md                    the model card (``model.card``)

Why this shape: the LLM stays a standard folder (any tool that reads a causal LM reads ``llm/``), the model
code is the repository's own (SpeechLM, adapter, encoders), not a second copy to keep in step, and the
export's code is a snapshot of it taken at export time, so an export keeps working as the repository moves on.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchFeature,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    SequenceFeatureExtractor,
)
from transformers.configuration_utils import SubConfigSpec

from config import from_dict
from model.adapter import Adapter, AdapterConfig
from model.encoder import EncoderConfig, build_encoder
from model.inputs import SPEECH, TEXT, Document, Span
from model.speech_lm import AdapterOutput, SpeechLM
from shards.format import resample

MODEL_TYPE = "salad_speech_lm"
LLM_DIR, ENCODER_DIR, SPEECH_WEIGHTS = "llm", "encoder", "speech.safetensors"
LEGACY_CONFIG = "speech_config.json"   # exports written before config.json: {"encoder", "adapter"}
ENTRY = "modeling_salad"               # this module's name in an export
AUTO_MAP = {"AutoConfig": f"{ENTRY}.SpeechLMConfig", "AutoModelForCausalLM": f"{ENTRY}.SpeechLMForCausalLM",
            "AutoProcessor": f"{ENTRY}.SpeechLMProcessor", "AutoFeatureExtractor": f"{ENTRY}.SpeechLMFeatureExtractor"}
PROJECT_PACKAGES = ("model", "config", "shards")   # imported by the model code; copied into an export
NOT_EXPORTED = "not an exported SpeechLM directory (train that round first)"


class SpeechLMConfig(PreTrainedConfig):
    """What builds the speech LLM around its LLM folder: encoder and adapter configs (``model.encoder``,
    ``model.adapter`` dataclasses as dicts; the encoder path relative to the export), the LLM's own config
    (``text_config``, a copy of ``llm/config.json``) and the BOS id the prompt starts with (the tokenizer's, None
    for tokenizers without one, e.g. Qwen2.5)."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(AutoConfig, model_type="qwen2", optional=True)}
    encoder: dict | None = None
    adapter: dict | None = None
    text_config: dict | PreTrainedConfig | None = None
    bos_token_id: int | None = None


def read_config(folder: Path) -> SpeechLMConfig:
    """The export's config; an export written before config.json existed is read from speech_config.json and
    ``llm/``, so that runs exported by older code still evaluate."""
    if (folder / "config.json").is_file():
        return SpeechLMConfig.from_pretrained(str(folder))
    if (folder / LEGACY_CONFIG).is_file():
        legacy = json.loads((folder / LEGACY_CONFIG).read_text())
        return SpeechLMConfig(encoder=legacy["encoder"], adapter=legacy["adapter"],
                              text_config=AutoConfig.from_pretrained(str(folder / LLM_DIR)),
                              bos_token_id=AutoTokenizer.from_pretrained(str(folder / LLM_DIR)).bos_token_id)
    raise FileNotFoundError(f"{folder / 'config.json'}: {NOT_EXPORTED}")


def encoder_config(config: SpeechLMConfig, folder: Path | None = None) -> EncoderConfig:
    """The encoder's config, its path (relative in an export) resolved against ``folder``."""
    cfg = from_dict(EncoderConfig, config.encoder, "encoder")
    if cfg.path and folder is not None:
        cfg.path = str(folder / cfg.path)
    return cfg


class SpeechLMFeatureExtractor(SequenceFeatureExtractor):
    """Mono waves at any rate -> ``input_values`` [B, T] float32 at the encoder's rate, right-padded with zeros,
    and ``attention_mask`` [B, T] (1 on samples). The encoder computes its own features from the waves (mel,
    Whisper's log-mel, Mimi's latents), so this only resamples and pads."""

    model_input_names = ["input_values", "attention_mask"]

    def __init__(self, sampling_rate: int = 16_000, **kwargs: Any) -> None:
        fixed = {"feature_size": 1, "padding_value": 0.0, "return_attention_mask": True,
                 "auto_map": {"AutoFeatureExtractor": AUTO_MAP["AutoFeatureExtractor"]}}
        super().__init__(sampling_rate=sampling_rate, **(fixed | kwargs))

    def __call__(self, audio: np.ndarray | Tensor | list, sampling_rate: int,
                 return_tensors: str = "pt") -> BatchFeature:
        """``audio``: one 1-D wave or a list of them, all at ``sampling_rate`` (required: a wrong rate would be
        silently wrong)."""
        waves = [audio] if isinstance(audio, (np.ndarray, Tensor)) and audio.ndim == 1 else list(audio)
        out = []
        for i, wave in enumerate(waves):
            wave = np.asarray(wave.cpu() if isinstance(wave, Tensor) else wave, dtype=np.float32)
            if wave.ndim != 1 or wave.size == 0:
                raise ValueError(f"audio {i}: expected a non-empty 1-D mono wave, got shape {wave.shape}")
            if not np.isfinite(wave).all():
                raise ValueError(f"audio {i}: has NaN or Inf samples")
            out.append(resample(wave, int(sampling_rate), self.sampling_rate))
        return self.pad(BatchFeature({"input_values": out}), padding="longest", return_attention_mask=True,
                        return_tensors=return_tensors)


class SpeechLMProcessor(ProcessorMixin):
    """Audio and an optional text prompt (an instruction read before the audio) -> the model's inputs:
    ``input_values``, ``audio_attention_mask`` (the feature extractor's) and the prompt's ``input_ids`` and
    ``attention_mask``, left-padded, without special tokens (the model adds BOS itself, as in training)."""

    def __init__(self, feature_extractor: SpeechLMFeatureExtractor, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(feature_extractor, tokenizer, **kwargs)
        self.auto_map = {"AutoProcessor": AUTO_MAP["AutoProcessor"]}

    def __call__(self, audio: np.ndarray | Tensor | list, sampling_rate: int,
                 text: str | list[str] | None = None) -> BatchFeature:
        features = self.feature_extractor(audio, sampling_rate)
        rows = len(features["input_values"])
        prompts = [text or ""] * rows if text is None or isinstance(text, str) else list(text)
        if len(prompts) != rows:
            raise ValueError(f"{len(prompts)} prompts for {rows} audio inputs")
        ids = [self.tokenizer.encode(p, add_special_tokens=False) if p else [] for p in prompts]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], dtype=torch.long)
        return BatchFeature({"input_values": features["input_values"],
                             "audio_attention_mask": features["attention_mask"],
                             "input_ids": input_ids.reshape(rows, width), "attention_mask": mask.reshape(rows, width)})


class SpeechLMForCausalLM(PreTrainedModel, GenerationMixin):
    """The speech LLM (``model.speech_lm.SpeechLM``: frozen encoder -> adapter -> LLM) behind the Hugging Face
    interface. ``generate`` takes audio (and a prompt) and forwards every generation argument to the LLM's own
    ``generate`` on the prompt's embeddings, so greedy, sampling, beams, stopping criteria and streamers behave
    as for any causal LM. Loads and saves the export layout of this module's docstring."""

    config_class = SpeechLMConfig
    base_model_prefix = "speech_lm"
    _supports_sdpa = True

    def __init__(self, config: SpeechLMConfig, speech_lm: SpeechLM | None = None) -> None:
        if speech_lm is None:
            raise TypeError("SpeechLMForCausalLM is built from an export: use from_pretrained(folder)")
        super().__init__(config)
        self.speech_lm = speech_lm
        self.generation_config = speech_lm.llm.generation_config   # one object: what the LLM's generate reads

    @classmethod
    def from_speech_lm(cls, speech_lm: SpeechLM, encoder: EncoderConfig, tokenizer: Any) -> SpeechLMForCausalLM:
        """Wrap a trained SpeechLM (its LLM a plain causal LM: LoRA merged) with the config an export needs."""
        llm = speech_lm.llm
        config = SpeechLMConfig(encoder=dataclasses.asdict(encoder), adapter=dataclasses.asdict(speech_lm.adapter.cfg),
                                text_config=llm.config.to_dict(), bos_token_id=tokenizer.bos_token_id)
        generation = GenerationConfig.from_dict(llm.generation_config.to_dict())
        eos = generation.eos_token_id
        stops = [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id]
        generation.eos_token_id = sorted({int(i) for i in stops if i is not None})
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        llm.generation_config = generation
        model = cls(config, speech_lm)
        model._processor = SpeechLMProcessor(SpeechLMFeatureExtractor(speech_lm.encoder.sample_rate), tokenizer)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any,
                        config: SpeechLMConfig | None = None, dtype: str | torch.dtype | None = "auto",
                        device_map: Any = None, **kwargs: Any) -> SpeechLMForCausalLM:
        """A local export folder: the LLM in ``dtype`` (``auto``: as saved) with the adapter in the same, the encoder
        in its own; on ``device_map`` if given (one device: a name, ``auto`` for the GPU if any), in eval mode.
        Hub ids and the other from_pretrained options are not supported (the export is a folder on disk)."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: {NOT_EXPORTED}")
        config = config if config is not None else read_config(folder)
        llm_kwargs = {"attn_implementation": kwargs["attn_implementation"]} if "attn_implementation" in kwargs else {}
        llm = AutoModelForCausalLM.from_pretrained(str(folder / LLM_DIR), dtype=dtype, **llm_kwargs)
        encoder = build_encoder(encoder_config(config, folder))
        adapter = Adapter(from_dict(AdapterConfig, config.adapter, "adapter"), in_dim=encoder.dim,
                          out_dim=llm.get_input_embeddings().embedding_dim)
        speech_lm = SpeechLM(llm, encoder, adapter)
        weights = load_file(str(folder / SPEECH_WEIGHTS))
        speech_lm.adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in weights.items()
                                           if k != "boundary"})
        speech_lm.boundary.data.copy_(weights["boundary"])
        speech_lm.adapter.to(llm.dtype)
        speech_lm.boundary.data = speech_lm.boundary.data.to(llm.dtype)
        config.encoder = dataclasses.asdict(encoder_config(config, folder))   # the path this model reads from
        config.name_or_path = str(folder)
        if (folder / "generation_config.json").is_file():
            llm.generation_config = GenerationConfig.from_pretrained(str(folder))
        model = cls(config, speech_lm)
        if device_map is not None:
            if isinstance(device_map, dict):
                raise ValueError("device_map: one device only (a name such as 'cuda:0', or 'auto')")
            auto = "cuda" if torch.cuda.is_available() else "cpu"
            model.to(auto if device_map == "auto" else device_map)
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write the export layout (the module docstring), the code included; the processor and the model card
        are written by their own owners (``SpeechLMProcessor.save_pretrained``, ``model.card``)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(str(folder / LLM_DIR))
        config = self.config.to_diff_dict() | {"architectures": [type(self).__name__], "auto_map": AUTO_MAP}
        if config["encoder"].get("path"):
            source = Path(config["encoder"]["path"])
            if source.resolve() != (folder / ENCODER_DIR).resolve():
                shutil.copytree(source, folder / ENCODER_DIR, dirs_exist_ok=True)
            config["encoder"]["path"] = ENCODER_DIR
        config.pop("_name_or_path", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.generation_config.save_pretrained(str(folder))   # the LLM's (also in llm/): EOS, pad, defaults
        speech = {f"adapter.{k}": v.detach().contiguous() for k, v in self.speech_lm.adapter.state_dict().items()}
        save_file(speech | {"boundary": self.speech_lm.boundary.detach().contiguous()}, str(folder / SPEECH_WEIGHTS))
        write_code(folder)

    # ---- the LLM's interface ----------------------------------------------------------------------------
    @property
    def llm(self) -> PreTrainedModel:
        return self.speech_lm.llm

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.llm.get_input_embeddings()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.llm.get_output_embeddings()

    @property
    def sampling_rate(self) -> int:
        return self.speech_lm.encoder.sample_rate

    # ---- speech in ---------------------------------------------------------------------------------------
    def embed(self, input_values: Tensor, audio_attention_mask: Tensor | None = None, input_ids: Tensor | None = None,
              attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each row's ``[bos] prompt [begin] speech vectors [end]`` (training's layout, ``model.inputs``; no
        ``[end]`` when the adapter has ``end_marker: false``), left-padded: inputs_embeds [B, P, H] and
        attention_mask [B, P]. ``input_values`` [B, T] at the encoder's rate, right-padded as the processor
        gives them; ``input_ids`` the prompts, left-padded, without special tokens."""
        lm, device = self.speech_lm, self.speech_lm.boundary.device
        waves = input_values.to(device, torch.float32)
        lengths = (audio_attention_mask.sum(1) if audio_attention_mask is not None
                   else torch.full((len(waves),), waves.shape[1])).to(device, torch.long)
        for n in lengths.tolist():
            if lm.vectors_for(n) < 1:
                raise ValueError(f"audio of {n / self.sampling_rate:.3f} s is too short to give the encoder one frame")
        speech = lm.adapter_output(waves, lengths)
        rows = []
        for i, n in enumerate(lengths.tolist()):
            ids = [] if input_ids is None else input_ids[i][attention_mask[i].bool() if attention_mask is not None
                                                          else slice(None)].tolist()
            k = int(speech.lengths[i])
            one = AdapterOutput(speech.vectors[i:i + 1, :k], speech.lengths[i:i + 1], speech.blank_logits[i:i + 1, :k])
            doc = Document(([Span(TEXT, ids)] if ids else []) + [Span(SPEECH, [], waves[i, :n].cpu().numpy())])
            rows.append(lm.prompt_embeddings(doc, self.config.bos_token_id, one)[0])
        width = max(len(r) for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            embeds[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        return embeds, mask

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                input_values: Tensor | None = None, audio_attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, **kwargs: Any) -> Any:
        """The LLM's forward (logits, cache, loss with ``labels`` laid out like the inputs): with ``input_values``
        on the prompt-then-speech layout of ``embed``, else on ``input_ids`` or ``inputs_embeds`` as given."""
        if input_values is not None:
            inputs_embeds, attention_mask = self.embed(input_values, audio_attention_mask, input_ids, attention_mask)
            input_ids = None
        return self.llm(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)

    @torch.no_grad()
    def generate(self, input_values: Tensor | None = None, audio_attention_mask: Tensor | None = None,
                 input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                 audio: np.ndarray | Tensor | list | None = None, sampling_rate: int | None = None,
                 prompt: str | list[str] | None = None, **kwargs: Any) -> Any:
        """The tokens that continue each (prompt, audio) row: only the new ones, [B, N], padded with the pad id
        after a row's EOS (or what the LLM's ``generate`` returns for ``return_dict_in_generate``).

        Inputs: the processor's output (``model.generate(**processor(audio, sampling_rate, text=prompt))``) or
        raw ``audio`` (a 1-D wave or a list), its ``sampling_rate`` and ``prompt`` (a string or one per wave),
        which this model's processor turns into the same. Every other keyword goes to the LLM's ``generate``
        (max_new_tokens, do_sample, temperature, top_p, top_k, num_beams, repetition_penalty, streamer, ...), on
        top of ``generation_config.json`` (stop at the LLM's or the tokenizer's EOS)."""
        if audio is not None:
            if sampling_rate is None:
                raise ValueError("audio needs its sampling_rate")
            inputs = self.processor(audio, sampling_rate, text=prompt)
            input_values, audio_attention_mask = inputs["input_values"], inputs["audio_attention_mask"]
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if input_values is None:
            raise ValueError("generate needs audio: input_values (from the processor) or audio=...")
        embeds, mask = self.embed(input_values, audio_attention_mask, input_ids, attention_mask)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    @property
    def processor(self) -> SpeechLMProcessor:
        """Audio and prompts -> this model's inputs: the tokenizer it was wrapped with, or its folder's."""
        if getattr(self, "_processor", None) is None:
            # llm/'s copy of the tokenizer: the export's root has remote code, which would ask for trust again
            tokenizer = AutoTokenizer.from_pretrained(str(Path(self.config.name_or_path) / LLM_DIR))
            self._processor = SpeechLMProcessor(SpeechLMFeatureExtractor(self.sampling_rate), tokenizer)
        return self._processor


# ---- the export's code --------------------------------------------------------------------------------------
_PROJECT_IMPORT = re.compile(rf"^([ \t]*)from ((?:{'|'.join(PROJECT_PACKAGES)})(?:\.\w+)*) import ", re.MULTILINE)


def _flat_name(module: str) -> str:
    """``model.adapter`` -> ``salad_model_adapter``: the module's file name in an export (one flat folder, which
    is what transformers copies for remote code)."""
    return ENTRY if module == __name__ else "salad_" + module.replace(".", "_")


def code_files() -> dict[str, str]:
    """File name -> source of the code an export carries: this module as ``modeling_salad.py`` and every project
    module it imports, transitively, with ``from model.x import`` rewritten to ``from .salad_model_x import``.
    Loaded from an export already, this module's imports are relative, and its files are copied as they are."""
    todo, files = [(_flat_name(__name__), Path(__file__))], {}
    while todo:
        name, path = todo.pop()
        if f"{name}.py" in files:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] in PROJECT_PACKAGES for a in node.names):
                raise ValueError(f"{path}:{node.lineno}: write project imports as 'from package.module import name'")
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.level == 1:
                    todo.append((node.module, path.parent / f"{node.module}.py"))
                elif node.level == 0 and node.module.split(".")[0] in PROJECT_PACKAGES:
                    todo.append((_flat_name(node.module), Path(importlib.util.find_spec(node.module).origin)))
        files[f"{name}.py"] = _PROJECT_IMPORT.sub(lambda m: f"{m[1]}from .{_flat_name(m[2])} import ", text)
    return files


def write_code(folder: Path) -> list[Path]:
    """Write ``code_files`` into ``folder``; the files written."""
    out = []
    for name, text in sorted(code_files().items()):
        (folder / name).write_text(text)
        out.append(folder / name)
    return out
