"""Peak memory and time of the chunked distillation loss against the naive full-logits version.

Forward + backward of KL(teacher || student) at N mapped positions with Qwen2.5's vocabulary
(152064). The naive version projects all N positions at once ([N, V] logits, log-softmax, KL); the
chunked one is ``train.losses.distillation_loss``. Two cases: gradient into the student's hidden states
only (the head is frozen: frozen LLM, or LoRA without lm_head) and a trainable student head (full
fine-tuning, whose V x H weight gradient neither version can avoid).

Each variant runs in a fresh subprocess. Peak memory is measured above the memory held once the
weights and inputs exist: on CUDA with ``torch.cuda.max_memory_allocated``; on CPU with the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs just before the loss), which sees every
torch allocation. The hidden size only scales compute time (and the weight gradient), not the logits.

    python -m bench.kd_loss [--positions 1024 --hidden 256 --chunk 64 --device cpu]

The last line is ``RESULT kd_loss_peak_mem_ratio <chunked / naive>`` (frozen head; goal <= 0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from train.losses import distillation_loss

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def naive_distillation(student_hidden, teacher_hidden, student_head, teacher_head, temperature):
    """The usual full-logits KD loss: every position's logits at once."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)
    student_logp = F.log_softmax(student_head(student_hidden).float() / temperature, dim=-1)
    kl = F.kl_div(student_logp, teacher_logp, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


def _proc_status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak(device: torch.device) -> float:
    """Start a peak measurement; returns the memory held now (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MIB
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _proc_status_mib("VmRSS")


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / MIB
    return _proc_status_mib("VmHWM")


def make_problem(args: argparse.Namespace, vocab: int, positions: int) -> tuple:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    student_head = nn.Linear(args.hidden, vocab, bias=False, device=device, dtype=dtype)
    teacher_head = nn.Linear(args.hidden, vocab, bias=False, device=device, dtype=dtype)
    teacher_head.requires_grad_(False)
    student_head.requires_grad_(args.trainable_head)
    teacher_hidden = torch.randn(positions, args.hidden, device=device, dtype=dtype)
    student_hidden = (teacher_hidden + 0.5 * torch.randn_like(teacher_hidden)).requires_grad_()
    return student_hidden, teacher_hidden, student_head, teacher_head


def step(args: argparse.Namespace, problem: tuple) -> torch.Tensor:
    """Forward + backward of one variant."""
    if args.worker == "naive":
        loss = naive_distillation(*problem, args.temperature)
    else:
        loss = distillation_loss(*problem, args.temperature, args.chunk)
    loss.backward()
    return loss


def worker(args: argparse.Namespace) -> dict:
    """One variant, in its own process: build weights and inputs, then time and measure one step.

    A tiny warm-up first, so that neither variant's peak counts one-off costs (code pages and thread
    pools touched on first use: about 170 MB of RSS on CPU). On CUDA the full step is warmed up too.
    """
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    step(args, make_problem(args, vocab=1000, positions=2 * args.chunk))
    problem = make_problem(args, args.vocab, args.positions)
    if device.type == "cuda":  # too slow to afford on CPU
        step(args, problem)
        problem[0].grad = problem[2].weight.grad = None
    held = _reset_peak(device)
    start = time.perf_counter()
    loss = step(args, problem)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"peak_mib": _peak(device) - held, "seconds": seconds, "loss": loss.item(),
            "grad_norm": problem[0].grad.float().norm().item()}


def run_variant(args: argparse.Namespace, variant: str, trainable_head: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.kd_loss", "--worker", variant, "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--positions", str(args.positions), "--chunk", str(args.chunk),
           "--temperature", str(args.temperature)] + (["--trainable-head"] if trainable_head else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench worker {variant} (trainable_head={trainable_head}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        chip = torch.cuda.get_device_name()
    else:
        chip = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    return f"{chip}; torch {torch.__version__}; python {platform.python_version()}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--vocab", type=int, default=152064, help="Qwen2.5's vocabulary")
    p.add_argument("--hidden", type=int, default=None, help="2048 (Qwen2.5-3B) on CUDA, 256 on CPU")
    p.add_argument("--positions", type=int, default=None, help="mapped positions N: 8192 on CUDA, 1024 on CPU")
    p.add_argument("--chunk", type=int, default=None, help="chunk size: 512 on CUDA, 64 on CPU")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--skip-trainable-head", action="store_true", help="only the frozen-head case")
    p.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--trainable-head", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.hidden = args.hidden or (2048 if on_gpu else 256)
    args.positions = args.positions or (8192 if on_gpu else 1024)
    args.chunk = args.chunk or (512 if on_gpu else 64)
    return args


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    console = Console()
    if not console.is_terminal:
        console.width = 120
    cases = [False] if args.skip_trainable_head else [False, True]
    rows = {}
    with console.status("running variants in fresh processes ...") as status:
        for trainable in cases:
            for variant in ("naive", "chunked"):
                status.update(f"{variant}, head {'trainable' if trainable else 'frozen'} ...")
                rows[variant, trainable] = run_variant(args, variant, trainable)

    table = Table(title=f"KD loss fwd+bwd: N={args.positions}, V={args.vocab}, H={args.hidden}, {args.dtype}, "
                        f"chunk={args.chunk}, T={args.temperature}", caption=machine(args))
    for col in ("student head", "variant", "peak MiB", "time s", "loss", "|grad hidden|", "mem ratio",
                "time ratio"):
        table.add_column(col, justify="left" if col in ("student head", "variant") else "right")
    for (variant, trainable), r in rows.items():
        base = rows["naive", trainable]
        for key in ("loss", "grad_norm"):
            if abs(r[key] - base[key]) > 1e-3 * abs(base[key]) + 1e-6:
                raise SystemExit(f"chunked {key} {r[key]} differs from naive {base[key]}")
        table.add_row("trainable" if trainable else "frozen", variant, f"{r['peak_mib']:.0f}", f"{r['seconds']:.2f}",
                      f"{r['loss']:.5f}", f"{r['grad_norm']:.4e}", f"{r['peak_mib'] / base['peak_mib']:.3f}",
                      f"{r['seconds'] / base['seconds']:.2f}")
    console.print(table)
    console.print("peak = memory above what weights and inputs hold (CPU: peak RSS; CUDA: max allocated)")
    if True in cases:
        trained = rows["chunked", True]["peak_mib"] / rows["naive", True]["peak_mib"]
        print(f"RESULT kd_loss_peak_mem_ratio_trainable_head {trained:.4f}")
    print(f"RESULT kd_loss_time_ratio {rows['chunked', False]['seconds'] / rows['naive', False]['seconds']:.4f}")
    print(f"RESULT kd_loss_peak_mem_ratio {rows['chunked', False]['peak_mib'] / rows['naive', False]['peak_mib']:.4f}")


if __name__ == "__main__":
    main()
