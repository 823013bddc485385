"""What the toy's natural speech and selection pool are made of: one table per source, graded by domain.

The paper's regime, mirrored (each number below is a toy choice; the fact it mirrors is beside it):
- Natural speech (audiobooks, podcasts) tells stories and so speaks most words of the web, but knowledge-heavy
  registers (science, facts, Q&A) only now and then. Here the three story domains make 72% of the natural
  documents, and every knowledge domain is spoken too, in its training phrasings, at a share graded from 8%
  (facts about people, as in a biography) down to 1% (arithmetic): every word is heard somewhere, knowledge words
  rarely, and a benchmark's own phrasing never (world.py holds one phrasing of every fact out).
- The selection pool (FineWeb-Edu, 128 clusters) is mostly text that natural speech already covers: here 60% story
  domains, and the knowledge domains share the other 40% equally. Uniform sampling therefore spends most of its
  budget where the student is already aligned; active selection has room to do better.

A knowledge "document" is a paragraph of ``STATEMENTS_PER_DOC`` statements, about as long as a story, so that the
shares are shares of speech time as well as of documents.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from toy.world import DOMAINS, STORY_DOMAINS, World

NATURAL_SHARES = {"narrative": 0.50, "endings": 0.12, "counting": 0.10,
                  "facts": 0.08, "directions": 0.05, "comparison": 0.04, "time": 0.03, "categories": 0.03,
                  "opposites": 0.02, "science": 0.02, "arithmetic": 0.01}
POOL_SHARES = {"narrative": 0.30, "endings": 0.15, "counting": 0.15,
               **{d: 0.40 / 8 for d in DOMAINS if d not in STORY_DOMAINS}}
STATEMENTS_PER_DOC = 8


def counts(shares: dict[str, float], total: int) -> dict[str, int]:
    """Documents per domain for ``total`` documents; every domain with a share gets at least one."""
    return {d: max(1, round(share * total)) for d, share in shares.items() if share > 0}


def natural_documents(world: World, total: int, rng_for: Callable[[str], np.random.Generator]) -> list[tuple[str, str]]:
    """``(document id, text)`` of the natural speech, ``NATURAL_SHARES`` of ``total`` documents (ids
    ``<domain>-<n>``; ``rng_for(domain)`` gives each domain its own random stream), in a seeded random order.

    Shuffled because the toy reads its shards in document order (configs/toy.yaml, ``stream``): grouped by domain,
    the last steps of a stage would train on one domain alone (a stage II on natural speech only ended on the
    knowledge paragraphs and lost narrative, 49 -> 18%)."""
    docs = []
    for domain, n in counts(NATURAL_SHARES, total).items():
        per_doc = 1 if domain in STORY_DOMAINS else STATEMENTS_PER_DOC
        texts = world.texts(domain, n * per_doc, rng_for(domain))
        docs += [(f"{domain}-{i:05d}", " ".join(texts[i * per_doc:(i + 1) * per_doc])) for i in range(n)]
    order = np.random.default_rng([world.seed, total]).permutation(len(docs))
    return [docs[i] for i in order]


def pool_texts(world: World, total: int, rng_for: Callable[[str], np.random.Generator]) -> list[tuple[str, str]]:
    """``(domain, text)`` of the selection pool, ``POOL_SHARES`` of ``total`` texts, grouped by domain."""
    return [(d, t) for d, n in counts(POOL_SHARES, total).items() for t in world.texts(d, n, rng_for(d))]


def write_coverage(path: Path, total: int) -> None:
    """The table the natural speech was built from (eval.coverage reads ``shares``), with its document counts."""
    from shards.format import atomic_write_json

    atomic_write_json(path, {"shares": NATURAL_SHARES, "documents": counts(NATURAL_SHARES, total)})
