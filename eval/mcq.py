"""k-shot multiple-choice scoring in three modes, teacher_text, student_text, student_speech, and the cascade.

Each choice is scored as a continuation of the prompt by its log-probability, as it is ("none", lm-eval-harness's
acc) or divided by its length ("tokens", or "chars" as lm-eval-harness's acc_norm); the argmax wins. The prompt is
run once and its KV cache is shared by all choices of the item (one batched pass over the choices).

Prompt = k solved examples (context + right answer, blank line between) + the item's context. The examples come
from another split when the task names one (``eval.tasks[].fewshot_path``, as lm-eval-harness draws them), else
from the task's other items. In speech mode every context (examples' and the item's) is spoken; its template words
("Question: ", "\\nAnswer:": ``MCQItem.prefix``, ``suffix``), answers and choices stay text. The cascade
(``eval.cascade``) is teacher_text with every spoken part replaced by the words the student decoded from its speech.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from eval.benchmarks import MCQItem
from eval.config import NORMS
from model.inputs import SPEECH, TEXT, Document, Span
from model.speech_lm import LM, AdapterOutput, SpeechLM

MODES = ("teacher_text", "student_text", "student_speech")
CASCADE = "cascade"
SEPARATOR = "\n\n"


def shots_for(items: list[MCQItem], index: int, k: int, seed: int, pool: list[MCQItem] | None = None,
              skip: int | None = None) -> list[MCQItem]:
    """k solved examples for item ``index``, chosen by a seeded RNG per item: other items of the task, or with
    ``pool`` (another split) its items but ``pool[skip]`` (the item itself, where the pool holds it too)."""
    source, skip = (items, index) if pool is None else (pool, skip)
    n = len(source) - (skip is not None)
    rng = np.random.default_rng([seed, index])
    picks = rng.choice(n, size=min(k, n), replace=False) if n > 0 else []
    return [source[int(j) + (skip is not None and int(j) >= skip)] for j in picks]


def draw_shots(items: list[MCQItem], k: int, seed: int, pool: list[MCQItem] | None = None) -> list[list[MCQItem]]:
    """Every item's examples (``shots_for``); an item that ``pool`` holds too (same text and choices) is never its
    own example."""
    where = {(p.text, tuple(p.choices)): j for j, p in enumerate(pool or [])}
    return [shots_for(items, i, k, seed, pool, where.get((it.text, tuple(it.choices)))) for i, it in enumerate(items)]


def prompt_document(item: MCQItem, shots: list[MCQItem], tokenizer, audio: dict[str, np.ndarray] | None,
                    texts: dict[str, str] | None = None) -> Document:
    """The prompt as spans; with ``audio`` (id -> waveform) spoken parts are speech spans between their template
    words as text, else each context is one text: the items' own, or with ``texts`` (id -> text, e.g. the
    cascade's decoded words) those in place of the spoken parts. A text is tokenized whole, as lm-eval-harness
    tokenizes a context; a prefix's last space is no token before speech (no training text span ends with one)."""
    spans: list[Span] = []

    def add(kind: int, text: str, wave: np.ndarray | None = None) -> None:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if kind == TEXT and not ids:
            return
        if spans and kind == TEXT and spans[-1].kind == TEXT:
            spans[-1].ids.extend(ids)   # keep one text span: the same tokens as one text, cheaper layout
        else:
            spans.append(Span(kind, ids, wave))

    def add_context(it: MCQItem) -> None:
        if audio:
            add(TEXT, it.prefix.rstrip(" "))
            add(SPEECH, it.context, audio[it.id])
            add(TEXT, it.suffix)
        else:
            add(TEXT, it.prefix + (texts[it.id] if texts is not None else it.context) + it.suffix)

    for shot in shots:
        add_context(shot)
        add(TEXT, shot.choices[shot.answer] + SEPARATOR)
    add_context(item)
    return Document(spans)


def text_prefix_embeddings(lm: LM, doc: Document, bos_id: int | None) -> torch.Tensor:
    ids = ([bos_id] if bos_id is not None else []) + [t for span in doc.spans for t in span.ids]
    device = next(lm.embed.parameters()).device
    return lm.embed(torch.tensor([ids], device=device))


