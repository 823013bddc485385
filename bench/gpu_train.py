"""Training throughput and MFU of ZeRO-3 on one device against a plain PyTorch loop: same model, same batches.

The model is the paper's (``configs/qwen2.5-3b-mimi.yaml``) with random weights: a Qwen2.5-3B-shaped LLM (its
config.json: hidden 2048, 36 layers, 16 heads, 2 KV heads, MLP 11008, vocabulary 151936, tied embeddings),
trained whole (``mode: full``) with a frozen, partitioned teacher copy, a frozen Mimi-shaped encoder
(transformers' ``MimiConfig()`` sizes), the 12-layer adapter, bf16, activation checkpointing. Both are saved
with save_pretrained into a temporary folder and loaded through the trainer's path. A step is forward +
backward + optimizer step of ``train.objective.Objective`` over ``train.grad_accum`` micro-batches of
``--rows`` rows; each row is one synthetic document (random token ids, noise audio at 2.5 words/s, 1.3 tokens
per word, span lengths from ``inputs``) that fills the student's row of ``inputs.context`` (2048) positions.
Both variants run in their own process on the same batches (built before timing, moved to the device per
micro-batch): ``zero3`` is ``train.engine.build_engine`` (ZeRO-3, 1 rank, the config's DeepSpeed JSON) with the
LLM loaded under ``train.engine.llm_init``; ``plain`` is the model on the device, ``torch.optim.AdamW`` (the
same parameter groups and betas, on the bf16 weights: no fp32 master copy), gradient clipping, no DeepSpeed.

Model FLOPs of a micro-batch (``step_stats``; no recomputation, embeddings, norms or softmax), with N the LLM's
decoder-layer parameters (N_t of them trained), L layers, a = heads x head size, V x H the head, rows of s
student and t teacher positions, M aligned positions:
  student   (4 N + 2 N_t) sum(s) + 3 * 4 L a sum(s (s + 1) / 2) + (4 + 2 [head trained]) V H M
            (forward 2N, input gradients 2N, weight gradients 2N_t; causal attention: s (s + 1) / 2 pairs)
  teacher   2 N sum(t) + 4 L a sum(t (t + 1) / 2) + 2 V H M            (forward only)
  adapter   6 N_a n + 3 * 4 L_a w sum(n_i (n_i + 1) / 2)   (all trained; n_i vectors of speech span i)
  encoder   its forward, counted by torch.utils.flop_counter on 1 s of audio, times the seconds encoded.
The head terms count once for the KL and once more for the NLL when loss.alpha < 1; the CTC term (off in the
paper's config) is not counted. MFU = model FLOPs / s / peak: bf16 dense peaks by device name (H100 SXM and
H200 989 TFLOPS, H100 PCIe 756, A100 312) or --peak-tflops; on CPU a nominal 0.1 TFLOPS per thread.

    python -m bench.gpu_train [--shape 3b|tiny --steps 5 --warmup 2 --rows 2 --grad-accum 4] [k=v ...]

``--shape 3b`` (the default on a GPU) needs a CUDA GPU; ``--shape tiny`` (the default without one) runs a tiny
Qwen2/Mimi/adapter through the same code (fp32 on CPU). Last lines: ``RESULT mfu <fraction>`` (ZeRO-3, goal
>= 0.45) and ``RESULT mfu_vs_baseline <ZeRO-3 MFU / plain MFU>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.train_step import check_config, machine, peak_rss_mib, run_steps
from config import split_overrides

ROOT = Path(__file__).resolve().parents[1]


MIB = 2**20
WORDS_PER_S, TOKENS_PER_WORD = 2.5, 1.3      # synthetic speech rate and tokens per word
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense
FLOP_PARTS = ("student", "teacher", "adapter", "encoder")
CPU_TFLOPS_PER_THREAD = 0.1                  # nominal: ~3 GHz x 2 AVX2 FMA units x 8 fp32 lanes x 2


@dataclass(frozen=True)
class Shape:
    llm: dict             # Qwen2Config keywords
    mimi: dict            # MimiConfig keywords
    overrides: list[str]  # experiment config overrides
    rows: int             # default rows per micro-batch
    grad_accum: int       # default micro-batches per step


SHAPES = {
    "3b": Shape(llm=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
                mimi={}, overrides=[], rows=2, grad_accum=4),
    "tiny": Shape(llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
                           tie_word_embeddings=True),
                  mimi=dict(hidden_size=16, num_filters=4, num_hidden_layers=2, intermediate_size=32,
                            num_attention_heads=2, num_key_value_heads=2, codebook_size=16, codebook_dim=8,
                            num_quantizers=2, vector_quantization_hidden_dimension=8, upsample_groups=16),
                  overrides=["model.adapter.layers=2", "model.adapter.width=64", "model.adapter.mlp=128",
                             "model.adapter.heads=4", "model.adapter.kv_heads=2", "inputs.context=256",
                             "train.precision=auto", "train.ds_config=auto"],
                  rows=2, grad_accum=1),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/qwen2.5-3b-mimi.yaml")
    p.add_argument("--shape", choices=sorted(SHAPES), default="3b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rows", type=int, help="rows per micro-batch (default: 2)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default: 4 for 3b, 1 for tiny)")
    p.add_argument("--peak-tflops", type=float, help="the device's peak (default: by device name)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--worker", choices=["zero3", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(args)
    shape = SHAPES[args.shape]
    args.rows = args.rows or shape.rows
    args.grad_accum = args.grad_accum or shape.grad_accum
    if args.steps < 1 or args.warmup < 0 or args.rows < 1 or args.grad_accum < 1 or args.threads < 1:
        p.error("--steps, --rows, --grad-accum and --threads must be >= 1, --warmup >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error("--peak-tflops must be > 0")
    args.user_overrides = overrides
    args.overrides = shape.overrides + overrides + [f"train.grad_accum={args.grad_accum}",
                                                    f"train.max_steps={args.warmup + args.steps}"]
    return args


def model_overrides(args: argparse.Namespace, assets: Path) -> list[str]:
    """Point the config at the saved random models; the tiny shape runs fp32 without a GPU."""
    out = [f"model.llm.path={assets / 'llm'}", f"model.encoder.path={assets / 'mimi'}"]
    if args.shape == "tiny":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        out += [f"model.llm.dtype={dtype}", f"model.encoder.dtype={dtype}"]
    return out + args.overrides


def save_assets(shape: Shape, folder: Path) -> None:
    """The random-init LLM (bf16) and Mimi, saved as a real checkpoint would be."""
    from transformers import AutoModelForCausalLM, MimiConfig, MimiModel, Qwen2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(**shape.llm), dtype=torch.bfloat16).save_pretrained(folder / "llm")
    MimiModel(MimiConfig(**shape.mimi)).save_pretrained(folder / "mimi")


# ---- batches and FLOPs ---------------------------------------------------------------------------
def synthetic_document(rng: np.random.Generator, inputs, vocab: int, sample_rate: int, vectors_for):
    """Alternating text and speech spans, then text up to exactly ``inputs.context`` student positions."""
    from model.inputs import SPEECH, TEXT, Document, Span

    spans: list[Span] = []
    kind = SPEECH if rng.random() < inputs.speech_first_prob else TEXT
    while True:
        low, high = inputs.speech_words if kind == SPEECH else inputs.text_words
        words = int(rng.integers(low, high + 1))
        ids = rng.integers(0, vocab, max(1, round(words * TOKENS_PER_WORD))).tolist()
        audio = None
        if kind == SPEECH:
            audio = (rng.standard_normal(int(words / WORDS_PER_S * sample_rate)) * 0.1).astype(np.float32)
        span = Span(kind, ids, audio)
        if Document(spans + [span]).lengths(vectors_for, bos=False)[0] > inputs.context:
            break
        spans.append(span)
        kind = TEXT if kind == SPEECH else SPEECH
    room = inputs.context - Document(spans).lengths(vectors_for, bos=False)[0]
    if room:
        spans.append(Span(TEXT, rng.integers(0, vocab, room).tolist()))
    return Document(spans)


def make_batches(cfg, model, args: argparse.Namespace) -> list[list]:
    """[[micro-batch] per step], the same in every process (seeded by the config's seed)."""
    from model.inputs import pack

    rng = np.random.default_rng(cfg.seed)
    vocab, rate = model.llm.config.vocab_size, model.encoder.sample_rate
    return [[pack([synthetic_document(rng, cfg.inputs, vocab, rate, model.vectors_for) for _ in range(args.rows)],
                  model.vectors_for, cfg.inputs.context, bos_id=None)
             for _ in range(args.grad_accum)] for _ in range(args.warmup + args.steps)]


def numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())   # whole size, also of a ZeRO-3 partitioned parameter


