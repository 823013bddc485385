"""The toy world's speech encoder: a small phonetic model standing where Mimi stands in the paper.

Why: a from-scratch adapter on raw log-mel learns "what kind of word comes next", not which word was spoken
(docs/toy.md). Real SALAD starts from a pretrained speech encoder whose features already
separate phones; this one is trained the same way, on speech alone and never on the LLM: espeak-ng speaks
the texts in several voices and speeds, and CTC teaches it the phonemes espeak-ng prints for them
(``espeak-ng -q -x``). Frozen, it is the encoder kind ``toy`` of ``model.encoder``; its frames (25 Hz) are the
Transformer's last hidden states, not the phoneme logits, so the adapter sees rich features.

Architecture: model.encoder's 80-dim log-mel at 16 kHz -> two stride-2 convolutions (4x subsampling) ->
sinusoidal positions -> a 3-layer pre-norm Transformer (d 144, 0.86M parameters) -> CTC head over the phonemes
plus blank (index 0). Training masks random mel bands and frame spans (SpecAugment): on voices never trained
on, phoneme error fell from 0.12 to 0.10 (en-gb-scotland) and from 0.08 to 0.05 (en-us-nyc) at 1000 steps.

Phoneme symbols: espeak-ng's own segmentation (``--sep=_``), so multi-character phonemes such as ``aU``,
``i@3`` or ``tS`` stay one symbol; stress and syllable marks (``' , % =``) are dropped (they are not
segments), as are pauses and word boundaries (no acoustic cue between words at normal speed). Targets are
the text as one reference voice (en-us) pronounces it, whoever speaks: accents spell the same word
differently (en-gb-scotland ``n,i@3r``, en-us ``n,i@3``; en-gb ``@`` where en-us has ``@2``), and labels that
follow the speaker taught the model accent-dependent spellings (phoneme error 0.18 on the held-out voice
instead of 0.12 with one reference). One label sequence per text also suits the adapter: the same word should
give the same features in every voice.

    python -m toy.speech_encoder --texts FILE --out DIR [--steps N] [--random-strings N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from model.toy_encoder import SAMPLE_RATE, ToyEncoderArch, ToySpeechNet, save_checkpoint
from shards.tts import TTSConfig, TTSError, make_tts, synthesize_many

TRAIN_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-us+f3", "en-gb+m3", "en-029", "en-us+f2"]
TRAIN_SPEEDS = [130, 160, 190]
HELDOUT_VOICE, HELDOUT_SPEED = "en-gb-scotland", 160
TARGET_VOICE = "en-us"  # whose pronunciation the targets follow, whoever speaks
_MARKS = "',%="  # stress and syllable marks espeak-ng prefixes to a phoneme
_SEGMENT = re.compile(r"[A-Za-z0-9@]")  # a token without one of these is a pause or a linking mark


# ---------------------------------------------------------------- phonemes


def _symbols(lines: list[str]) -> list[str]:
    tokens = (token.lstrip(_MARKS) for token in re.split(r"[\s_]+", " ".join(lines)))
    return [token for token in tokens if _SEGMENT.search(token)]


def _espeak_lines(texts: list[str], voice: str, timeout: float) -> list[str]:
    """espeak-ng's phoneme lines for ``texts`` given one per stdin line with blank lines between (no shell;
    stdin, so a text starting with '-' is never an option)."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise TTSError("espeak-ng phonemes: program 'espeak-ng' not found (install it: apt-get install espeak-ng)")
    argv = [program, "-q", "-x", "--sep=_", "-b", "1", "-v", voice]
    data = "\n\n".join(texts).encode("utf-8") + b"\n"
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TTSError(f"espeak-ng phonemes (voice {voice!r}): timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()[-300:] or "no message"
        raise TTSError(f"espeak-ng phonemes (voice {voice!r}): exit status {proc.returncode}: {message}")
    return proc.stdout.decode("utf-8", errors="replace").splitlines()


def phonemize_many(texts: list[str], voice: str = "en-us", timeout: float = 60.0) -> list[list[str]]:
    """Phoneme symbols of each text as ``voice`` pronounces it (``espeak-ng -q -x``), in input order.

    One espeak-ng process reads all texts, a blank line after each: espeak-ng answers each input line on its
    own (a clause per output line) and a blank line with a blank line, so the groups between blank output
    lines are the texts. Should a text itself print a blank line the count disagrees, and every text is then
    phonemized alone (same output, one process each).
    """
    spoken = [i for i, text in enumerate(texts) if any(c.isalnum() for c in text)]  # the rest has no phonemes
    lines = [" ".join(texts[i].split()) for i in spoken]
    out: list[list[str]] = [[] for _ in texts]
    if not lines:
        return out
    groups: list[list[str]] = [[]]
    for line in _espeak_lines(lines, voice, timeout + 0.05 * len(lines)):
        if line.strip():
            groups[-1].append(line)
        else:
            groups.append([])
    if len(groups) != len(lines):
        groups = [_espeak_lines([line], voice, timeout) for line in lines]
    for i, group in zip(spoken, groups, strict=True):
        out[i] = _symbols(group)
    return out


def phonemize(text: str, voice: str = "en-us") -> list[str]:
    """Phoneme symbols of one text (see ``phonemize_many``); deterministic."""
    return phonemize_many([text], voice)[0]


def phoneme_error_rate(references: list[list[str]], hypotheses: list[list[str]]) -> float:
    """Edit distance over symbols, summed, divided by the references' total length."""
    return float(jiwer.wer([" ".join(r) for r in references], [" ".join(h) for h in hypotheses]))


# ---------------------------------------------------------------- data


def random_word_strings(texts: list[str], n: int, seed: int, words: tuple[int, int] = (3, 9)) -> list[str]:
    """``n`` strings of random words from the texts' vocabulary, each word equally likely, so that the
    encoder hears every word (also those narrative texts rarely use)."""
    vocab = sorted({w for text in texts for w in re.findall(r"[\w']+", text.lower())})
    if not vocab:
        raise ValueError("random_word_strings: the texts contain no words")
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocab, k=rng.randint(*words))) for _ in range(n)]


