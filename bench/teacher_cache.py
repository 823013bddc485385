"""Cached teacher targets against the live teacher: training-step time, and the KL error of top-k targets.

One process, plain PyTorch (``train.objective.Objective`` + AdamW, like bench/train_step.py's plain loop),
the same speech micro-batches for every variant, built before timing:
  live, row        the live teacher reading whole packed rows (``loss.teacher_context: row``, the default)
  live, document   the live teacher reading each document alone (``teacher_context: document``): the
                   baseline, as it gives the targets that the cache holds
  cache, k=K       ``train.teacher_cache`` targets (built by its code into a temporary mirror of the shard
                   sets), no teacher forward pass
Variants alternate for ``--repeats`` rounds of ``--steps`` steps (plus one warm-up step each); the table
shows the median per step. On CPU the speed-up is taken from CPU time (on a shared machine wall time
includes waiting for a core), on CUDA from wall time.

The KL error is |KL(cache, k) - KL(exact)| / KL(exact), summed over ``--error-batches`` batches, for each k
of ``--ks`` (log-probabilities stored as ``--dtype``), at the initial weights or with a trained student
(``--student``, a round's export). Beside it: the KL between the row and the document teacher's targets at
the same positions, which is how much packing moves the live teacher.

    python -m bench.teacher_cache [--config C --steps 4 --repeats 3 --top-k 64] [k=v ...]

Default config: configs/toy.yaml when the toy assets exist, else configs/smoke.yaml. Last lines:
``RESULT teacher_cache_kl_rel_error_k<K> <value>`` per k, then ``RESULT teacher_cache_speedup <ratio>``
(live, document / cache).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.train_step import machine
from config import split_overrides

ROOT = Path(__file__).resolve().parents[1]


BENCH_OVERRIDES = ["data.text_ratio=0", "loss.teacher_context=document", "loss.teacher_cache=required"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    toy = (ROOT / "assets/toy/speech/index.json").is_file()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=f"configs/{'toy' if toy else 'smoke'}.yaml")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and repeat")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all variants, alternating")
    p.add_argument("--top-k", type=int, default=64, help="k of the timed cache")
    p.add_argument("--ks", default="4,16,64,V", help="k whose KL error is measured (V: the vocabulary)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="cached log-probs")
    p.add_argument("--error-batches", type=int, default=8)
    p.add_argument("--student", help="a round's export (runs/<name>/round-R/export) for the KL error")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(args)
    args.ks = {k if k == "V" else int(k) for k in args.ks.split(",")} | {args.top_k}
    if min(args.steps, args.repeats, args.error_batches, *(k for k in args.ks if k != "V")) < 1:
        p.error("--steps, --repeats, --error-batches and every k must be >= 1")
    args.overrides = BENCH_OVERRIDES + overrides
    return args


def mirror(set_dir: str, out: Path) -> str:
    """A shard set's folder with its shards linked, so that a cache can be written beside them."""
    out.mkdir(parents=True)
    for path in Path(set_dir).resolve().iterdir():
        if path.suffix == ".tar":
            (out / path.name).symlink_to(path)
        elif path.is_file():
            shutil.copy(path, out / path.name)
    return str(out)


def build_caches(cfg, args: argparse.Namespace, tmp: Path) -> dict[int, tuple[object, float, float]]:
    """k -> (config whose speech sets are mirrors with a k cache, build seconds, cache bytes per token)."""
    from safetensors import safe_open

    from train.teacher_cache import CACHE_DIR, build_cache

    vocab = json.loads((Path(cfg.model.llm.path) / "config.json").read_text())["vocab_size"]
    out = {}
    for k in sorted({vocab if k == "V" else k for k in args.ks}):
        speech = [replace(r, path=mirror(r.path, tmp / f"k{k}" / f"speech{i}"))
                  for i, r in enumerate(cfg.data.speech)]
        kcfg = copy.deepcopy(cfg)
        kcfg.data = replace(cfg.data, speech=speech, text=[])
        start = time.perf_counter()
        build_cache(kcfg, [(r.path, False) for r in speech], k, args.dtype, torch.device(args.device), 16384,
                    progress=False)
        seconds = time.perf_counter() - start
        files = [f for r in speech for f in (Path(r.path) / CACHE_DIR).glob("*.safetensors")]
        tokens = 0
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                tokens += handle.get_slice("ids").get_shape()[0]
        out[k] = (kcfg, seconds, sum(f.stat().st_size for f in files) / tokens)
    return out


def batches(cfg, model, tokenizer, count: int, device: str) -> list:
    """The first ``count`` speech micro-batches of rank 0, with their cached targets."""
    from train.data import BatchSource
    from train.teacher_cache import open_cache

    cache = open_cache(cfg, [r.path for r in cfg.data.speech], tokenizer)
    source = BatchSource(cfg.data, cfg.inputs, cfg.stream, tokenizer, model.vectors_for, cfg.seed, 0, 1,
                         teacher_cache=cache)
    return [source.next(step, 0)[0].to(device) for step in range(count)]


