"""Evaluate a trained round: spoken benchmarks in three modes and the cascade, the gap, M and F.

    python -m eval --config CONFIG --round R [key=value ...]
    torchrun --nproc_per_node N -m eval --config CONFIG --round R     (items split across ranks)

Reads ``runs/<name>/round-R/export`` (plain torch, no DeepSpeed) and the original LLM
(``model.llm.path``, the teacher), both in ``model.llm.dtype`` (auto: bf16 on GPUs, fp32 on CPUs; one dtype for
both, so that the gap does not measure precision); writes ``runs/<name>/round-R/eval.json``::

    {"tasks": {task: {teacher_text, student_text, student_speech, gap, text_gap, n, ci95, M, norm, shots, fewshot}},
     "cascade": {task: accuracy}, "cascade_wer": {task: word error rate},      (students with a CTC head)
     "M": float, "F": float,                                                    (with eval.heldout)
     "coverage": {task: share of the natural speech}}                           (with eval.coverage)

Cascade reference (the paper's ASR + LLM cascade, ``eval.cascade``): where the student has a CTC head
(``loss.ctc_weight > 0`` or the export's ``adapter.compress: ctc``), every spoken context, the examples' too,
is greedy-decoded along the student's CTC path (``SpeechLM.transcribe``) to LLM tokens, turned into text, and
the teacher scores the same k-shot prompt as in teacher_text built from those words. "cascade_wer" is the word
error rate of the decoded contexts against the benchmark's spoken text (lower case, punctuation dropped). Without a
CTC head neither key is written. A task's "M" is the misalignment where the benchmark decides: KL(student after
the text prompt || student after the spoken prompt) over the right answer's tokens, averaged over its items.

How a task was scored is recorded beside its numbers: "norm" (``eval.tasks[].norm``, else ``eval.norm``: "none" is
lm-eval-harness's acc, "chars" its acc_norm, "tokens" per token), "shots" and "fewshot", the file the examples came
from (``eval.tasks[].fewshot_path``: another split, as lm-eval-harness draws them) or "scored split" (the task's
other items). Only an item's spoken part is spoken: its template words ("Question: ", "\\nAnswer:") stay text.

Deterministic: the same export gives the same bytes in a fresh process, for the same launcher (world size)
and thread count (float sums follow the threads' split: 1 and 2 CPU threads differ by ~1e-6 in a
log-probability). Shots and bootstrap are seeded by ``seed``; every prompt and every decoding runs alone
(never padded beside another item), so task numbers do not depend on the rank an item falls in; per-item
results are gathered in item order; every module is in eval mode (``load_export``); choice log-probabilities
are summed in a fixed order; and torch runs its deterministic kernels (on CUDA: cuBLAS with a fixed
workspace, the CTC pooling's index_add without atomics). M and F are sums over whole held-out rows split
across ranks, so they do not depend on the world size either.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from model.build import load_export
from rounds.experiment import ExperimentConfig, job_parser, parse_job
from train import distributed

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "salad_gap"


def parser() -> argparse.ArgumentParser:
    p = job_parser("python -m eval", __doc__, "the round whose export to evaluate")
    p.add_argument("--force", action="store_true", help="evaluate again even if eval.json exists")
    return p


def evaluate_task(cfg: ExperimentConfig, task, student, tokenizer, rank: int, world: int,
                  cascade: bool) -> tuple[dict, dict | None]:
    """The task's metrics per mode and how it was scored ("norm", "shots", "fewshot"), and with ``cascade`` the
    cascade's accuracy and word error rate."""
    from rich.progress import Progress

    from eval.benchmarks import read_items
    from eval.cascade import summarise, transcribe_contexts, word_errors
    from eval.mcq import CASCADE, LM, MODES, correct_by_mode, draw_shots, encode_contexts
    from eval.spoken import build_spoken, load_spoken, shot_items, shots_folder

    items = read_items(task.path)
    if task.limit:
        items = items[: task.limit]
    pool = shot_items(read_items(task.fewshot_path)) if task.fewshot_path else None
    shots = draw_shots(items, task.shots, cfg.seed, pool)
    spoken_base = Path(cfg.eval.spoken_dir or cfg.run.folder().spoken)
    spoken = [(items, spoken_base / task.name)]
    if pool is not None:   # the examples drawn from the other split, spoken into a set of their own
        used = list({it.id: it for row in shots for it in row}.values())
        spoken += [(used, shots_folder(spoken_base, task.name, used))] if used else []
    audio = {}
    for group, folder in spoken:
        build_spoken(group, folder, cfg.eval.tts, student.encoder.sample_rate, cfg.eval.workers, (rank, world),
                     distributed.barrier)
        audio |= load_spoken(folder, group)
    mine = list(range(rank, len(items), world))
    norm = task.norm or cfg.eval.norm
    teacher, llm = LM.of(student.teacher), LM.of(student.llm)
    lms = {"teacher_text": teacher, "student_text": llm, "student_speech": llm}
    # every context this rank's prompts hear, encoded once: for the speech prompts and the cascade's decoding
    encoded = encode_contexts(student, audio, sorted({it.id for i in mine for it in (items[i], *shots[i])}))
    transcripts = None
    if cascade:   # the teacher reads the decoded contexts of this rank's items and examples
        lms[CASCADE] = teacher
        transcripts = transcribe_contexts(student, tokenizer, encoded)
    rows = []
    with Progress(disable=rank != 0, transient=True) as bar:
        job = bar.add_task(f"eval {task.name}", total=len(mine))
        for i in mine:
            row = correct_by_mode(student, lms, items[i], shots[i], tokenizer, audio, norm, transcripts, encoded)
            if transcripts is not None:
                row["errors"], row["words"] = word_errors(items[i].context, transcripts[items[i].id])
            rows.append((i, row))
            bar.advance(job)
    rows = [row for _, row in sorted(distributed.gather_lists(rows), key=lambda r: r[0])]
    metrics = task_metrics({m: [r[m] for r in rows] for m in MODES}, cfg.eval.bootstrap, cfg.seed)
    metrics["M"] = sum(r["M"] for r in rows) / len(rows)
    metrics |= {"norm": norm, "shots": task.shots, "fewshot": task.fewshot_path or "scored split"}
    return metrics, summarise(rows) if cascade else None


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
    from train.objective import Objective, diagnostic_means

    batch, weight = heldout_batch(cfg.eval.heldout, cfg.eval.heldout_docs, cfg.inputs, tokenizer,
                                  student.vectors_for, cfg.seed, rank, world)
    sums = Objective(student, cfg.loss).diagnostics(batch.to(student.boundary.device)) * weight
    means = diagnostic_means(distributed.all_reduce(sums))
    return {"M": means["M"], "F": means["F"]}


