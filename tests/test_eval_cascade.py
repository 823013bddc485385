"""The cascade reference (decoded words read by the teacher) and deterministic evaluation.

Unit tests use test_ctc's constructed student, whose CTC path decodes every utterance to the tokens [A, B];
the end-to-end tests evaluate a smoke student trained briefly with CTC, in fresh processes and on 2 ranks."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.benchmarks import MCQItem
from eval.cascade import has_ctc_head, summarise, transcribe_contexts, word_errors
from eval.mcq import (
    CASCADE,
    SEPARATOR,
    choice_logprobs_naive,
    correct_by_mode,
    encode_contexts,
    normalise,
    prompt_document,
)
from model.speech_lm import LM
from tests import test_ctc
from tests.test_ctc import A, B, audio, build
from tests.test_train import REPO, TORCHRUN, env

constructed = test_ctc.constructed   # the fixture: a student whose CTC path decodes every utterance to [A, B]
CHOICES = [" the red ball", " seven friends", " bread with cheese"]


def item(i: int, context: str, answer: int = 0) -> MCQItem:
    return MCQItem(id=f"q{i}", task="t", context=context, choices=CHOICES, answer=answer)


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()


def reference_pick(teacher, tokenizer, pieces: list[str], start: int, choices: list[str]) -> int:
    """The teacher's choice after the text ``pieces`` (tokenized one by one), one full forward per choice."""
    lm = LM.of(teacher)
    ids = [start] + [t for p in pieces for t in tokenizer.encode(p, add_special_tokens=False)]
    prefix = lm.embed(torch.tensor([ids]))
    tokens = [tokenizer.encode(c, add_special_tokens=False) for c in choices]
    return int(torch.argmax(normalise(choice_logprobs_naive(lm, prefix, tokens), tokens, choices, "tokens")))


def test_word_errors_ignore_case_and_punctuation():
    assert word_errors("Anna went to Rome.", "anna went to rome .") == (0, 4)
    assert word_errors("the cat sat", "the bat sat down") == (2, 3)      # a substitution and an insertion
    assert word_errors("the cat sat", "( )") == (3, 3)                   # nothing decoded: all deleted
    rows = [{CASCADE: 1, "errors": 0, "words": 4}, {CASCADE: 0, "errors": 2, "words": 3},
            {CASCADE: 1, "errors": 3, "words": 3}]
    assert summarise(rows) == {"accuracy": 2 / 3, "wer": 5 / 10}       # errors over all reference words


def test_ctc_head_means_a_trained_or_used_path(tiny_dir):
    plain, compressing = build(tiny_dir), build(tiny_dir, compress="ctc")
    assert not has_ctc_head(plain, ctc_weight=0.0)
    assert has_ctc_head(plain, ctc_weight=0.5)
    assert has_ctc_head(compressing, ctc_weight=0.0)


def test_cascade_scores_what_the_teacher_picks_on_the_decoded_words(constructed, teacher, tokenizer):
    model, _ = constructed
    model.teacher = teacher
    decoded = tokenizer.decode([A, B]).strip()
    shots = [item(7, "alice met bob in paris", 2), item(8, "a dog ran to the park", 1)]
    contexts = ["the cat sat on the mat", "the quick brown fox", "numbers one two", "the dog near the river"]
    items = [item(i, context) for i, context in enumerate(contexts)]
    audio_of = {it.id: audio(0.5 + 0.1 * k, k) for k, it in enumerate(items + shots)}
    transcripts = transcribe_contexts(model, tokenizer, encode_contexts(model, audio_of, sorted(audio_of)))
    assert transcripts == {key: decoded for key in audio_of}
    pieces = [p for s in shots for p in (decoded, s.choices[s.answer] + SEPARATOR)] + [decoded]
    prompt = prompt_document(items[0], shots, tokenizer, None, transcripts)       # decoded words, as text
    assert [t for span in prompt.spans for t in span.ids] == [
        t for p in pieces for t in tokenizer.encode(p, add_special_tokens=False)]
    pick = reference_pick(teacher, tokenizer, pieces, tokenizer.bos_token_id, CHOICES)
    for k, it in enumerate(items):   # the teacher's pick is the answer of items 0 and 2 only
        it.answer = pick if k % 2 == 0 else (pick + 1) % len(CHOICES)
    lms = {CASCADE: LM.of(teacher)}
    rows = []
    for it in items:
        row = correct_by_mode(model, lms, it, shots, tokenizer, audio_of, "tokens", transcripts)
        errors, words = word_errors(it.context, transcripts[it.id])
        rows.append(row | {"errors": errors, "words": words})
    assert [r[CASCADE] for r in rows] == [1, 0, 1, 0]
    assert summarise(rows) == {"accuracy": 0.5, "wer": 1.0}     # "()" holds no word