def kl_errors(model, cfg, per_k: dict[int, list], live: list) -> tuple[dict[int, float], float, float]:
    """Relative KL error per k against the exact KL (live teacher, document context), the exact KL per
    batch, and KL(row teacher || document teacher) per aligned position."""
    from train.losses import chunked_kl
    from train.objective import Objective

    objective = Objective(model, cfg.loss)
    row = Objective(model, replace(cfg.loss, teacher_context="row", teacher_cache="off"))
    with torch.no_grad():
        exact = sum(objective(b)["kl"].item() for b in live)
        errors = {k: abs(sum(objective(b)["kl"].item() for b in bs) - exact) / exact
                  for k, bs in per_k.items()}
        moved = 0.0
        for b in live:
            _, layout = model(b)
            at = (layout.map_row, layout.map_teacher)
            moved += chunked_kl(row.teacher_hidden(b, layout)[at], objective.teacher_hidden(b, layout)[at],
                                model.teacher_head, model.teacher_head, 1.0, cfg.loss.chunk_size).item()
    return errors, exact / len(live), moved / len(live)


def time_variants(model, cfg, variants: dict[str, tuple[object, list]], args: argparse.Namespace) -> dict:
    """Median (wall, CPU) seconds per step of each variant: forward + backward + AdamW step, each variant
    from the same initial weights, its first step untimed."""
    from train.engine import param_groups
    from train.objective import Objective

    initial = copy.deepcopy(model.state_dict())
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (loss_cfg, steps) in variants.items():
            model.load_state_dict(initial)
            objective = Objective(model, loss_cfg)
            optimizer = torch.optim.AdamW(param_groups(objective, cfg.train))
            for i, batch in enumerate(steps):
                if i == 1:
                    sync()
                    wall, cpu = time.perf_counter(), time.process_time()
                out = objective(batch)
                out["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            n = len(steps) - 1
            times[name].append(((time.perf_counter() - wall) / n, (time.process_time() - cpu) / n))
            if (out["cached"] == 1) != name.startswith("cache"):
                raise SystemExit(f"variant {name!r} did not take its teacher path")
    return {name: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
            for name, runs in times.items()}


def device_name(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}; torch {torch.__version__}"
    return f"{machine()}; {args.threads} thread(s)"


def report(args: argparse.Namespace, caches: dict, errors: dict, exact: float, moved: float,
           timing: dict) -> None:
    console = Console()
    if not console.is_terminal:
        console.width = 120
    table = Table(title=f"Training step (fwd + bwd + AdamW), cached vs live teacher: {args.config} "
                        f"{' '.join(args.overrides)}", caption=device_name(args))
    for col in ("variant", "wall s/step", "CPU s/step", "speed-up vs live, document"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    use = 1 if args.device == "cpu" else 0
    base = timing["live, document"][use]
    for name, times in timing.items():
        table.add_row(name, f"{times[0]:.3f}", f"{times[1]:.3f}", f"{base / times[use]:.3f}")
    console.print(table)
    student = f"student {args.student}" if args.student else "initial weights"
    errs = Table(title=f"KL of top-k targets vs the exact KL ({args.error_batches} batches, {student}, "
                       f"log-probs as {args.dtype})")
    for col in ("k", "relative KL error", "cache bytes / token", "build s"):
        errs.add_column(col, justify="right")
    for k, (_, seconds, per_token) in caches.items():
        errs.add_row(str(k), f"{errors[k]:.2e}", f"{per_token:.0f}", f"{seconds:.2f}")
    console.print(errs)
    console.print(f"exact KL {exact:.4f} nats per position; KL(row teacher || document teacher) at the same "
                  f"positions {moved:.4f} nats: what packing moves the live teacher's targets")
    print(f"RESULT teacher_context_row_vs_document_kl {moved:.4f}")
    for k in caches:
        print(f"RESULT teacher_cache_kl_rel_error_k{k} {errors[k]:.3e}")
    print(f"RESULT teacher_cache_speedup {base / timing[f'cache, k={args.top_k}'][use]:.4f}")


def main() -> None:
    from model.build import build_speech_lm, load_export, load_tokenizer
    from rounds.experiment import load_experiment

    args = parse()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)   # the config's asset paths are relative to the repository
    cfg = load_experiment(args.config, args.overrides)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp, Console().status("building caches ...") as status:
        caches = build_caches(cfg, args, Path(tmp))
        model = build_speech_lm(cfg.model).to(args.device)
        tokenizer = load_tokenizer(cfg.model)
        status.update("building batches ...")
        count = max(args.steps + 1, args.error_batches)
        per_k = {k: batches(kcfg, model, tokenizer, count, args.device) for k, (kcfg, _, _) in caches.items()}
        live = [replace(b, teacher=None) for b in per_k[args.top_k]]
        status.update("measuring the KL error ...")
        student = load_export(args.student, cfg.model.llm.path)[0].to(args.device) if args.student else model
        errors, exact, moved = kl_errors(student, cfg, {k: b[: args.error_batches] for k, b in per_k.items()},
                                         live[: args.error_batches])
        status.update("timing steps ...")
        steps = args.steps + 1
        row = replace(cfg.loss, teacher_context="row", teacher_cache="off")
        variants = {"live, row": (row, live[:steps]), "live, document": (cfg.loss, live[:steps]),
                    f"cache, k={args.top_k}": (cfg.loss, per_k[args.top_k][:steps])}
        timing = time_variants(model, cfg, variants, args)
    report(args, caches, errors, exact, moved, timing)


if __name__ == "__main__":
    main()
