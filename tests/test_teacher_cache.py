"""Cached teacher targets: the top-k KL against the exact one, the cache command, training with the cache."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from model.inputs import document_positions
from train.losses import distillation_loss, topk_distillation_loss, topk_log_probs
from train.teacher_cache import (
    CACHE_DIR,
    STAMP_NAME,
    TeacherCache,
    TeacherCacheError,
    cache_file,
    main,
    open_cache,
    teacher_stamp,
)

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "assets" / "smoke"
H, V, N = 8, 37, 13


# ---- the loss -------------------------------------------------------------------------------------------
class LoraHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(H, V, bias=False).requires_grad_(False)
        self.a, self.b = nn.Parameter(torch.randn(2, H) * 0.3), nn.Parameter(torch.randn(V, 2) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.T @ self.b.T


def problem(dtype: torch.dtype, sharpness: float = 1.0):
    torch.manual_seed(0)
    teacher, student = nn.Linear(H, V, bias=False).to(dtype), LoraHead().to(dtype)
    teacher.weight.data *= sharpness
    t_hidden = torch.randn(N, H, dtype=dtype)
    s_hidden = (t_hidden + 0.5 * torch.randn(N, H, dtype=dtype)).requires_grad_()
    return teacher, student, t_hidden, s_hidden


def loss_and_grads(loss_fn, student, s_hidden):
    trainable = [s_hidden, student.a, student.b]
    for t in trainable:
        t.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in trainable]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_vocabulary_topk_equals_exact_kl_and_gradients(dtype, temperature):
    teacher, student, t_hidden, s_hidden = problem(dtype)
    ids, logp, rest = topk_log_probs(teacher(t_hidden), V, temperature)
    assert torch.isneginf(rest).all()   # nothing is left outside the top V
    exact, exact_grads = loss_and_grads(
        lambda: distillation_loss(s_hidden, t_hidden, student, teacher, temperature, chunk_size=4),
        student, s_hidden)
    cached, cached_grads = loss_and_grads(
        lambda: topk_distillation_loss(s_hidden, student, ids, logp, rest, temperature, chunk_size=4),
        student, s_hidden)
    assert exact > 0.05
    torch.testing.assert_close(cached, exact, rtol=1e-5, atol=1e-6)
    for got, want in zip(cached_grads, exact_grads, strict=True):
        assert torch.isfinite(got).all() and want.abs().max() > 1e-4
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_topk_log_probs_rest_is_the_remaining_mass():
    logits = torch.randn(5, V, dtype=torch.float64) * 3
    ids, logp, rest = topk_log_probs(logits, 4)
    full = F.log_softmax(logits, -1)
    assert torch.equal(ids, full.topk(4).indices)
    torch.testing.assert_close(logp, full.gather(1, ids))
    torch.testing.assert_close(rest.exp(), 1 - logp.exp().sum(1))
    with pytest.raises(ValueError, match="k: must be in"):
        topk_log_probs(logits, V + 1)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_small_k_error_is_the_tail_kl_weighted_by_its_mass(k):
    """Chain rule of the KL: exact = top-k KL + p_rest * KL(p(.|rest) || q(.|rest)), so the error of the top-k
    KL is that tail term: >= 0, and 0 when the teacher puts no mass outside its top k. The gradient matches
    autograd through the same top-k formula."""
    teacher, student, t_hidden, s_hidden = problem(torch.float64, sharpness=3.0)
    t_logits = teacher(t_hidden)
    ids, logp, rest = topk_log_probs(t_logits, k)
    tail = torch.ones(N, V, dtype=torch.bool).scatter(1, ids, False)
    cached, grads = loss_and_grads(
        lambda: topk_distillation_loss(s_hidden, student, ids, logp, rest, reduction="sum"),
        student, s_hidden)

    def coarse() -> torch.Tensor:   # reference, by autograd: the KL of both distributions cut to k + 1 bins
        q = F.log_softmax(student(s_hidden), -1)
        q_rest = torch.where(tail, q, -torch.inf).logsumexp(-1)
        return (logp.exp() * (logp - q.gather(1, ids))).sum() + (rest.exp() * (rest - q_rest)).sum()

    _, want = loss_and_grads(coarse, student, s_hidden)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref)
    with torch.no_grad():
        p, q = F.log_softmax(t_logits, -1), F.log_softmax(student(s_hidden), -1)
        exact = (p.exp() * (p - q)).sum()
        p_tail = torch.where(tail, p, -torch.inf).log_softmax(-1)
        q_tail = torch.where(tail, q, -torch.inf).log_softmax(-1)
        tail_kl = torch.where(tail, p_tail.exp() * (p_tail - q_tail), 0.0).sum(-1)
    torch.testing.assert_close(exact - cached, (rest.exp() * tail_kl).sum())
    assert 0 <= exact - cached <= rest.exp().max() * tail_kl.sum()
    print(f"\ntop-{k} of {V}: KL {cached.item():.4f} vs exact {exact.item():.4f} "
          f"(relative error {1 - cached.item() / exact.item():.3f}, teacher mass outside the top k "
          f"{rest.exp().mean().item():.3f})")


def test_bad_target_shapes_are_named():
    teacher, student, t_hidden, s_hidden = problem(torch.float32)
    ids, logp, rest = topk_log_probs(teacher(t_hidden), 3)
    with pytest.raises(ValueError, match="topk_ids"):
        topk_distillation_loss(s_hidden, student, ids[:-1], logp[:-1], rest[:-1])


# ---- the command and training ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory) -> Path:
    """Copies of the smoke speech and text sets (the cache is written beside them)."""
    if not (SMOKE / "speech" / "index.json").is_file():
        subprocess.run([sys.executable, "-m", "toy.smoke"], cwd=REPO, check=True)
    out = tmp_path_factory.mktemp("sets")
    for name in ("speech", "text"):
        shutil.copytree(SMOKE / name, out / name)
    return out


def overrides(sets: Path, *extra: str) -> list[str]:
    return [f"model.llm.path={SMOKE / 'llm'}", f"data.speech=[{{path: {sets / 'speech'}}}]",
            f"data.text=[{{path: {sets / 'text'}}}]", "loss.teacher_context=document", *extra]


def command(sets: Path, *args: str) -> list[str]:
    return ["--config", str(REPO / "configs/smoke.yaml"), "--device", "cpu", *args, *overrides(sets)]


def load(sets: Path, *extra: str):
    from model.build import load_tokenizer
    from rounds.experiment import load_experiment

    cfg = load_experiment(REPO / "configs/smoke.yaml", overrides(sets, *extra))
    return cfg, load_tokenizer(cfg.model)


@pytest.fixture(scope="module")
def cached(shard_sets):
    """The cache with k = the vocabulary and float32 log-probabilities, so that it is exact."""
    assert main(command(shard_sets, "--top-k", "373", "--dtype", "float32")) == 0
    return shard_sets


def test_command_writes_the_teachers_top_k_per_chunk(cached):
    from model.build import load_llm
    from shards.format import read_index, read_shard, shard_urls
    from train.teacher_cache import teacher_ids

    cfg, tokenizer = load(cached)
    stamp = json.loads((cached / "speech" / CACHE_DIR / STAMP_NAME).read_text())
    assert stamp == teacher_stamp(cfg, tokenizer, 373, "float32")
    assert stamp["model"] == str((SMOKE / "llm").resolve()) and stamp["context"] == cfg.inputs.context
    llm = load_llm(cfg.model.llm).eval()
    for name, is_text in (("speech", False), ("text", True)):
        entry = read_index(cached / name)["shards"][0]
        chunks = list(read_shard(shard_urls(cached / name)[0]))
        with safe_open(str(cache_file(cached / name, entry["url"])), framework="pt") as f:
            meta = f.metadata()
            assert json.loads(meta["keys"]) == [c.key for c in chunks]
            assert meta["shard_sha256"] == entry["sha256"]
            assert f.get_tensor("topk_ids").dtype == torch.int32 and f.get_tensor("topk_logp").shape[1] == 373
            for j in (0, len(chunks) - 1):
                ids = teacher_ids(chunks[j], tokenizer, cfg.inputs, is_text)
                t0, t1 = f.get_tensor("token_offsets")[j: j + 2].tolist()
                r0, r1 = f.get_tensor("row_offsets")[j: j + 2].tolist()
                assert f.get_tensor("ids")[t0:t1].tolist() == ids and r1 - r0 == len(ids) - 1
                with torch.no_grad():
                    logp = F.log_softmax(llm(torch.tensor([ids])).logits[0, :-1].float(), -1)
                top = logp.topk(373)
                torch.testing.assert_close(f.get_tensor("topk_logp")[r0:r1], top.values, rtol=1e-5, atol=1e-5)
                assert torch.isneginf(f.get_tensor("rest_logp")[r0:r1]).all()
                agree = f.get_tensor("topk_ids")[r0:r1, :5] == top.indices[:, :5]
                assert agree.float().mean() > 0.99   # near-ties may swap
    assert ids[0] == tokenizer.bos_token_id


def test_teacher_tokens_without_decoding_audio_follow_word_timings(tmp_path):
    """Spoken segments with word timings give their words (not their text) to interleave; the cache reads
    shards without decoding audio and must still see which segments are spoken."""
    import numpy as np

    from model.build import load_tokenizer
    from rounds.experiment import load_experiment
    from shards.format import Chunk, Segment, read_shard, write_shard
    from train.teacher_cache import read_text, teacher_ids

    cfg = load_experiment(REPO / "configs/smoke.yaml", [f"model.llm.path={SMOKE / 'llm'}"])
    tokenizer = load_tokenizer(cfg.model)
    audio = np.zeros(16000, dtype=np.float32)
    chunk = Chunk("k0", "doc", segments=[
        Segment("The cat, it sat.", audio, 16000, [("the", 0.0, 0.2), ("cat", 0.2, 0.5), ("sat", 0.6, 0.9)]),
        Segment("a  dog ran", None),
        Segment("seven  friends", audio, 16000, [("seven", 0.1, 0.4), ("friends", 0.5, 0.9)])])
    shard = tmp_path / "shard.tar"
    write_shard(shard, [chunk])
    decoded = teacher_ids(next(read_shard(shard)), tokenizer, cfg.inputs, text=False)
    assert teacher_ids(read_text(str(shard))[0], tokenizer, cfg.inputs, text=False) == decoded
    bare = next(read_shard(shard, decode_audio=False))   # no stand-ins: every segment's text words
    assert teacher_ids(bare, tokenizer, cfg.inputs, text=False) != decoded
    assert decoded[1:] == tokenizer.encode("the cat sat a dog ran seven friends", add_special_tokens=False)


def test_command_resumes_and_refuses_a_different_stamp(cached, capsys, tmp_path):
    files = sorted((cached / "speech" / CACHE_DIR).glob("*.safetensors"))
    before = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    assert main(command(cached, "--top-k", "373", "--dtype", "float32")) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in files] == before
    files[0].unlink()   # a run killed before this shard: the next run writes only it
    assert main(command(cached, "--top-k", "373", "--dtype", "float32")) == 0
    assert "wrote 1 shard" in capsys.readouterr().err and files[0].is_file()
    assert main(command(cached, "--top-k", "8", "--dtype", "float32")) == 1
    err = capsys.readouterr().err
    assert f"{cached / 'speech' / CACHE_DIR / STAMP_NAME}: field 'top_k' is 373 there but 8" in err
    moved = tmp_path / "llm"   # the same weights elsewhere are the same teacher: nothing to redo
    shutil.copytree(SMOKE / "llm", moved)
    assert main([*command(cached, "--top-k", "373", "--dtype", "float32"), f"model.llm.path={moved}"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in files[1:]] == before[1:]


def test_training_refuses_a_cache_that_does_not_fit(cached, tmp_path):
    cfg, tokenizer = load(cached, "loss.temperature=2.0")
    sets = [str(cached / "speech"), str(cached / "text")]
    with pytest.raises(TeacherCacheError, match=r"stamp.json: field 'temperature' is 1.0 there but 2.0"):
        open_cache(cfg, sets, tokenizer)
    cfg, tokenizer = load(cached, "inputs.context=1024")
    with pytest.raises(TeacherCacheError, match="field 'context' is 512 there"):
        open_cache(cfg, sets, tokenizer)
    cfg, tokenizer = load(cached, "loss.teacher_context=row")
    assert open_cache(cfg, sets, tokenizer) is None   # the cache holds per-document targets: not for "row"
    stale = tmp_path / "speech"
    shutil.copytree(cached / "speech", stale)
    index = json.loads((stale / "index.json").read_text())
    index["shards"][0]["sha256"] = "0" * 64
    (stale / "index.json").write_text(json.dumps(index))
    cfg, tokenizer = load(cached)
    with pytest.raises(TeacherCacheError, match="field 'shard_sha256' differs"):
        open_cache(cfg, [str(stale)], tokenizer)
    cache_file(stale, index["shards"][0]["url"]).unlink()
    with pytest.raises(TeacherCacheError, match="missing .*incomplete"):
        open_cache(cfg, [str(stale)], tokenizer)
    cfg, tokenizer = load(cached, "loss.teacher_cache=required")
    with pytest.raises(TeacherCacheError, match="required: no teacher cache for"):
        open_cache(cfg, [str(cached / "speech"), str(tmp_path)], tokenizer)


def test_training_step_with_the_cache_matches_the_live_teacher(cached):
    """Speech batches whose rows pack several documents: the cached loss and gradients equal the live
    teacher's in document context; a teacher that reads whole rows gives later documents other targets."""
    from model.build import build_speech_lm
    from train.data import BatchSource
    from train.objective import Objective

    cfg, tokenizer = load(cached, "data.text_ratio=0")
    torch.manual_seed(0)
    model = build_speech_lm(cfg.model)
    cache = open_cache(cfg, [str(cached / "speech"), str(cached / "text")], tokenizer)
    assert isinstance(cache, TeacherCache)
    source = BatchSource(cfg.data, cfg.inputs, cfg.stream, tokenizer, model.vectors_for, 0, 0, 1,
                         teacher_cache=cache)
    batch, is_text = source.next(0, 0)
    assert not is_text and batch.teacher is not None and batch.rows < len(batch.doc_keys)
    objective = Objective(model, cfg.loss)
    trainable = [p for p in objective.parameters() if p.requires_grad]

    def step(b):
        objective.zero_grad(set_to_none=True)
        out = objective(b)
        out["loss"].backward()
        return out, [p.grad.clone() for p in trainable if p.grad is not None]

    out_cached, grads_cached = step(batch)
    out_live, grads_live = step(dataclasses.replace(batch, teacher=None))
    assert out_cached["cached"] == 1 and out_live["cached"] == 0 and out_live["loss"] > 0.1
    torch.testing.assert_close(out_cached["loss"], out_live["loss"], rtol=1e-5, atol=1e-6)
    assert len(grads_cached) == len(grads_live) > 0
    for got, want in zip(grads_cached, grads_live, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    # document context: each document's hidden states as if it were alone; row context differs after the first
    with torch.no_grad():
        _, layout = model(batch)
        by_doc = objective.teacher_hidden(batch, layout)
        row_cfg = dataclasses.replace(cfg.loss, teacher_context="row")
        by_row = Objective(model, row_cfg).teacher_hidden(batch, layout)
    doc, pos = document_positions(batch, layout.teacher_len)
    decoder = model._decoder(teacher=True)
    later = 0.0
    for d in range(len(batch.doc_keys)):
        at = doc == d
        alone = layout.teacher_ids[at][None]
        with torch.no_grad(), model.teacher_mode():
            reference = decoder(input_ids=alone).last_hidden_state[0]
        torch.testing.assert_close(by_doc[at], reference, rtol=1e-4, atol=1e-5)
        first = bool((pos[at] == torch.nonzero(at)[:, 1]).all())   # starts its row
        gap = (by_row[at] - reference).abs().max().item()
        if first:
            assert gap < 1e-4
        else:
            later = max(later, gap)
    assert later > 1e-3


@pytest.mark.slow
def test_two_rank_zero3_training_with_a_partly_cached_data_mix(shard_sets, tmp_path):
    """2 CPU ranks, ZeRO-3, the speech set cached and the text set not: a micro-batch uses the cache only when
    every rank's batch has it (the live teacher's forward is a collective), so steps are all cached or all
    live, and training runs through without a hang."""
    import os

    sets = tmp_path / "sets"
    shutil.copytree(shard_sets / "speech", sets / "speech", ignore=shutil.ignore_patterns(CACHE_DIR))
    shutil.copytree(shard_sets / "text", sets / "text", ignore=shutil.ignore_patterns(CACHE_DIR))
    assert main(["--set", str(sets / "speech"), *command(sets, "--top-k", "16")]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "train", "--config", "configs/smoke.yaml", *overrides(sets), f"run.dir={tmp_path / 'runs'}",
           "train.max_steps=6", "train.save_every=100", "train.diagnostics_every=0", "data.text_ratio=0.3"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = tmp_path / "runs/smoke/round-0/metrics.jsonl"
    log = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert {r["teacher_cached"] for r in log} == {0.0, 1.0}, log
    assert all(r["loss"] > 0 for r in log)
