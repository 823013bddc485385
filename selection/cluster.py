"""Balanced k-means: K clusters whose sizes stay within a tolerance of N/K, at corpus scale.

Why balanced: selection samples clusters in proportion to their pool share times a score; one giant cluster
would hide several domains behind one score, and a tiny one would be scored from too few texts.

How: the centroids are fit on a seeded sample of at most ``sample`` points (256 per cluster by default, faiss's
own training subsample): faiss k-means (k-means++ start), then "balanced Lloyd" passes, each a balanced
assignment followed by the means. Then every one of the N points is given its label by one more balanced
assignment, with those centroids fixed. A balanced assignment puts each point on its nearest centroid that
still has room (capacity ceil(N/K * (1 + tolerance))), points with the largest margin between their two
nearest centroids first, since they lose most by moving; clusters left below floor(N/K * (1 - tolerance)) then
take the points that are cheapest to move from clusters with spare points.

Why it fits at any N: the assignment reads ``x`` in row blocks and keeps O(N) numbers (a label, a distance, a
margin and a rank per point), never the N x K distances nor the N x D matrix, so ``x`` may be an embeddings
file larger than memory (``selection.vectors.Vectors``); distances that a later round needs (points whose
nearest centroid filled up, candidates for a small cluster) are computed again from their rows. The balance
guarantee is unchanged by the sample: every cluster of the N points ends within [floor, ceil] above, exactly;
what the sample changes is only where the centroids are.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import faiss
import numpy as np
import torch

from selection.vectors import Vectors

Points = np.ndarray | Vectors  # float32 [N, D] in memory or in an embeddings file, read by row blocks
_BLOCK = 16384  # rows per distance block: bounds the temporaries (rows x D copied, rows x K distances)
SAMPLE_PER_CLUSTER = 256


def _sq_distances(block: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [rows, K], float32."""
    d = block @ (-2.0 * centroids.T)
    d += np.einsum("ij,ij->i", block, block)[:, None]
    d += (centroids * centroids).sum(1)
    return d


def _nearest_two(x: Points, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per point: its nearest centroid, the squared distance to it, and the margin to the second nearest
    (0 with one centroid)."""
    n = len(x)
    choice, dist, margin = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32), np.zeros(n, np.float32)
    for start in range(0, n, _BLOCK):
        d = _sq_distances(x[start:start + _BLOCK], centroids)
        stop = start + len(d)
        choice[start:stop] = d.argmin(1)
        dist[start:stop] = d.min(1)
        if d.shape[1] > 1:
            two = np.partition(d, 1, axis=1)[:, :2]
            margin[start:stop] = two[:, 1] - two[:, 0]
    return choice, dist, margin


def _nearest_allowed(x: Points, centroids: np.ndarray, rows: np.ndarray,
                     allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the points ``rows``: the nearest centroid among the ``allowed`` ones, and the squared distance to it."""
    columns = np.flatnonzero(allowed)
    kept = centroids[columns]
    choice, dist = np.empty(len(rows), dtype=np.int64), np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), _BLOCK):
        d = _sq_distances(x[rows[start:start + _BLOCK]], kept)
        best = d.argmin(1)
        choice[start:start + len(d)] = columns[best]
        dist[start:start + len(d)] = d[np.arange(len(d)), best]
    return choice, dist