def test_an_empty_cascade_prompt_reads_from_eos(teacher, tokenizer):
    """No BOS (as Qwen2.5's tokenizer), no shots and nothing decoded: the teacher still scores, after EOS."""
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    it = item(0, "the cat sat")
    it.answer = reference_pick(teacher, tokenizer, [], tokenizer.eos_token_id, CHOICES)
    row = correct_by_mode(None, {CASCADE: LM.of(teacher)}, it, [], no_bos, {}, "tokens", {"q0": ""})
    assert row == {CASCADE: 1}


# ---- end to end: a smoke student trained with CTC, evaluated by `python -m eval` ------------------------
def train_ctc(model, docs, steps: int, lr: float) -> None:
    """Adapter and blank vector trained with the alignment loss alone on the documents' speech spans."""
    from model.inputs import pack
    from train.losses import ctc_alignment_loss

    batch = pack(docs, model.vectors_for, 4096, None)
    opt = torch.optim.Adam([*model.adapter.parameters(), model.boundary], lr=lr)
    for _ in range(steps):
        out = model.adapter_output(batch.waves, batch.wave_lengths)
        loss = ctc_alignment_loss(out.vectors, out.blank_logits, out.lengths, batch.span_tokens,
                                  batch.span_token_count, model.token_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def ctc_run(tmp_path_factory):
    """A smoke run whose round-0 export has CTC trained (150 steps on the benchmark's spoken contexts, which
    the eval then reuses), written by train.export from that state; no compression, so the head is on only
    when evaluating with loss.ctc_weight > 0."""
    import train.export
    from eval.benchmarks import read_items
    from eval.spoken import build_spoken, load_spoken
    from model.build import build_speech_lm, load_tokenizer
    from model.inputs import SPEECH, Document, Span
    from rounds.experiment import load_experiment

    subprocess.run([sys.executable, "-m", "toy.smoke"], cwd=REPO, env=env(), check=True)   # reused if built
    run_dir = tmp_path_factory.mktemp("runs_cascade")
    cfg = load_experiment(REPO / "configs/smoke.yaml", [f"run.dir={run_dir}"])
    task = cfg.eval.tasks[0]
    items = read_items(REPO / task.path)
    torch.manual_seed(0)
    model, tokenizer = build_speech_lm(cfg.model), load_tokenizer(cfg.model)
    spoken_dir = cfg.run.path() / "spoken" / task.name
    spoken = build_spoken(items, spoken_dir, cfg.eval.tts, model.encoder.sample_rate)
    waves = load_spoken(spoken)
    docs = [Document([Span(SPEECH, tokenizer.encode(it.context, add_special_tokens=False), waves[it.id])])
            for it in items]
    train_ctc(model, docs, steps=150, lr=1e-2)
    trained = {k: v for k, v in model.state_dict().items() if k.startswith("adapter.") or k == "boundary"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.export, "trained_state", lambda ckpt_dir, tag: trained)
        train.export.export(cfg.model, run_dir, "final", cfg.run.folder().export(0))
    return run_dir


def evaluate(run_dir, *overrides: str, ranks: int = 1) -> bytes:
    launcher = [*TORCHRUN[:-1], str(ranks)] if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "eval", "--config", "configs/smoke.yaml", "--round", "0", "--force",
           f"run.dir={run_dir}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return (run_dir / "smoke/round-0/eval.json").read_bytes()


@pytest.fixture(scope="module")
def with_cascade(ctc_run) -> bytes:
    return evaluate(ctc_run, "loss.ctc_weight=0.5")


@pytest.mark.slow
def test_fresh_process_gives_the_same_bytes_and_the_cascade(ctc_run, with_cascade):
    assert evaluate(ctc_run, "loss.ctc_weight=0.5") == with_cascade
    result = json.loads(with_cascade)
    assert set(result) == {"tasks", "cascade", "cascade_wer", "M", "F"}
    assert set(result["cascade"]) == set(result["cascade_wer"]) == {"smoke"}
    assert 0.0 <= result["cascade"]["smoke"] <= 1.0
    assert result["cascade_wer"]["smoke"] < 0.5        # CTC-trained on these utterances: mostly decoded right


@pytest.mark.slow
def test_two_ranks_give_the_same_task_and_cascade_numbers(ctc_run, with_cascade):
    """Items are split across ranks and gathered; M and F are not compared (each rank draws its own held-out
    documents)."""
    two = json.loads(evaluate(ctc_run, "loss.ctc_weight=0.5", ranks=2))
    one = json.loads(with_cascade)
    for key in ("tasks", "cascade", "cascade_wer"):
        assert two[key] == one[key], key


@pytest.mark.slow
def test_no_cascade_without_a_ctc_head(ctc_run, with_cascade):
    result = json.loads(evaluate(ctc_run, "eval.heldout="))
    assert set(result) == {"tasks"}
    assert result["tasks"] == json.loads(with_cascade)["tasks"]    # the cascade leaves the other modes alone