def speak(texts: list[str], tts: TTSConfig, target_voice: str | None, workers: int, progress: Progress, label: str,
          chunk: int = 256) -> tuple[list[np.ndarray], list[list[str]], int]:
    """Speak text i with ``tts``'s combination i; its phonemes as ``target_voice`` pronounces the text (or,
    if None, the voice that speaks it).

    Returns audio, symbols and the number of texts dropped (synthesis failed or no phonemes).
    """
    voice_of = [target_voice or combo[0] for combo in make_tts(tts, SAMPLE_RATE).combos]
    voices = [voice_of[i % len(voice_of)] for i in range(len(texts))]
    symbols: list[list[str]] = [[] for _ in texts]
    by_voice = {v: [i for i in range(len(texts)) if voices[i] == v] for v in sorted(set(voices))}
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:  # threads wait on espeak-ng processes
        found = pool.map(lambda v: phonemize_many([texts[i] for i in by_voice[v]], v), by_voice)
        for v, result in zip(by_voice, found, strict=True):
            for i, s in zip(by_voice[v], result, strict=True):
                symbols[i] = s
    task = progress.add_task(label, total=len(texts), status="")
    audio: list[np.ndarray] = []
    kept: list[list[str]] = []
    for start in range(0, len(texts), chunk):
        ids = list(range(start, min(start + chunk, len(texts))))
        spoken = synthesize_many(tts, SAMPLE_RATE, [texts[i] for i in ids], ids, workers)
        for i, wave in zip(ids, spoken, strict=True):
            if isinstance(wave, np.ndarray) and symbols[i]:
                audio.append(wave)
                kept.append(symbols[i])
        progress.update(task, advance=len(ids), status=f"{sum(len(a) for a in audio) / SAMPLE_RATE / 3600:.2f} h")
    return audio, kept, len(texts) - len(audio)