def causal_pairs(lengths: torch.Tensor) -> float:
    """Query-key pairs of causal attention over sequences of these lengths."""
    lengths = lengths.double()
    return float((lengths * (lengths + 1) / 2).sum())


def encoder_flops_per_sample(encoder) -> float:
    """Forward FLOPs of the frozen encoder per audio sample, counted on one second of noise."""
    from torch.utils.flop_counter import FlopCounterMode

    wave = torch.randn(1, encoder.sample_rate) * 0.1
    counter = FlopCounterMode(display=False)
    with counter:
        encoder(wave, torch.tensor([wave.shape[1]]))
    return counter.get_total_flops() / wave.shape[1]


def step_stats(model, loss_cfg, micro_batches: list, encoder_per_sample: float) -> tuple[dict[str, float], int]:
    """Model FLOPs of each part (the formulas in the module docstring) and student positions of one step."""
    from model.inputs import Layout

    llm = model.llm.config
    layers = list(model.llm.get_decoder().layers.parameters())
    n, n_trained = sum(map(numel, layers)), sum(numel(p) for p in layers if p.requires_grad)
    attn = llm.num_hidden_layers * llm.num_attention_heads * (getattr(llm, "head_dim", None)
                                                              or llm.hidden_size // llm.num_attention_heads)
    head = llm.vocab_size * llm.hidden_size
    head_trained = model.student_head.weight.requires_grad
    head_uses = int(loss_cfg.alpha > 0) + int(loss_cfg.alpha < 1)
    adapter_n = sum(numel(p) for p in model.adapter.parameters())
    adapter_attn = model.adapter.cfg.layers * model.adapter.cfg.width
    parts, tokens = dict.fromkeys(FLOP_PARTS, 0.0), 0
    for batch in micro_batches:
        vectors = torch.tensor([model.vectors_for(int(x)) for x in batch.wave_lengths], dtype=torch.long)
        layout = Layout.build(batch, vectors, model.adapter.cfg.end_marker)
        s, t, m = layout.student_mask.sum(1), layout.teacher_mask.sum(1), layout.map_row.numel()
        student = (4 * n + 2 * n_trained) * int(s.sum()) + 3 * 4 * attn * causal_pairs(s) \
            + (4 + 2 * head_trained) * head * m * head_uses
        teacher = 2 * n * int(t.sum()) + 4 * attn * causal_pairs(t) + 2 * head * m * (loss_cfg.alpha > 0)
        adapter = 6 * adapter_n * int(vectors.sum()) + 3 * 4 * adapter_attn * causal_pairs(vectors)
        encoder = encoder_per_sample * float(batch.wave_lengths.sum())
        for part, value in zip(FLOP_PARTS, (student, teacher, adapter, encoder), strict=True):
            parts[part] += value
        tokens += int(s.sum())
    return parts, tokens


# ---- workers -------------------------------------------------------------------------------------
def setup(args: argparse.Namespace, llm_context=None) -> tuple:
    """Config, model (the LLM loaded inside ``llm_context(cfg)``), batches and their (FLOPs, positions) per step."""
    from model.build import build_speech_lm
    from rounds.experiment import load_experiment

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    cfg = load_experiment(args.config, model_overrides(args, Path(args.assets)))
    torch.manual_seed(cfg.seed)
    model = build_speech_lm(cfg.model, llm_context(cfg) if llm_context else contextlib.nullcontext)
    batches = make_batches(cfg, model, args)
    per_sample = encoder_flops_per_sample(model.encoder)
    return cfg, model, batches, [step_stats(model, cfg.loss, step, per_sample) for step in batches]


def measure(args: argparse.Namespace, train_step, batches: list, stats: list, model, device: torch.device) -> dict:
    """Time ``train_step`` (micro-batches -> summed loss) with ``bench.train_step.run_steps``; tokens are student
    positions; add the timed steps' model FLOPs and the peak memory."""
    counts = iter(tokens for _, tokens in stats)

    def step(micro_batches: list) -> tuple[float, float]:
        return next(counts), train_step(micro_batches) / len(micro_batches)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = run_steps(step, batches, args.warmup, model.encoder.sample_rate, sync=sync)
    if device.type == "cuda":
        memory = {"peak_mib": torch.cuda.max_memory_allocated(device) / MIB, "memory": "max_memory_allocated",
                  "device": torch.cuda.get_device_name(device)}
    else:
        memory = {"peak_mib": peak_rss_mib(), "memory": "peak RSS", "device": "CPU"}
    parts = {part: sum(p[part] for p, _ in stats[args.warmup:]) for part in FLOP_PARTS}
    return {**result, **memory, "flops": sum(parts.values()), "flop_parts": parts}


def zero3_worker(args: argparse.Namespace) -> dict:
    """ZeRO-3 through the trainer's engine, one rank."""
    from train import distributed
    from train.engine import build_engine, llm_init
    from train.objective import Objective

    _, world = distributed.join(deepspeed=True)
    cfg, model, batches, stats = setup(args, lambda cfg: llm_init(cfg.train, world))
    engine = build_engine(Objective(model, cfg.loss), cfg.train, world)

    def train_step(micro_batches: list) -> float:
        loss = 0.0
        for batch in micro_batches:
            out = engine(batch.to(engine.device))
            engine.backward(out["loss"])
            engine.step()   # DeepSpeed steps the optimizer at the accumulation boundary
            loss += out["loss"].item()
        return loss

    params = list(engine.module.parameters())
    return {**measure(args, train_step, batches, stats, model, engine.device), "params": sum(map(numel, params)),
            "trainable": sum(numel(p) for p in params if p.requires_grad)}


def plain_worker(args: argparse.Namespace) -> dict:
    """No DeepSpeed: the model on the device, AdamW over the same groups with the same betas, clipping."""
    from train.engine import deepspeed_config, param_groups
    from train.objective import Objective

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, batches, stats = setup(args)
    objective = Objective(model, cfg.loss).to(device)
    opt = deepspeed_config(cfg.train, world=1)["optimizer"]["params"]
    optimizer = torch.optim.AdamW(param_groups(objective, cfg.train), betas=tuple(opt["betas"]), eps=opt["eps"])
    trainable = [p for p in objective.parameters() if p.requires_grad]

    def train_step(micro_batches: list) -> float:
        loss = 0.0
        for batch in micro_batches:
            out = objective(batch.to(device))
            (out["loss"] / len(micro_batches)).backward()
            loss += out["loss"].item()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return {**measure(args, train_step, batches, stats, model, device),
            "params": sum(p.numel() for p in objective.parameters()), "trainable": sum(map(numel, trainable))}


# ---- driver --------------------------------------------------------------------------------------
def peak_flops(args: argparse.Namespace, name: str) -> tuple[float, str]:
    """Peak FLOP/s of the device the workers named (``torch.cuda.get_device_name`` or CPU), and its source."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g}"
    if name == "CPU":
        return args.threads * CPU_TFLOPS_PER_THREAD * 1e12, \
            f"nominal CPU peak {CPU_TFLOPS_PER_THREAD:g} TFLOPS/thread x {args.threads} (fp32)"
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):   # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_TFLOPS[key] * 1e12, f"{key} bf16 dense {PEAK_TFLOPS[key]:g} TFLOPS"
    raise SystemExit(f"no peak FLOP/s known for {name!r}: pass --peak-tflops")


def run_worker(args: argparse.Namespace, mode: str, assets: Path, out: Path) -> dict:
    """One variant in its own process (so that each has the device and its peak memory to itself)."""
    cmd = [sys.executable, "-m", "bench.gpu_train", "--worker", mode, "--assets", str(assets), "--out", str(out),
           "--config", args.config, "--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--rows", str(args.rows), "--grad-accum", str(args.grad_accum), "--threads", str(args.threads),
           *args.user_overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    if not torch.cuda.is_available():
        env.update(OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        first = max(done.stderr.find("Traceback"), 0)
        raise SystemExit(f"bench worker {mode} failed (exit {done.returncode}):\n{done.stderr[first:first + 4000]}")
    return json.loads(out.read_text())


def report(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    zero3, plain = rows["zero3"], rows["plain"]
    peak, peak_source = peak_flops(args, zero3["device"])
    if zero3["tokens"] != plain["tokens"] or abs(zero3["flops"] - plain["flops"]) > 1e-6 * plain["flops"]:
        raise SystemExit(f"the variants did different work: positions {zero3['tokens']} vs {plain['tokens']}, "
                         f"FLOPs {zero3['flops']:.4g} vs {plain['flops']:.4g}")
    console = Console()
    if not console.is_terminal:
        console.width = 130
    table = Table(title=f"Training step, shape {args.shape}: {args.config} {' '.join(args.overrides)}",
                  caption=f"{zero3['device']}; peak {peak_source}\n{machine()}")
    for col in ("variant", "timed\nsteps", "s/step", "tokens/s", "audio-s/s", "model\nTFLOP/s", "MFU",
                "peak memory\nMiB", "step-1\nloss"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
    labels = {"zero3": "ZeRO-3 (DeepSpeed, 1 rank)", "plain": "plain PyTorch + AdamW"}
    for name, r in rows.items():
        table.add_row(labels[name], str(args.steps), f"{r['seconds'] / args.steps:.3f}",
                      f"{r['tokens'] / r['seconds']:.0f}", f"{r['audio_s'] / r['seconds']:.1f}",
                      f"{r['flops'] / r['seconds'] / 1e12:.3f}", f"{r['flops'] / r['seconds'] / peak:.3f}",
                      f"{r['peak_mib']:.0f}", f"{r['loss_first']:.4f}")
    console.print(table)
    console.print(f"Per step: {args.grad_accum} x {args.rows} rows, {zero3['tokens'] / args.steps:.0f} student "
                  f"positions, {zero3['flops'] / args.steps / 1e12:.3f} model TFLOP. Parameters {zero3['params']:,} "
                  f"({zero3['trainable']:,} trainable). Memory: {zero3['memory']}. Tokens are student positions.")
    shares = ", ".join(f"{part} {value / zero3['flops']:.1%}" for part, value in zero3["flop_parts"].items())
    console.print(f"Model FLOPs (formulas in bench/gpu_train.py): {shares}. MFU = model FLOP/s / peak.")
    mfu = {name: r["flops"] / r["seconds"] / peak for name, r in rows.items()}
    for name, r in rows.items():
        print(f"RESULT {name}_tokens_per_s {r['tokens'] / r['seconds']:.1f}")
        print(f"RESULT {name}_peak_mem_mib {r['peak_mib']:.0f}")
    print(f"RESULT baseline_mfu {mfu['plain']:.4f}")
    print(f"RESULT mfu_vs_baseline {mfu['zero3'] / mfu['plain']:.4f}")
    print(f"RESULT mfu {mfu['zero3']:.4f}")


def main() -> None:
    args = parse()
    if args.worker:
        Path(args.out).write_text(json.dumps(zero3_worker(args) if args.worker == "zero3" else plain_worker(args)))
        return
    if args.shape == "3b" and not torch.cuda.is_available():
        raise SystemExit("--shape 3b needs a CUDA GPU (3B parameters, bf16); without one run --shape tiny")
    if torch.cuda.is_available():
        peak_flops(args, torch.cuda.get_device_name())   # an unknown GPU fails now, not after the run
    else:
        torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, Console().status("saving random models ...") as status:
        assets = Path(tmp)
        check_config(argparse.Namespace(config=args.config, overrides=model_overrides(args, assets)))
        save_assets(SHAPES[args.shape], assets)
        for mode in ("zero3", "plain"):
            status.update(f"{mode} ...")
            rows[mode] = run_worker(args, mode, assets, assets / f"{mode}.json")
    report(args, rows)


if __name__ == "__main__":
    main()
