"""Which pool texts to synthesize: a speech budget spread over clusters by their scores.

Target P(c) ∝ P_pool(c) * score(c)^gamma (gamma 0: proportional to the pool, i.e. uniform over texts; large
gamma: everything to the highest-scoring cluster). Draws follow it exactly: a cluster from the target
renormalised over clusters with texts left, then a text uniformly within it without replacement, until the
budget is met. Draws are vectorised in blocks; a draw that hits a cluster already emptied within the block is
rejected, which is the same as renormalising over the clusters left.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-12  # scores are clipped here: a zero score gives a tiny share, never log(0)
_BLOCK = 4096  # draws per vectorised block


def target_shares(pool_share: np.ndarray, score: np.ndarray, gamma: float) -> np.ndarray:
    """P(c) ∝ pool_share(c) * max(score(c), EPS)^gamma, normalised; computed in log space, so a large gamma
    gives (almost) all mass to the top cluster instead of overflowing."""
    pool_share, score = np.asarray(pool_share, dtype=np.float64), np.asarray(score, dtype=np.float64)
    if pool_share.shape != score.shape or pool_share.ndim != 1:
        raise ValueError(f"pool_share {pool_share.shape} and score {score.shape} must be 1-D of one length")
    if gamma < 0 or not np.isfinite(gamma):
        raise ValueError(f"gamma: must be a finite number >= 0, got {gamma}")
    if not np.isfinite(score).all():
        raise ValueError(f"score: not finite for clusters {np.flatnonzero(~np.isfinite(score)).tolist()}")
    if (pool_share < 0).any() or not pool_share.sum() > 0:
        raise ValueError("pool_share: must be non-negative with a positive sum")
    with np.errstate(divide="ignore"):
        logp = np.log(pool_share) + gamma * np.log(np.maximum(score, EPS))
    p = np.exp(logp - logp.max())
    return p / p.sum()


def _shuffled_by_cluster(labels: np.ndarray, k: int, rng: np.random.Generator,
                         exclude: set[int] | frozenset[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drawable pool indices grouped by cluster, in random order within each; group starts and sizes."""
    keep = np.ones(len(labels), dtype=bool)
    if exclude:
        gone = np.fromiter(exclude, dtype=np.int64, count=len(exclude))
        keep[gone[(gone >= 0) & (gone < len(labels))]] = False
    idx = np.flatnonzero(keep)
    idx = idx[np.lexsort((rng.random(len(idx)), labels[idx]))]
    sizes = np.bincount(labels[idx], minlength=k)
    return idx, np.cumsum(sizes) - sizes, sizes


def allocate(labels: np.ndarray, score: np.ndarray, gamma: float, budget_s: float, seconds_per_text: np.ndarray,
             seed: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Pool indices in draw order, until their seconds reach ``budget_s`` (the last text may cross it) or
    the pool runs out; never one in ``exclude``, never one twice; deterministic for the seed."""
    labels, score = np.asarray(labels, dtype=np.int64), np.asarray(score, dtype=np.float64)
    seconds = np.asarray(seconds_per_text, dtype=np.float64)
    k = len(score)
    if labels.ndim != 1 or seconds.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and seconds_per_text {seconds.shape} must be 1-D of one length")
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels: must lie in 0..{k - 1} (one score per cluster)")
    if (seconds < 0).any() or not np.isfinite(seconds).all():
        raise ValueError("seconds_per_text: must be finite and non-negative")
    pool_share = np.bincount(labels, minlength=k) / max(len(labels), 1)
    rng = np.random.default_rng(seed)
    order, starts, left = _shuffled_by_cluster(labels, k, rng, exclude)
    taken = np.zeros(k, dtype=np.int64)
    chosen: list[np.ndarray] = []
    total = 0.0
    while total < budget_s and left.any():
        cum = np.cumsum(target_shares(pool_share * (left > 0), score, gamma))
        picks = np.minimum(np.searchsorted(cum, rng.random(_BLOCK) * cum[-1], side="right"), k - 1)
        by_cluster = np.argsort(picks, kind="stable")  # the n-th draw of each cluster in this block
        counts = np.bincount(picks, minlength=k)
        nth = np.empty(_BLOCK, dtype=np.int64)
        nth[by_cluster] = np.arange(_BLOCK) - np.repeat(np.cumsum(counts) - counts, counts)
        ok = nth < left[picks]
        picks, nth = picks[ok], nth[ok]
        texts = order[starts[picks] + taken[picks] + nth]
        run = total + np.cumsum(seconds[texts])
        stop = np.searchsorted(run, budget_s, side="left")  # first draw that reaches the budget
        if stop < len(texts):
            picks, texts = picks[:stop + 1], texts[:stop + 1]
        total = run[len(texts) - 1] if len(texts) else total
        used = np.bincount(picks, minlength=k)
        taken += used
        left -= used
        chosen.append(texts)
    return np.concatenate(chosen).tolist() if chosen else []


def allocation_table(labels: np.ndarray, chosen: list[int], score: np.ndarray, shares: np.ndarray,
                     seconds_per_text: np.ndarray) -> list[dict]:
    """Per cluster: pool size, score, target share, and the texts, seconds and share of seconds chosen."""
    labels, seconds = np.asarray(labels), np.asarray(seconds_per_text, dtype=np.float64)
    k = len(score)
    chosen_arr = np.asarray(chosen, dtype=np.int64)
    texts = np.bincount(labels[chosen_arr], minlength=k)
    secs = np.bincount(labels[chosen_arr], weights=seconds[chosen_arr], minlength=k)
    pool = np.bincount(labels, minlength=k)
    total = secs.sum()
    return [{"cluster": c, "pool_texts": int(pool[c]), "score": float(score[c]), "target_share": float(shares[c]),
             "texts": int(texts[c]), "seconds": round(float(secs[c]), 3),
             "share": float(secs[c] / total) if total > 0 else 0.0} for c in range(k)]


def spread(table: list[dict]) -> dict[str, float]:
    """How widely the chosen speech is spread over clusters: the entropy of its shares (nats), the same over
    log(clusters) (1: even, 0: one cluster) and exp(entropy), the number of clusters an even spread would use.
    With the paper's gamma a wide range of scores makes the allocation nearly an argmax; this shows it."""
    shares = np.array([row["share"] for row in table], dtype=np.float64)
    shares = shares[shares > 0]
    entropy = float(-(shares * np.log(shares)).sum()) if shares.size else 0.0
    return {"entropy": entropy, "evenness": entropy / math.log(len(table)) if len(table) > 1 else 1.0,
            "effective_clusters": math.exp(entropy)}
