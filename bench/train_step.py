"""Throughput of a training step: 2-rank DeepSpeed ZeRO-3 on CPU against a 1-process plain PyTorch loop.

A step is forward + backward + optimizer step of ``train.objective.Objective`` (student, teacher and
chunked KL) on one packed micro-batch per rank (x ``train.grad_accum``). Both variants see the same
per-rank batches, built before timing (data preparation is not timed): the ZeRO-3 run (launched with
``torch.distributed.run``; ``train.engine.build_engine`` with the merged ``ds_configs/zero3_cpu.json``)
steps every rank's batch at once; the plain loop (``torch.optim.AdamW`` over the same parameter groups,
gradient clipping, no process group) steps rank 0's batch, then rank 1's, and so on. Scaling is
(ZeRO-3 tokens/s) / (ranks x plain tokens/s); tokens are the aligned target tokens the loss sees.
Each process runs ``--threads`` threads (default 1: 2 ranks x 1 thread against 1 process x 1 thread).
CPU time per step is reported too: on a machine shared with other work, ranks that wait for each
other at every ZeRO-3 gather lose wall time that the single process does not.

    python -m bench.train_step [--steps 4 --warmup 1 --ranks 2 key=value ...]

The smoke model with bigger steps (data.docs_per_batch=64, data.text_ratio=0: at 16 documents ZeRO-3's
per-step overhead is as large as the step), then the given overrides. Last line:
``RESULT zero3_cpu_scaling <value>`` (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

from config import ConfigError, split_overrides

if TYPE_CHECKING:
    from rounds.experiment import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]
BENCH_OVERRIDES = ["data.docs_per_batch=64", "data.text_ratio=0"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (per rank)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--ranks", type=int, default=2, help="ZeRO-3 processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--worker", choices=["zero3", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(args)
    if args.steps < 1 or args.warmup < 0 or args.ranks < 1 or args.threads < 1:
        p.error("--steps, --ranks and --threads must be >= 1, --warmup >= 0")
    args.user_overrides = overrides
    args.overrides = BENCH_OVERRIDES + overrides + [f"train.max_steps={args.warmup + args.steps}"]
    return args


# ---- host reads ----------------------------------------------------------------------------------
SIZED_BY_DATA = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                 "aten.repeat_interleave.Tensor", "aten._unique2.default", "aten.unique_consecutive.default",
                 "aten.bincount.default"}


class HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for the device, by the repository file that called them (the
    innermost frame outside site-packages): a value read back (``item``, ``int``, ``bool``: aten's
    ``_local_scalar_dense``), an output sized by the data (``nonzero``, ``repeat_interleave`` without
    ``output_size``, ...), or indexing with a boolean mask (a ``nonzero`` inside). On a CPU they cost nothing;
    on a GPU each one waits until every kernel launched before it has run, which stalls the queue of ZeRO-3
    gathers. Counted on the CPU, they are what a GPU would wait for."""

    def __init__(self) -> None:
        super().__init__()
        self.by_file: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        hit = name in SIZED_BY_DATA and not (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size"))
        if name.startswith(("aten.index.Tensor", "aten.index_put")):
            hit = any(i is not None and i.dtype == torch.bool for i in args[1])
        if hit:
            import traceback

            ours = [f.filename for f in traceback.extract_stack()[:-1]   # not this method's own frame
                    if f.filename.startswith(str(ROOT)) and "site-packages" not in f.filename]
            where = Path(ours[-1]).relative_to(ROOT).as_posix() if ours else "other"
            self.by_file[where] = self.by_file.get(where, 0) + 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.by_file.values())


def host_reads(objective: torch.nn.Module, batch) -> HostReads:
    """The host reads of one micro-step's forward and backward of ``objective`` on ``batch``."""
    with HostReads() as reads:
        objective(batch)["loss"].backward()
    return reads


# ---- workers -------------------------------------------------------------------------------------
def setup(args: argparse.Namespace, cfg: ExperimentConfig, ranks: list[int]):
    """The model and the micro-batches of ``ranks`` for every step (built before timing)."""
    from model.build import build_speech_lm, load_tokenizer
    from train.data import BatchSource, check_sample_rate

    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    model = build_speech_lm(cfg.model)
    check_sample_rate(cfg.data.speech, model.encoder.sample_rate)
    tokenizer = load_tokenizer(cfg.model)
    steps = args.warmup + args.steps
    batches = {}   # rank -> [[micro-batch, ...] per step]
    for rank in ranks:
        source = BatchSource(cfg.data, cfg.inputs, cfg.stream, tokenizer, model.vectors_for, cfg.seed, rank,
                             args.ranks)
        batches[rank] = [[source.next(step, micro)[0] for micro in range(cfg.train.grad_accum)]
                         for step in range(steps)]
    return model, batches


