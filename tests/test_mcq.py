"""Multiple-choice scoring: batched = naive, length normalisation, modes, prompts."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.benchmarks import MCQItem
from eval.mcq import (
    answer_misalignment,
    choice_logprobs,
    choice_logprobs_naive,
    choice_pass,
    continuation_logprobs,
    correct_by_mode,
    encode_contexts,
    normalise,
    prompt_document,
    score_item,
    shots_for,
    text_prefix_embeddings,
)
from model.adapter import AdapterConfig
from model.build import LLMConfig, ModelConfig, build_speech_lm
from model.encoder import EncoderConfig
from model.inputs import SPEECH, TEXT
from model.speech_lm import LM, AdapterOutput


def items(n=4):
    return [MCQItem(id=f"q{i}", task="t", context=f"Question: alice met bob number {i}\nAnswer:",
                    choices=[" paris", " the red ball near the river", " seven"], answer=i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()


def test_batched_scorer_equals_naive_per_choice_forward(llm, tokenizer):
    lm = LM.of(llm)
    doc = prompt_document(items()[0], items()[1:3], tokenizer, None)
    prefix = text_prefix_embeddings(lm, doc, tokenizer.bos_token_id)
    choices = [tokenizer.encode(c, add_special_tokens=False) for c in items()[0].choices]
    assert len({len(c) for c in choices}) > 1, "choices of different lengths exercise the padding"
    batched = choice_logprobs(lm, prefix, choices)
    naive = choice_logprobs_naive(lm, prefix, choices)
    assert torch.allclose(batched, naive, atol=1e-5), (batched, naive)
    assert (batched < 0).all()


def test_length_normalisation_prefers_the_better_per_token_choice():
    logprobs = torch.tensor([-3.0, -4.0])          # raw: the short choice wins
    choices = [[1], [1, 2, 3, 4]]                   # per token: -3.0 vs -1.0, the long one wins
    assert int(torch.argmax(logprobs)) == 0
    assert int(torch.argmax(normalise(logprobs, choices, ["a", "abcd"], "tokens"))) == 1
    assert int(torch.argmax(normalise(logprobs, choices, ["a", "a longer text"], "chars"))) == 1


def test_score_item_picks_the_argmax_choice(llm, tokenizer):
    lm = LM.of(llm)
    item = items()[0]
    prefix = text_prefix_embeddings(lm, prompt_document(item, [], tokenizer, None), tokenizer.bos_token_id)
    fixed = lambda lm_, p, choices: torch.tensor([-5.0, -1.0, -9.0])  # noqa: E731
    assert score_item(lm, prefix, item, tokenizer, "tokens", scorer=lambda *a: fixed(*a)) in (0, 1, 2)
    assert score_item(lm, prefix, item, tokenizer, "chars", scorer=fixed) == 1


def test_shots_exclude_the_item_and_are_deterministic():
    pool = items(6)
    shots = shots_for(pool, 2, 3, seed=0)
    assert len(shots) == 3 and all(s.id != "q2" for s in shots)
    assert [s.id for s in shots] == [s.id for s in shots_for(pool, 2, 3, seed=0)]
    assert shots_for(pool[:1], 0, 5, seed=0) == []


def test_prompt_document_speech_and_text_layouts(tokenizer):
    pool = items(3)
    audio = {it.id: np.ones(800, np.float32) for it in pool}
    speech = prompt_document(pool[0], pool[1:], tokenizer, audio)
    assert [s.kind for s in speech.spans] == [SPEECH, TEXT, SPEECH, TEXT, SPEECH]
    text = prompt_document(pool[0], pool[1:], tokenizer, None)
    assert [s.kind for s in text.spans] == [TEXT]
    # the teacher reads the same tokens in both: the speech spans' transcripts are the contexts
    assert [t for s in speech.spans for t in s.ids] == text.spans[0].ids
    decoded = tokenizer.decode(text.spans[0].ids)
    assert decoded.startswith(pool[1].context) and decoded.endswith(pool[0].context)
    assert pool[1].choices[pool[1].answer] + "\n\n" in decoded


def test_student_text_equals_teacher_text_with_lora_at_zero(tiny_dir, tokenizer):
    model = build_speech_lm(ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="lora", lora_r=2),
                                        encoder=EncoderConfig(kind="mel"),
                                        adapter=AdapterConfig(stack=4, layers=1, width=32, mlp=64, heads=2,
                                                              kv_heads=1))).eval()
    merged = model.llm.merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    doc = prompt_document(items()[0], items()[1:], tokenizer, None)
    choices = [tokenizer.encode(c, add_special_tokens=False) for c in items()[0].choices]
    scores = [choice_logprobs(LM.of(m), text_prefix_embeddings(LM.of(m), doc, 0), choices) for m in (merged, base)]
    assert torch.equal(scores[0], scores[1])


def mel_student(tiny_dir):
    """A seeded student on mel features with a small adapter and the tiny LLM frozen, in eval mode."""
    torch.manual_seed(0)
    return build_speech_lm(ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="frozen"),
                                       encoder=EncoderConfig(kind="mel"),
                                       adapter=AdapterConfig(stack=4, layers=1, width=32, mlp=64, heads=2,
                                                             kv_heads=1))).eval()


def test_speech_prefix_runs_through_the_adapter(tiny_dir, tokenizer):
    model = mel_student(tiny_dir)
    pool = items(2)
    audio = {it.id: np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1 for it in pool}
    doc = prompt_document(pool[0], pool[1:], tokenizer, audio)
    with torch.no_grad():
        prefix = model.prompt_embeddings(doc, tokenizer.bos_token_id)
    expected = 1 + 2 * (model.vectors_for(16000) + 2) + len(doc.spans[1].ids)
    assert prefix.shape == (1, expected, model.boundary.shape[1])
    choices = [tokenizer.encode(c, add_special_tokens=False) for c in pool[0].choices]
    lm = LM.of(model.llm)
    assert torch.allclose(choice_logprobs(lm, prefix, choices), choice_logprobs_naive(lm, prefix, choices), atol=1e-5)


def test_contexts_encoded_once_give_the_same_speech_prompt(tiny_dir, tokenizer):
    """eval encodes each spoken context alone once and stacks them per prompt (AdapterOutput.stack, padding the
    shorter): the prompt equals the one encoded from the waves together, for contexts of different lengths."""
    model = mel_student(tiny_dir)
    pool = items(3)
    rng, sizes = np.random.default_rng(1), (16000, 9000, 12500)
    audio = {it.id: rng.standard_normal(n).astype(np.float32) * 0.1 for it, n in zip(pool, sizes, strict=True)}
    encoded = encode_contexts(model, audio, [it.id for it in pool])
    assert [int(encoded[it.id].lengths[0]) for it in pool] == [model.vectors_for(n) for n in sizes]
    doc = prompt_document(pool[0], pool[1:], tokenizer, audio)
    with torch.no_grad():
        together = model.prompt_embeddings(doc, tokenizer.bos_token_id)
        stacked = AdapterOutput.stack([encoded[it.id] for it in (*pool[1:], pool[0])])
        apart = model.prompt_embeddings(doc, tokenizer.bos_token_id, stacked)
    assert stacked.vectors.shape[:2] == (3, model.vectors_for(16000))
    assert apart.shape == together.shape
    assert torch.allclose(apart, together, atol=1e-5)


def test_item_misalignment_is_the_kl_over_the_answer_tokens(tiny_dir, tokenizer):
    model = mel_student(tiny_dir)
    pool = items(2)
    audio = {it.id: np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1 for it in pool}
    lm, bos = LM.of(model.llm), tokenizer.bos_token_id
    answer = tokenizer.encode(pool[0].choices[pool[0].answer], add_special_tokens=False)
    with torch.no_grad():
        text = text_prefix_embeddings(lm, prompt_document(pool[0], pool[1:], tokenizer, None), bos)
        speech = model.prompt_embeddings(prompt_document(pool[0], pool[1:], tokenizer, audio), bos)
    p, q = (continuation_logprobs(lm, prefix, answer) for prefix in (text, speech))   # one full forward each
    assert p.shape == (len(answer), model.llm.config.vocab_size)
    assert answer_misalignment(p, p) == pytest.approx(0.0, abs=1e-6)
    by_hand = sum(float((p[i].exp() * (p[i] - q[i])).sum()) for i in range(len(answer))) / len(answer)
    assert answer_misalignment(p, q) == pytest.approx(by_hand, rel=1e-5) and by_hand > 0.01
    choices = [tokenizer.encode(c, add_special_tokens=False) for c in pool[0].choices]
    _, dists = choice_pass(lm, text, choices)   # the batched pass gives the same distributions
    assert torch.allclose(dists[pool[0].answer], p, atol=1e-4)
    row = correct_by_mode(model, {"student_text": lm, "student_speech": lm}, pool[0], pool[1:], tokenizer, audio,
                          "tokens")
    assert set(row) == {"student_text", "student_speech", "M"} and row["M"] == pytest.approx(by_hand, rel=1e-4)
