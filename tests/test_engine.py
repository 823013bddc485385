"""The training engine as a GPU cluster runs it, checked on CPU ranks (ZeRO-3, gloo):

- it starts and takes a step for every LLM mode x training precision x ``model.llm.dtype`` (ZeRO-3 requires one
  dtype for every trained weight; peft upcasts LoRA, the adapter was built in ``llm.dtype``);
- the model trains in train mode, so activation checkpointing really recomputes (transformers checkpoints only
  when ``self.training``; ``from_pretrained`` returns eval mode), in the LLM and in the adapter; a separate teacher
  and the encoder stay in eval mode, also after a resume;
- the frozen encoder keeps its own dtype (float32) under a bf16 engine;
- every tensor is on the engine's device before the first forward (DeepSpeed never moves a ``zero.Init`` model);
- a rank whose batch has nothing to predict runs the same collectives as the others (no hang).

Run as a script, this file is the worker: ``python tests/test_engine.py one TINY_DIR MIMI_DIR OUT`` (one rank)
or ``torchrun --nproc_per_node 2 tests/test_engine.py empty TINY_DIR OUT``.
"""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapter import AdapterConfig
from model.build import LLMConfig, ModelConfig, build_speech_lm
from model.encoder import EncoderConfig
from model.inputs import SPEECH, TEXT, Document, Span, pack
from tests.conftest import kill_tree
from tests.test_train import REPO, TORCHRUN, env
from train.engine import TrainConfig, check_placement, place
from train.objective import LossConfig

ADAPTER = AdapterConfig(stack=4, layers=2, width=32, mlp=64, heads=2, kv_heads=1)
MODES, PRECISIONS, LLM_DTYPES = ("frozen", "lora", "full"), ("fp32", "bf16"), ("float32", "bfloat16")


