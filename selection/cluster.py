"""Balanced k-means: K clusters whose sizes stay within a tolerance of N/K.

Why balanced: selection samples clusters in proportion to their pool share times a score; one giant cluster
would hide several domains behind one score, and a tiny one would be scored from too few texts.

How: faiss k-means (k-means++ start, on faiss's default subsample of 256 points per centroid: the start only
has to be good, the passes below see every point) and then "balanced Lloyd" passes. A pass assigns each
point to its nearest centroid that still has room (capacity ceil(N/K * (1 + tolerance))), points with the
largest margin between their two nearest centroids first, since they lose most by moving; clusters left
below floor(N/K * (1 - tolerance)) then take the points that are cheapest to move from clusters with spare
points; the means are recomputed. Everything is vectorised over points; loops run over rounds and clusters.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

_CHUNK = 65536  # rows per distance block: bounds the temporaries at 1M points


def _sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [N, K], float32, computed in row blocks."""
    out = np.empty((len(x), len(centroids)), dtype=np.float32)
    c_norm = (centroids * centroids).sum(1)
    for start in range(0, len(x), _CHUNK):
        block = x[start:start + _CHUNK]
        d = block @ (-2.0 * centroids.T)
        d += (block * block).sum(1, keepdims=True)
        d += c_norm
        out[start:start + _CHUNK] = d
    return out


def _margins(dist: np.ndarray) -> np.ndarray:
    """Distance to the second-nearest minus to the nearest centroid, per point (0 with one centroid)."""
    out = np.zeros(len(dist), dtype=np.float32)
    if dist.shape[1] == 1:
        return out
    for start in range(0, len(dist), _CHUNK):
        two = np.partition(dist[start:start + _CHUNK], 1, axis=1)[:, :2]
        out[start:start + _CHUNK] = two[:, 1] - two[:, 0]
    return out


def _capacity_assign(dist: np.ndarray, priority: np.ndarray, cap: int) -> np.ndarray:
    """Each point to its nearest centroid with room; where a centroid is over-asked, points with the lower
    ``priority`` value win. Each round fills at least one centroid, so there are at most K rounds."""
    n, k = dist.shape
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, cap, dtype=np.int64)
    todo = np.arange(n)
    choice = dist.argmin(1)
    while len(todo):
        order = np.lexsort((priority[todo], choice))
        todo, choice = todo[order], choice[order]
        starts = np.searchsorted(choice, np.arange(k))
        accept = np.arange(len(todo)) - starts[choice] < room[choice]
        labels[todo[accept]] = choice[accept]
        room -= np.bincount(choice[accept], minlength=k)
        todo = todo[~accept]
        if len(todo):
            masked = dist[todo]
            masked[:, room == 0] = np.inf
            choice = masked.argmin(1)
    return labels


def _fill_small(dist: np.ndarray, labels: np.ndarray, low: int) -> np.ndarray:
    """Bring every cluster up to ``low`` points with the points cheapest to move, taken only from clusters
    that keep at least ``low``. Only the cheapest few candidates are sorted (more only when donors run out)."""
    k = dist.shape[1]
    sizes = np.bincount(labels, minlength=k)
    own = dist[np.arange(len(labels)), labels]
    for c in np.argsort(sizes, kind="stable"):
        need = low - sizes[c]
        if need <= 0:
            break
        spare = sizes - low
        cand = np.flatnonzero(spare[labels] > 0)
        cost = dist[cand, c] - own[cand]
        m = min(len(cand), 4 * need + 256)
        while True:
            top = np.arange(len(cand)) if m == len(cand) else np.argpartition(cost, m - 1)[:m]
            top = cand[top[np.argsort(cost[top], kind="stable")]]
            donors = labels[top]
            counts = np.bincount(donors, minlength=k)
            rank = np.empty(len(top), dtype=np.int64)  # rank of each candidate within its donor, cheapest first
            rank[np.argsort(donors, kind="stable")] = np.arange(len(top)) - np.repeat(np.cumsum(counts) - counts,
                                                                                     counts)
            moved = top[rank < spare[donors]][:need]
            if len(moved) == need or m == len(cand):
                break
            m = min(len(cand), 4 * m)
        sizes -= np.bincount(labels[moved], minlength=k)
        labels[moved] = c
        own[moved] = dist[moved, c]
        sizes[c] += len(moved)
    return labels


def _means(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Cluster means; an empty cluster keeps its old centroid."""
    sums = torch.zeros(old.shape, dtype=torch.float64)
    for start in range(0, len(x), _CHUNK):
        block = torch.from_numpy(x[start:start + _CHUNK])
        sums += torch.zeros(old.shape).index_add_(0, torch.from_numpy(labels[start:start + _CHUNK]), block).double()
    counts = np.bincount(labels, minlength=len(old))[:, None]
    return np.where(counts > 0, sums.numpy() / np.maximum(counts, 1), old).astype(np.float32)


def balanced_kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 10, tolerance: float = 0.05,
                    balance_passes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N] (int64) and centroids [k, D] (float32) with every cluster size within
    ``tolerance`` of N/k; seeded and deterministic."""
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"x: expected a non-empty [N, D] array, got shape {x.shape}")
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in 1..{n} (the number of points), got {k}")
    if tolerance < 0 or iters < 1 or balance_passes < 1:
        raise ValueError(f"need tolerance >= 0, iters >= 1 and balance_passes >= 1, got {tolerance}, {iters}, "
                         f"{balance_passes}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, min_points_per_centroid=1,
                          init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
    kmeans.train(x)
    centroids = kmeans.centroids.copy()
    # rounded first, so that 100/7 * 1.05 = 15.000000000000002 still means a capacity of 15
    cap, low = math.ceil(round(n / k * (1 + tolerance), 9)), math.floor(round(n / k * (1 - tolerance), 9))
    labels = None
    for _ in range(balance_passes):
        dist = _sq_distances(x, centroids)
        priority = np.argsort(np.argsort(-_margins(dist), kind="stable"), kind="stable")
        new = _fill_small(dist, _capacity_assign(dist, priority, cap), low)
        centroids = _means(x, new, centroids)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
    return labels, centroids


def cluster_summary(labels: np.ndarray, texts: list[str], examples: int = 3, max_chars: int = 200) -> list[dict]:
    """Per cluster: its size and the first ``examples`` texts (in pool order, cut to ``max_chars``)."""
    if len(labels) != len(texts):
        raise ValueError(f"got {len(labels)} labels for {len(texts)} texts")
    sizes = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    starts = np.cumsum(sizes) - sizes
    summary = []
    for c, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        shown = [texts[i] for i in order[start:start + min(size, examples)]]
        summary.append({"cluster": c, "size": int(size),
                         "examples": [t if len(t) <= max_chars else t[:max_chars] + "..." for t in shown]})
    return summary
