"""Active selection for round R: find where the round R-1 student is misaligned, synthesize texts there.

    python -m selection --config CONFIG --round R [key=value ...]
    torchrun --nproc_per_node N -m selection --config CONFIG --round R   (embedding and probes split by rank)

Writes ``runs/<name>/round-R/selection/``: ``clusters.json``, ``probe.json``, ``allocation.json``,
``chosen.jsonl``, ``score_vs_share.png``, the synthesized shard set ``shards/`` and ``DONE``, and
appends that shard set to ``runs/<name>/data.yaml``. Every file is written atomically and a re-run
continues where a killed one stopped (the shard build itself is resumable).

``selection.strategy`` picks the ablation's variants: ``uniform`` draws clusters in proportion to the pool
(gamma 0) at the same budget without probing a student (no ``probe.json`` nor plot); ``natural`` selects
nothing and appends nothing, so the round's steps go to the natural speech only (``DONE`` says ``texts: 0``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from config import ConfigError
from rounds.experiment import ExperimentConfig, job_parser, parse_job
from train.layout import RunFolder

if TYPE_CHECKING:
    from selection.pool import PoolIndex

def natural_seconds(cfg: ExperimentConfig) -> float:
    from shards.format import read_index

    return sum(sum(s.get("seconds", 0.0) for s in read_index(ref.path)["shards"]) for ref in cfg.data.speech)


def previously_chosen(run: RunFolder, round_: int) -> set[int]:
    """Pool indices drawn in earlier rounds: never drawn again."""
    chosen: set[int] = set()
    for r in range(1, round_):
        path = run.selection(r) / "chosen.jsonl"
        if path.is_file():
            chosen.update(json.loads(line)["index"] for line in path.read_text().splitlines() if line)
    return chosen


def plot_scores(path: Path, table: list[dict], score_name: str) -> None:
    """Score of each cluster against the share of the budget it received."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from shards.format import atomic_write_bytes

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    total = sum(row["seconds"] for row in table) or 1.0
    ax.scatter([row["score"] for row in table], [row["seconds"] / total for row in table], s=12)
    ax.set_xlabel(f"probe score {score_name} of the cluster")
    ax.set_ylabel("share of the selected speech")
    ax.set_title("active selection: score vs share selected")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def natural_sample_rate(cfg: ExperimentConfig) -> int:
    """Rate of the natural speech, which training requires to be the encoder's: uniform selection
    synthesizes at it without loading a student."""
    from shards.format import read_index

    if not cfg.data.speech:
        raise ConfigError("data.speech: a natural speech shard set is required")
    return int(read_index(cfg.data.speech[0].path)["sr"])


def cluster_pool(cfg: ExperimentConfig, out: Path, rank: int, world: int) -> tuple[PoolIndex, np.ndarray]:
    """The pool's index and its texts' balanced k-means cluster labels, int32 [N] (written to ``clusters.json``).

    Nothing here holds the pool's texts: the pool is streamed into an index (positions and word counts), its
    embeddings are a file filled by every rank, and rank 0 clusters them in blocks and sends the labels."""
    from selection.cluster import balanced_kmeans, cluster_summary
    from selection.embed import embed_pool
    from selection.pool import open_pool
    from shards.format import atomic_write_json
    from train import distributed

    sel = cfg.selection
    folder = cfg.run.folder().pool_embeddings
    pool = open_pool(sel.pool, folder)
    vectors = embed_pool(pool, sel.embed, rank, world, cache_dir=folder)
    labels = None
    if rank == 0:
        k = min(sel.clusters, len(pool))
        labels, _ = balanced_kmeans(vectors, k, seed=cfg.seed, tolerance=sel.tolerance,
                                    sample=sel.kmeans_sample or None)
        atomic_write_json(out / "clusters.json", {"clusters": cluster_summary(labels, pool.texts)})
    return pool, distributed.broadcast_object(labels)


def probe_clusters(cfg: ExperimentConfig, round_: int, pool: PoolIndex, labels: np.ndarray, out: Path,
                   rank: int, world: int) -> tuple[np.ndarray, int]:
    """Active selection: the round R-1 student's score per cluster (written to ``probe.json``) and its
    encoder's sample rate."""
    from rich.progress import Progress

    from model.build import load_export
    from selection.probe import cluster_scores, probe_texts, score_clusters
    from shards.format import atomic_write_json
    from train import distributed
    from train.objective import Objective

    sel = cfg.selection
    student, tokenizer = load_export(cfg.run.folder().export(round_ - 1),
                                     teacher_path=cfg.model.llm.path, dtype=cfg.model.llm.dtype)
    student = student.to(distributed.device())
    drawn = probe_texts(labels, sel.probes, cfg.seed + round_)
    read = iter(pool.texts([i for idx in drawn.values() for i in idx]))   # only the probe texts are read
    probes = {c: [next(read) for _ in idx] for c, idx in drawn.items()}
    with Progress(disable=rank != 0, transient=True) as bar:
        job = bar.add_task("probing clusters", total=len(range(rank, len(probes), world)))
        scores = score_clusters(Objective(student, cfg.loss), probes, tokenizer, sel.tts, student.encoder.sample_rate,
                                cfg.inputs, sel.workers, rank, world, progress=lambda: bar.advance(job))
    values, unscored = cluster_scores(scores, sel.score, sel.min_positions)
    if rank == 0:
        atomic_write_json(out / "probe.json", {"score": sel.score, "unscored": unscored,
                                               "clusters": {str(c): v for c, v in scores.items()}})
        if unscored:
            print(f"round {round_}: clusters {unscored} had fewer than selection.min_positions={sel.min_positions} "
                  "scorable probe positions (texts that could not be synthesized?): they get the mean score "
                  f"(listed under 'unscored' in {out / 'probe.json'})", file=sys.stderr)
    return values, student.encoder.sample_rate