def run_steps(step_fn, steps: list, warmup: int, sample_rate: int, sync=lambda: None) -> dict:
    """Run ``step_fn`` on each step's micro-batches; time, tokens and audio seconds after ``warmup`` steps."""
    timed = torch.zeros(2, dtype=torch.float64)   # target tokens, audio seconds
    for i, micro_batches in enumerate(steps):
        if i == warmup:
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
        tokens, loss = step_fn(micro_batches)
        if i == 0:
            first_loss = loss
        if i >= warmup:
            audio = sum(float(b.wave_lengths.sum()) for b in micro_batches) / sample_rate
            timed += torch.tensor([tokens, audio], dtype=torch.float64)
    cpu = time.process_time() - cpu_start
    sync()
    return {"seconds": time.perf_counter() - start, "cpu_s": cpu, "tokens": timed[0].item(),
            "audio_s": timed[1].item(), "loss_first": first_loss}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def zero3_worker(args: argparse.Namespace) -> dict | None:
    """One rank of the ZeRO-3 run (under torch.distributed.run); rank 0 returns the totals."""
    from rounds.experiment import load_experiment
    from train import distributed
    from train.__main__ import ensure_assets
    from train.engine import build_engine
    from train.objective import Objective

    rank, world = distributed.join(deepspeed=True)
    if world != args.ranks:
        raise SystemExit(f"--ranks {args.ranks} but the launcher started {world} processes")
    cfg = load_experiment(args.config, args.overrides)
    ensure_assets(cfg, rank)
    model, batches = setup(args, cfg, [rank])
    engine = build_engine(Objective(model, cfg.loss, distributed=world > 1), cfg.train, world)

    def step(micro_batches: list) -> tuple[float, float]:
        tokens = loss = 0.0
        for batch in micro_batches:
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            tokens, loss = tokens + out["tokens"].item(), loss + out["loss"].item()
        return tokens, loss / len(micro_batches)

    result = run_steps(step, batches[rank], args.warmup, model.encoder.sample_rate, sync=distributed.barrier)
    totals = distributed.all_reduce(torch.tensor([result["tokens"], result["audio_s"]], dtype=torch.float64))
    per_rank = distributed.all_gather_object((peak_rss_mib(), result["cpu_s"]))   # (peak RSS, CPU s) per rank
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    distributed.finish()
    if rank:
        return None
    params = list(engine.module.parameters())
    return {**result, "tokens": totals[0].item(), "audio_s": totals[1].item(), "backend": backend,
            "rss_mib": [r for r, _ in per_rank], "cpu_s": [c for _, c in per_rank],
            "params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in params if p.requires_grad)}


def plain_worker(args: argparse.Namespace) -> dict:
    """One process, no DeepSpeed: the same objective and batches, AdamW with the same groups and betas."""
    from rounds.experiment import load_experiment
    from train.engine import deepspeed_config, param_groups
    from train.objective import Objective

    cfg = load_experiment(args.config, args.overrides)
    model, batches = setup(args, cfg, list(range(args.ranks)))
    objective = Objective(model, cfg.loss)
    opt_params = deepspeed_config(cfg.train, world=1)["optimizer"]["params"]
    optimizer = torch.optim.AdamW(param_groups(objective, cfg.train), betas=tuple(opt_params["betas"]),
                                  eps=opt_params["eps"])
    trainable = [p for p in objective.parameters() if p.requires_grad]

    def step(micro_batches: list) -> tuple[float, float]:
        tokens = loss = 0.0
        for batch in micro_batches:
            out = objective(batch)
            (out["loss"] / len(micro_batches)).backward()
            tokens, loss = tokens + out["tokens"].item(), loss + out["loss"].item()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens, loss / len(micro_batches)

    # Rank 0's batch of a step, then rank 1's ...: the same work the ranks share, one after the other.
    steps = [batches[rank][i] for i in range(args.warmup + args.steps) for rank in range(args.ranks)]
    result = run_steps(step, steps, args.warmup * args.ranks, model.encoder.sample_rate)
    reads = host_reads(objective, batches[0][0][0])
    optimizer.zero_grad(set_to_none=True)
    return {**result, "rss_mib": [peak_rss_mib()], "cpu_s": [result["cpu_s"]], "host_reads": reads.by_file,
            "params": sum(p.numel() for p in objective.parameters()),
            "trainable": sum(p.numel() for p in trainable)}


# ---- driver --------------------------------------------------------------------------------------
def run_worker(args: argparse.Namespace, mode: str, out: Path) -> dict:
    script = ["-m", "bench.train_step", "--worker", mode, "--out", str(out), "--config", args.config,
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--ranks", str(args.ranks),
              "--threads", str(args.threads), *args.user_overrides]
    launch = [sys.executable]
    if mode == "zero3":
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.ranks)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(launch + script, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        first = max(done.stderr.find("Traceback"), 0)   # the failing rank's error, not the launcher's summary
        raise SystemExit(f"bench worker {mode} failed (exit {done.returncode}):\n{done.stderr[first:first + 4000]}")
    return json.loads(out.read_text())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine() -> str:
    usable = len(os.sched_getaffinity(0))
    return (f"{cpu_model()}, {os.cpu_count()} cores ({usable} usable); torch {torch.__version__}, "
            f"deepspeed {version('deepspeed')}")


def report(args: argparse.Namespace, rows: dict[str, dict], load: list[str]) -> None:
    zero3, plain = rows["zero3"], rows["plain"]
    if abs(zero3["tokens"] - plain["tokens"]) > 0.5 or \
            abs(zero3["loss_first"] - plain["loss_first"]) > 1e-3 * abs(plain["loss_first"]):
        raise SystemExit(f"the variants did different work: target tokens {zero3['tokens']} vs {plain['tokens']}, "
                         f"first-step loss {zero3['loss_first']} vs {plain['loss_first']}")
    console = Console()
    if not console.is_terminal:
        console.width = 120
    table = Table(title=f"Training step (fwd + bwd + optimizer): {args.config} {' '.join(args.overrides)}",
                  caption=f"{machine()}\nload average (1/5/15 min) before / between / after: {' / '.join(load)}")
    for col in ("variant", "procs x\nthreads", "timed\nsteps", "wall\ns/step", "CPU s/step\nper rank", "tokens/s",
                "audio-s/s", "peak RSS MiB\nper rank", "step-1\nloss"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    labels = {"zero3": f"ZeRO-3 ({zero3['backend']})", "plain": "plain PyTorch"}
    for name, r in rows.items():
        procs, steps = (args.ranks, args.steps) if name == "zero3" else (1, args.steps * args.ranks)
        table.add_row(labels[name], f"{procs} x {args.threads}", str(steps), f"{r['seconds'] / steps:.3f}",
                      " / ".join(f"{c / steps:.3f}" for c in r["cpu_s"]), f"{r['tokens'] / r['seconds']:.0f}",
                      f"{r['audio_s'] / r['seconds']:.1f}", " / ".join(f"{m:.0f}" for m in r["rss_mib"]),
                      f"{r['loss_first']:.4f}")
    console.print(table)
    scaling = (zero3["tokens"] / zero3["seconds"]) / (args.ranks * plain["tokens"] / plain["seconds"])
    cpu_scaling = plain["cpu_s"][0] / args.ranks / max(zero3["cpu_s"])
    console.print(f"Per rank and step: {zero3['tokens'] / args.steps / args.ranks:.0f} target tokens, "
                  f"{zero3['audio_s'] / args.steps / args.ranks:.1f} audio-s. Parameters {zero3['params']:,} "
                  f"({zero3['trainable']:,} trainable). Batches are built before timing.")
    console.print(f"scaling = ZeRO-3 tokens/s / ({args.ranks} x plain tokens/s) = {scaling:.3f} (goal >= 0.8); "
                  f"by CPU time per step (what an idle core per rank would give, less waiting) {cpu_scaling:.3f}")
    reads = plain["host_reads"]
    console.print(f"Host reads (what a GPU would wait for) in one micro-step's forward + backward: "
                  f"{sum(reads.values())} ({', '.join(f'{n} from {f}' for f, n in sorted(reads.items())) or 'none'})")
    for name, r in rows.items():
        print(f"RESULT {name}_tokens_per_s {r['tokens'] / r['seconds']:.1f}")
        print(f"RESULT {name}_audio_s_per_s {r['audio_s'] / r['seconds']:.2f}")
        print(f"RESULT {name}_peak_rss_mib {max(r['rss_mib']):.0f}")
    print(f"RESULT host_reads_per_micro_step {sum(reads.values())}")
    print(f"RESULT zero3_cputime_scaling {cpu_scaling:.4f}")
    print(f"RESULT zero3_cpu_scaling {scaling:.4f}")


def check_config(args: argparse.Namespace) -> None:
    """Fail on a bad config or override here, with its message, not inside a launched rank."""
    from rounds.experiment import load_experiment

    try:
        load_experiment(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


def main() -> None:
    args = parse()
    if args.worker:
        result = zero3_worker(args) if args.worker == "zero3" else plain_worker(args)
        if result is not None:
            Path(args.out).write_text(json.dumps(result))
        return
    if torch.cuda.is_available():
        print("GPU present: the GPU training-step benchmark is bench/gpu_train.py; "
              "this CPU benchmark is skipped.")
        return
    check_config(args)
    load = [" ".join(f"{x:.2f}" for x in os.getloadavg())]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, Console().status("running ...") as status:
        for mode in ("zero3", "plain"):   # zero3 first: its rank 0 builds missing assets
            status.update(f"{mode} ...")
            rows[mode] = run_worker(args, mode, Path(tmp) / f"{mode}.json")
            load.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
    report(args, rows, load)


if __name__ == "__main__":
    main()
