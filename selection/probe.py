"""Per-cluster probes: how misaligned the current student is on each part of the text pool.

A probe text is cut in two: its first words are spoken (TTS; half of the text, at most the longest speech span
training uses), the words after them stay text (at most the longest text span): every probe then has the shape
of a training span pair whatever the length of the pool's texts, and long texts neither vanish from the context
nor dilute M with positions far from the speech. The student reads "speech, then text"; the diagnostics compare,
at the text's positions, the student on that input against the student (M) or the teacher (D) reading
everything as text, and the teacher against the student on text (F). Clusters split across ranks; every rank
gets every score.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from model.inputs import SPEECH, TEXT, Document, InputsConfig, Span, pack
from shards.tts import TTSConfig, TTSError, synthesize_many
from train import distributed
from train.objective import DIAGNOSTIC_SUMS, Objective, diagnostic_means


def probe_texts(labels: np.ndarray, per_cluster: int, seed: int) -> dict[int, list[int]]:
    """Pool indices of up to ``per_cluster`` probe texts per cluster, chosen by a seeded RNG."""
    rng = np.random.default_rng([seed, 17])
    out = {}
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out[int(c)] = sorted(int(i) for i in rng.choice(members, size=min(per_cluster, len(members)), replace=False))
    return out


def split_text(text: str, speech_words: int = 1 << 30, text_words: int = 1 << 30) -> tuple[str, str] | None:
    """(spoken words, text words after them): half the text, at most ``speech_words``, spoken; at most
    ``text_words`` after it. None when the text has fewer than two words."""
    words = text.split()
    if len(words) < 2:
        return None
    spoken = min(len(words) // 2, speech_words)
    return " ".join(words[:spoken]), " ".join(words[spoken:spoken + text_words])


def probe_documents(texts: list[str], tokenizer, tts: TTSConfig, sample_rate: int, workers: int,
                    inputs: InputsConfig, variant_base: int = 0) -> list[Document]:
    """Probe documents, spans bounded by ``inputs``' longest ones; texts whose speech cannot be synthesized are
    left out."""
    halves = [split_text(t, inputs.speech_words[1], inputs.text_words[1]) for t in texts]
    spoken = [h[0] for h in halves if h]
    audio = synthesize_many(tts, sample_rate, spoken, [variant_base + i for i in range(len(spoken))], workers)
    docs, k = [], 0
    for h in halves:
        if not h:
            continue
        wave = audio[k]
        k += 1
        if isinstance(wave, TTSError):
            continue
        docs.append(Document([Span(SPEECH, tokenizer.encode(h[0], add_special_tokens=False), wave),
                              Span(TEXT, tokenizer.encode(" " + h[1], add_special_tokens=False))]))
    return docs


def score_clusters(objective: Objective, probes: dict[int, list[str]], tokenizer, tts: TTSConfig, sample_rate: int,
                   inputs: InputsConfig, workers: int, rank: int = 0, world: int = 1,
                   progress: Callable[[], None] | None = None) -> dict[int, dict[str, float]]:
    """M, F and D per cluster (means over its probe positions) and the positions they were measured at;
    clusters are split across ranks."""
    clusters = sorted(probes)
    model = objective.model
    sums = torch.zeros(len(clusters), len(DIAGNOSTIC_SUMS), dtype=torch.float64, device=model.boundary.device)
    for j in range(rank, len(clusters), world):
        docs = probe_documents(probes[clusters[j]], tokenizer, tts, sample_rate, workers, inputs, variant_base=j)
        if docs:
            batch = pack(docs, model.vectors_for, inputs.context, tokenizer.bos_token_id).to(model.boundary.device)
            sums[j] = objective.diagnostics(batch)
        if progress:
            progress()
    distributed.all_reduce(sums)
    aligned = DIAGNOSTIC_SUMS.index("aligned")
    return {c: diagnostic_means(sums[j]) | {"positions": int(sums[j, aligned])} for j, c in enumerate(clusters)}


def cluster_scores(scores: dict[int, dict[str, float]], name: str, min_positions: int) -> tuple[np.ndarray, list[int]]:
    """Each cluster's ``name`` score, and the clusters measured at fewer than ``min_positions`` positions: those
    get the mean score of the others (neither favoured nor left out: a score of 0 would never select them)."""
    clusters = sorted(scores)
    unscored = [c for c in clusters if scores[c]["positions"] < min_positions]
    scored = [scores[c][name] for c in clusters if c not in unscored]
    fill = float(np.mean(scored)) if scored else 1.0
    return np.array([fill if c in unscored else scores[c][name] for c in clusters]), unscored
