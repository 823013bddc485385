"""Chunked losses against naive full-logits references: values, gradients, memory behaviour, M and F."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from train.losses import (
    chunked_kl,
    combine,
    distillation_loss,
    forgetting,
    misalignment,
    nll_loss,
)

H, V, N = 8, 37, 13  # N = 13 is not divisible by any chunk size tested below except 1 and 13


class LoraHead(nn.Module):
    """A frozen base projection plus a trainable low-rank update, like peft LoRA on lm_head."""

    def __init__(self, hidden: int, vocab: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(hidden, vocab, bias=False)
        self.base.weight.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(rank, hidden) * 0.3)
        self.b = nn.Parameter(torch.randn(vocab, rank) * 0.3)  # non-zero so every grad is non-trivial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a.T @ self.b.T


class CountingHead(nn.Module):
    """Records the number of rows of every call, forward and backward recompute alike."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.head(x)


def make_head(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    head = nn.Linear(H, V, bias=False) if kind == "linear" else LoraHead(H, V)
    return head.double()


def naive_kl(p_hidden, q_hidden, p_head, q_head, temperature=1.0):
    """Per-position KL(p || q) from full logits, written independently of train.losses."""
    p = F.log_softmax(p_head(p_hidden) / temperature, dim=-1)
    q = F.log_softmax(q_head(q_hidden) / temperature, dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def grads(tensors):
    return [t.grad.clone() for t in tensors]


def zero(tensors):
    for t in tensors:
        t.grad = None


def hidden(seed: int, n: int = N, requires_grad: bool = True) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, H, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("kind", ["linear", "lora"])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 13, 1024])
def test_chunked_kl_matches_naive_value_and_grads(kind, chunk_size):
    p_head, q_head = make_head(kind, 0), make_head(kind, 1)
    p_h, q_h = hidden(2, requires_grad=False), hidden(3)
    trainable = [q_h, *[p for p in q_head.parameters() if p.requires_grad]]

    naive_kl(p_h, q_h, p_head, q_head).mean().backward()
    ref = grads(trainable)
    zero(trainable)
    loss = chunked_kl(p_h, q_h, p_head, q_head, chunk_size=chunk_size)
    loss.backward()

    expected = naive_kl(p_h, q_h, p_head, q_head).mean()
    assert loss.item() > 0.01
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads(trainable), ref, strict=True):
        assert want.abs().max() > 1e-4
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_flows_into_both_sides_with_a_shared_trainable_head(temperature):
    """Trainable M: both sides are the student (same LoRA head); p gets gradient unless detached."""
    head = make_head("lora", 0)
    p_h, q_h = hidden(1), hidden(2)
    trainable = [p_h, q_h, head.a, head.b]

    naive_kl(p_h, q_h, head, head, temperature).mean().backward()
    ref = grads(trainable)
    zero(trainable)
    chunked_kl(p_h, q_h, head, head, temperature, chunk_size=3, scale_t2=False).backward()
    for got, want in zip(grads(trainable), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    zero(trainable)
    chunked_kl(p_h, q_h, head, head, chunk_size=3, detach_p=True).backward()
    assert p_h.grad is None


def test_float32_within_1e5_of_float64_reference():
    p_head, q_head = make_head("linear", 0), make_head("linear", 1)
    p_h, q_h = hidden(2, requires_grad=False), hidden(3)
    expected = naive_kl(p_h, q_h, p_head, q_head).mean()
    got = chunked_kl(p_h.float(), q_h.float(), p_head.float(), q_head.float(), chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_head_gives_float32_loss_close_to_reference():
    p_head, q_head = make_head("linear", 0), make_head("linear", 1)
    p_h, q_h = hidden(2, requires_grad=False), hidden(3)
    expected = naive_kl(p_h, q_h, p_head, q_head).mean()
    got = chunked_kl(p_h.bfloat16(), q_h.bfloat16(), p_head.bfloat16(), q_head.bfloat16(), chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0.05, atol=0.01)


@pytest.mark.parametrize("scale_t2", [True, False])
def test_temperature(scale_t2):
    p_head, q_head = make_head("linear", 0), make_head("linear", 1)
    p_h, q_h = hidden(2, requires_grad=False), hidden(3)
    t = 2.0
    naive = naive_kl(p_h, q_h, p_head, q_head, temperature=t).mean() * (t * t if scale_t2 else 1.0)
    naive.backward()
    ref = q_h.grad.clone()
    q_h.grad = None
    got = chunked_kl(p_h, q_h, p_head, q_head, temperature=t, chunk_size=5, scale_t2=scale_t2)
    got.backward()
    torch.testing.assert_close(got, naive, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q_h.grad, ref, rtol=1e-9, atol=1e-12)
    # a higher temperature flattens both distributions: the unscaled KL shrinks
    assert chunked_kl(p_h, q_h, p_head, q_head, temperature=t, scale_t2=False) < chunked_kl(p_h, q_h, p_head, q_head)


def test_reductions_and_weights_with_leading_batch_dims():
    p_head, q_head = make_head("linear", 0), make_head("linear", 1)
    torch.manual_seed(5)
    p_h, q_h = torch.randn(3, 4, H, dtype=torch.float64), torch.randn(3, 4, H, dtype=torch.float64)
    weights = torch.rand(3, 4, dtype=torch.float64)
    per_pos = naive_kl(p_h, q_h, p_head, q_head)

    none = chunked_kl(p_h, q_h, p_head, q_head, chunk_size=5, reduction="none")
    assert none.shape == (3, 4)
    torch.testing.assert_close(none, per_pos, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked_kl(p_h, q_h, p_head, q_head, chunk_size=5, reduction="sum"), per_pos.sum())
    torch.testing.assert_close(chunked_kl(p_h, q_h, p_head, q_head, chunk_size=5, weights=weights),
                               (per_pos * weights).sum() / weights.sum())
    assert chunked_kl(p_h, q_h, p_head, q_head, weights=torch.zeros(3, 4, dtype=torch.float64)).item() == 0.0


def test_identical_distributions_give_zero_kl_and_zero_gradient():
    head = make_head("lora", 0)
    h = hidden(1)
    loss = chunked_kl(h, h, head, head, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    for g in (h.grad, head.a.grad, head.b.grad):
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-12)

    student = hidden(1)
    loss = distillation_loss(student, student.detach(), head, head, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    torch.testing.assert_close(student.grad, torch.zeros_like(student.grad), rtol=0, atol=1e-12)


def test_distillation_loss_is_kl_teacher_to_student_without_teacher_gradient():
    teacher_head, student_head = make_head("lora", 0), make_head("lora", 1)  # teacher params require grad too
    teacher_h, student_h = hidden(2), hidden(3)
    loss = distillation_loss(student_h, teacher_h, student_head, teacher_head, chunk_size=4)
    torch.testing.assert_close(loss, naive_kl(teacher_h, student_h, teacher_head, student_head).mean())
    loss.backward()
    assert teacher_h.grad is None and teacher_head.a.grad is None and teacher_head.b.grad is None
    assert student_h.grad.abs().max() > 0 and student_head.a.grad.abs().max() > 0


def test_heads_see_at_most_chunk_rows_and_backward_recomputes_chunks():
    p_head, q_head = CountingHead(make_head("linear", 0)), CountingHead(make_head("linear", 1))
    p_h, q_h = hidden(2, requires_grad=False), hidden(3)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_kl(p_h, q_h, p_head, q_head, chunk_size=4)
    assert q_head.rows == [4, 3, 3, 3] and p_head.rows == [4, 3, 3, 3]
    assert max(saved, default=0) < 4 * V  # forward keeps no logits for backward
    loss.backward()
    assert q_head.rows == p_head.rows == [4, 3, 3, 3] + [3, 3, 3, 4]  # recomputed one chunk at a time, last first


def test_empty_input_gives_zero_and_still_calls_the_head_once():
    head = CountingHead(make_head("linear", 0))
    q_h = torch.zeros(0, H, dtype=torch.float64, requires_grad=True)
    loss = chunked_kl(q_h.detach(), q_h, head, head)
    loss.backward()
    assert loss.item() == 0.0 and head.rows == [0, 0, 0, 0]
    assert nll_loss(q_h, head, torch.zeros(0, dtype=torch.long)).item() == 0.0


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_nll_matches_cross_entropy_with_ignore_index(chunk_size):
    head = make_head("lora", 0)
    h = hidden(1)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    targets[[0, 5, 6, 12]] = -100
    trainable = [h, head.a, head.b]

    F.cross_entropy(head(h), targets, ignore_index=-100).backward()
    ref = grads(trainable)
    zero(trainable)
    loss = nll_loss(h, head, targets, chunk_size=chunk_size)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(head(h), targets, ignore_index=-100))
    for got, want in zip(grads(trainable), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert h.grad[[0, 5, 6, 12]].abs().max() == 0


def test_nll_custom_ignore_index_all_ignored_and_bad_shape():
    head = make_head("linear", 0)
    h = hidden(1).reshape(1, N, H)
    targets = torch.full((1, N), 3)
    targets[0, :4] = 7
    torch.testing.assert_close(nll_loss(h, head, targets, ignore_index=7),
                               F.cross_entropy(head(h[0, 4:]), targets[0, 4:]))
    loss = nll_loss(h, head, torch.full((1, N), -100))
    loss.backward()
    assert loss.item() == 0.0 and not math.isnan(loss.item())
    with pytest.raises(ValueError, match="targets: shape"):
        nll_loss(h, head, torch.zeros(N, dtype=torch.long))


def test_combine():
    dist_, nll = torch.tensor(2.0), torch.tensor(5.0)
    assert combine(dist_, nll, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 5)
    assert combine(dist_, None, 1.0) is dist_
    assert combine(None, nll, 0.0) is nll
    with pytest.raises(ValueError, match="alpha"):
        combine(dist_, nll, 1.5)
    with pytest.raises(ValueError, match="needs both"):
        combine(dist_, None, 0.5)


def two_point(probs: list[float]) -> torch.Tensor:
    """Hidden rows whose softmax under the identity head is [a, 1 - a]."""
    a = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([a.log(), (1 - a).log()], dim=-1)


def bernoulli_kl(a: float, b: float) -> float:
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def fixed_head(weight: list[list[float]]) -> nn.Linear:
    head = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor(weight))
    return head


def test_misalignment_closed_form_and_identity():
    head = fixed_head([[1, 0], [0, 1]])
    text, speech = [0.9, 0.5, 0.2], [0.6, 0.5, 0.7]
    m = misalignment(two_point(text).requires_grad_(), two_point(speech).requires_grad_(), head, chunk_size=2)
    assert not m.requires_grad and m.dtype == torch.float64 and m.dim() == 0
    assert m.item() == pytest.approx(sum(bernoulli_kl(a, b) for a, b in zip(text, speech, strict=True)) / 3,
                                     rel=1e-12)
    per_pos = misalignment(two_point(text), two_point(speech), head, chunk_size=2, reduction="none")
    assert per_pos.tolist() == pytest.approx([bernoulli_kl(a, b) for a, b in zip(text, speech, strict=True)])
    assert misalignment(two_point(text), two_point(text), head).item() == 0.0


def test_forgetting_closed_form_and_identity():
    teacher_head, student_head = fixed_head([[1, 0], [0, 1]]), fixed_head([[0, 1], [1, 0]])  # student swaps
    teacher, student = [0.8, 0.3], [0.4, 0.1]
    f = forgetting(two_point(teacher), two_point(student), teacher_head, student_head, chunk_size=1)
    expected = sum(bernoulli_kl(a, 1 - b) for a, b in zip(teacher, student, strict=True)) / 2
    assert f.item() == pytest.approx(expected, rel=1e-12)
    assert forgetting(two_point(teacher), two_point(teacher), teacher_head, teacher_head).item() == 0.0


def test_bad_arguments_name_the_argument():
    head = make_head("linear", 0)
    h = hidden(1)
    with pytest.raises(ValueError, match="leading"):
        chunked_kl(h, h[:-1], head, head)
    with pytest.raises(ValueError, match="reduction"):
        chunked_kl(h, h, head, head, reduction="max")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kl(h, h, head, head, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_kl(h, h, head, head, temperature=0.0)
    with pytest.raises(ValueError, match="weights"):
        chunked_kl(h, h, head, head, weights=torch.ones(N + 1))
    with pytest.raises(ValueError, match="p_hidden"):
        chunked_kl(h[0], h[0], head, head)


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        head = CountingHead(make_head("linear", 0))
        q_h = hidden(rank, n=5 if rank == 0 else 17)
        loss = chunked_kl(q_h.detach() * 0.5, q_h, head, head, chunk_size=4, sync_ranks=True)
        loss.backward()
        head.rows.append(-1)  # separates forward calls from backward recompute calls
        unsynced = chunked_kl(q_h.detach() * 0.5, q_h, head.head, head.head).item()
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps([head.rows, loss.item(), unsynced]))
    finally:
        dist.destroy_process_group()


def test_sync_ranks_makes_every_rank_call_the_head_equally_often(tmp_path):
    """Under ZeRO-3 a head call is a collective: ranks with different N must still call it equally often."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sync_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")
    results = {rank: json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)}
    calls = {rank: len(rows) for rank, (rows, _, _) in results.items()}
    assert calls[0] == calls[1] == 2 * 2 * 5 + 1  # 5 chunks (ceil(17 / 4)), p and q heads, forward + backward
    assert max(results[0][0]) <= 4 and max(results[1][0]) <= 4
    for _, synced, unsynced in results.values():
        assert synced == pytest.approx(unsynced, rel=1e-12)