def read_texts(path: str | Path) -> list[str]:
    """Texts from a .jsonl file (a "text" field per line) or a plain file (one text per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: texts file not found")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            texts.append(line.strip())
            continue
        try:
            text = json.loads(line).get("text")
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{number}: expected a JSON object with a string field 'text'")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


# ---------------------------------------------------------------- training


def _batches(audio: list[np.ndarray], batch: int) -> list[list[int]]:
    """Indices sorted by length, cut into batches: little padding per batch."""
    order = sorted(range(len(audio)), key=lambda i: len(audio[i]))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _collate(audio: list[np.ndarray], ids: list[int]) -> tuple[Tensor, Tensor]:
    lengths = torch.tensor([len(audio[i]) for i in ids])
    waves = torch.zeros(len(ids), int(lengths.max()))
    for row, i in enumerate(ids):
        waves[row, : len(audio[i])] = torch.from_numpy(audio[i])
    return waves, lengths


def _ctc_fits(frames: int, ids: list[int]) -> bool:
    """CTC needs a frame per symbol plus a blank between repeated symbols."""
    return frames >= len(ids) + sum(a == b for a, b in zip(ids, ids[1:], strict=False))


@torch.no_grad()
def evaluate(model: ToySpeechNet, audio: list[np.ndarray], symbols: list[list[str]], batch: int = 32) -> float:
    """Phoneme error rate of greedy CTC decoding."""
    training = model.training
    model.eval()
    hypotheses: list[list[str]] = [[] for _ in audio]
    for ids in _batches(audio, batch):
        for i, hypothesis in zip(ids, model.decode(*_collate(audio, ids)), strict=True):
            hypotheses[i] = hypothesis
    model.train(training)
    return phoneme_error_rate(symbols, hypotheses)


def progress_bar(enabled: bool) -> Progress:
    """Bars for speech synthesis and training; each task shows a ``status`` field (hours, loss, PER)."""
    return Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=not enabled)


def pretrain_encoder(texts: list[str], out_dir: str | Path, steps: int = 1000, voices: list[str] | None = None,
                     speeds: list[int] | None = None, target_voice: str | None = TARGET_VOICE,
                     heldout_voice: str = HELDOUT_VOICE, heldout: int = 200, batch: int = 32, lr: float = 2e-3,
                     eval_every: int = 250, arch: ToyEncoderArch | None = None, seed: int = 0, workers: int = 2,
                     show_progress: bool = True) -> tuple[ToySpeechNet, dict]:
    """Train the encoder with CTC on espeak-ng phonemes of ``texts`` spoken in ``voices`` x ``speeds``.

    Targets are the phonemes of the text as ``target_voice`` pronounces it, whoever speaks (None: as the
    speaking voice does): one label sequence per text, so features that map every voice to it are rewarded.
    ``heldout`` texts (drawn at random, never trained on) are spoken by ``heldout_voice`` to measure the phoneme
    error rate every ``eval_every`` steps. Saves encoder.safetensors + encoder.json in ``out_dir`` and returns
    the model (eval mode) and the metrics written into encoder.json.
    """
    texts = list(dict.fromkeys(t for t in texts if t.strip()))  # a repeated text must not be both train and test
    if steps <= 0 or batch <= 0 or eval_every <= 0:
        raise ValueError(f"steps, batch and eval_every must be positive, got {steps}, {batch}, {eval_every}")
    if not 0 <= heldout < len(texts):
        raise ValueError(f"heldout must lie in [0, {len(texts)}) for {len(texts)} texts, got {heldout}")
    torch.set_num_threads(1)  # the synthesis workers take the other core
    torch.manual_seed(seed)
    rng = random.Random(seed)
    order = rng.sample(range(len(texts)), len(texts))
    train_tts = TTSConfig(voices=voices or TRAIN_VOICES, speeds=speeds or TRAIN_SPEEDS)
    test_tts = TTSConfig(voices=[heldout_voice], speeds=[HELDOUT_SPEED])
    with progress_bar(show_progress) as bar:
        started = time.perf_counter()
        audio, symbols, dropped = speak([texts[i] for i in order[heldout:]], train_tts, target_voice, workers, bar,
                                        "speech")
        test_audio, test_symbols, _ = speak([texts[i] for i in order[:heldout]], test_tts, target_voice, workers, bar,
                                            "held-out")
        speech_seconds = time.perf_counter() - started
        inventory = sorted({s for syms in symbols for s in syms})
        model = ToySpeechNet(arch or ToyEncoderArch(), inventory)
        index = {s: k + 1 for k, s in enumerate(inventory)}
        targets = [[index[s] for s in syms] for syms in symbols]
        frames = model.frame_lengths(torch.tensor([len(a) for a in audio])).tolist()
        keep = [i for i in range(len(audio)) if _ctc_fits(frames[i], targets[i])]
        dropped += len(audio) - len(keep)
        audio, targets = [audio[i] for i in keep], [targets[i] for i in keep]
        if not audio:
            raise ValueError("pretrain_encoder: no utterance left to train on (synthesis failed or too fast)")
        batches = _batches(audio, batch)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        warmup = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * s / steps)))
        ctc = nn.CTCLoss(blank=0, zero_infinity=True)
        task = bar.add_task("encoder", total=steps, status="")
        started, queue, window, losses, pers = time.perf_counter(), [], [], [], []
        model.train()
        for step in range(1, steps + 1):
            queue = queue or rng.sample(batches, len(batches))
            ids = queue.pop()
            logits, n = model(*_collate(audio, ids))
            wanted = [targets[i] for i in ids]
            loss = ctc(logits.float().log_softmax(-1).transpose(0, 1), torch.tensor([t for ts in wanted for t in ts]),
                       n, torch.tensor([len(ts) for ts in wanted]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            window.append(loss.item())
            if step % eval_every == 0 or step == steps:
                losses.append({"step": step, "loss": round(sum(window) / len(window), 4)})
                window = []
                if test_audio:
                    pers.append({"step": step, "per": round(evaluate(model, test_audio, test_symbols, batch), 4)})
            status = f"loss {loss.item():.3f}" + (f"  PER {pers[-1]['per']:.3f} @ {pers[-1]['step']}" if pers else "")
            bar.update(task, advance=1, status=status)
        train_seconds = time.perf_counter() - started
    unseen = sum(s not in index for syms in test_symbols for s in syms)
    metrics = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "voices": train_tts.voices,
               "speeds": train_tts.speeds, "target_voice": target_voice, "train_utterances": len(audio),
               "dropped_utterances": dropped,
               "train_hours": round(sum(len(a) for a in audio) / SAMPLE_RATE / 3600, 3),
               "speech_seconds": round(speech_seconds, 1), "train_seconds": round(train_seconds, 1),
               "loss": losses, "heldout_voice": heldout_voice, "heldout_utterances": len(test_audio),
               "heldout_unseen_symbols": round(unseen / max(1, sum(map(len, test_symbols))), 4),
               "per": pers[-1]["per"] if pers else None, "per_history": pers}
    model.eval()
    save_checkpoint(model, out_dir, metrics)
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", required=True, help=".jsonl with a 'text' field per line, or one text per line")
    parser.add_argument("--out", required=True, help="folder for encoder.safetensors and encoder.json")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--random-strings", type=int, default=0,
                        help="add this many random word strings over the texts' vocabulary")
    parser.add_argument("--heldout", type=int, default=200, help="texts spoken by the held-out voice only")
    parser.add_argument("--target-voice", default=TARGET_VOICE,
                        help="voice whose pronunciation the targets follow; 'speaker': the voice that speaks")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    texts = read_texts(args.texts)
    texts += random_word_strings(texts, args.random_strings, args.seed) if args.random_strings else []
    target_voice = None if args.target_voice == "speaker" else args.target_voice
    _, metrics = pretrain_encoder(texts, args.out, steps=args.steps, target_voice=target_voice, heldout=args.heldout,
                                  batch=args.batch, eval_every=args.eval_every, seed=args.seed)
    print(f"{args.out}: {metrics['train_utterances']} utterances ({metrics['train_hours']} h), "
          f"{metrics['steps']} steps in {metrics['train_seconds']} s, phoneme error rate {metrics['per']} "
          f"on {metrics['heldout_voice']}", file=sys.stderr)


if __name__ == "__main__":
    main()
