"""CTC over the LLM's vocabulary: the alignment loss against a direct F.ctc_loss, learning, one vector per token
(compression along the greedy path), decoding, and the objective with the term off and on."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, from_dict
from model.adapter import AdapterConfig
from model.build import LLMConfig, ModelConfig, build_speech_lm
from model.encoder import EncoderConfig
from model.inputs import SPEECH, TEXT, Document, Span, pack
from model.speech_lm import BLANK, BLANK_LABEL, ctc_pool
from train.losses import ctc_alignment_loss, distillation_loss, nll_loss
from train.objective import LossConfig, Objective

SR = 16000
A, B, C = 11, 12, 13          # token ids of the constructed greedy path


def build(tiny_dir, compress: str = "none", seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="frozen"), encoder=EncoderConfig(kind="mel"),
                      adapter=AdapterConfig(stack=4, layers=1, width=32, mlp=64, heads=2, kv_heads=1,
                                            compress=compress))
    return build_speech_lm(cfg)


def audio(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def speech_docs(seconds=(1.0, 0.6)) -> list[Document]:
    return [Document([Span(TEXT, [5, 6]), Span(SPEECH, [20, 21, 21, 22], audio(seconds[0], 1)), Span(TEXT, [9])]),
            Document([Span(SPEECH, [30, 31], audio(seconds[1], 2)), Span(TEXT, [10, 11])])]


def assert_pairs_predict_the_same_token(batch, layout):
    """Student grid (token ids at text positions, -2 at boundaries, -3 at vectors): every mapped pair predicts
    the same next token in both layouts (as in test_inputs)."""
    grid = torch.full((batch.rows, layout.student_len), -1)
    grid[layout.text_row, layout.text_pos] = layout.text_token
    grid[layout.span_row, layout.begin_pos] = -2
    grid[layout.span_row, layout.end_pos] = -2
    grid[layout.vector_row, layout.vector_pos] = -3
    r, s, t = layout.map_row, layout.map_student, layout.map_teacher
    assert torch.equal(grid[r, s + 1], layout.map_target)
    assert torch.equal(layout.teacher_ids[r, t + 1], layout.map_target)
    assert int(layout.student_mask.sum()) == int((grid != -1).sum())


# ---- the loss against a direct computation -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_alignment_loss_equals_direct_ctc(dtype, chunk_size):
    torch.manual_seed(0)
    spans, n, hidden, vocab = 4, 9, 8, 13
    vectors = torch.randn(spans, n, hidden, dtype=dtype, requires_grad=True)
    table = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    blank = torch.randn(hidden, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([9, 6, 4, 3])
    # repeated tokens (need a blank between them), a token shared by spans, and a span too short for its
    # transcript (4 vectors for 4 equal tokens: infinite loss, counted as 0)
    target_lengths = torch.tensor([4, 2, 4, 1])
    targets = torch.tensor([3, 3, 7, 12, 1, 7, 4, 4, 4, 4, 0])

    loss = ctc_alignment_loss(vectors, vectors @ blank, lengths, targets, target_lengths, lambda h: h @ table.T,
                              chunk_size)
    grads = torch.autograd.grad(loss, [vectors, table, blank])

    logits = torch.cat([vectors @ table.T, (vectors @ blank)[..., None]], -1)        # blank = class `vocab`
    direct = F.ctc_loss(F.log_softmax(logits, -1).transpose(0, 1), targets, lengths, target_lengths, blank=vocab,
                        reduction="mean", zero_infinity=True)
    expected = torch.autograd.grad(direct, [vectors, table, blank])
    assert torch.isfinite(direct) and direct > 0
    torch.testing.assert_close(loss, direct, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert grads[0][1, 6:].abs().sum() == 0 and grads[0][2].abs().sum() == 0   # padding; infeasible span


def test_alignment_loss_without_spans_is_zero_and_keeps_the_graph():
    vectors = torch.randn(1, 5, 4, requires_grad=True)[:0]
    calls = []
    head = lambda h: calls.append(len(h)) or h @ torch.ones(6, 4).T  # noqa: E731
    empty = torch.zeros(0, dtype=torch.long)
    loss = ctc_alignment_loss(vectors, vectors.sum(-1), empty, empty, empty, head)
    assert loss.item() == 0.0 and loss.requires_grad and calls == [0]   # the head still runs once


def test_alignment_loss_falls_when_training_the_adapter(tiny_dir):
    model = build(tiny_dir)
    batch = pack(speech_docs(), model.vectors_for, 256, bos_id=0)
    params = list(model.adapter.parameters()) + [model.boundary]
    opt = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(50):
        out = model.adapter_output(batch.waves, batch.wave_lengths)
        loss = ctc_alignment_loss(out.vectors, out.blank_logits, out.lengths, batch.span_tokens,
                                  batch.span_token_count, model.token_logits, chunk_size=16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.llm.get_input_embeddings().weight.grad is None      # E is the fixed target space
    assert losses[-1] < 0.1 * losses[0], losses
    # trained, the greedy path decodes the transcripts, the repeated token (split by a blank) included
    assert model.transcribe(batch.waves, batch.wave_lengths) == [[20, 21, 21, 22], [30, 31]]


# ---- one vector per token ------------------------------------------------------------------------------------
def test_ctc_pool_means_the_frames_of_each_emitted_token():
    torch.manual_seed(0)
    vectors = torch.randn(3, 7, 5, requires_grad=True)
    x = BLANK_LABEL
    labels = torch.tensor([[A, A, x, B, B, B, x],      # "a a - b b b -"  -> a, b
                           [A, x, A, C, C, C, C],      # "a - a c" (length 4; the rest is padding) -> a, a, c
                           [x, x, x, A, A, A, A]])     # all blank (length 3) -> one vector, the mean
    lengths = torch.tensor([7, 4, 3])
    pooled, counts = ctc_pool(vectors, labels, lengths)
    v = vectors.detach()
    expected = torch.stack([v[0, 0:2].mean(0), v[0, 3:6].mean(0), v[1, 0], v[1, 2], v[1, 3], v[2, 0:3].mean(0)])
    assert counts.tolist() == [2, 3, 1]
    torch.testing.assert_close(pooled, expected)
    pooled.sum().backward()                          # gradients reach exactly the pooled frames, scaled 1/run
    weights = vectors.grad[..., 0]
    torch.testing.assert_close(weights, torch.tensor([[1 / 2, 1 / 2, 0, 1 / 3, 1 / 3, 1 / 3, 0],
                                                      [1, 0, 1, 1, 0, 0, 0],
                                                      [1 / 3, 1 / 3, 1 / 3, 0, 0, 0, 0]]))


@pytest.fixture
def constructed(tiny_dir, monkeypatch):
    """A compressing SpeechLM whose scores are set by hand: E[A] = e0, E[B] = e1, blank = e2, every other
    embedding 0; the adapter returns frames "a a - b b b -" (e0, e0, e2, e1, e1, e1, e2 plus noise in
    dimensions >= 3, which no score reads)."""
    model = build(tiny_dir, compress="ctc")
    table = model.llm.get_input_embeddings().weight
    hidden = table.shape[1]
    with torch.no_grad():
        table.zero_()
        table[A, 0] = table[B, 1] = 1.0
        model.boundary[BLANK] = 0.0
        model.boundary[BLANK, 2] = 1.0
    unit = torch.eye(hidden)
    frames = torch.stack([unit[i] for i in (0, 0, 2, 1, 1, 1, 2)]) * 3.0
    frames[:, 3:] = torch.randn(7, hidden - 3, generator=torch.Generator().manual_seed(0))
    frames.requires_grad_(True)
    monkeypatch.setattr(model, "speech_vectors", lambda waves, lengths: (frames[None], torch.tensor([7])))
    return model, frames


def test_compressed_student_embeddings_give_one_vector_per_token(constructed):
    model, frames = constructed
    doc = Document([Span(TEXT, [5, 6]), Span(SPEECH, [A, B], audio(1.0, 0)), Span(TEXT, [9, 10])])
    batch = pack([doc], model.vectors_for, 256, bos_id=0)
    assert model.vectors_for(SR) >= 7
    out = model.adapter_output(batch.waves, batch.wave_lengths)
    assert model.greedy_labels(out).tolist() == [[A, A, BLANK_LABEL, B, B, B, BLANK_LABEL]]
    embeds, layout = model.student_embeddings(batch)
    assert layout.vector_pos.tolist() == [layout.begin_pos.item() + 1, layout.begin_pos.item() + 2]
    assert layout.end_pos.item() == layout.begin_pos.item() + 3
    # each emitted token's pooled frames, read as their expected embedding under the CTC posterior
    table = model.llm.get_input_embeddings().weight.detach()
    pooled = torch.stack([frames[0:2].mean(0), frames[3:6].mean(0)]).detach()
    expected = torch.softmax(pooled @ table.T, -1) @ table
    torch.testing.assert_close(embeds[0, layout.vector_pos], expected)
    assert expected[0, 0] > expected[0, 1] and expected[1, 1] > expected[1, 0]    # near E[A], then near E[B]
    assert_pairs_predict_the_same_token(batch, layout)
    embeds.sum().backward()
    assert frames.grad[2].abs().sum() == 0 and frames.grad[6].abs().sum() == 0   # blank frames dropped
    assert frames.grad[0].abs().sum() > 0


def test_transcribe_decodes_the_greedy_path(constructed):
    model, _ = constructed
    waves = torch.zeros(1, SR)
    assert model.transcribe(waves, torch.tensor([SR])) == [[A, B]]


def test_compression_counts_stay_within_the_planned_bound(tiny_dir):
    model = build(tiny_dir, compress="ctc", seed=1)
    docs = speech_docs(seconds=(1.3, 0.4)) + [Document([Span(TEXT, [7]), Span(SPEECH, [40], audio(0.2, 3))])]
    batch = pack(docs, model.vectors_for, 512, bos_id=0)
    embeds, layout = model.student_embeddings(batch)
    counts = layout.end_pos - layout.begin_pos - 1
    planned = torch.tensor([model.vectors_for(int(n)) for n in batch.wave_lengths])
    assert ((counts >= 1) & (counts <= planned)).all(), (counts, planned)
    assert_pairs_predict_the_same_token(batch, layout)
    out = model.adapter_output(batch.waves, batch.wave_lengths)
    vectors, expected = model.llm_vectors(out)
    assert torch.equal(counts, expected)
    torch.testing.assert_close(embeds[layout.vector_row, layout.vector_pos], vectors)


# ---- the objective -------------------------------------------------------------------------------------------
def reference_loss(model, batch, cfg: LossConfig, objective: Objective) -> torch.Tensor:
    """The objective as it was before the CTC term: alpha * KL + (1 - alpha) * NLL at the mapped positions."""
    hidden, layout = model(batch)
    teacher = model.text_hidden(layout.teacher_ids, layout.teacher_mask, teacher=True)
    student_at = hidden[layout.map_row, layout.map_student]
    teacher_at = teacher[layout.map_row, layout.map_teacher]
    dist = distillation_loss(student_at, teacher_at, model.student_head, objective.teacher_head, cfg.temperature,
                             cfg.chunk_size)
    nll = nll_loss(student_at, model.student_head, layout.map_target, cfg.chunk_size)
    return cfg.alpha * dist + (1 - cfg.alpha) * nll


def test_objective_without_ctc_is_unchanged_and_with_it_adds_the_term(tiny_dir):
    model = build(tiny_dir)
    batch = pack(speech_docs(), model.vectors_for, 256, bos_id=0)
    off = LossConfig(alpha=0.7, chunk_size=8)
    objective = Objective(model, off)
    out = objective(batch)
    assert torch.equal(out["loss"], reference_loss(model, batch, off, objective))
    assert out["ctc"].item() == 0.0
    model.zero_grad()
    out["loss"].backward()
    assert model.boundary.grad[BLANK].abs().sum() == 0

    on = LossConfig(alpha=0.7, chunk_size=8, ctc_weight=0.5)
    out = Objective(model, on)(batch)
    speech = model.adapter_output(batch.waves, batch.wave_lengths)
    ctc = ctc_alignment_loss(speech.vectors, speech.blank_logits, speech.lengths, batch.span_tokens,
                             batch.span_token_count, model.token_logits, on.chunk_size)
    assert ctc > 0 and torch.equal(out["ctc"], ctc.detach())
    torch.testing.assert_close(out["loss"], reference_loss(model, batch, on, objective) + 0.5 * ctc,
                               atol=1e-6, rtol=1e-6)
    model.zero_grad()
    out["loss"].backward()
    assert model.boundary.grad[BLANK].abs().sum() > 0


def test_text_only_batch_with_ctc_touches_every_parameter(tiny_dir):
    model = build(tiny_dir, compress="ctc")
    batch = pack([Document([Span(TEXT, [10, 11, 12])])], model.vectors_for, 64, bos_id=0)
    out = Objective(model, LossConfig(ctc_weight=1.0))(batch)
    assert out["ctc"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient (ZeRO-3 ranks would disagree)"


def test_config_checks():
    with pytest.raises(ConfigError, match="^ctc_weight:"):
        from_dict(LossConfig, {"ctc_weight": -0.1})
    with pytest.raises(ConfigError, match="compress"):
        from_dict(AdapterConfig, {"compress": "words"})


@pytest.mark.slow
def test_two_rank_zero3_trains_with_ctc_and_compression(tmp_path):
    """Partitioned E and boundary: 2 ranks with ZeRO-3 (text-only batches on some steps) train, and the export
    (plain PyTorch) reproduces the engine's logits, so both took the same compressed layout."""
    import json
    import subprocess
    import sys

    from tests.test_train import REPO, TORCHRUN, env

    subprocess.run([sys.executable, "-m", "toy.smoke"], cwd=REPO, env=env(), check=True)   # reused if built
    cmd = [*TORCHRUN, "-m", "train", "--config", "configs/smoke.yaml", "train.max_steps=4", "train.save_every=4",
           "data.text_ratio=0.25", "loss.ctc_weight=0.5", "model.adapter.compress=ctc", f"run.dir={tmp_path}"]
    subprocess.run(cmd, cwd=REPO, env=env(), check=True, timeout=600, capture_output=True)
    out = tmp_path / "smoke/round-0"
    assert json.loads((out / "DONE").read_text())["export_max_logit_diff"] < 1e-4
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(r["loss"] >= r["kl"] for r in log) and any(r["loss"] > r["kl"] for r in log)
