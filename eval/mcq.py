"""k-shot multiple-choice scoring in three modes: teacher_text, student_text, student_speech.

Each choice is scored as a continuation of the prompt by its log-probability divided by its length
(tokens, or characters as lm-eval-harness's acc_norm); the argmax wins. The prompt is run once and
its KV cache is shared by all choices of the item (one batched pass over the choices).

Prompt = k solved examples (context + right answer, blank line between) + the item's context. In
speech mode every context (examples' and the item's) is spoken; answers and choices stay text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eval.benchmarks import MCQItem
from model.inputs import SPEECH, TEXT, Document, Span, pack
from model.speech_lm import SpeechLM

MODES = ("teacher_text", "student_text", "student_speech")
SEPARATOR = "\n\n"


@dataclass
class LM:
    """What scoring needs of a causal LM: its decoder (hidden states), token embeddings and head."""

    decoder: nn.Module
    embed: nn.Module
    head: nn.Module

    @staticmethod
    def of(llm: nn.Module) -> LM:
        return LM(llm.get_decoder(), llm.get_input_embeddings(), llm.get_output_embeddings())


def shots_for(items: list[MCQItem], index: int, k: int, seed: int) -> list[MCQItem]:
    """k solved examples for item ``index``: other items of the task, chosen by a seeded RNG per item."""
    others = [i for i in range(len(items)) if i != index]
    rng = np.random.default_rng([seed, index])
    picks = rng.choice(len(others), size=min(k, len(others)), replace=False) if others else []
    return [items[others[int(i)]] for i in picks]


def prompt_document(item: MCQItem, shots: list[MCQItem], tokenizer, audio: dict[str, np.ndarray] | None) -> Document:
    """The prompt as spans; with ``audio`` (id -> waveform) contexts are speech spans, else text."""
    spans: list[Span] = []

    def add(kind: int, text: str, wave: np.ndarray | None = None) -> None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if spans and kind == TEXT and spans[-1].kind == TEXT:
            spans[-1].ids.extend(ids)   # keep one text span: the same tokens as one text, cheaper layout
        else:
            spans.append(Span(kind, ids, wave))

    for shot in shots:
        add(SPEECH if audio else TEXT, shot.context, audio[shot.id] if audio else None)
        add(TEXT, shot.choices[shot.answer] + SEPARATOR)
    add(SPEECH if audio else TEXT, item.context, audio[item.id] if audio else None)
    return Document(spans)


def text_prefix_embeddings(lm: LM, doc: Document, bos_id: int | None) -> torch.Tensor:
    ids = ([bos_id] if bos_id is not None else []) + [t for span in doc.spans for t in span.ids]
    device = next(lm.embed.parameters()).device
    return lm.embed(torch.tensor([ids], device=device))


def speech_prefix_embeddings(model: SpeechLM, doc: Document, bos_id: int | None) -> torch.Tensor:
    budget = max(doc.lengths(model.vectors_for, bos_id is not None))   # the whole prompt, never truncated
    batch = pack([doc], model.vectors_for, budget, bos_id).to(model.boundary.device)
    embeds, _ = model.student_embeddings(batch)
    return embeds


@torch.no_grad()
def choice_logprobs(lm: LM, prefix: torch.Tensor, choices: list[list[int]]) -> torch.Tensor:
    """Summed log-probability of each choice after ``prefix`` [1, P, H]; the prefix runs once (KV cache)."""
    n, P = len(choices), prefix.shape[1]
    out = lm.decoder(inputs_embeds=prefix, use_cache=True)
    cache = out.cache
    cache.batch_repeat_interleave(n)
    length = max(len(c) for c in choices)
    ids = torch.zeros(n, length, dtype=torch.long, device=prefix.device)
    mask = torch.zeros(n, length, dtype=torch.bool, device=prefix.device)
    for i, c in enumerate(choices):
        ids[i, : len(c)] = torch.tensor(c, device=prefix.device)
        mask[i, : len(c)] = True
    attention = torch.cat([torch.ones(n, P, dtype=torch.long, device=prefix.device), mask.long()], 1)
    positions = torch.arange(P, P + length, device=prefix.device).expand(n, -1)
    hidden = lm.decoder(inputs_embeds=lm.embed(ids), attention_mask=attention, cache=cache,
                        position_ids=positions, use_cache=False).last_hidden_state
    last = out.last_hidden_state[:, -1:].expand(n, 1, -1)
    predictors = torch.cat([last, hidden[:, :-1]], 1)       # position j predicts choice token j
    logp = F.log_softmax(lm.head(predictors[mask]).float(), -1).gather(1, ids[mask][:, None]).squeeze(1)
    return torch.zeros(n, device=prefix.device).index_add_(0, torch.nonzero(mask)[:, 0], logp)


@torch.no_grad()
def choice_logprobs_naive(lm: LM, prefix: torch.Tensor, choices: list[list[int]]) -> torch.Tensor:
    """Reference: one full forward over prefix + choice per choice (what the batched scorer replaces)."""
    scores = []
    for c in choices:
        ids = torch.tensor([c], device=prefix.device)
        hidden = lm.decoder(inputs_embeds=torch.cat([prefix, lm.embed(ids)], 1)).last_hidden_state
        logp = F.log_softmax(lm.head(hidden[0, prefix.shape[1] - 1: -1]).float(), -1)
        scores.append(logp.gather(1, ids[0][:, None]).sum())
    return torch.stack(scores)


def normalise(logprobs: torch.Tensor, choices: list[list[int]], texts: list[str], norm: str) -> torch.Tensor:
    """Length-normalised scores: per token, or per character of the choice text."""
    lengths = [len(c) for c in choices] if norm == "tokens" else [max(1, len(t)) for t in texts]
    return logprobs / torch.tensor(lengths, dtype=logprobs.dtype, device=logprobs.device)


def score_item(lm: LM, prefix: torch.Tensor, item: MCQItem, tokenizer, norm: str,
               scorer: Callable = choice_logprobs) -> int:
    """Index of the choice with the best length-normalised log-probability."""
    choices = [tokenizer.encode(c, add_special_tokens=False) or [tokenizer.eos_token_id] for c in item.choices]
    scores = normalise(scorer(lm, prefix, choices), choices, item.choices, norm)
    return int(torch.argmax(scores))
