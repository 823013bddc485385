"""The export check after training: the exported model reloaded in the engine's dtype against the engine, on a
sample of positions projected a chunk at a time (never [positions, vocabulary] for a 7B batch at once); a
failure names the numbers and the way forward, and keeps the trained round."""

import math

import numpy as np
import pytest
import torch

from model.build import load_export
from model.inputs import SPEECH, TEXT, Document, Span, pack
from tests.test_infer import export_dir  # noqa: F401 (the smoke model as train.export writes it)
from train.engine import TrainConfig
from train.export import CHECK_CHUNK, CHECK_POSITIONS, check_export, sampled_logits


def batch(vectors_for, docs: int = 3):
    rng = np.random.default_rng(1)
    return pack([Document([Span(TEXT, [5, 6, 7, 8] * (i + 1)),
                           Span(SPEECH, [20, 21], rng.standard_normal(8000 + 1000 * i).astype(np.float32)),
                           Span(TEXT, [9, 10, 11])]) for i in range(docs)], vectors_for, 512, bos_id=1)


class CountingHead(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, x):
        self.rows.append(len(x))
        return self.head(x)


@pytest.mark.parametrize("docs", [1, 3])
def test_sampled_logits_bound_the_rows_and_make_the_same_head_calls_whatever_the_batch(export_dir, docs):  # noqa: F811
    model, _ = load_export(export_dir)
    head = CountingHead(model.llm.lm_head)
    model.llm.lm_head = head
    b = batch(model.vectors_for, docs)
    valid = int(b.layout.student_mask.sum())
    logits = sampled_logits(model, b, positions=16)
    assert logits.shape == (min(16, valid), model.llm.config.vocab_size) and logits.dtype == torch.float32
    assert len(head.rows) == math.ceil(16 / CHECK_CHUNK) and max(head.rows) <= CHECK_CHUNK
    assert CHECK_POSITIONS * model.llm.config.vocab_size * 4 < 2**30   # at 152k tokens: 156 MB at most


def test_the_check_passes_on_the_same_weights_and_explains_a_failure(export_dir):  # noqa: F811
    engine_model, _ = load_export(export_dir)
    b = batch(engine_model.vectors_for)
    verdict = check_export(engine_model, export_dir, b, TrainConfig(), rank=0)
    assert verdict["export_max_logit_diff"] < 1e-5 and verdict["export_dtype"] == "float32"
    assert verdict["export_tolerance"] == 1e-4 and verdict["export_positions"] > 0
    assert engine_model.training is False   # back in the mode it was in
    with torch.no_grad():
        engine_model.boundary.add_(3.0)   # the trained model drifts from what was exported
    with pytest.raises(RuntimeError, match=r"differ .* by [0-9.e-]+ .*tolerance 0\.0001.*train\.export_tolerance"):
        check_export(engine_model, export_dir, b, TrainConfig(), rank=0)
    accepted = check_export(engine_model, export_dir, b, TrainConfig(export_tolerance=10.0), rank=0)
    assert 1e-4 < accepted["export_max_logit_diff"] <= 10.0


def test_eval_loads_student_and_teacher_in_one_dtype_and_the_encoder_in_its_own(export_dir):  # noqa: F811
    """Eval and selection load with ``model.llm.dtype`` (auto: bf16 on GPUs): student and teacher alike, so that
    the gap, F and D do not measure precision; the encoder keeps fp32."""
    import json

    teacher = json.loads((export_dir / "config.json").read_text())   # the smoke LLM is the teacher
    model, _ = load_export(export_dir, teacher_path=str(export_dir / "llm"), dtype="bfloat16")
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.adapter.parameters()} | {model.boundary.dtype} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in model.encoder.buffers()) and teacher["encoder"]["kind"] == "mel"
    auto, _ = load_export(export_dir, dtype="auto")   # no GPU here: float32
    assert {p.dtype for p in auto.llm.parameters()} == {torch.float32}
