"""Evaluate a trained round: spoken benchmarks in three modes, the gap, and the diagnostics M and F.

    python -m eval --config CONFIG --round R [key=value ...]
    torchrun --nproc_per_node N -m eval --config CONFIG --round R     (items split across ranks)

Reads ``runs/<name>/round-R/export`` (plain torch, no DeepSpeed) and the original LLM
(``model.llm.path``, the teacher); writes ``runs/<name>/round-R/eval.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model.build import load_export
from train.config import ConfigError, split_overrides
from train.dist import all_reduce, barrier, device, finish, gather, init_ranks
from train.experiment import ExperimentConfig, load_experiment

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "salad_gap"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    args, overrides = split_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--round", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="evaluate again even if eval.json exists")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(args), overrides


def evaluate_task(cfg: ExperimentConfig, task, student, tokenizer, run_dir: Path, rank: int, world: int) -> dict:
    from rich.progress import Progress

    from eval.benchmarks import read_items
    from eval.mcq import LM, prompt_document, score_item, shots_for, speech_prefix_embeddings, text_prefix_embeddings
    from eval.spoken import build_spoken, load_spoken

    items = read_items(task.path)
    if task.limit:
        items = items[: task.limit]
    spoken_dir = Path(cfg.eval.spoken_dir or run_dir / "spoken") / task.name
    if rank == 0:
        build_spoken(items, spoken_dir, cfg.eval.tts, student.encoder.sample_rate, cfg.eval.workers)
    barrier()
    audio = load_spoken(spoken_dir)
    missing = [it.id for it in items if it.id not in audio]
    if missing:
        raise ValueError(f"{spoken_dir}: no speech for items {missing[:5]} (see its rejects.jsonl)")
    lms = {"teacher_text": LM.of(student.teacher), "student_text": LM.of(student.llm),
           "student_speech": LM.of(student.llm)}
    bos = tokenizer.bos_token_id
    rows = []
    mine = list(range(rank, len(items), world))
    with Progress(disable=rank != 0, transient=True) as bar:
        job = bar.add_task(f"eval {task.name}", total=len(mine))
        for i in mine:
            item, shots = items[i], shots_for(items, i, task.shots, cfg.seed)
            text_doc = prompt_document(item, shots, tokenizer, None)
            speech_doc = prompt_document(item, shots, tokenizer, audio)
            picks = {}
            for mode, lm in lms.items():
                with torch.no_grad():
                    prefix = (speech_prefix_embeddings(student, speech_doc, bos) if mode == "student_speech"
                              else text_prefix_embeddings(lm, text_doc, bos))
                picks[mode] = score_item(lm, prefix, item, tokenizer, cfg.eval.norm)
            rows.append((i, {m: int(p == item.answer) for m, p in picks.items()}))
            bar.advance(job)
    rows = sorted(gather(rows))
    correct = {m: [r[m] for _, r in rows] for m in picks}
    return task_metrics(correct, cfg.eval.bootstrap, cfg.seed)


def task_metrics(correct: dict[str, list[int]], n_bootstrap: int, seed: int) -> dict:
    """Accuracy per mode, gap, text_gap, n and bootstrap 95% intervals, from the repo's metric module."""
    import evaluate

    metric = evaluate.load(str(METRIC_DIR), keep_in_memory=True)
    return metric.compute(**correct, n_bootstrap=n_bootstrap, seed=seed)


def diagnostics(cfg: ExperimentConfig, student, tokenizer, rank: int, world: int) -> dict[str, float]:
    """M and F on held-out speech documents (``eval.heldout``); empty when none is configured."""
    if not cfg.eval.heldout:
        return {}
    from train.data import heldout_batch
    from train.objective import Objective

    batch = heldout_batch(cfg.eval.heldout, cfg.eval.heldout_docs, cfg.inputs, tokenizer, student.vectors_for,
                          cfg.seed, rank, world)
    totals = Objective(student, cfg.loss).diagnostics(batch.to(student.boundary.device))
    all_reduce(totals)
    return {"M": float(totals[0] / totals[1].clamp(min=1)), "F": float(totals[2] / totals[3].clamp(min=1))}


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_experiment(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from shards.format import atomic_write_json

    run_dir = cfg.run.path()
    round_dir = run_dir / f"round-{args.round}"
    if (round_dir / "eval.json").is_file() and not args.force:
        print(f"{round_dir / 'eval.json'} exists; nothing to do (--force evaluates again)", file=sys.stderr)
        return 0
    rank, world = init_ranks()
    torch.manual_seed(cfg.seed)
    student, tokenizer = load_export(round_dir / "export", teacher_path=cfg.model.llm.path)
    student = student.to(device())
    result = {"tasks": {t.name: evaluate_task(cfg, t, student, tokenizer, run_dir, rank, world)
                        for t in cfg.eval.tasks}}
    result.update(diagnostics(cfg, student, tokenizer, rank, world))
    if rank == 0:
        atomic_write_json(round_dir / "eval.json", result)
        print(f"wrote {round_dir / 'eval.json'}", file=sys.stderr)
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
