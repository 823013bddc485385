"""How often a micro-step makes the host wait for the device (counted on the CPU: what a GPU would wait for).

Each read of a device value (``item``, ``int``, a boolean mask, an output sized by its data) empties the GPU's
queue, and with it the prefetched ZeRO-3 gathers. The layout of a batch depends only on the batch, so it is
built where the batch is packed; the trainer reads its step figures once per logged step. What remains are
transformers' own checks of the attention mask and the encoder's look at lengths that are still on the host.
"""

import numpy as np
import pytest
import torch

from bench.train_step import HostReads, host_reads
from model.adapter import AdapterConfig
from model.build import LLMConfig, ModelConfig, build_speech_lm
from model.encoder import EncoderConfig
from model.inputs import SPEECH, TEXT, Document, Span, pack
from train.objective import LossConfig, Objective

MOST = 6   # measured on the code before this test: 26


@pytest.fixture(scope="module")
def objective(tiny_dir):
    cfg = ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="lora", lora_r=4), encoder=EncoderConfig(kind="mel"),
                      adapter=AdapterConfig(stack=4, layers=1, width=32, mlp=64, heads=2, kv_heads=1))
    torch.manual_seed(0)
    return Objective(build_speech_lm(cfg).train(), LossConfig(chunk_size=8))


def speech_batch(vectors_for):
    rng = np.random.default_rng(0)
    docs = [Document([Span(TEXT, [5, 6, 7]), Span(SPEECH, [20, 21], rng.standard_normal(9000).astype(np.float32)),
                      Span(TEXT, [9, 10, 11, 12])]),
            Document([Span(SPEECH, [30, 31, 32], rng.standard_normal(14000).astype(np.float32)),
                      Span(TEXT, [12, 13])])]
    return pack(docs, vectors_for, 256, bos_id=1)


def test_counter_sees_reads_masks_and_data_sized_outputs():
    x = torch.arange(6.0)
    with HostReads() as reads:
        float(x.sum())
        x[x > 2]
        torch.nonzero(x)
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]))
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)   # sized: no read
        x + 1
    assert reads.total == 4


@pytest.mark.parametrize("kind", ["speech", "text"])
def test_a_micro_step_reads_the_device_at_most_a_few_times(objective, kind):
    model = objective.model
    batch = speech_batch(model.vectors_for) if kind == "speech" else \
        pack([Document([Span(TEXT, [5, 6, 7, 8, 9])])], model.vectors_for, 64, bos_id=1)
    reads = host_reads(objective, batch)
    assert reads.total <= MOST, reads.by_file
    assert not any(f.startswith(("model/inputs", "train/")) for f in reads.by_file), reads.by_file


def test_the_packed_layout_is_the_one_the_model_would_build(objective):
    """The layout made where the batch is packed equals the layout built from the adapter's own output."""
    model = objective.model
    batch = speech_batch(model.vectors_for)
    packed = batch.layout
    batch.layout = None
    _, rebuilt = model(batch)
    for name, value in vars(packed).items():
        other = getattr(rebuilt, name)
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
