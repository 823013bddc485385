"""Assets of the toy default (configs/toy.yaml), built on first use, offline, and reused afterwards.

    python -m toy.build [--out assets/toy] [--world-seed 0] [--size full|reduced] [--workers 2] [--tokenizer bpe]
                        [--set KEY=VALUE ...]   (a ``Sizes`` field, e.g. encoder_steps=1500; another --out keeps
                                                 the default's assets, which ./run.sh rebuilds to its sizes)

Parts, each built when missing or stale (other sizes or world seed, or an older builder: ``assets.json`` keeps
the stamp of every part), and written under a temporary name first (a killed build resumes):

- ``llm/``        the teacher: a word-level (or BPE) tokenizer + ~1M-parameter Llama trained on every domain's text
                  (toy.teacher), with ``accuracy.json``: its text accuracy on every benchmark (trained on in
                  top-ups while below ``teacher_target``: CPUs' float kernels differ);
- ``encoder/``    the frozen toy speech encoder: CTC on espeak-ng phonemes of narrative sentences and random
                  strings over the whole vocabulary (toy.speech_encoder), never the LLM;
- ``speech/``     the natural speech, audiobook-like (toy.coverage.NATURAL_SHARES): mostly stories, knowledge
                  domains graded from rare to very rare, cut into pieces of about a sentence (cut_pieces),
                  several voices/speeds;
- ``text/``       text-only shards of every domain (the anti-forgetting mix);
- ``heldout/``    spoken documents of every domain in voices no training data uses (the diagnostics M and F);
- ``pool.jsonl``  the selection pool, web-like (toy.coverage.POOL_SHARES: 60% story domains): texts of every
                  domain, unlabelled for selection (a ``domain`` field is kept for the analysis only; selection
                  reads ``text``);
- ``bench/``      one multiple-choice benchmark per domain (eval schema), held out from every text above.

Why natural speech is mostly stories: like audiobooks in the paper, it speaks most words but rarely the
knowledge registers, so the student's gap is largest on the knowledge domains and selection has something to
find (toy.coverage says what each part mirrors).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing as mp
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from config import ConfigError, apply_overrides, from_dict, require
from toy.coverage import natural_documents, pool_texts, write_coverage
from toy.world import DOMAINS, World, vocabulary

# torch, webdataset and espeak helpers are imported by the builders that need them: ./run.sh runs this module
# before every training job, and when nothing is stale it should cost a second, not the 10 s of those imports.

UNSEEN_VOICES = ["en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc"]   # eval and held-out only
NATURAL = "narrative"


@dataclass(frozen=True)
class Sizes:
    """How much of everything to build; ``reduced`` is the few-minute version the tests use."""

    teacher_steps: int = 600       # min text accuracy over the domains 0.958 here (toy.teacher.WEIGHTS)
    teacher_target: float = 0.95   # min text accuracy; below it training goes on (toy.teacher.train_teacher)
    teacher_top_ups: int = 4       # at most this many top-ups of 150 steps
    teacher_layers: int = 4
    teacher_hidden: int = 128
    encoder_steps: int = 500       # held-out-voice phoneme error 0.26 (1000 steps: 0.226, at twice the time)
    encoder_sentences: int = 1100
    encoder_random_strings: int = 2900
    natural_docs: int = 1600       # natural speech documents (a story or a paragraph of statements, about 15 s)
    text_per_domain: int = 200     # text shards
    heldout_per_domain: int = 8    # spoken held-out texts per domain, 4 per document
    pool_texts: int = 4400
    bench_items: int = 200         # per domain (all a knowledge domain has when fewer)
    tokenizer: str = "word"        # the teacher's: word (one token per word) or bpe (toy.teacher.bpe_tokenizer)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            require(not isinstance(value, int | float) or value >= 0, f.name, f"must be >= 0, got {value}")


SIZES = {"full": Sizes(),
         "reduced": Sizes(teacher_steps=800, teacher_target=0.9, teacher_layers=2, teacher_hidden=96, encoder_steps=300,
                          encoder_sentences=300, encoder_random_strings=500, natural_docs=60,
                          text_per_domain=24, heldout_per_domain=4, pool_texts=440, bench_items=40)}


def _docs(texts: list[str], prefix: str, per_doc: int) -> list[tuple[str, str]]:
    return [(f"{prefix}-{i // per_doc:05d}", t) for i, t in enumerate(texts)]


def _domain_rng(seed: int, part: str, domain: str) -> np.random.Generator:
    """Independent streams per part and domain, so that changing one size never changes another part."""
    return np.random.default_rng([seed, sum(map(ord, part)), DOMAINS.index(domain)])


def build_teacher(world: World, out: Path, sizes: Sizes, workers: int) -> None:
    from shards.format import atomic_write_json
    from toy.teacher import domain_accuracy, train_teacher

    tmp = out.with_name(out.name + ".train")
    shutil.rmtree(tmp, ignore_errors=True)

    def check(model, tokenizer) -> dict[str, float]:
        return domain_accuracy(world, model, tokenizer, sizes.bench_items, shots=0, seed=0)

    model, tokenizer, info = train_teacher(world, tmp, sizes.teacher_steps, hidden=sizes.teacher_hidden,
                                           layers=sizes.teacher_layers, tokenizer=sizes.tokenizer, check=check,
                                           target=sizes.teacher_target, max_top_ups=sizes.teacher_top_ups)
    accuracy = info["accuracy"]
    atomic_write_json(tmp / "accuracy.json", {"shots": 0, "items": sizes.bench_items, "accuracy": accuracy,
                                               "target": sizes.teacher_target, "top_ups": info["top_ups"],
                                               "checks": info["checks"], "train_seconds": info["wall_s"]})
    if min(accuracy.values()) < sizes.teacher_target:
        print(f"teacher: WARNING: below its text target {sizes.teacher_target} after {info['top_ups']} top-ups: "
              + ", ".join(f"{d} {a:.3f}" for d, a in accuracy.items() if a < sizes.teacher_target), file=sys.stderr)
    tmp.rename(out)
    print(f"teacher: {info['params']:,} params, {info['wall_s']:.0f} s; text accuracy "
          + ", ".join(f"{d} {a:.2f}" for d, a in accuracy.items()), file=sys.stderr)


def build_encoder(world: World, out: Path, sizes: Sizes, workers: int) -> None:
    from shards.build import sentences
    from toy.speech_encoder import pretrain_encoder, random_word_strings

    rng = _domain_rng(world.seed, "encoder", NATURAL)
    pool = [s for story in world.texts(NATURAL, sizes.encoder_sentences, rng) for s in sentences(story)]
    texts = list(dict.fromkeys(pool))[: sizes.encoder_sentences]
    texts += random_word_strings([" ".join(vocabulary())], sizes.encoder_random_strings, seed=world.seed)
    tmp = out.with_name(out.name + ".train")
    shutil.rmtree(tmp, ignore_errors=True)
    _, metrics = pretrain_encoder(texts, tmp, steps=sizes.encoder_steps, heldout=min(200, len(texts) // 10),
                                  eval_every=max(1, sizes.encoder_steps // 4), workers=workers)
    tmp.rename(out)
    print(f"encoder: phoneme error {metrics['per']} on {metrics['heldout_voice']} after {metrics['steps']} steps",
          file=sys.stderr)


def build_speech(world: World, out: Path, sizes: Sizes, workers: int) -> None:
    from model.toy_encoder import SAMPLE_RATE
    from shards.build import build_texts, cut_pieces
    from shards.tts import TTSConfig
    from toy.speech_encoder import TRAIN_SPEEDS, TRAIN_VOICES

    rng = _domain_rng(world.seed, "speech", NATURAL)
    texts = natural_documents(world, sizes.natural_docs, lambda d: _domain_rng(world.seed, "speech", d))
    docs = [(doc, s) for doc, text in texts for s in cut_pieces(text, rng)]
    build_texts(docs, out, TTSConfig(voices=TRAIN_VOICES, speeds=TRAIN_SPEEDS), SAMPLE_RATE, workers,
                source="toy-natural")
    write_coverage(out / "coverage.json", sizes.natural_docs)


def build_text(world: World, out: Path, sizes: Sizes, workers: int) -> None:
    from model.toy_encoder import SAMPLE_RATE
    from shards.build import build_texts

    docs = [doc for d in DOMAINS
            for doc in _docs(world.texts(d, sizes.text_per_domain, _domain_rng(world.seed, "text", d)), d, 8)]
    order = np.random.default_rng([world.seed, len(docs)]).permutation(len(docs))   # read in order: mix domains
    build_texts([docs[i] for i in order], out, None, SAMPLE_RATE, source="toy-text")


def build_heldout(world: World, out: Path, sizes: Sizes, workers: int) -> None:
    from model.toy_encoder import SAMPLE_RATE
    from shards.build import build_texts, cut_pieces
    from shards.tts import TTSConfig

    docs = []
    for d in DOMAINS:
        rng = _domain_rng(world.seed, "heldout", d)
        texts = world.texts(d, sizes.heldout_per_domain, rng)
        docs += [(f"{d}-{i // 4:05d}", s) for i, text in enumerate(texts) for s in cut_pieces(text, rng)]
    build_texts(docs, out, TTSConfig(voices=UNSEEN_VOICES), SAMPLE_RATE, workers, source="toy-heldout")


def build_pool(world: World, out: Path, sizes: Sizes, workers: int) -> None:
    from shards.format import atomic_write_bytes

    texts = pool_texts(world, sizes.pool_texts, lambda d: _domain_rng(world.seed, "pool", d))
    lines = [json.dumps({"text": t, "domain": d}) + "\n" for d, t in texts]
    order = np.random.default_rng(world.seed).permutation(len(lines))   # unlabelled: no domain order either
    atomic_write_bytes(out, "".join(lines[i] for i in order).encode())


def build_bench(world: World, out: Path, sizes: Sizes, workers: int) -> None:
    from shards.format import atomic_write_json

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = world.write_benchmarks(tmp, sizes.bench_items, seed=world.seed)
    atomic_write_json(tmp / "counts.json", counts)
    tmp.rename(out)


def sizes_with(size: str, settings: list[str]) -> Sizes:
    """The named size with ``KEY=VALUE`` settings of its fields (``--set encoder_steps=1500``), read and checked
    as config overrides are: a lever is measured on assets built into another folder, without editing the code."""
    return from_dict(Sizes, apply_overrides(asdict(SIZES[size]), settings))


def build(out: Path, world_seed: int = 0, sizes: Sizes = SIZES["full"], workers: int = 2) -> None:
    """Build every missing or stale part of the toy assets into ``out`` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    with build_lock(out):
        _build_locked(out, world_seed, sizes, workers)


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One builder at a time per asset folder: two ``./run.sh`` started together on a fresh clone would both train
    the teacher and the second rename would fail. The second waits, then finds the parts built."""
    with (out / ".build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"toy assets: waiting for another build of {out}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_locked(out: Path, world_seed: int, sizes: Sizes, workers: int) -> None:
    stamps = read_stamps(out)
    todo = stale_parts(out, stamps, world_seed, sizes)
    if not todo:
        return
    from shards.format import atomic_write_json

    for name in todo:
        part = out / name
        if part.exists():
            print(f"toy assets: {part} was built with other settings or code; rebuilding it", file=sys.stderr)
            if part.is_dir():
                shutil.rmtree(part)
            else:
                part.unlink()
        stamps.pop(name, None)
    atomic_write_json(out / STAMPS, {"parts": stamps})

    def done(name: str) -> None:
        stamps[name] = part_stamp(name, world_seed, sizes)
        atomic_write_json(out / STAMPS, {"parts": stamps})

    # The teacher is the longest part (single-threaded training): it gets its own process from the start, and
    # the other parts are built beside it, one after another (their speech synthesis uses ``workers`` processes).
    # Each part is stamped as soon as it is built, so a failure elsewhere does not make it stale.
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        teacher = pool.submit(_build_part, "llm", out, world_seed, sizes, workers) if "llm" in todo else None
        try:
            for name in [n for n in (*MODEL_PARTS, *DATA_PARTS) if n in todo and n != "llm"]:
                _build_part(name, out, world_seed, sizes, workers)
                done(name)
        finally:
            if teacher is not None and teacher.exception() is None:
                done("llm")
    if teacher is not None:
        teacher.result()   # raise its failure, after every other part is stamped


DATA_PARTS = {"bench": build_bench, "pool.jsonl": build_pool, "text": build_text, "speech": build_speech,
              "heldout": build_heldout}
MODEL_PARTS = {"encoder": build_encoder, "llm": build_teacher}
# What each part is made from: the sizes it reads, and a version raised whenever its builder changes what it makes
# (so that assets built by older code are rebuilt, and only those).
PART_SIZES = {"bench": ("bench_items",), "pool.jsonl": ("pool_texts",), "text": ("text_per_domain",),
              "speech": ("natural_docs",), "heldout": ("heldout_per_domain",),
              "encoder": ("encoder_steps", "encoder_sentences", "encoder_random_strings"),
              "llm": ("teacher_steps", "teacher_target", "teacher_top_ups", "teacher_layers", "teacher_hidden",
                      "bench_items", "tokenizer")}
PART_VERSIONS = {"bench": 1, "pool.jsonl": 2, "text": 2, "speech": 4, "heldout": 2, "encoder": 1, "llm": 3}
STAMPS = "assets.json"


def part_stamp(name: str, world_seed: int, sizes: Sizes) -> dict:
    return {"world_seed": world_seed, "version": PART_VERSIONS[name],
            **{k: getattr(sizes, k) for k in PART_SIZES[name]}}


def read_stamps(out: Path) -> dict[str, dict]:
    """Part -> the stamp it was built with. A stamp file of the first format (one stamp for all parts) stands for
    version 1 of every part."""
    path = out / STAMPS
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if "parts" in data:
        return data["parts"]
    old = Sizes(**data["sizes"]) if set(data.get("sizes", {})) == set(asdict(Sizes())) else None
    return {name: {**part_stamp(name, data.get("world_seed"), old), "version": 1} for name in PART_SIZES} if old else {}


def stale_parts(out: Path, stamps: dict[str, dict], world_seed: int, sizes: Sizes) -> list[str]:
    """Parts to build: missing, or built with other settings or an older builder (a part without a stamp was
    left by an interrupted build or built by hand: rebuilt too). A setting added after a part was built stands
    at its default in the part's stamp: the part was built that way."""
    defaults = {f.name: f.default for f in fields(Sizes)}
    return [name for name in PART_SIZES if not (out / name).exists() or name not in stamps
            or {**defaults, **stamps[name]} != {**defaults, **part_stamp(name, world_seed, sizes)}]


def _build_part(name: str, out: Path, world_seed: int, sizes: Sizes, workers: int) -> None:
    import torch

    torch.set_num_threads(1)
    print(f"toy assets: building {out / name}", file=sys.stderr)
    {**DATA_PARTS, **MODEL_PARTS}[name](World(world_seed), out / name, sizes, workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toy.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/toy"))
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes")
    parser.add_argument("--tokenizer", choices=("word", "bpe"), default=None,
                        help="the teacher's tokenizer (default: the size's, word)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a size field for this build, e.g. encoder_steps=1500 (repeatable; fields: "
                             + ", ".join(f.name for f in fields(Sizes)) + ")")
    args = parser.parse_args(argv)
    try:
        sizes = sizes_with(args.size, args.set + ([f"tokenizer={args.tokenizer}"] if args.tokenizer else []))
    except ConfigError as exc:
        parser.error(f"--set: {exc}")
    build(args.out, args.world_seed, sizes, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