def select(cfg: ExperimentConfig, round_: int) -> Path:
    from rich.console import Console

    from selection.allocate import allocate, allocation_table, spread, target_shares
    from shards.build import synthesize_documents
    from shards.format import atomic_write_bytes, atomic_write_json, read_index
    from train import distributed
    from train.data import ShardSetRef, append_speech_set

    sel = cfg.selection
    if round_ < 1:
        raise ValueError("--round: selection runs for rounds >= 1 (it uses the previous round's student)")
    if sel.strategy != "natural" and not sel.pool:
        raise ConfigError("selection.pool: a text pool is required")
    rank, world = distributed.join(cfg.run.comm_timeout_minutes)
    console = Console(stderr=True)
    run = cfg.run.folder()
    out = run.selection(round_)
    if run.selected(round_).is_file():
        if rank == 0:
            console.print(f"{out} is complete ({run.selected(round_).name} exists); nothing to do")
        return out
    out.mkdir(parents=True, exist_ok=True)
    if sel.strategy == "natural":
        if rank == 0:
            run.selected(round_).write_text(json.dumps({"strategy": sel.strategy, "texts": 0, "budget_s": 0.0})
                                            + "\n")
            console.print(f"round {round_}: natural-speech control: nothing selected, the round trains on the "
                          "natural speech only")
        distributed.barrier()
        return out

    pool, labels = cluster_pool(cfg, out, rank, world)
    k = min(sel.clusters, len(pool))
    if sel.strategy == "active":
        score, sample_rate = probe_clusters(cfg, round_, pool, labels, out, rank, world)
        gamma = sel.gamma
    else:
        score, sample_rate, gamma = np.ones(k), natural_sample_rate(cfg), 0.0
    pool_share = np.bincount(labels, minlength=k) / len(labels)
    shares = target_shares(pool_share, score, gamma)
    budget = sel.budget_s or sel.budget_fraction * natural_seconds(cfg)
    seconds_per_text = pool.words / sel.words_per_second
    chosen = distributed.broadcast_object(allocate(labels, score, gamma, budget, seconds_per_text,
                                                   seed=cfg.seed + round_, exclude=previously_chosen(run, round_)))
    texts = pool.texts(chosen)   # only these texts are read, by their positions in the pool
    if rank == 0:
        table = allocation_table(labels, chosen, score, shares, seconds_per_text)
        allocation_spread = spread(table)
        atomic_write_json(out / "allocation.json", {"strategy": sel.strategy, "gamma": gamma, "budget_s": budget,
                                                    "spread": allocation_spread, "clusters": table})
        lines = "".join(json.dumps({"index": i, "cluster": int(labels[i]), "text": t}) + "\n"
                        for i, t in zip(chosen, texts, strict=True))
        atomic_write_bytes(out / "chosen.jsonl", lines.encode())
        if sel.strategy == "active":
            plot_scores(out / "score_vs_share.png", table, sel.score)
    # every rank speaks its share of the chosen texts (the same on every rank: allocation is seeded)
    shards = synthesize_documents([(f"r{round_}-{i}", t) for i, t in zip(chosen, texts, strict=True)],
                                  out / "shards", sel.tts, sample_rate, sel.workers, source=f"selection-round-{round_}",
                                  seed=cfg.seed + round_, part=(rank, world), barrier=distributed.barrier)
    if rank == 0:   # weighted by its documents among the selected sets (data.selected_share is theirs together)
        append_speech_set(run.root, ShardSetRef(path=str(shards), weight=float(read_index(shards)["docs"])), round_,
                          cfg.data)
        run.selected(round_).write_text(json.dumps({"strategy": sel.strategy, "texts": len(chosen),
                                                    "budget_s": budget})
                                + "\n")
        console.print(f"round {round_}: {sel.strategy} selection of {len(chosen)} texts (~{budget:.0f} s) from {k} "
                      f"clusters (spread like {allocation_spread['effective_clusters']:.1f} even ones) -> {shards}")
    distributed.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_job(job_parser("python -m selection", __doc__, "R >= 1; uses the round R-1 student",
                                     round_required=True), argv)
    try:
        select(cfg, args.round)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from train import distributed

    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
