"""Continue spoken input with an exported SpeechLM: greedy (default) or sampled decoding with a KV cache.

    python -m model.infer --model runs/<name>/round-R/export --audio FILE.wav [--prompt TEXT]
        [--max-new-tokens N] [--sample --temperature T --top-p P --seed S] [--device D] [--dtype D]

The LLM reads ``[bos] prompt [begin] speech vectors [end]``: the optional text prompt first, like an
instruction, then the audio as one speech span, as in training; it prints the text that follows, stopping
at EOS or after N tokens. The export directory (``train.export``) loads with plain torch + transformers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from model.build import DTYPES, load_export
from model.inputs import SPEECH, TEXT, Document, Span
from model.speech_lm import LM, SpeechLM


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


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return wave
    return torchaudio.functional.resample(torch.from_numpy(wave), rate, target).numpy()


def load(model_dir: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[SpeechLM, object]:
    """The exported model in eval mode on ``device``, LLM and adapter in ``dtype`` (the encoder keeps its own),
    and its tokenizer."""
    model, tokenizer = load_export(model_dir)
    model.llm.to(DTYPES[dtype])
    model.adapter.to(DTYPES[dtype])
    model.boundary.data = model.boundary.data.to(DTYPES[dtype])
    return model.to(device).eval(), tokenizer


def prompt_embeddings(model: SpeechLM, tokenizer, wave: np.ndarray, prompt: str = "") -> torch.Tensor:
    """[1, P, H]: ``[bos] prompt [begin] vectors [end]``, built by training's packing (``model.inputs``).
    ``wave`` is float32 mono at the encoder's sample rate."""
    if model.vectors_for(len(wave)) < 1:
        seconds = len(wave) / model.encoder.sample_rate
        raise ValueError(f"audio of {seconds:.3f} s is too short to give the encoder one frame")
    ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    spans = [Span(TEXT, ids)] if ids else []
    doc = Document(spans + [Span(SPEECH, [], np.ascontiguousarray(wave, dtype=np.float32))])
    return model.prompt_embeddings(doc, tokenizer.bos_token_id)


def stop_ids(model: SpeechLM, tokenizer) -> set[int]:
    """The tokenizer's EOS and the LLM's generation-config EOS ids (an int or a list)."""
    config = getattr(model.llm.generation_config, "eos_token_id", None)
    ids = set(config if isinstance(config, list) else [config]) | {tokenizer.eos_token_id}
    return {int(i) for i in ids if i is not None}


def next_token(logits: torch.Tensor, sample: bool, temperature: float, top_p: float,
               generator: torch.Generator) -> int:
    """Argmax of ``logits`` [V], or a draw from the smallest set of tokens whose probability at ``temperature``
    reaches ``top_p`` (nucleus sampling; the most likely token is always in it)."""
    if not sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
    sorted_probs = torch.where(keep, sorted_probs, 0.0)
    return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])


@torch.no_grad()
def generate_ids(model: SpeechLM, prefix: torch.Tensor, max_new_tokens: int, stop: set[int],
                 sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    """Tokens after ``prefix`` [1, P, H] until a ``stop`` id (not returned) or ``max_new_tokens``: the prefix
    runs once, then one position per step against the KV cache."""
    lm = LM.of(model.llm)
    generator = torch.Generator().manual_seed(seed)
    out = lm.decoder(inputs_embeds=prefix, use_cache=True)
    ids: list[int] = []
    while len(ids) < max_new_tokens:
        token = next_token(lm.head(out.last_hidden_state[0, -1]), sample, temperature, top_p, generator)
        if token in stop:
            break
        ids.append(token)
        step = lm.embed(torch.tensor([[token]], device=prefix.device))
        out = lm.decoder(inputs_embeds=step, cache=out.cache, use_cache=True)
    return ids


def generate(model: SpeechLM, tokenizer, wave: np.ndarray, prompt: str = "", max_new_tokens: int = 64,
             sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> str:
    """The text continuing ``prompt`` + the speech ``wave`` (float32 mono at the encoder's rate)."""
    prefix = prompt_embeddings(model, tokenizer, wave, prompt)
    ids = generate_ids(model, prefix, max_new_tokens, stop_ids(model, tokenizer), sample, temperature, top_p, seed)
    return tokenizer.decode(ids, skip_special_tokens=True)


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m model.infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export directory (runs/<name>/round-R/export)")
    parser.add_argument("--audio", required=True, help="sound file (wav, flac, ...), any rate, mixed to mono")
    parser.add_argument("--prompt", default="", help="text read before the audio, like an instruction")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (or at EOS)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, with --sample")
    parser.add_argument("--seed", type=int, default=0, help="with --sample: the same seed, the same text")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the LLM and adapter")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return parser, args


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    try:
        wave, rate = read_audio(args.audio)      # before the (slow) model load: a bad file fails at once
        model, tokenizer = load(args.model, args.device, args.dtype)
        wave = resample(wave, rate, model.encoder.sample_rate)
        text = generate(model, tokenizer, wave, args.prompt, args.max_new_tokens, args.sample,
                        args.temperature, args.top_p, args.seed)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
