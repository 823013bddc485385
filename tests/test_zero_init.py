"""Loading at scale: under ZeRO-3 the LLM (and the full-mode teacher) is partitioned as it loads
(``train.engine.llm_init`` + ``model.build``), gives the plain load's logits, and trains on 2 ranks.

Run as a script, this file is the 2-rank worker (``torchrun ... tests/test_zero_init.py TINY_DIR OUT``).
"""

import contextlib
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapter import Adapter, AdapterConfig
from model.build import LLMConfig, ModelConfig, build_speech_lm, load_llm
from model.encoder import EncoderConfig
from model.inputs import SPEECH, TEXT, Document, Span, pack
from rounds.experiment import load_experiment
from tests.conftest import kill_tree
from tests.test_train import REPO, TORCHRUN, env
from train.engine import TrainConfig, deepspeed_config, llm_init

STEPS = 6
IDS = torch.tensor([[1, 5, 9, 22, 31, 7, 40, 41], [1, 12, 4, 8, 60, 61, 62, 63]])


# ---------------------------------------------------------------------------------------------- worker
def partition(module: torch.nn.Module) -> dict:
    """Elements this rank holds vs the whole module's, and whether every parameter is a ZeRO-3 one."""
    params = list(module.parameters())
    return {"zero": all(hasattr(p, "ds_id") for p in params),
            "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "dtypes": sorted({str(p.dtype) for p in params})}


def max_diff(model: torch.nn.Module, reference: torch.nn.Module, logits: bool = True) -> dict:
    """Largest difference of a (partitioned) model's gathered weights, and of its logits unless ``logits`` is
    off (inside an engine, whose hooks own the forward), from a plainly loaded model's."""
    import deepspeed

    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters())):
        ref = dict(reference.named_parameters())
        out = {"weights": max(float((p.float() - ref[n].float()).abs().max())
                              for n, p in model.named_parameters())}
        if logits:
            out["logits"] = float((model(input_ids=IDS).logits.float()
                                   - reference(input_ids=IDS).logits.float()).abs().max())
    return out


def speech_batch(vectors_for, rank: int):
    rng = np.random.default_rng(rank)
    audio = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 9600)]
    docs = [Document([Span(TEXT, [5, 6, 7]), Span(SPEECH, [20, 21, 22, 23], audio[0]),
                      Span(TEXT, [9, 10, 11])]),
            Document([Span(SPEECH, [30, 31], audio[1]), Span(TEXT, [12, 13, 14, 15])])]
    return pack(docs, vectors_for, 256, bos_id=1)