# ---------------------------------------------------------------------------------------------- worker
def batch_of(vectors_for, docs: int = 2, targets: bool = True, seed: int = 0):
    """Speech documents with text after the speech (targets), or speech only (nothing to predict)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(docs):
        audio = (rng.standard_normal(12_000 + 2_000 * i) * 0.1).astype(np.float32)
        spans = [Span(SPEECH, [20 + i, 21, 22], audio)] + ([Span(TEXT, [9, 10, 11 + i])] if targets else [])
        out.append(Document(([Span(TEXT, [5, 6, 7])] if targets else []) + spans))
    return pack(out, vectors_for, 256, bos_id=1 if targets else None)


def engine_for(tiny_dir: str, mode: str, precision: str, llm_dtype: str, checkpointing: bool = False,
               encoder: EncoderConfig | None = None, ranks: int = 1):
    from train.engine import build_engine, build_model
    from train.objective import Objective

    model_cfg = ModelConfig(llm=LLMConfig(path=tiny_dir, mode=mode, lora_r=4, dtype=llm_dtype),
                            encoder=encoder or EncoderConfig(kind="mel"), adapter=ADAPTER,
                            gradient_checkpointing=checkpointing)
    train_cfg = TrainConfig(max_steps=4, warmup_steps=0, decay_fraction=0.0, precision=precision,
                            ds_config="ds_configs/zero3_cpu.json", lr_adapter=1e-3, lr_llm=1e-3)
    torch.manual_seed(0)
    model = build_model(model_cfg, train_cfg, ranks)
    return model, build_engine(Objective(model, LossConfig(chunk_size=16), distributed=ranks > 1), train_cfg, ranks)


def step(engine, batch) -> dict:
    out = engine(batch.to(engine.device))
    engine.backward(out["loss"])
    engine.step()
    return {"loss": float(out["loss"]), "tokens": float(out["tokens"])}


def modes(model) -> dict:
    return {"llm": model.llm.training, "adapter": model.adapter.training, "encoder": model.encoder.training,
            "teacher": None if model.teacher is None else model.teacher.training}


def grad_calls(layer: torch.nn.Module) -> list[int]:
    """Counts (in the returned list) the calls of a decoder layer's MLP made with autograd on: one per forward
    without checkpointing, one more per backward recompute with it (transformers checkpoints the layer's
    ``forward``, so the layer's own hooks stay outside the checkpoint, its submodules' inside)."""
    module = layer.mlp
    calls = [0]

    def hook(*_):
        calls[0] += torch.is_grad_enabled()

    module.register_forward_pre_hook(hook)
    return calls


def one_rank(tiny_dir: str, mimi_dir: str, out: str) -> None:
    from train import checkpoint, distributed
    from train.objective import evaluating

    torch.set_num_threads(1)
    distributed.join(deepspeed=True)
    got: dict = {"matrix": {}}
    for mode, precision, llm_dtype in itertools.product(MODES, PRECISIONS, LLM_DTYPES):
        model, engine = engine_for(tiny_dir, mode, precision, llm_dtype)
        trained = sorted({str(p.dtype) for p in engine.module.parameters() if p.requires_grad})
        got["matrix"][f"{mode}/{precision}/{llm_dtype}"] = {**step(engine, batch_of(model.vectors_for)),
                                                           "trained_dtypes": trained}
        del model, engine

    model, engine = engine_for(tiny_dir, "full", "bf16", "bfloat16", encoder=EncoderConfig("mimi", mimi_dir))
    frames, _ = model.encoder(torch.zeros(1, 4800, device=engine.device), torch.tensor([4800]))
    got["mimi_under_bf16"] = {"weights": sorted({str(p.dtype) for p in model.encoder.parameters()}),
                              "frames": str(frames.dtype), **step(engine, batch_of(model.vectors_for))}
    del model, engine

    for checkpointing in (False, True):
        model, engine = engine_for(tiny_dir, "lora", "fp32", "float32", checkpointing=checkpointing)
        llm_calls = grad_calls(model.llm.get_decoder().layers[0])
        adapter_calls = grad_calls(model.adapter.backbone.layers[0])
        step(engine, batch_of(model.vectors_for))
        got[f"calls_checkpointing_{checkpointing}"] = {"llm": llm_calls[0], "adapter": adapter_calls[0]}
        del model, engine

    model, engine = engine_for(tiny_dir, "full", "fp32", "float32", checkpointing=True)
    got["modes_built"] = modes(model)
    with evaluating(model):
        got["modes_evaluating"] = modes(model)
    got["modes_after_evaluating"] = modes(model)
    step(engine, batch_of(model.vectors_for))
    checkpoint.save(engine, Path(out) / "ckpt", "step-1", 1, {"speech": 2, "text": 0})
    del model, engine
    model, engine = engine_for(tiny_dir, "full", "fp32", "float32", checkpointing=True)
    got["resumed_step"] = checkpoint.resume(engine, Path(out) / "ckpt")[0]
    got["modes_resumed"] = modes(model)
    Path(out, "one.json").write_text(json.dumps(got))
    distributed.finish()


def empty_rank(tiny_dir: str, out: str) -> None:
    """Two ranks, ZeRO-3: rank 1's batches hold speech with nothing after it, so it has no target position."""
    from train import distributed

    torch.set_num_threads(1)
    rank, world = distributed.join(timeout_minutes=1.5, deepspeed=True)
    model, engine = engine_for(tiny_dir, "lora", "fp32", "float32", checkpointing=True, ranks=world)
    results = [step(engine, batch_of(model.vectors_for, targets=rank == 0, seed=s)) for s in range(3)]
    Path(out, f"empty{rank}.json").write_text(json.dumps(results))
    distributed.finish()


# ---------------------------------------------------------------------------------------------- tests
def run_worker(cmd: list[str], timeout: int) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), text=True, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        log = "(timed out: a collective that only some ranks reached?)"
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, log[-4000:]


@pytest.fixture(scope="module")
def one(tiny_dir, tmp_path_factory) -> dict:
    from transformers import MimiModel

    from tests.test_encoder import MIMI

    out = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    MimiModel(MIMI).eval().save_pretrained(out / "mimi")
    run_worker([sys.executable, __file__, "one", str(tiny_dir), str(out / "mimi"), str(out)], timeout=600)
    return json.loads((out / "one.json").read_text())