def read_coverage(path: str, tasks: list[str]) -> dict[str, float]:
    """The natural speech's share of each evaluated task's domain, from ``eval.coverage`` (tasks it lists)."""
    import json

    try:
        shares = json.loads(Path(path).read_text())["shares"]
        found = {t: float(shares[t]) for t in tasks if t in shares}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"eval.coverage {path}: expected JSON {{\"shares\": {{task: share}}}} ({exc!r})") from None
    if not all(0.0 <= v <= 1.0 for v in found.values()):
        raise ValueError(f"eval.coverage {path}: shares must be in [0, 1], got {found}")
    return found


def deterministic() -> None:
    """Deterministic kernels wherever torch has them; one without warns instead of stopping a long evaluation.
    cuBLAS reads its workspace setting when CUDA starts: set before any model reaches the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_job(parser(), argv)
    from shards.format import atomic_write_json

    run = cfg.run.folder()
    out = run.eval_json(args.round)
    if out.is_file() and not args.force:
        print(f"{out} exists; nothing to do (--force evaluates again)", file=sys.stderr)
        return 0
    from eval.cascade import has_ctc_head

    coverage = read_coverage(cfg.eval.coverage, [t.name for t in cfg.eval.tasks]) if cfg.eval.coverage else None
    deterministic()
    rank, world = distributed.join(cfg.run.comm_timeout_minutes)
    torch.manual_seed(cfg.seed)
    student, tokenizer = load_export(run.export(args.round), teacher_path=cfg.model.llm.path, dtype=cfg.model.llm.dtype)
    student = student.to(distributed.device())
    cascade = has_ctc_head(student, cfg.loss.ctc_weight)
    result: dict = {"tasks": {}} | ({"cascade": {}, "cascade_wer": {}} if cascade else {})
    for task in cfg.eval.tasks:
        metrics, reference = evaluate_task(cfg, task, student, tokenizer, rank, world, cascade)
        result["tasks"][task.name] = metrics
        if reference is not None:
            result["cascade"][task.name] = reference["accuracy"]
            result["cascade_wer"][task.name] = reference["wer"]
    result.update(diagnostics(cfg, student, tokenizer, rank, world))
    if coverage is not None:
        result["coverage"] = coverage
    if rank == 0:
        atomic_write_json(out, result)
        print(f"wrote {out}", file=sys.stderr)
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
