"""Multiple-choice scoring speed: batched scorer (prompt once, KV cache shared by the choices) against
one full forward pass per choice, on the same items in the same run.

    python -m bench.mcq [--items 40] [--shots 5] [--hidden 256] [--layers 4]

Ends with ``RESULT eval_batched_speedup <x>`` (items/s batched / items/s naive).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from eval.benchmarks import MCQItem
from eval.mcq import (
    choice_logprobs,
    choice_logprobs_naive,
    prompt_document,
    score_item,
    shots_for,
    text_prefix_embeddings,
)
from model.speech_lm import LM
from toy.smoke import sentences
from toy.tiny import tiny_llm, train_tokenizer


def make_items(n: int) -> list[MCQItem]:
    texts = sentences(n * 5, seed=0)
    return [MCQItem(id=f"b{i}", task="bench", context=f"Question: {texts[5 * i]}. What happened next?\nAnswer:",
                    choices=[f" {t}" for t in texts[5 * i + 1: 5 * i + 5]], answer=i % 4) for i in range(n)]


def run(lm: LM, items: list[MCQItem], tokenizer, shots: int, scorer) -> tuple[float, list[int]]:
    picks = []
    start = time.perf_counter()
    with torch.no_grad():
        for i, item in enumerate(items):
            doc = prompt_document(item, shots_for(items, i, shots, seed=0), tokenizer, None)
            prefix = text_prefix_embeddings(lm, doc, tokenizer.bos_token_id)
            picks.append(score_item(lm, prefix, item, tokenizer, "tokens", scorer=scorer))
    return len(items) / (time.perf_counter() - start), picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    items = make_items(args.items)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(sentences(400, seed=1), tmp, vocab_size=400)
        model = tiny_llm(tokenizer, tmp, hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2).eval()
    lm = LM.of(model)
    run(lm, items[:2], tokenizer, args.shots, choice_logprobs)   # warm-up
    batched, picks_b = run(lm, items, tokenizer, args.shots, choice_logprobs)
    naive, picks_n = run(lm, items, tokenizer, args.shots, choice_logprobs_naive)
    agree = sum(a == b for a, b in zip(picks_b, picks_n, strict=True)) / len(items)
    table = Table(title=f"MCQ scoring, {args.items} items x 4 choices, {args.shots}-shot prompts, "
                        f"LM hidden {args.hidden} x {args.layers} layers, 1 thread")
    for col in ("scorer", "items/s", "speed-up", "same picks"):
        table.add_column(col)
    table.add_row("one forward per choice (baseline)", f"{naive:.2f}", "1.00", "")
    table.add_row("batched (shared prompt KV cache)", f"{batched:.2f}", f"{batched / naive:.2f}", f"{agree:.0%}")
    console = Console(width=120)
    console.print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
                  f"torch {torch.__version__}, python {platform.python_version()}")
    console.print(table)
    print(f"RESULT eval_items_per_s {batched:.3f}")
    print(f"RESULT eval_batched_speedup {batched / naive:.3f}")


if __name__ == "__main__":
    main()
