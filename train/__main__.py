"""Stage-I / stage-II distillation training on DeepSpeed ZeRO-3.

    python -m train --config CONFIG [--round R] [key=value ...]
    torchrun --nproc_per_node N -m train --config CONFIG ...
    deepspeed [--hostfile H] --module train --config CONFIG ...

Writes ``runs/<name>/round-R/``: ``checkpoints/``, ``metrics.jsonl``, ``export/`` and ``DONE``; with
``train.monitor``, every figure of ``metrics.jsonl`` also goes to TensorBoard, CSV or W&B (``train/monitor.py``).
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

from config import to_dict
from rounds.experiment import ExperimentConfig, job_parser, parse_job
from train import checkpoint, distributed
from train.layout import DONE, PRE_DECAY
from train.monitor import Monitor, round_offset, scalars
from train.schedule import decay_start

STEP_FIGURES = ("loss", "kl", "nll", "ctc", "tokens", "cached")   # the Objective's outputs a logged step reports


def ensure_assets(cfg: ExperimentConfig, rank: int) -> None:
    """Build missing or stale assets (tiny LLM, shards) with the config's builder module, on rank 0 only. The
    builder runs every time: it decides what is stale (toy.build stamps each part) and is quick when nothing is."""
    paths = [Path(p) for p in (cfg.model.llm.path, *(r.path for r in cfg.data.speech + cfg.data.text),
                               cfg.eval.heldout, *(f for t in cfg.eval.tasks for f in (t.path, t.fewshot_path)),
                               cfg.selection.pool) if p]
    if rank == 0 and cfg.data.assets:
        subprocess.run([sys.executable, "-m", cfg.data.assets], check=True)
    distributed.barrier()
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
    per_rank = distributed.all_gather_object(local)
    if distributed.rank() == 0:
        path.write_text(json.dumps({"world_size": world, "params_total": total, "params_trainable": trainable,
                                    "params_per_rank": per_rank}, indent=2) + "\n")


class LogWindow:
    """The step figures since the last logged step, summed on the device: the host reads them (one wait for the
    GPU) and the ranks add them up only when a step is logged, so the queue of ZeRO-3 gathers never stalls in
    between."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(STEP_FIGURES), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.audio_s, self.micro_steps, self.since = 0.0, 0, time.perf_counter()

    def add(self, outputs: dict[str, torch.Tensor], audio_s: float) -> None:
        self.sums += torch.stack([outputs[name].detach().double() for name in STEP_FIGURES])
        self.audio_s += audio_s
        self.micro_steps += 1

    def record(self, step: int, lr: float, cached: bool) -> dict:
        """The logged figures, as means over the window's micro-steps on every rank; starts a new window."""
        figures = dict(zip(STEP_FIGURES, distributed.all_reduce(self.sums).tolist(), strict=True))
        audio = float(distributed.all_reduce(torch.tensor(self.audio_s, dtype=torch.float64)))
        elapsed, n = time.perf_counter() - self.since, self.micro_steps * distributed.world()
        record = {"step": step, **{k: figures[k] / n for k in ("loss", "kl", "nll", "ctc")}, "lr": lr,
                  "tokens_per_s": figures["tokens"] / elapsed, "audio_s_per_s": audio / elapsed}
        if cached:   # share of micro-batches that used cached teacher targets
            record["teacher_cached"] = figures["cached"] / n
        if self.sums.device.type == "cuda":   # peak GPU memory since the last logged step, the most of any rank
            peak = torch.tensor(torch.cuda.max_memory_allocated(self.sums.device) / 2**30, dtype=torch.float64)
            record["gpu_mem_gib"] = float(distributed.all_reduce(peak, "max"))
            torch.cuda.reset_peak_memory_stats(self.sums.device)
        self.reset()
        return record


def progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[status]}"), disable=not enabled, transient=False)


