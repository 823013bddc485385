"""Distillation KL, next-token NLL, the optional CTC alignment loss and the diagnostics M and F.

Why chunked: Qwen2.5's vocabulary has 152k entries, so logits for a whole batch ([batch, time, vocab])
do not fit. Callers gather the hidden states at the positions that matter ([N, H]) and pass *heads*:
callables hidden [n, H] -> logits [n, V], usually the LLM's ``lm_head`` module. Every loss here runs
the head on at most ``chunk_size`` rows at a time and, when autograd is on, checkpoints each chunk
(``torch.utils.checkpoint``, non-reentrant), so backward recomputes that chunk's logits instead of
keeping them: peak memory is O(chunk_size x V) in forward and in backward.

Contract for heads:
- Call the module, never read ``head.weight``: under DeepSpeed ZeRO-3 the weight is partitioned and
  only gathered inside the module's forward. Trainable parameters inside the head (full fine-tuning,
  LoRA on ``lm_head``) receive their gradients through autograd as usual. The CTC head
  (``SpeechLM.token_logits``) reads the input embeddings through ``model.speech_lm.embedding_table``,
  which calls the embedding module when the weight is partitioned.
- A head is called again during backward (recompute), outside any context manager active around the
  loss call. It must give the same logits then: a teacher that is "the student with LoRA adapters
  disabled" must disable them inside the callable, not around the loss call.
- Under ZeRO-3 every head call is a collective (it all-gathers the weight); pass ``sync_ranks=True`` so
  that all ranks make the same number of head calls even when their N differ (one all-reduce of the
  chunk count per loss call; every rank must then make the same loss calls). Without it, 2 CPU ranks
  with N = 5 and 17 aborted; with it, the gradients of a partitioned lm_head matched an unpartitioned
  reference to 3e-8.

All log-probabilities are taken in at least float32, whatever the head's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from model.masks import valid_mask
from train import distributed

Head = Callable[[Tensor], Tensor]
REDUCTIONS = ("mean", "sum", "none")


def _num_chunks(n: int, chunk_size: int, sync_ranks: bool) -> int:
    """At least one chunk (so every rank calls the head even with N = 0); the max over ranks if synced (a CPU
    tensor: it goes through the CPU group, never waiting for the GPU's queue)."""
    count = max(1, -(-n // chunk_size))
    if sync_ranks:
        count = int(distributed.all_reduce(torch.tensor(count), "max"))
    return count


def _chunked_rows(fn: Callable[..., Tensor], rows: tuple[Tensor, ...], chunk_size: int,
                  sync_ranks: bool) -> Tensor:
    """The core every loss shares: ``fn`` maps row chunks of ``rows`` to one value per row.

    Chunks hold at most ``chunk_size`` rows. With autograd on, each chunk is checkpointed, so only its
    inputs are kept and backward recomputes its logits one chunk at a time.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    n_chunks = _num_chunks(rows[0].shape[0], chunk_size, sync_ranks)
    run = partial(checkpoint, fn, use_reentrant=False) if torch.is_grad_enabled() else fn
    return torch.cat([run(*part) for part in zip(*(r.tensor_split(n_chunks) for r in rows), strict=True)])


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


class _KLFromLogits(torch.autograd.Function):
    """Per-row KL(softmax(p / T) || softmax(q / T)) summed over the vocabulary.

    Why not ``log_softmax`` + ``kl_div``: autograd would keep both log-softmax outputs, exp(p) and the
    backward temporaries, all in float32. This keeps only the two logits tensors (in the head's dtype)
    and works in place, which roughly halves the per-chunk peak.
    """

    @staticmethod
    def forward(ctx, p_logits: Tensor, q_logits: Tensor, temperature: float) -> Tensor:
        p_logp = _log_probs(p_logits, temperature)
        diff = _log_probs(q_logits, temperature).neg_().add_(p_logp)  # log p - log q
        ctx.save_for_backward(p_logits, q_logits)
        ctx.temperature = temperature
        return diff.mul_(p_logp.exp_()).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        p_logits, q_logits = ctx.saved_tensors
        t = ctx.temperature
        scale = grad.unsqueeze(-1) / t
        p_logp = _log_probs(p_logits, t)
        grad_p = grad_q = None
        if ctx.needs_input_grad[0]:  # d KL / d p_logits = p * (log p - log q - KL) / T
            diff = _log_probs(q_logits, t).neg_().add_(p_logp)
            p = p_logp.exp()
            grad_p = diff.sub_((diff * p).sum(-1, keepdim=True)).mul_(p).mul_(scale).to(p_logits.dtype)
            del diff, p
        if ctx.needs_input_grad[1]:  # d KL / d q_logits = (q - p) / T
            grad_q = _log_probs(q_logits, t).exp_().sub_(p_logp.exp_()).mul_(scale).to(q_logits.dtype)
        return grad_p, grad_q, None


def _kl_rows(p_hidden: Tensor, q_hidden: Tensor, p_head: Head, q_head: Head, temperature: float,
             detach_p: bool) -> Tensor:
    """KL(p || q) per row, summed over the vocabulary."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_p):
        p_logits = p_head(p_hidden)
    return _KLFromLogits.apply(p_logits, q_head(q_hidden), temperature)


def _nll_rows(hidden: Tensor, targets: Tensor, head: Head) -> Tensor:
    return F.nll_loss(_log_probs(head(hidden), 1.0), targets, reduction="none")


def _reduce(values: Tensor, reduction: str, weights: Tensor | None) -> Tensor:
    """Mean is the (weighted) mean over rows, 0 when there are no rows (or all weights are 0)."""
    if reduction == "none":
        return values
    if weights is not None:
        values = values * weights.to(values.dtype)
    total = values.sum()
    if reduction == "sum":
        return total
    count = weights.sum().to(values.dtype) if weights is not None else values.new_tensor(values.numel())
    return total / count.clamp_min(torch.finfo(values.dtype).tiny)


def _rows(hidden: Tensor, name: str) -> Tensor:
    if hidden.dim() < 2:
        raise ValueError(f"{name}: expected [..., hidden] with at least 2 dims, got shape {tuple(hidden.shape)}")
    return hidden.reshape(-1, hidden.shape[-1])


def _check_kl_args(reduction: str, temperature: float, weights: Tensor | None, positions: torch.Size) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: must be one of {REDUCTIONS}, got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if weights is not None and weights.shape != positions:
        raise ValueError(f"weights: shape {tuple(weights.shape)} must equal the positions' shape {tuple(positions)}")


def _finish_kl(kl: Tensor, temperature: float, scale_t2: bool, reduction: str, weights: Tensor | None,
               positions: torch.Size) -> Tensor:
    """Per-row KL -> T^2-scaled (Hinton et al.) and reduced over positions, shaped like them for "none"."""
    if scale_t2 and temperature != 1.0:
        kl = kl * temperature**2
    out = _reduce(kl, reduction, weights.reshape(-1) if weights is not None else None)
    return out.reshape(positions) if reduction == "none" else out


def chunked_kl(p_hidden: Tensor, q_hidden: Tensor, p_head: Head, q_head: Head, temperature: float = 1.0,
               chunk_size: int = 1024, reduction: str = "mean", weights: Tensor | None = None, *,
               scale_t2: bool = True, detach_p: bool = False, sync_ranks: bool = False) -> Tensor:
    """KL(p || q) summed over the vocabulary at each position, then reduced over positions.

    ``p_hidden`` and ``q_hidden`` are [..., H] with the same leading shape; position i of one is compared
    with position i of the other. Both sides use logits / ``temperature``; with ``scale_t2`` the KL is
    multiplied by T^2 (Hinton et al.), which keeps gradient magnitudes independent of T (a no-op at T=1).
    Gradients reach whatever requires grad on both sides (both are the student for a trainable M);
    ``detach_p`` runs the p side without autograd (a teacher). ``reduction``: "mean" (weighted by
    ``weights`` when given: sum(w * kl) / sum(w)), "sum" (of w * kl), or "none" (per position, shaped
    like the leading dims, unweighted).
    """
    _check_kl_args(reduction, temperature, weights, q_hidden.shape[:-1])
    if p_hidden.shape[:-1] != q_hidden.shape[:-1]:
        raise ValueError(f"p_hidden {tuple(p_hidden.shape)} and q_hidden {tuple(q_hidden.shape)}: "
                         "leading (position) dims differ")
    fn = partial(_kl_rows, p_head=p_head, q_head=q_head, temperature=temperature, detach_p=detach_p)
    if detach_p:
        p_hidden = p_hidden.detach()
    kl = _chunked_rows(fn, (_rows(p_hidden, "p_hidden"), _rows(q_hidden, "q_hidden")), chunk_size, sync_ranks)
    return _finish_kl(kl, temperature, scale_t2, reduction, weights, q_hidden.shape[:-1])


def distillation_loss(student_hidden: Tensor, teacher_hidden: Tensor, student_head: Head, teacher_head: Head,
                      temperature: float = 1.0, chunk_size: int = 1024, *, weights: Tensor | None = None,
                      scale_t2: bool = True, sync_ranks: bool = False) -> Tensor:
    """L_dist = mean KL(teacher || student) over mapped positions; the teacher side gets no gradient."""
    return chunked_kl(teacher_hidden, student_hidden, teacher_head, student_head, temperature, chunk_size,
                      "mean", weights, scale_t2=scale_t2, detach_p=True, sync_ranks=sync_ranks)


def nll_loss(hidden: Tensor, head: Head, targets: Tensor, chunk_size: int = 1024, ignore_index: int = -100,
             *, sync_ranks: bool = False) -> Tensor:
    """Mean cross entropy of ``head(hidden[i])`` against ``targets[i]`` (already shifted: row i predicts
    targets[i]). Rows whose target is ``ignore_index`` are dropped before the head runs; with no row
    left the loss is 0 (not NaN, which would poison a training step)."""
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets: shape {tuple(targets.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    hidden, targets = _rows(hidden, "hidden"), targets.reshape(-1)
    keep = targets != ignore_index
    losses = _chunked_rows(partial(_nll_rows, head=head), (hidden[keep], targets[keep]), chunk_size, sync_ranks)
    return _reduce(losses, "mean", None)


_PAD_CLASS = -2                       # class table: -1 = blank, -2 = padding, >= 0 = token id
_NEVER = torch.finfo(torch.float32).min   # logit of padding classes: finite, so CTC's backward stays NaN-free


def _ctc_classes(targets: Tensor, target_lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Each span's CTC classes and its targets renumbered into them.

    classes [S, C]: column 0 blank (-1), then the span's distinct tokens (ascending), padded with -2;
    renumbered [K]: targets as columns of their span's row (1..C-1)."""
    spans = target_lengths.numel()
    span_of = torch.repeat_interleave(torch.arange(spans, device=targets.device), target_lengths)
    base = int(targets.max()) + 1 if targets.numel() else 1
    keys, inverse = torch.unique(span_of * base + targets, return_inverse=True)   # sorted by span, then token
    key_span = keys // base
    distinct = torch.bincount(key_span, minlength=spans)
    within = torch.arange(keys.numel(), device=targets.device) - (torch.cumsum(distinct, 0) - distinct)[key_span]
    width = 1 + (int(distinct.max()) if spans else 0)
    classes = torch.full((spans, width), _PAD_CLASS, dtype=torch.long, device=targets.device)
    classes[:, 0] = -1
    classes[key_span, 1 + within] = keys % base
    return classes, 1 + within[inverse]


def _ctc_rows(hidden: Tensor, blank_logits: Tensor, classes: Tensor, head: Head) -> Tensor:
    """Log-probabilities [n, C + 1] of each row's classes (its span's blank and tokens) and of "rest", all
    other vocabulary entries together, under the softmax over the whole vocabulary plus blank.

    Exact: the reduced distribution sums to one, and autograd through log_softmax of [picked logits,
    logsumexp(other logits)] gives d loss / d logit_v = p_v - gamma_v for every class v, as the full CTC would.
    (``F.ctc_loss``'s gradient assumes normalised log-probabilities, which this keeps.)"""
    logits = head(hidden)
    logits = torch.cat([logits.to(torch.promote_types(logits.dtype, torch.float32)),
                        blank_logits.to(torch.promote_types(logits.dtype, torch.float32))[:, None]], 1)
    index = torch.where(classes < 0, logits.shape[1] - 1, classes)             # blank and padding: blank column
    picked = logits.gather(1, index).masked_fill(classes == _PAD_CLASS, _NEVER)
    rest = logits.scatter(1, index, _NEVER).logsumexp(1, keepdim=True)
    return F.log_softmax(torch.cat([picked, rest], 1), 1)


def ctc_alignment_loss(vectors: Tensor, blank_logits: Tensor, lengths: Tensor, targets: Tensor,
                       target_lengths: Tensor, head: Head, chunk_size: int = 1024, *,
                       sync_ranks: bool = False) -> Tensor:
    """CTC of adapter outputs against the LLM's vocabulary plus a blank class, transcript tokens as targets.

    vectors [S, n, H] (zero padded) with ``lengths`` [S] valid vectors per speech span; ``blank_logits`` [S, n]
    the blank class's logit of each vector (v . blank); ``targets`` [K] the spans' transcript tokens
    concatenated, ``target_lengths`` [S]; ``head`` hidden [m, H] -> token logits [m, V] (v . E^T, the LLM's
    input embeddings: ``SpeechLM.token_logits``). The head runs on ``chunk_size`` vectors at a time, each
    chunk checkpointed, and CTC runs on each span's own classes (blank, its distinct tokens, the rest of the
    vocabulary pooled): never [vectors, V] at once.

    Reduction: per span, the negative log-likelihood divided by its number of target tokens, then the mean
    over spans (``F.ctc_loss``'s "mean"): a per-token scale like the NLL's, and long spans do not dominate.
    Spans too short for their transcript (infinite loss) count as 0 (``zero_infinity``). No spans: 0, with
    the head still called (ZeRO-3: every rank the same calls) and the graph kept.
    """
    if lengths.shape != target_lengths.shape or vectors.shape[:1] != lengths.shape:
        raise ValueError(f"ctc_alignment_loss: {vectors.shape[0]} spans of vectors, lengths {tuple(lengths.shape)}, "
                         f"target_lengths {tuple(target_lengths.shape)}: one entry per span expected")
    if blank_logits.shape != vectors.shape[:2]:
        raise ValueError(f"blank_logits: shape {tuple(blank_logits.shape)} must be [spans, vectors] "
                         f"{tuple(vectors.shape[:2])}")
    valid = valid_mask(lengths, vectors.shape[1])
    classes, renumbered = _ctc_classes(targets, target_lengths)
    span_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    log_probs = _chunked_rows(partial(_ctc_rows, head=head), (vectors[valid], blank_logits[valid], classes[span_of]),
                              chunk_size, sync_ranks)
    if not lengths.numel():
        return log_probs.sum() * 0.0
    padded = log_probs.new_zeros(*valid.shape, log_probs.shape[1])
    padded[valid] = log_probs
    return F.ctc_loss(padded.transpose(0, 1), renumbered, lengths, target_lengths, blank=0, reduction="mean",
                      zero_infinity=True)


def combine(distill: Tensor | None, nll: Tensor | None, alpha: float) -> Tensor:
    """alpha * distill + (1 - alpha) * nll. A term whose weight is 0 may be None (not computed at all: SALAD
    uses alpha = 1, so the NLL pass over the vocabulary can be skipped)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must be in [0, 1], got {alpha}")
    if alpha == 1.0 and distill is not None:
        return distill
    if alpha == 0.0 and nll is not None:
        return nll
    if distill is None or nll is None:
        given = {name: "None" if term is None else "tensor" for name, term in (("distill", distill), ("nll", nll))}
        raise ValueError(f"combine: alpha={alpha} needs both distill and nll, got {given}")
    return alpha * distill + (1.0 - alpha) * nll


@torch.no_grad()
def misalignment(student_text_hidden: Tensor, student_speech_hidden: Tensor, head: Head, chunk_size: int = 1024,
                 reduction: str = "mean", *, sync_ranks: bool = False) -> Tensor:
    """M = mean over aligned positions of KL(student(. | text) || student(. | speech)), at T = 1.
    ``reduction="none"`` gives per-position values (per-document or per-cluster means)."""
    return chunked_kl(student_text_hidden, student_speech_hidden, head, head, 1.0, chunk_size, reduction,
                      sync_ranks=sync_ranks)


@torch.no_grad()
def forgetting(teacher_text_hidden: Tensor, student_text_hidden: Tensor, teacher_head: Head, student_head: Head,
               chunk_size: int = 1024, reduction: str = "mean", *, sync_ranks: bool = False) -> Tensor:
    """F = mean over text positions of KL(teacher(. | text) || student(. | text)), at T = 1."""
    return chunked_kl(teacher_text_hidden, student_text_hidden, teacher_head, student_head, 1.0, chunk_size,
                      reduction, sync_ranks=sync_ranks)


# ---- cached teacher targets: the teacher's top-k log-probabilities and the mass of the rest -------------
@torch.no_grad()
def topk_log_probs(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """A distribution cut to its ``k`` most likely tokens plus one bin for all others.

    Returns ids [n, k] (long), their log-probabilities [n, k] and the log of the remaining mass [n] (float32;
    -inf when k is the whole vocabulary). The rest is a log-sum-exp over the other tokens, not log(1 - sum p),
    which would cancel to noise when the top k hold almost all the mass."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k: must be in [1, vocabulary size {logits.shape[-1]}], got {k}")
    logp = _log_probs(logits, temperature)
    top, ids = logp.topk(k, dim=-1)
    return ids, top, logp.scatter_(-1, ids, float("-inf")).logsumexp(-1)


class _TopKKLFromLogits(torch.autograd.Function):
    """Per-row KL of a cached top-k teacher against the student, over the k tokens and the rest bin:

        sum_i p_i (log p_i - log q_i) + p_r (log p_r - log q_r),   q_r = 1 - sum_i q_i

    with log q_r a log-sum-exp over the student's other logits. With k = V it is the exact KL; for k < V it
    is the KL of the two distributions coarsened to k + 1 bins, a lower bound of the exact one. Like
    ``_KLFromLogits`` it keeps only the student's logits for backward, where the gradient is

        d KL / d s_v = (P q_v - p_v) / T  for v in the top k,   (P q_v - p_r q_v / q_r) / T  otherwise,

    P = sum_i p_i + p_r (1 up to the cache's rounding; used as stored, so the gradient is the forward's).
    """

    @staticmethod
    def forward(ctx, q_logits: Tensor, ids: Tensor, logp: Tensor, rest: Tensor, temperature: float) -> Tensor:
        logq = _log_probs(q_logits, temperature)
        logp, rest = logp.to(logq.dtype), rest.to(logq.dtype)
        logq_k = logq.gather(-1, ids)
        logq_r = logq.scatter_(-1, ids, float("-inf")).logsumexp(-1)
        p = logp.exp()
        has_rest = torch.isfinite(rest)
        rest_term = torch.where(has_rest, rest.exp() * (rest - torch.where(has_rest, logq_r, 0.0)), 0.0)
        ctx.save_for_backward(q_logits, ids, p, rest, logq_r)
        ctx.temperature = temperature
        return torch.where(p > 0, p * (logp - logq_k), 0.0).sum(-1) + rest_term

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        q_logits, ids, p, rest, logq_r = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logq = _log_probs(q_logits, ctx.temperature)
        has_rest = torch.isfinite(rest)
        total = p.sum(-1) + torch.where(has_rest, rest.exp(), 0.0)
        out = logq.exp().mul_(total.unsqueeze(-1))
        # p_r q_v / q_r for the other tokens, as exp(log q_v + log p_r - log q_r) <= p_r: no overflow
        ratio = torch.where(has_rest, rest - logq_r, float("-inf")).unsqueeze(-1)
        out.sub_(logq.scatter_(-1, ids, float("-inf")).add_(ratio).exp_())
        out.scatter_add_(-1, ids, -p)
        return out.mul_(grad.unsqueeze(-1) / ctx.temperature).to(q_logits.dtype), None, None, None, None


def _topk_kl_rows(hidden: Tensor, ids: Tensor, logp: Tensor, rest: Tensor, head: Head,
                  temperature: float) -> Tensor:
    return _TopKKLFromLogits.apply(head(hidden), ids.long(), logp, rest, temperature)


def topk_distillation_loss(student_hidden: Tensor, student_head: Head, topk_ids: Tensor, topk_logp: Tensor,
                           rest_logp: Tensor, temperature: float = 1.0, chunk_size: int = 1024, *,
                           reduction: str = "mean", weights: Tensor | None = None, scale_t2: bool = True,
                           sync_ranks: bool = False) -> Tensor:
    """``distillation_loss`` against cached teacher targets instead of a teacher head.

    ``student_hidden`` [N, H]; ``topk_ids`` / ``topk_logp`` [N, k] and ``rest_logp`` [N] as ``topk_log_probs``
    returns them for the teacher at ``temperature`` (the cache stores them at the run's temperature). The
    student head runs chunked and checkpointed as in ``chunked_kl`` (same ZeRO-3 contract, ``sync_ranks``);
    the targets get no gradient. Reductions as in ``chunked_kl``.
    """
    _check_kl_args(reduction, temperature, weights, student_hidden.shape[:-1])
    rows = _rows(student_hidden, "student_hidden")
    if topk_ids.shape != topk_logp.shape or topk_ids.shape[:-1] != student_hidden.shape[:-1] \
            or rest_logp.shape != student_hidden.shape[:-1]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)}, topk_logp {tuple(topk_logp.shape)} and "
                         f"rest_logp {tuple(rest_logp.shape)} must be [positions, k], [positions, k] and "
                         f"[positions] for student_hidden {tuple(student_hidden.shape)}")
    k = topk_ids.shape[-1]
    targets = (topk_ids.reshape(-1, k), topk_logp.detach().reshape(-1, k), rest_logp.detach().reshape(-1))
    fn = partial(_topk_kl_rows, head=student_head, temperature=temperature)
    kl = _chunked_rows(fn, (rows, *targets), chunk_size, sync_ranks)
    return _finish_kl(kl, temperature, scale_t2, reduction, weights, student_hidden.shape[:-1])
