"""Stage-I / stage-II distillation training on DeepSpeed ZeRO-3.

    python -m train --config CONFIG [--round R] [key=value ...]
    torchrun --nproc_per_node N -m train --config CONFIG ...
    deepspeed [--hostfile H] --module train --config CONFIG ...

Writes ``runs/<name>/round-R/``: ``checkpoints/``, ``metrics.jsonl``, ``export/`` and ``DONE``.
A killed run started again with the same command resumes from its latest checkpoint exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from train import checkpoint
from train.config import to_dict
from train.experiment import ExperimentConfig, job_parser, parse_job
from train.schedule import decay_start

DONE = "DONE"
PRE_DECAY = "pre-decay"
EXPORT_TOLERANCE = {False: 1e-4, True: 3e-2}   # fp32 / bf16: relative logit difference of model vs export


def round_dir(cfg: ExperimentConfig, round_: int) -> Path:
    return cfg.run.path() / f"round-{round_}"


def ensure_assets(cfg: ExperimentConfig, rank: int) -> None:
    """Build missing or stale assets (tiny LLM, shards) with the config's builder module, on rank 0 only. The
    builder runs every time: it decides what is stale (toy.build stamps each part) and is quick when nothing is."""
    paths = [Path(p) for p in (cfg.model.llm.path, *(r.path for r in cfg.data.speech + cfg.data.text),
                               cfg.eval.heldout, *(t.path for t in cfg.eval.tasks), cfg.selection.pool) if p]
    if rank == 0 and cfg.data.assets:
        subprocess.run([sys.executable, "-m", cfg.data.assets], check=True)
    dist.barrier()
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing model or shard folders: {', '.join(missing)}")


def write_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: Path, step: int) -> None:
    """After a resume, drop logged steps past the checkpoint (they will be run again)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def describe_partitions(engine, path: Path, world: int) -> None:
    """Record how ZeRO-3 split the parameters (elements held per rank vs the whole model)."""
    params = list(engine.module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, local)
    if dist.get_rank() == 0:
        path.write_text(json.dumps({"world_size": world, "params_total": total, "params_trainable": trainable,
                                    "params_per_rank": per_rank}, indent=2) + "\n")


def progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), disable=not enabled, transient=False)