def _capacity_assign(x: Points, centroids: np.ndarray, choice: np.ndarray, dist: np.ndarray, priority: np.ndarray,
                     cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point to its nearest centroid with room (labels, and the squared distance to it); where a centroid
    is over-asked, points with the lower ``priority`` value win. ``choice`` and ``dist`` start as every point's
    nearest centroid. Each round fills at least one centroid, so there are at most K rounds."""
    n, k = len(x), len(centroids)
    labels, own = np.full(n, -1, dtype=np.int64), np.empty(n, dtype=np.float32)
    room = np.full(k, cap, dtype=np.int64)
    todo = np.arange(n)
    while len(todo):
        order = np.lexsort((priority[todo], choice))
        todo, choice, dist = todo[order], choice[order], dist[order]
        starts = np.searchsorted(choice, np.arange(k))
        accept = np.arange(len(todo)) - starts[choice] < room[choice]
        labels[todo[accept]], own[todo[accept]] = choice[accept], dist[accept]
        room -= np.bincount(choice[accept], minlength=k)
        todo = np.sort(todo[~accept])   # in row order: the rows are read again
        if len(todo):
            choice, dist = _nearest_allowed(x, centroids, todo, room > 0)
    return labels, own


def _candidates(x: Points, centroids: np.ndarray, clusters: list[int], eligible: np.ndarray, own: np.ndarray,
                limits: list[int | None]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each of ``clusters``: the ``eligible`` points cheapest to move there (at most its limit; None: all),
    as (points, their squared distance to it); the cost of a move is that distance minus ``own``. One pass."""
    found = [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in clusters]
    for start in range(0, len(x), _BLOCK):
        rows = start + np.flatnonzero(eligible[start:start + _BLOCK])
        if not len(rows):
            continue
        d = _sq_distances(x[start:start + _BLOCK][rows - start], centroids[clusters])
        for j, limit in enumerate(limits):
            points, dist = np.concatenate([found[j][0], rows]), np.concatenate([found[j][1], d[:, j]])
            if limit is not None and len(points) > limit:
                keep = np.argpartition(dist - own[points], limit - 1)[:limit]
                points, dist = points[keep], dist[keep]
            found[j] = points, dist
    return found


def _cheapest_moves(points: np.ndarray, cost: np.ndarray, labels: np.ndarray, spare: np.ndarray,
                    need: int) -> np.ndarray:
    """Positions in ``points`` of up to ``need`` of them, cheapest first, taking no more from a cluster than its
    ``spare``."""
    order = np.lexsort((points, cost))
    donors = labels[points[order]]
    counts = np.bincount(donors, minlength=len(spare))
    rank = np.empty(len(order), dtype=np.int64)  # rank of each candidate within its donor, cheapest first
    rank[np.argsort(donors, kind="stable")] = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    return order[rank < spare[donors]][:need]


def _fill_small(x: Points, centroids: np.ndarray, labels: np.ndarray, own: np.ndarray, low: int) -> np.ndarray:
    """Bring every cluster up to ``low`` points with the points cheapest to move, taken only from clusters
    that keep at least ``low``; the smallest cluster first. One pass finds the cheapest few candidates of every
    small cluster; when a cluster's run short (its nearest donors gave their spare away), another pass finds 4
    times as many for the clusters still to fill."""
    n, k = len(labels), len(centroids)
    sizes = np.bincount(labels, minlength=k)
    pending = [int(c) for c in np.argsort(sizes, kind="stable") if sizes[c] < low]
    limits: list[int | None] = [4 * int(low - sizes[c]) + 256 for c in pending]
    while pending:
        found = _candidates(x, centroids, pending, sizes[labels] > low, own, limits)
        for j, c in enumerate(pending):
            need, spare = low - sizes[c], sizes - low
            points, dist = found[j]
            ok = spare[labels[points]] > 0   # donors may have given their spare to earlier clusters
            points, dist = points[ok], dist[ok]
            picked = _cheapest_moves(points, dist - own[points], labels, spare, need)
            if len(picked) < need and limits[j] is not None:
                pending, limits = pending[j:], [None if 4 * m >= n else 4 * m for m in limits[j:]]
                break
            moved = points[picked]
            sizes -= np.bincount(labels[moved], minlength=k)
            labels[moved], own[moved] = c, dist[picked]
            sizes[c] += len(moved)
        else:
            pending = []
    return labels


def _balanced_assign(x: Points, centroids: np.ndarray, tolerance: float) -> np.ndarray:
    """Labels of all points, every cluster's size within ``tolerance`` of N/K (module docstring)."""
    n, k = len(x), len(centroids)
    # rounded first, so that 100/7 * 1.05 = 15.000000000000002 still means a capacity of 15
    cap, low = math.ceil(round(n / k * (1 + tolerance), 9)), math.floor(round(n / k * (1 - tolerance), 9))
    choice, dist, margin = _nearest_two(x, centroids)
    priority = np.argsort(np.argsort(-margin, kind="stable"), kind="stable")
    labels, own = _capacity_assign(x, centroids, choice, dist, priority, cap)
    return _fill_small(x, centroids, labels, own, low)


def _means(x: np.ndarray, labels: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Cluster means; an empty cluster keeps its old centroid."""
    sums = torch.zeros(old.shape, dtype=torch.float64)
    for start in range(0, len(x), _BLOCK):
        block = torch.from_numpy(x[start:start + _BLOCK])
        sums += torch.zeros(old.shape).index_add_(0, torch.from_numpy(labels[start:start + _BLOCK]), block).double()
    counts = np.bincount(labels, minlength=len(old))[:, None]
    return np.where(counts > 0, sums.numpy() / np.maximum(counts, 1), old).astype(np.float32)


def sample_rows(n: int, sample: int, seed: int) -> np.ndarray | None:
    """Sorted rows of a seeded sample of ``sample`` of ``n`` points; None when that is all of them."""
    if n <= sample:
        return None
    return np.sort(np.random.default_rng([seed, 29]).choice(n, size=sample, replace=False))


def balanced_kmeans(x: Points, k: int, seed: int = 0, iters: int = 10, tolerance: float = 0.05,
                    balance_passes: int = 5, sample: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels [N] (int32) and centroids [k, D] (float32) with every cluster size within ``tolerance`` of N/k;
    seeded and deterministic. ``x`` is a float32 [N, D] array or a ``Vectors`` file; the centroids are fit on
    ``sample`` points of it (default 256 per cluster), then all N are assigned (module docstring)."""
    n = len(x)
    if len(getattr(x, "shape", ())) != 2 or n == 0:
        raise ValueError(f"x: expected a non-empty [N, D] array, got shape {getattr(x, 'shape', None)}")
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in 1..{n} (the number of points), got {k}")
    if tolerance < 0 or iters < 1 or balance_passes < 1:
        raise ValueError(f"need tolerance >= 0, iters >= 1 and balance_passes >= 1, got {tolerance}, {iters}, "
                         f"{balance_passes}")
    rows = sample_rows(n, SAMPLE_PER_CLUSTER * k if sample is None else max(sample, k), seed)
    fit = np.ascontiguousarray(x[:] if rows is None else x[rows], dtype=np.float32)
    kmeans = faiss.Kmeans(fit.shape[1], k, niter=iters, seed=seed, min_points_per_centroid=1,
                          init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
    kmeans.train(fit)
    centroids = kmeans.centroids.copy()
    labels = None
    for _ in range(balance_passes):
        new = _balanced_assign(fit, centroids, tolerance)
        centroids = _means(fit, new, centroids)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
    if rows is not None:
        labels = _balanced_assign(x, centroids, tolerance)
    return labels.astype(np.int32), centroids


def cluster_summary(labels: np.ndarray, texts: Callable[[np.ndarray], list[str]], examples: int = 3,
                    max_chars: int = 200) -> list[dict]:
    """Per cluster: its size and its first ``examples`` texts (in pool order, cut to ``max_chars``), read with
    ``texts(indices)`` (``PoolIndex.texts``: only those few texts are read)."""
    sizes = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    starts = np.cumsum(sizes) - sizes
    shown = [order[start:start + min(size, examples)] for start, size in zip(starts, sizes, strict=True)]
    cut = [t if len(t) <= max_chars else t[:max_chars] + "..." for t in texts(np.concatenate(shown))]
    ends = np.cumsum([len(idx) for idx in shown])
    return [{"cluster": c, "size": int(sizes[c]), "examples": cut[end - len(shown[c]):end]}
            for c, end in enumerate(ends.tolist())]
