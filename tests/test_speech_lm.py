"""SpeechLM: the LoRA teacher is exactly the base model; student embeddings follow the layout."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from model.adapter import AdapterConfig
from model.build import LLMConfig, ModelConfig, build_speech_lm
from model.encoder import EncoderConfig
from model.inputs import SPEECH, TEXT, Document, Span, pack


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="lora", lora_r=4),
                      encoder=EncoderConfig(kind="mel"),
                      adapter=AdapterConfig(stack=4, layers=1, width=32, mlp=64, heads=2, kv_heads=1))
    model = build_speech_lm(cfg)
    for name, p in model.llm.named_parameters():   # move LoRA away from its zero start
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return model


def test_lora_teacher_equals_base_model(lora_model, tiny_dir):
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    ids = torch.tensor([[0, 5, 9, 22, 31, 7], [0, 12, 4, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    teacher = lora_model.text_hidden(ids, mask, teacher=True)
    with torch.no_grad():
        expected = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        student = lora_model.text_hidden(ids, mask, teacher=False)
    assert torch.equal(teacher, expected)
    assert not teacher.requires_grad
    assert (student - expected).abs().max() > 1e-3, "LoRA must change the student"


def test_only_adapter_boundary_and_lora_train(lora_model):
    trainable = {n.split(".")[0] for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable == {"llm", "adapter", "boundary"}
    llm_trainable = [n for n, p in lora_model.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert not any(p.requires_grad for p in lora_model.encoder.parameters())


def test_student_embeddings_follow_the_layout(lora_model):
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16000).astype(np.float32) * 0.1
    doc = Document([Span(TEXT, [5, 6]), Span(SPEECH, [7, 8], audio), Span(TEXT, [9])])
    batch = pack([doc, Document([Span(TEXT, [10, 11, 12])])], lora_model.vectors_for, 512, bos_id=0)
    embeds, layout = lora_model.student_embeddings(batch)
    table = lora_model.llm.get_input_embeddings().weight
    assert torch.equal(embeds[layout.text_row, layout.text_pos], table[layout.text_token])
    assert torch.equal(embeds[layout.span_row, layout.begin_pos], lora_model.boundary[0].expand(1, -1))
    assert torch.equal(embeds[layout.span_row, layout.end_pos], lora_model.boundary[1].expand(1, -1))
    vectors, counts = lora_model.speech_vectors(batch.waves, batch.wave_lengths)
    assert int(counts[0]) == lora_model.vectors_for(16000) == len(layout.vector_pos)
    assert torch.allclose(embeds[layout.vector_row, layout.vector_pos], vectors[0, : int(counts[0])])
    lora_model.zero_grad()
    embeds.sum().backward()
    assert float(lora_model.adapter.proj_in.weight.grad.abs().sum()) > 0


def test_text_only_batch_still_touches_the_adapter(lora_model):
    lora_model.zero_grad()
    batch = pack([Document([Span(TEXT, [10, 11, 12])])], lora_model.vectors_for, 64, bos_id=0)
    embeds, _ = lora_model.student_embeddings(batch)
    embeds.sum().backward()
    grads = [p.grad for p in lora_model.adapter.parameters()]
    assert all(g is not None and float(g.abs().sum()) == 0.0 for g in grads)


def test_full_mode_loads_its_frozen_teacher_only_when_asked(tiny_dir):
    cfg = ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="full"), encoder=EncoderConfig(kind="mel"),
                      adapter=AdapterConfig(stack=4, layers=1, width=32, mlp=64, heads=2, kv_heads=1))
    trained = build_speech_lm(cfg)
    assert trained.teacher is not None and not any(p.requires_grad for p in trained.teacher.parameters())
    exported = build_speech_lm(cfg, with_teacher=False)   # what train.export builds
    assert exported.teacher is None

    def trainable(m):
        return [n for n, p in m.llm.named_parameters() if p.requires_grad]
    assert trainable(exported) == trainable(trained) and trainable(exported)