@torch.no_grad()
def choice_pass(lm: LM, prefix: torch.Tensor, choices: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed log-probability of each choice after ``prefix`` [1, P, H], and each choice's log-distributions
    [len(choice), V] (what M is computed from); the prefix runs once (KV cache)."""
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
    dists = F.log_softmax(lm.head(predictors[mask]).float(), -1)   # choice by choice (the mask is row-major)
    logp = dists.gather(1, ids[mask][:, None]).squeeze(1)
    # summed over a zero-padded [n, length] grid: one fixed order on every device (index_add_ adds
    # atomically on CUDA, in an order that changes from run to run)
    sums = logp.new_zeros(n, length).masked_scatter(mask, logp).sum(1)
    return sums, list(dists.split([len(c) for c in choices]))


def choice_logprobs(lm: LM, prefix: torch.Tensor, choices: list[list[int]]) -> torch.Tensor:
    """Summed log-probability of each choice after ``prefix`` (``choice_pass``'s first part)."""
    return choice_pass(lm, prefix, choices)[0]


@torch.no_grad()
def continuation_logprobs(lm: LM, prefix: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The LM's log-distributions [len(ids), V] over each token of ``ids`` read after ``prefix`` [1, P, H]."""
    tokens = torch.tensor([ids], device=prefix.device)
    hidden = lm.decoder(inputs_embeds=torch.cat([prefix, lm.embed(tokens)], 1)).last_hidden_state
    return F.log_softmax(lm.head(hidden[0, prefix.shape[1] - 1: -1]).float(), -1)


@torch.no_grad()
def choice_logprobs_naive(lm: LM, prefix: torch.Tensor, choices: list[list[int]]) -> torch.Tensor:
    """Reference: one full forward over prefix + choice per choice (what the batched scorer replaces)."""
    return torch.stack([continuation_logprobs(lm, prefix, c).gather(1, torch.tensor(c, device=prefix.device)[:, None])
                        .sum() for c in choices])


def answer_misalignment(text: torch.Tensor, speech: torch.Tensor) -> float:
    """M on one item: KL(student after the text context || student after the spoken context), averaged over the
    right answer's tokens, from the two log-distributions [len, V] (``choice_pass``). Per task it says how far
    speech is from text where the benchmark decides."""
    return float((text.exp() * (text - speech)).sum(-1).mean())


def normalise(logprobs: torch.Tensor, choices: list[list[int]], texts: list[str], norm: str) -> torch.Tensor:
    """The scores compared: summed log-probabilities ("none", lm-eval-harness's acc), per token ("tokens"), or per
    character of the choice without its leading space ("chars": lm-eval-harness's acc_norm divides by
    ``len(choice)`` of the choice before its target delimiter)."""
    if norm == "none":
        return logprobs
    if norm not in NORMS:
        raise ValueError(f"norm: must be one of {list(NORMS)}, got {norm!r}")
    lengths = [len(c) for c in choices] if norm == "tokens" else [max(1, len(t.removeprefix(" "))) for t in texts]
    return logprobs / torch.tensor(lengths, dtype=logprobs.dtype, device=logprobs.device)


def choice_ids(item: MCQItem, tokenizer) -> list[list[int]]:
    """The tokens of each choice (EOS for a choice that has none)."""
    return [tokenizer.encode(c, add_special_tokens=False) or [tokenizer.eos_token_id] for c in item.choices]


def best_choice(logprobs: torch.Tensor, choices: list[list[int]], item: MCQItem, norm: str) -> int:
    """Index of the choice with the best length-normalised log-probability."""
    return int(torch.argmax(normalise(logprobs, choices, item.choices, norm)))


def score_item(lm: LM, prefix: torch.Tensor, item: MCQItem, tokenizer, norm: str,
               scorer: Callable = choice_logprobs) -> int:
    """Index of the choice with the best length-normalised log-probability."""
    choices = choice_ids(item, tokenizer)
    return best_choice(scorer(lm, prefix, choices), choices, item, norm)


@torch.no_grad()
def encode_contexts(student: SpeechLM, audio: dict[str, np.ndarray], ids: list[str]) -> dict[str, AdapterOutput]:
    """Id -> the adapter outputs of its spoken context, each utterance encoded alone (never padded beside
    another, so that they do not depend on the rank or the batch it falls in); encoded once, they serve the
    speech prompts of every item that hears it and the cascade's decoding."""
    device = student.boundary.device
    out = {}
    for key in ids:
        wave = torch.from_numpy(audio[key]).to(device)[None]
        out[key] = student.adapter_output(wave, torch.tensor([wave.shape[1]], device=device))
    return out


@torch.no_grad()
def correct_by_mode(student: SpeechLM, lms: dict[str, LM], item: MCQItem, shots: list[MCQItem], tokenizer,
                    audio: dict[str, np.ndarray], norm: str, transcripts: dict[str, str] | None = None,
                    encoded: dict[str, AdapterOutput] | None = None) -> dict[str, int]:
    """1 where a mode of ``lms`` (mode -> the LM that reads its prompt) picks the item's answer, else 0; with both
    student modes, "M": the item's misalignment (``answer_misalignment``).

    student_speech hears every context of the prompt (their ``encoded`` adapter outputs where given, see
    ``encode_contexts``); CASCADE reads them as ``transcripts`` (id -> decoded text); the other modes read them
    as text. A cascade prompt can hold no token at all (nothing decoded, no BOS, no shots): it then starts from
    EOS, as lm-evaluation-harness does for an empty context."""
    bos = tokenizer.bos_token_id
    choices = choice_ids(item, tokenizer)
    out: dict = {}
    answer_dists = {}
    for mode, lm in lms.items():
        if mode == "student_speech":
            speech = AdapterOutput.stack([encoded[it.id] for it in (*shots, item)]) if encoded else None
            prefix = student.prompt_embeddings(prompt_document(item, shots, tokenizer, audio), bos, speech)
        else:
            doc = prompt_document(item, shots, tokenizer, None, transcripts if mode == CASCADE else None)
            start = bos if bos is not None or any(span.ids for span in doc.spans) else tokenizer.eos_token_id
            prefix = text_prefix_embeddings(lm, doc, start)
        logprobs, dists = choice_pass(lm, prefix, choices)
        out[mode] = int(best_choice(logprobs, choices, item, norm) == item.answer)
        answer_dists[mode] = dists[item.answer]
    if {"student_text", "student_speech"} <= answer_dists.keys():
        out["M"] = answer_misalignment(answer_dists["student_text"], answer_dists["student_speech"])
    return out