def train(cfg: ExperimentConfig, round_: int) -> Path:
    from model.build import build_speech_lm, load_tokenizer
    from train.data import BatchSource, check_sample_rate, heldout_batch, round_speech_sets
    from train.engine import build_engine, init_distributed, llm_init, use_bf16
    from train.export import export, verify_export
    from train.objective import Objective
    from train.teacher_cache import open_cache

    rank, world = init_distributed()
    out = round_dir(cfg, round_)
    if (out / DONE).exists():
        if rank == 0:
            print(f"{out} is complete ({DONE} exists); nothing to do", file=sys.stderr)
        return out
    ensure_assets(cfg, rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model = build_speech_lm(cfg.model, llm_init(cfg.train, world))
    data = dataclasses.replace(cfg.data, speech=round_speech_sets(cfg.run.path(), cfg.data, round_))
    check_sample_rate(data.speech, model.encoder.sample_rate)
    tokenizer = load_tokenizer(cfg.model)
    schedule = cfg.train.for_round(round_)
    engine = build_engine(Objective(model, cfg.loss, distributed=world > 1), schedule, world)
    describe_partitions(engine, out / "engine.json", world)
    ckpt_dir = out / "checkpoints"
    resumed = checkpoint.resume(engine, ckpt_dir)
    if resumed is None and round_ > 0:
        checkpoint.start_from(engine, round_dir(cfg, round_ - 1) / "checkpoints", PRE_DECAY)
    step, consumed = resumed if resumed else (0, None)
    metrics = out / "metrics.jsonl"
    if rank == 0:
        trim_metrics(metrics, step)
    teacher_cache = open_cache(cfg, [r.path for r in data.speech + data.text], tokenizer)
    source = BatchSource(data, cfg.inputs, cfg.stream, tokenizer, model.vectors_for, cfg.seed + round_, rank, world,
                         consumed, teacher_cache)
    heldout = None
    if schedule.diagnostics_every and cfg.eval.heldout:
        heldout, heldout_weight = heldout_batch(cfg.eval.heldout, cfg.eval.heldout_docs, cfg.inputs, tokenizer,
                                                model.vectors_for, cfg.seed, rank, world)
        heldout = heldout.to(engine.device)
    pre_decay = decay_start(schedule.max_steps, schedule.decay_fraction)

    def save_pre_decay() -> None:
        if step == pre_decay and not (ckpt_dir / PRE_DECAY).exists():
            checkpoint.save(engine, ckpt_dir, PRE_DECAY, step, source.state())

    bar = progress(rank == 0)
    with bar:
        task = bar.add_task(f"train round {round_}", total=schedule.max_steps, completed=step, status="")
        while step < schedule.max_steps:
            save_pre_decay()
            started = time.perf_counter()
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            totals = torch.zeros(7)   # loss, kl, nll, ctc, target tokens, audio seconds, cached teacher
            for micro in range(schedule.grad_accum):
                batch, _ = source.next(step, micro)
                batch = batch.to(engine.device)
                out_ = engine(batch)
                engine.backward(out_["loss"])
                engine.step()
                audio_s = float(batch.wave_lengths.sum()) / model.encoder.sample_rate
                totals += torch.tensor([out_["loss"].item(), out_["kl"].item(), out_["nll"].item(),
                                        out_["ctc"].item(), out_["tokens"].item(), audio_s,
                                        out_["cached"].item()])
            step += 1
            dist.all_reduce(totals)
            elapsed = time.perf_counter() - started
            n = schedule.grad_accum * world
            record = {"step": step, "loss": totals[0].item() / n, "kl": totals[1].item() / n,
                      "nll": totals[2].item() / n, "ctc": totals[3].item() / n, "lr": engine.get_lr()[0],
                      "tokens_per_s": totals[4].item() / elapsed, "audio_s_per_s": totals[5].item() / elapsed}
            if teacher_cache is not None:   # share of micro-batches that used cached teacher targets
                record["teacher_cached"] = totals[6].item() / n
            if heldout is not None and step % schedule.diagnostics_every == 0:
                sums = engine.module.diagnostics(heldout) * heldout_weight   # collective under ZeRO-3
                dist.all_reduce(sums)
                record.update(M=float(sums[0] / sums[1].clamp(min=1)), F=float(sums[2] / sums[3].clamp(min=1)))
            if rank == 0 and (step % schedule.log_every == 0 or step == schedule.max_steps):
                write_metrics(metrics, record)
            bar.update(task, completed=step, status=f"loss {record['loss']:.3f} kl {record['kl']:.3f} "
                       f"{record['tokens_per_s']:.0f} tok/s {record['audio_s_per_s']:.1f} audio-s/s")
            if step % schedule.save_every == 0 and step < schedule.max_steps:
                checkpoint.save(engine, ckpt_dir, f"{checkpoint.PERIODIC_PREFIX}{step:07d}", step, source.state())
                if rank == 0:
                    checkpoint.prune(ckpt_dir, schedule.keep_checkpoints)
    save_pre_decay()   # no decay phase (decay_fraction 0): the end is the pre-decay point
    checkpoint.save(engine, ckpt_dir, "final", step, source.state())
    dist.barrier()
    if rank == 0:
        export(cfg, ckpt_dir, "final", out / "export")
    dist.barrier()
    probe, _ = source.next(step, micro=0)   # a batch past the last step: data no step has seen
    diff = verify_export(engine.module.model, out / "export", probe.to(engine.device), rank)
    if rank == 0:
        tolerance = EXPORT_TOLERANCE[use_bf16(cfg.train)]
        if diff > tolerance:
            raise RuntimeError(f"{out / 'export'}: exported model's logits differ from the trained model's "
                               f"by {diff:.3g} (relative; tolerance {tolerance})")
        (out / DONE).write_text(json.dumps({"step": step, "export_max_logit_diff": diff}) + "\n")
    dist.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_job(job_parser("python -m train", __doc__, "0 = stage I; R >= 1 = stage II of round R"), argv)
    # DeepSpeed's ZeRO-3 calls a deprecated torch collective on every step: one warning per call floods the log
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    train(cfg, args.round)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
