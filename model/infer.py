"""Continue spoken input with an exported speech LLM: greedy (default) or sampled decoding, one file or a batch.

    python -m model.infer --model runs/<name>/round-R/export --audio FILE.wav [FILE.wav ...] [--prompt TEXT]
        [--max-new-tokens N] [--sample --temperature T --top-p P --seed S] [--batch-size B] [--device D] [--dtype D]

The LLM reads ``[bos] prompt [begin] speech vectors [end]``: the optional text prompt first, like an
instruction, then the audio as one speech span, as in training; it prints the text that follows, stopping
at EOS or after N tokens, one line per file in the order given. The export loads as a Hugging Face model
(``model.hf.SpeechLMForCausalLM``, what ``AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)``
gives) and decodes with its ``generate``: the export's generation_config.json applies to what these flags do
not set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from model.build import DTYPES
from model.hf import SpeechLMForCausalLM, SpeechLMProcessor
from shards.format import resample


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A sound file as float32 mono (channels averaged) and its sample rate; a clear error if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise ValueError(f"{path}: unreadable audio ({exc})") from None
    if audio.size == 0:
        raise ValueError(f"{path}: empty audio (no samples)")
    mono = audio.mean(axis=1)
    if not np.isfinite(mono).all():
        raise ValueError(f"{path}: audio has NaN or Inf samples")
    return mono, rate


def load(model_dir: str | Path, device: str = "cpu",
         dtype: str = "float32") -> tuple[SpeechLMForCausalLM, SpeechLMProcessor]:
    """The exported model in eval mode on ``device``, LLM and adapter in ``dtype`` (the encoder keeps its own),
    and its processor."""
    model = SpeechLMForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], device_map=device)
    return model, model.processor


def generate_ids(model: SpeechLMForCausalLM, processor: SpeechLMProcessor, waves: list[np.ndarray], prompt: str = "",
                 max_new_tokens: int = 64, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0) -> list[list[int]]:
    """The tokens continuing ``prompt`` + each wave (float32 mono at the encoder's rate), up to the first EOS.
    Sampling draws from the tokens whose probability at ``temperature`` reaches ``top_p`` (no top-k cut),
    seeded: the same seed and batch give the same tokens."""
    inputs = processor(waves, model.sampling_rate, text=prompt)
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample \
        else {"do_sample": False}
    torch.manual_seed(seed)
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, **options).cpu()
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])   # a finished row: its EOS, then padding
    return [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in ids.tolist()]


def generate(model: SpeechLMForCausalLM, processor: SpeechLMProcessor, waves: list[np.ndarray], prompt: str = "",
             max_new_tokens: int = 64, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0) -> list[str]:
    """The text continuing ``prompt`` + each wave (float32 mono at the encoder's rate)."""
    ids = generate_ids(model, processor, waves, prompt, max_new_tokens, sample, temperature, top_p, seed)
    return processor.batch_decode(ids, skip_special_tokens=True)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m model.infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export directory (runs/<name>/round-R/export)")
    parser.add_argument("--audio", required=True, nargs="+",
                        help="sound files (wav, flac, ...), any rate, mixed to mono; one output line each")
    parser.add_argument("--prompt", default="", help="text read before the audio, like an instruction")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (or at EOS)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, with --sample")
    parser.add_argument("--seed", type=int, default=0, help="with --sample: the same seed, the same text")
    parser.add_argument("--batch-size", type=int, default=8, help="files decoded together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the LLM and adapter")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return parser, args


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    try:
        audio = [read_audio(path) for path in args.audio]   # before the (slow) model load: a bad file fails at once
        model, processor = load(args.model, args.device, args.dtype)
        waves = [resample(wave, rate, model.sampling_rate) for wave, rate in audio]
        texts = [text for i in range(0, len(waves), args.batch_size)
                 for text in generate(model, processor, waves[i:i + args.batch_size], args.prompt,
                                      args.max_new_tokens, args.sample, args.temperature, args.top_p, args.seed)]
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    sys.stdout.write("".join(text + "\n" for text in texts))


if __name__ == "__main__":
    main()