def worker(tiny_dir: str, out_dir: str) -> None:
    """(a) partitioned vs plain loading, fp32 and bf16; (b) full mode with a partitioned teacher trains."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from train import distributed
    from train.engine import build_engine
    from train.objective import LossConfig, Objective

    torch.set_num_threads(1)
    rank, world = distributed.join(deepspeed=True)
    fp32 = TrainConfig(max_steps=STEPS, warmup_steps=0, decay_fraction=0.0, lr_adapter=3e-3, lr_llm=3e-3)
    cfg = ModelConfig(llm=LLMConfig(path=tiny_dir, mode="full"), encoder=EncoderConfig(kind="mel"),
                      adapter=AdapterConfig(stack=4, layers=1, width=32, mlp=64, heads=2, kv_heads=1))
    torch.manual_seed(0)
    model = build_speech_lm(cfg, llm_init(fp32, world))
    out: dict = {"zero3_left_on": is_deepspeed_zero3_enabled(), "llm": partition(model.llm),
                 "teacher": partition(model.teacher), "adapter": partition(model.adapter)}
    plain = load_llm(cfg.llm)   # the plain path, in the same process after the context
    out["llm_vs_plain"] = max_diff(model.llm, plain)
    out["teacher_vs_plain"] = max_diff(model.teacher, plain)

    bf16 = llm_init(TrainConfig(precision="bf16"), world)
    llm_bf16 = load_llm(LLMConfig(path=tiny_dir, dtype="bfloat16"), bf16)
    out["bf16"] = partition(llm_bf16)
    out["bf16_vs_plain"] = max_diff(llm_bf16, load_llm(LLMConfig(path=tiny_dir, dtype="bfloat16")))
    del llm_bf16

    engine = build_engine(Objective(model, LossConfig(chunk_size=64), distributed=True), fp32, world)
    optimized = {id(p) for group in engine.optimizer.fp16_groups for p in group}   # what ZeRO-3 updates
    parts = {"llm": model.llm, "teacher": model.teacher, "adapter": model.adapter}
    out["optimized"] = {name: sum(id(p) in optimized for p in part.parameters())
                        for name, part in parts.items()}
    batch = speech_batch(model.vectors_for, rank).to(engine.device)
    losses = []
    for _ in range(STEPS):
        result = engine(batch)
        engine.backward(result["loss"])
        engine.step()
        losses.append(float(result["loss"].detach()))
    out["losses"] = losses
    out["teacher_after"] = partition(model.teacher)
    out["teacher_after_vs_plain"] = max_diff(model.teacher, plain, logits=False)
    out["student_after_vs_plain"] = max_diff(model.llm, plain, logits=False)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    distributed.finish()


# ---------------------------------------------------------------------------------------------- tests
def test_llm_init_switches_transformers_zero3_on_only_inside(tmp_path):
    from transformers.integrations import is_deepspeed_zero3_enabled

    with llm_init(TrainConfig(ds_config="ds_configs/zero3_cpu.json"), world=1)():
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()   # later plain loads (the export on rank 0) are no collectives
    stage2 = tmp_path / "zero2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert llm_init(TrainConfig(ds_config=str(stage2)), world=1) is contextlib.nullcontext


@pytest.mark.parametrize("size, lr_adapter, lr_llm", [("3b", 1e-3, 5e-5), ("7b", 1e-4, 5e-6)])
def test_scale_configs_hold_the_paper_settings(size, lr_adapter, lr_llm):
    from deepspeed.runtime.config import DeepSpeedConfig  # DeepSpeed's own, strict check of the merged JSON

    cfg = load_experiment(REPO / f"configs/qwen2.5-{size}-mimi.yaml")
    assert (cfg.model.llm.mode, cfg.model.encoder.kind, cfg.train.precision) == ("full", "mimi", "bf16")
    assert cfg.model.gradient_checkpointing and cfg.model.llm.dtype == "bfloat16"
    assert cfg.model.encoder.dtype == "float32"   # Mimi frozen in fp32 whatever the training precision
    # the paper's text mix is the SmolLM corpus; FineWeb-Edu is the pool selection clusters
    assert [Path(r.path).name for r in cfg.data.text] == ["smollm-cosmopedia-v2", "smollm-fineweb-edu-dedup"]
    assert "fineweb-edu" in cfg.selection.pool and cfg.data.selected_share == 0.5
    assert (cfg.train.lr_adapter, cfg.train.lr_llm, cfg.train.weight_decay) == (lr_adapter, lr_llm, 0.1)
    assert (cfg.loss.alpha, cfg.loss.ctc_weight, cfg.inputs.context, cfg.rounds) == (1.0, 0.0, 2048, 1)
    assert (cfg.selection.clusters, cfg.selection.gamma, cfg.selection.budget_fraction) == (128, 5.0, 0.01)
    assert [t.name for t in cfg.eval.tasks] == ["storycloze", "mmsu", "openbookqa", "hellaswag",
                                                "arc_challenge", "piqa"]
    hidden = {"3b": 2048, "7b": 3584}[size]
    with torch.device("meta"):   # the paper's ~122M adapter, counted without allocating it
        adapter = Adapter(cfg.model.adapter, in_dim=512, out_dim=hidden)   # Mimi latents are 512-d
    assert 115e6 < sum(p.numel() for p in adapter.parameters()) < 130e6
    paths = [cfg.model.llm.path, cfg.model.encoder.path, cfg.eval.heldout, cfg.selection.pool,
             *(r.path for r in cfg.data.speech + cfg.data.text), *(t.path for t in cfg.eval.tasks)]
    assert all(p.startswith("/data/") for p in paths), paths   # placeholders, checked only when a job starts
    for name, offload in ((cfg.train.ds_config, None), ("ds_configs/zero3_offload.json", "cpu")):
        merged = deepspeed_config(dataclasses.replace(cfg.train, ds_config=name), world=1)
        ds = DeepSpeedConfig(merged)
        assert ds.zero_optimization_stage == 3 and ds.bfloat16_config.enabled, name
        # no optimizer that compiles at start-up (FusedAdam, CPUAdam need nvcc); gradients summed and sent in fp32
        assert merged["optimizer"]["params"]["torch_adam"] is True, name
        assert ds.grad_accum_dtype == "fp32" and ds.communication_data_type == torch.float32, name
        for part in (ds.zero_config.offload_param, ds.zero_config.offload_optimizer):
            assert (part.device if part else None) == offload, (name, part)


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("zero_init")
    proc = subprocess.Popen([*TORCHRUN, __file__, str(tiny_dir), str(out)], cwd=REPO, env=env(), text=True,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_zero3_loading_partitions_and_matches_plain_loading(two_ranks):
    for rank in two_ranks:
        assert not rank["zero3_left_on"]
        for name in ("llm", "teacher", "bf16"):
            part = rank[name]
            assert part["zero"], name                         # partitioned as it loaded, never whole here
            assert part["local"] <= 0.55 * part["total"], (name, part)
        assert not rank["adapter"]["zero"]        # built whole; deepspeed.initialize partitions it
        assert rank["bf16"]["dtypes"] == ["torch.bfloat16"] and rank["llm"]["dtypes"] == ["torch.float32"]
        for key in ("llm_vs_plain", "teacher_vs_plain", "bf16_vs_plain"):
            assert rank[key] == {"weights": 0.0, "logits": 0.0}, (key, rank[key])


@pytest.mark.slow
def test_full_mode_with_partitioned_teacher_trains_on_two_ranks(two_ranks):
    for rank in two_ranks:
        losses = rank["losses"]
        assert len(losses) == STEPS and all(np.isfinite(losses)), losses
        assert losses[-1] < 0.8 * losses[0], losses
        assert rank["optimized"]["teacher"] == 0, rank["optimized"]     # the teacher is never optimized
        assert rank["optimized"]["llm"] > 0 and rank["optimized"]["adapter"] > 0
        teacher = rank["teacher_after"]
        assert teacher["zero"] and teacher["local"] <= 0.55 * teacher["total"], teacher
        assert rank["teacher_after_vs_plain"]["weights"] == 0.0     # the frozen teacher never moved
        assert rank["student_after_vs_plain"]["weights"] > 1e-4     # the whole LLM trained


if __name__ == "__main__":
    worker(*sys.argv[1:3])


@pytest.mark.slow
def test_cpu_offload_variant_trains_and_exports(tmp_path):
    """ds_configs/zero3_offload.json (parameters and Adam states in CPU memory, DeepSpeed's CPU Adam) through
    the same `python -m train` path: it trains, and the export reproduces the trained model's logits."""
    subprocess.run([sys.executable, "-m", "toy.smoke"], cwd=REPO, env=env(), check=True)   # reused if built
    subprocess.run([sys.executable, "-m", "train", "--config", "configs/smoke.yaml",
                    "train.ds_config=ds_configs/zero3_offload.json", "train.max_steps=3", "train.save_every=3",
                    "train.diagnostics_every=0", f"run.dir={tmp_path}"], cwd=REPO, env=env(), check=True,
                   timeout=900)
    out = tmp_path / "smoke" / "round-0"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 0
    assert json.loads((out / "config.json").read_text())["train"]["ds_config"] == "ds_configs/zero3_offload.json"
    assert json.loads((out / "DONE").read_text())["export_max_logit_diff"] < 1e-4
