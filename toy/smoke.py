"""Assets of the smoke config, built on first use in about a minute, offline.

    python -m toy.smoke [--out assets/smoke]

- ``llm/``: a tiny Qwen2-style LM trained briefly on the sentences below, and their BPE tokenizer;
- ``speech/``: a few dozen sentences spoken by espeak-ng, as shards (``python -m shards.build --tts``);
- ``text/``: the same kind of sentences as text shards (the anti-forgetting mix);
- ``heldout/``: other sentences, spoken, for the diagnostics M and F;
- ``bench.jsonl``: a small multiple-choice benchmark in the eval schema (where did it happen?);
- ``pool.jsonl``: an unlabelled text pool for selection: the story sentences, arithmetic and colours.
Each part is built only when its folder is missing; each is written to a temporary name first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from eval.benchmarks import MCQItem, write_items
from shards.format import atomic_write_bytes
from toy.tiny import pretrain_lm, tiny_llm, train_tokenizer

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]
PLACES = ["paris", "rome", "the park", "the river", "the market", "the school"]
THINGS = ["a red ball", "two green apples", "a small dog", "the old book", "a blue cup", "seven stones"]
VERBS = ["found", "carried", "painted", "lost", "bought", "wanted"]


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return [f"{pick(NAMES)} {pick(VERBS)} {pick(THINGS)} near {pick(PLACES)}" for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], per_doc: int) -> None:
    with path.open("w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "doc": f"doc{i // per_doc:03d}"}) + "\n")


def build_shards(texts: list[str], out: Path, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "texts.jsonl"
        write_jsonl(src, texts, per_doc=4)
        staging = Path(tmp) / "shards"
        subprocess.run([sys.executable, "-m", "shards.build", "--input", str(src), "--out", str(staging),
                        "--format", "text", *extra], check=True)
        shutil.move(str(staging), str(out))


def build(out: Path, sample_rate: int = 16000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "llm").exists():
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            texts = sentences(400, seed=1)
            tokenizer = train_tokenizer(texts, tmp, vocab_size=400)
            model = tiny_llm(tokenizer, tmp)
            pretrain_lm(model, tokenizer, texts, steps=150)
            model.save_pretrained(tmp)
            shutil.copytree(tmp, out / "llm")
    if not (out / "speech").exists():
        build_shards(sentences(48, seed=2), out / "speech",
                     ["--tts", "espeak-ng", "--sr", str(sample_rate), "--workers", "2"])
    if not (out / "text").exists():
        build_shards(sentences(64, seed=3), out / "text", [])
    if not (out / "heldout").exists():
        build_shards(sentences(16, seed=4), out / "heldout", ["--tts", "espeak-ng", "--sr", str(sample_rate)])
    if not (out / "bench.jsonl").exists():
        write_items(out / "bench.jsonl", benchmark(12, seed=5))
    if not (out / "pool.jsonl").exists():
        pool = pool_texts(seed=6)
        atomic_write_bytes(out / "pool.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in pool).encode())


NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


def pool_texts(seed: int) -> list[str]:
    """Three kinds of text, unlabelled: stories (like the natural speech), arithmetic and colour facts."""
    rng = np.random.default_rng(seed)
    arithmetic = [f"{NUMBERS[a]} plus {NUMBERS[b]} makes {NUMBERS[a + b] if a + b < 10 else 'many'}"
                  for a, b in rng.integers(0, 10, size=(40, 2))]
    colours = [f"the {t.split()[-1]} of {n} is {c}" for n, c, t in
               zip(rng.choice(NAMES, 40), rng.choice(COLOURS, 40), rng.choice(THINGS, 40), strict=True)]
    return sentences(40, seed) + arithmetic + colours


def benchmark(n: int, seed: int) -> list[MCQItem]:
    """Items like "alice found a red ball near" -> one of four places (the teacher saw such sentences)."""
    items = []
    for i, text in enumerate(sentences(n, seed)):
        context, place = text.rsplit(" near ", 1)
        others = [p for p in PLACES if p != place][: 3]
        choices = [f" near {p}" for p in [place, *others]]
        answer = i % len(choices)
        choices[0], choices[answer] = choices[answer], choices[0]
        items.append(MCQItem(id=f"smoke-{i:03d}", task="smoke", context=context, choices=choices, answer=answer))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/smoke")
    build(Path(parser.parse_args().out))


if __name__ == "__main__":
    main()