@pytest.mark.parametrize("mode, precision, llm_dtype", list(itertools.product(MODES, PRECISIONS, LLM_DTYPES)))
def test_engine_starts_and_steps_in_every_combination(one, mode, precision, llm_dtype):
    got = one["matrix"][f"{mode}/{precision}/{llm_dtype}"]
    assert math.isfinite(got["loss"]) and got["loss"] > 0 and got["tokens"] > 0, got
    assert got["trained_dtypes"] == [{"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]], got


def test_encoder_keeps_float32_under_a_bf16_engine(one):
    got = one["mimi_under_bf16"]
    assert got["weights"] == ["torch.float32"] and got["frames"] == "torch.float32"
    assert math.isfinite(got["loss"])


def test_activation_checkpointing_recomputes_llm_and_adapter_layers(one):
    assert one["calls_checkpointing_False"] == {"llm": 1, "adapter": 1}
    assert one["calls_checkpointing_True"] == {"llm": 2, "adapter": 2}   # forward, then recomputed in backward


def test_what_trains_is_in_train_mode_and_frozen_parts_in_eval_mode(one):
    trained = {"llm": True, "adapter": True, "encoder": False, "teacher": False}
    assert one["modes_built"] == trained
    assert one["modes_evaluating"] == {"llm": False, "adapter": False, "encoder": False, "teacher": False}
    assert one["modes_after_evaluating"] == trained
    assert one["resumed_step"] == 1 and one["modes_resumed"] == trained


@pytest.mark.slow
def test_a_rank_with_nothing_to_predict_does_not_hang_the_others(tiny_dir, tmp_path):
    run_worker([*TORCHRUN, __file__, "empty", str(tiny_dir), str(tmp_path)], timeout=400)
    ranks = [json.loads((tmp_path / f"empty{r}.json").read_text()) for r in range(2)]
    assert all(s["tokens"] > 0 and s["loss"] > 0 for s in ranks[0]), ranks[0]
    assert all(s["tokens"] == 0 and s["loss"] == 0.0 for s in ranks[1]), ranks[1]


def test_place_moves_every_buffer_and_unpartitioned_weight_and_the_check_names_strays(tiny_dir):
    cfg = ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="lora", lora_r=4), encoder=EncoderConfig(kind="mel"),
                      adapter=ADAPTER)
    model = build_speech_lm(cfg)
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match=r"encoder\.window"):
        check_placement(model, meta)
    place(model, meta)
    check_placement(model, meta)
    buffers = [model.encoder.window, model.encoder.filters, model.adapter.backbone.rotary_emb.inv_freq]
    assert all(t.device == meta for t in [*buffers, model.boundary, *model.llm.parameters()])
    model.adapter.backbone.rotary_emb.inv_freq = torch.zeros(2)   # a buffer left on the CPU
    with pytest.raises(RuntimeError, match=r"adapter\.backbone\.rotary_emb\.inv_freq \(cpu\)"):
        check_placement(model, meta)


def test_a_bf16_cast_of_the_model_leaves_the_encoder_alone(tiny_dir, tmp_path):
    from transformers import MimiModel

    from tests.test_encoder import MIMI

    MimiModel(MIMI).eval().save_pretrained(tmp_path / "mimi")
    cfg = ModelConfig(llm=LLMConfig(path=str(tiny_dir), mode="lora", lora_r=4),
                      encoder=EncoderConfig("mimi", str(tmp_path / "mimi")), adapter=ADAPTER)
    model = build_speech_lm(cfg)
    waves = torch.randn(2, 24_000) * 0.1
    lengths = torch.tensor([24_000, 13_000])
    before, _ = model.encoder(waves, lengths)
    model.to(torch.bfloat16)
    after, _ = model.encoder(waves, lengths)
    assert {p.dtype for p in model.adapter.parameters()} == {torch.bfloat16} == {model.boundary.dtype}
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}
    assert torch.equal(before, after)
    assert not any(name.startswith("encoder.") for name, _ in model.named_parameters())   # beside the tree
    model.to("meta")
    assert {p.device.type for p in model.encoder.parameters()} == {"meta"}   # but it follows moves


if __name__ == "__main__":
    if sys.argv[1] == "one":
        one_rank(*sys.argv[2:5])
    else:
        empty_rank(*sys.argv[2:4])
    sys.exit(0)