def train(cfg: ExperimentConfig, round_: int) -> Path:
    from model.build import load_tokenizer
    from shards.format import atomic_write_json
    from train.data import BatchSource, check_sample_rate, heldout_batch, plays, round_speech_sets, shares, speech_draws
    from train.engine import build_engine, build_model
    from train.export import check_export, export
    from train.objective import Objective, diagnostic_means
    from train.teacher_cache import open_cache

    rank, world = distributed.join(cfg.run.comm_timeout_minutes, deepspeed=True)
    run = cfg.run.folder()
    out = run.round(round_)
    if run.trained(round_).exists():
        if rank == 0:
            print(f"{out} is complete ({DONE} exists); nothing to do", file=sys.stderr)
        return out
    ensure_assets(cfg, rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.train, world)
    data = dataclasses.replace(cfg.data, speech=round_speech_sets(cfg.run.path(), cfg.data, round_))
    schedule = cfg.train.for_round(round_)
    if rank == 0:   # what this round's speech documents are drawn from, and how often each is heard
        mix = shares(data.speech)
        draws = speech_draws(data, schedule.max_steps, schedule.grad_accum, world)
        heard = plays(data.speech, draws)
        atomic_write_json(out / "data_mix.json", {"speech_shares": mix, "text_ratio": data.text_ratio,
                                                   "speech_draws": draws, "plays": heard})
        print(f"round {round_}: speech documents from " + ", ".join(
            f"{p} {v:.1%}" + ("" if heard[p] is None else f" (each heard {heard[p]:.2g}x)") for p, v in mix.items())
            + f"; text-only micro-batches {data.text_ratio:.0%}", file=sys.stderr)
    check_sample_rate(data.speech, model.encoder.sample_rate)
    tokenizer = load_tokenizer(cfg.model)
    engine = build_engine(Objective(model, cfg.loss, distributed=world > 1), schedule, world)
    describe_partitions(engine, out / "engine.json", world)
    ckpt_dir = run.checkpoints(round_)
    resumed = checkpoint.resume(engine, ckpt_dir)
    start = None
    if round_ > 0:   # stage II: from a pre-decay checkpoint (TrainConfig.stage2_start), with this round's schedule
        start = run.checkpoints(cfg.train.stage2_start(round_)) / PRE_DECAY
        if resumed is None:
            checkpoint.start_from(engine, start.parent, PRE_DECAY)
        if rank == 0:
            print(f"round {round_}: stage II from {start}, {schedule.max_steps} steps, decaying over the last "
                  f"{schedule.decay_fraction:.0%}", file=sys.stderr)
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

    def save_pre_decay() -> None:   # not at the first step of stage II: its start is another round's checkpoint
        if step == pre_decay and (round_ == 0 or pre_decay > 0) and not (ckpt_dir / PRE_DECAY).exists():
            checkpoint.save(engine, ckpt_dir, PRE_DECAY, step, source.state())

    window = LogWindow(engine.device)
    bar = progress(rank == 0)
    offset = round_offset(cfg.train, round_)   # the monitor's steps run on across rounds (train/monitor.py)
    with bar, Monitor(cfg.train.monitor, cfg.run, f"round-{round_} train", rank) as monitor:
        monitor.purge(offset + step + 1)   # what a killed try logged past the checkpoint, as metrics.jsonl
        task = bar.add_task(f"train round {round_}", total=schedule.max_steps, completed=step, status="")
        while step < schedule.max_steps:
            save_pre_decay()
            # Seeded per step and rank (dropout, any sampling in the model): a resumed run repeats the steps of an
            # uninterrupted one exactly.
            torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
            for micro in range(schedule.grad_accum):
                batch, _ = source.next(step, micro)
                outputs = engine(batch.to(engine.device))
                engine.backward(outputs["loss"])
                # Called at every micro-step, unlike a plain optimizer: DeepSpeed counts them and updates the
                # weights (and the learning rate) at the last micro-step of each grad_accum.
                engine.step()
                window.add(outputs, float(batch.wave_lengths.sum()) / model.encoder.sample_rate)
            step += 1
            diagnose = heldout is not None and step % schedule.diagnostics_every == 0
            if diagnose or step % schedule.log_every == 0 or step == schedule.max_steps:
                record = window.record(step, engine.get_lr()[0], teacher_cache is not None)
                if diagnose:   # M, F, D on the held-out batch (its forward is a collective under ZeRO-3)
                    record.update(diagnostic_means(distributed.all_reduce(
                        engine.module.diagnostics(heldout) * heldout_weight)))
                if rank == 0:
                    write_metrics(metrics, record)
                    monitor.write(scalars({k: v for k, v in record.items() if k != "step"}, "train"), offset + step)
                bar.update(task, status=f"loss {record['loss']:.3f} kl {record['kl']:.3f} "
                           f"{record['tokens_per_s']:.0f} tok/s {record['audio_s_per_s']:.1f} audio-s/s")
            bar.update(task, completed=step)
            if step % schedule.save_every == 0 and step < schedule.max_steps:
                checkpoint.save(engine, ckpt_dir, f"{checkpoint.PERIODIC_PREFIX}{step:07d}", step, source.state())
                if rank == 0:
                    checkpoint.prune(ckpt_dir, schedule.keep_checkpoints)
    save_pre_decay()   # no decay phase (decay_fraction 0): the end is the pre-decay point
    checkpoint.save(engine, ckpt_dir, "final", step, source.state())
    distributed.barrier()
    if rank == 0:
        export(cfg.model, ckpt_dir, "final", run.export(round_))
    distributed.barrier()
    probe, _ = source.next(step, micro=0)   # a batch past the last step: data no step has seen
    verdict = check_export(engine.module.model, run.export(round_), probe.to(engine.device), cfg.train, rank)
    if rank == 0:
        done = {"step": step, "started_from": str(start) if start else None, **verdict}
        run.trained(round_).write_text(json.dumps(done) + "\n")
    distributed.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_job(job_parser("python -m train", __doc__, "0 = stage I; R >= 1 = stage II of round R"), argv)
    # DeepSpeed's ZeRO-3 calls a deprecated torch collective on every step: one warning per call floods the log
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    train(cfg, args.round)
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
