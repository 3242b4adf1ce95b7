"""Distributed k-means over a Ray Dataset of embeddings (paper: k=10, 10 restarts).

Why not scikit-learn: it needs every vector in one process. Here the driver never holds the
vectors; it holds a sample (for initialisation) and O(n_init * k * d) partial sums:

1. **Sample pass.** Every row gets a seeded 64-bit key, a hash of the vector's bytes (64-bit
   words folded through the splitmix64 mixer, vectorised over the rows), so the sample is a
   function of (data, seed) alone, not of block layout or execution order.
   Each batch returns its smallest distinct keys (with their multiplicity) and the per-feature
   sum / sum of squares; the driver keeps the smallest keys overall, as many as the
   initialisation reads (``_sample_cap``: ``init_rows``, at most ``sample_size``): a uniform
   sample of the distinct vectors, weighted by how often each occurs. It also yields the exact
   number of distinct vectors whenever that is below the cap (the k > n check) and the
   data variance (scikit-learn's relative tolerance).
2. **Initialisation on the sample**, one seeded generator per restart: greedy k-means++ as in
   scikit-learn (2 + log k candidates per step), or k-means|| (oversampling rounds, then a
   weighted k-means++ down to k), on the head of the sample (``init_rows``: max(10,000, 20 k)
   rows; the sample is in key order, so its head is a uniform sample too).
3. **Lloyd passes.** One pass serves every restart: the batch function gets the centroids of
   all active restarts, shape (n_init, k, d), and returns per restart the cluster sums
   (float64), counts, inertia and its few farthest points (for re-seeding empty clusters).
   The dataset is materialised once; a pass is one plain Ray task per piece of at most
   ``batch_size`` rows of a block (``_pieces``), reading the block from the object store
   without a copy, so no Ray Data execution is planned and started per pass (that cost ~1.2 s
   a pass at 1M x 384 on 2 cores). The driver adds the results up in piece order, so a run is
   reproducible bit for bit. A restart stops after ``max_iter`` updates or when its centroids
   move (sum of squared shifts) by at most ``tol`` times the mean feature variance, then gets
   one more pass to compute the inertia of its final centroids, as scikit-learn does.

**Backends** (``backend``, the ``cluster.backend`` setting) decide how a block finds each row's
nearest centroid; everything else (the partial sums, their float64 block-order reduction) is
the same code:

- ``faiss``: one ``faiss.IndexFlatL2`` search (k=1) per restart: a blocked matmul with the
  arg-min fused in, so the (rows x k) distance matrix is never written out.
- ``numpy``: one matmul against the centroids of every restart at once, (rows x n_init*k),
  then an arg-min per restart.

  Measured (CPU time of the nearest-centroid search, one core, 32,768 x 384 rows, on a shared
  2-core machine), faiss / numpy:
  0.88 at k=1000, 0.91 at k=300, 0.98-1.09 at k=10-100 with one restart; with 10 restarts
  2.8 at k=10, 1.8 at k=30, 1.1 at k=100, 0.99 at k=300, 0.94 at k=1000 (faiss reads the rows
  once per restart; numpy's single matmul serves all of them).
- ``auto`` (the default): ``faiss`` when k >= 256, else ``numpy``. The choice depends on k
  alone, so a run uses one backend throughout and reproduces bit for bit. Both backends scale
  the same way (one Ray task per batch, flat driver memory); they may differ in the last bit
  of a distance, so a near-tie can go to a different centroid.

**Threads.** A pass task (and an ``assign`` task of ``map_batches``) holds 1 CPU, and Ray
starts its workers with ``OMP_NUM_THREADS=1``; the block functions still set faiss's OpenMP
threads (which also drive its bundled OpenBLAS) to the task's whole CPUs explicitly and put the
old value back, so a ``runtime_env`` that sets OMP_NUM_THREADS, or a worker started without it
(faiss then takes every core in every task: 2 tasks x 2 threads on 2 cores), cannot
oversubscribe the node. On
2 cores that is 2 concurrent tasks x 1 thread. ``batch_size`` (65,536 rows, 96 MiB at
d=384) makes one task long enough (~0.5 s of matmul at k=1000) that Ray's per-task cost is
noise, and 1M rows still split into 16 tasks for 2 cores; faiss blocks the search internally
(4,096 rows x 1,024 centroids), and the sums go in chunks of ``_FAISS_CHUNK`` rows that stay in
cache while every restart's index searches them.

``fit_kmeans`` and ``assign`` import faiss only inside the Ray tasks, never in the driver, and
through ``blas.import_faiss``: faiss-cpu's wheel bundles an OpenBLAS (0.3.15) that runs its
SSE3 kernels on CPUs newer than it, 4.5x slower on a Sapphire Rapids Xeon.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from hetray.selection.blas import import_faiss

log = logging.getLogger(__name__)

_CHUNK_ELEMS = 1 << 23  # distance-matrix entries per chunk (32 MiB of float32)
_MAX_FAR = 16  # farthest points kept per restart and batch, to re-seed empty clusters
_FAISS_CHUNK = 8192  # rows per faiss search (12 MiB at d=384): every restart's index reads them from cache
_FAISS_MIN_K = 256  # backend "auto": faiss from this many centroids per restart up, numpy below
BACKENDS = ("auto", "faiss", "numpy")


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32, of the best restart
    inertia: float  # sum of squared distances to the nearest centroid, best restart
    n_iter: int  # Lloyd updates of the best restart
    inertias: list[float]  # final inertia of every restart
    best_init: int  # index of the best restart
    n_iters: list[int] = field(default_factory=list)  # Lloyd updates of every restart
    sizes: np.ndarray | None = None  # points per cluster under the final centroids
    n_samples: int = 0  # rows in the dataset
    backend: str = ""  # the backend that ran ("faiss" or "numpy")
    passes: int = 0  # Lloyd passes over the data (every restart shares each pass)
    seconds: dict = field(default_factory=dict)  # wall time of the sample pass, the init and the Lloyd passes


# ---------------------------------------------------------------------------- plain numpy


def vectors_of(table: pa.Table, column: str) -> np.ndarray:
    """The (m, d) float32 matrix of a vector column: a fixed-size list (our embedding schema),
    a list, or Ray's tensor extension (what ``ray.data.from_numpy`` makes)."""
    parts = []
    for chunk in table.column(column).chunks:
        t = chunk.type
        if pa.types.is_fixed_size_list(t):
            flat = chunk.flatten().to_numpy(zero_copy_only=False)
            parts.append(flat.reshape(len(chunk), t.list_size))
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            flat = chunk.flatten().to_numpy(zero_copy_only=False)
            parts.append(flat.reshape(len(chunk), -1))
        else:
            parts.append(np.asarray(chunk.to_numpy(zero_copy_only=False)))
    if not parts:
        return np.zeros((0, 0), np.float32)
    x = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return np.ascontiguousarray(x, dtype=np.float32)


def _rowsq(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def sqdist(x: np.ndarray, c: np.ndarray, xsq=None, csq=None) -> np.ndarray:
    """Squared distances (m, k) as ||x||^2 - 2 x.c + ||c||^2: one matmul, in x's dtype."""
    d = x @ c.T
    d *= -2
    d += (_rowsq(x) if xsq is None else xsq)[:, None]
    d += (_rowsq(c) if csq is None else csq)[None, :]
    return np.maximum(d, 0, out=d)  # rounding can make the expansion slightly negative


def kmeans_inertia(x: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> float:
    """Sum of squared distances of ``x`` to their nearest centroid (float64, chunked)."""
    c = np.asarray(centroids, np.float64)
    csq = _rowsq(c)
    total = 0.0
    for i in range(0, len(x), chunk):
        xc = np.asarray(x[i : i + chunk], np.float64)
        total += float(sqdist(xc, c, csq=csq).min(axis=1).sum())
    return total


def _pick(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Indices drawn from a cumulative weight vector; ``side=right`` never picks a zero weight."""
    return np.minimum(np.searchsorted(cum, u * cum[-1], side="right"), len(cum) - 1)


def kmeans_plusplus(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy weighted k-means++ (scikit-learn's variant): each step draws 2 + log(k) candidates
    with probability ~ weight * D^2 and keeps the one that lowers the potential most."""
    trials = 2 + int(np.log(k))
    xsq = _rowsq(x)
    # (trials, n) against x transposed once: a step's product reads x.T row-major, 1.65 s
    # instead of 3.0 s for x @ cand.T at 20,000 x 384, k=1000 (2 BLAS threads); same picks
    xt = np.ascontiguousarray(x.T)
    centers = np.empty((k, x.shape[1]), np.float32)
    first = int(_pick(np.cumsum(w), rng.random(1))[0])
    centers[0] = x[first]
    closest = sqdist(x, x[first : first + 1], xsq, xsq[first : first + 1])[:, 0].astype(np.float64)
    for c in range(1, k):
        cand = _pick(np.cumsum(w * closest), rng.random(trials))
        d = x[cand] @ xt
        d *= -2
        d += xsq[None, :]
        d += xsq[cand][:, None]
        np.maximum(d, 0, out=d)  # rounding can make the expansion slightly negative
        d = np.minimum(d, closest[None, :])  # float64
        best = int(np.argmin(d @ w))
        closest = d[best]
        centers[c] = x[cand[best]]
    return centers


def kmeans_parallel(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator, rounds: int = 5) -> np.ndarray:
    """k-means|| (Bahmani et al.): ``rounds`` passes that each add ~2k points with probability
    ~ weight * D^2, then weighted k-means++ on those candidates, weighted by the sample weight
    closest to each. Falls back to k-means++ when the rounds find fewer than k candidates."""
    xsq = _rowsq(x)
    chosen = [int(_pick(np.cumsum(w), rng.random(1))[0])]
    closest = sqdist(x, x[chosen], xsq, xsq[chosen])[:, 0].astype(np.float64)
    for _ in range(rounds):
        pot = float(closest @ w)
        if pot <= 0:
            break
        p = np.minimum(1.0, 2 * k * w * closest / pot)
        new = np.flatnonzero(rng.random(len(x)) < p)
        if len(new) == 0:
            continue
        chosen.extend(new.tolist())
        for i in range(0, len(new), 1024):
            part = new[i : i + 1024]
            np.minimum(closest, sqdist(x, x[part], xsq, xsq[part]).min(axis=1), out=closest)
    cand = np.asarray(chosen)
    if len(cand) < k:
        return kmeans_plusplus(x, w, k, rng)
    labels = _nearest(x, x[cand], xsq)
    cw = np.bincount(labels, weights=w, minlength=len(cand))
    return kmeans_plusplus(x[cand], cw, k, rng)


def _nearest(x: np.ndarray, c: np.ndarray, xsq=None) -> np.ndarray:
    xsq = _rowsq(x) if xsq is None else xsq
    csq = _rowsq(c)
    step = max(1, _CHUNK_ELEMS // max(1, len(c)))
    return np.concatenate(
        [sqdist(x[i : i + step], c, xsq[i : i + step], csq).argmin(axis=1) for i in range(0, len(x), step)]
    )


# ---------------------------------------------------------------------------- batch functions


_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place on a uint64 array: a bijection with full avalanche."""
    h ^= h >> _S30
    h *= _MIX1
    h ^= h >> _S27
    h *= _MIX2
    h ^= h >> _S31
    return h


def _row_keys(x: np.ndarray, seed: int, chunk: int = 4096) -> np.ndarray:
    """A seeded uniform 64-bit key per row: its 64-bit words folded in one by one, h = mix(h ^ w),
    from h = mix(seed). Each fold is a bijection, so rows that differ in one word never collide.
    Vectorised over the rows, in chunks that stay in cache: 2.4x less CPU than a BLAKE2b call per
    row (65,536 x 384 rows)."""
    x = np.ascontiguousarray(x)
    if x.shape[1] * x.itemsize % 8:  # rows of an odd number of float32: pad with a zero word half
        x = np.concatenate([x, np.zeros((len(x), 1), x.dtype)], axis=1)
    words = x.view(np.uint64)  # (rows, bytes per row / 8)
    start = _mix64(np.array([seed % 2**64], np.uint64))[0]
    keys = np.empty(len(x), np.uint64)
    with np.errstate(over="ignore"):
        for i in range(0, len(x), chunk):
            part = words[i : i + chunk]
            h = np.full(len(part), start, np.uint64)
            for j in range(part.shape[1]):
                h ^= part[:, j]
                _mix64(h)
            keys[i : i + chunk] = h
    return keys


def sample_batch(batch: pa.Table, column: str, seed: int, threshold: int, limit: int) -> dict:
    """One batch -> its row count, feature sums, and its ``limit`` smallest distinct keys below
    ``threshold`` with their multiplicity and vectors. One output row."""
    x = vectors_of(batch, column) + np.float32(0)  # -0.0 -> 0.0: equal points hash equally
    keys = _row_keys(x, seed)
    keep = np.flatnonzero(keys <= np.uint64(threshold))
    u, first, cnt = np.unique(keys[keep], return_index=True, return_counts=True)
    rows = keep[first[:limit]]
    return {
        "n": np.array([len(x)]),
        "sum": x.sum(axis=0, dtype=np.float64)[None],
        "sumsq": np.einsum("ij,ij->j", x, x, dtype=np.float64)[None],
        "keys": u[:limit][None],
        "counts": cnt[:limit][None],
        "vectors": x[rows][None],
    }


def resolve_backend(backend: str, k: int) -> str:
    """``auto`` -> ``faiss`` for k >= 256 centroids per restart, else ``numpy`` (module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "auto":
        return "faiss" if k >= _FAISS_MIN_K else "numpy"
    return backend


@contextlib.contextmanager
def _faiss_threads():
    """faiss (OpenMP, and its OpenBLAS) on the CPUs this Ray task holds, 1 outside a task; the
    previous setting comes back afterwards."""
    faiss = import_faiss()
    cpus = 1.0
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # not in a Ray worker: one thread
        pass
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, math.floor(cpus)))
    try:
        yield faiss
    finally:
        faiss.omp_set_num_threads(before)


def _faiss_indexes(faiss, centroids: np.ndarray) -> list:
    """One exact L2 index per restart; ``centroids`` is (R, k, d)."""
    out = []
    for c in centroids:
        index = faiss.IndexFlatL2(c.shape[1])
        index.add(np.ascontiguousarray(c, np.float32))
        out.append(index)
    return out


def _nearest_faiss(indexes: list, xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels (m, R) int64, squared distances (m, R) float32) of the rows ``xc``, per restart."""
    labels = np.empty((len(xc), len(indexes)), np.int64)
    mind = np.empty((len(xc), len(indexes)), np.float32)
    for r, index in enumerate(indexes):
        dist, idx = index.search(xc, 1)
        labels[:, r], mind[:, r] = idx[:, 0], dist[:, 0]
    return labels, mind


def _nearest_numpy(xc, flat, xsq, csq, R: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same from one (m, R*k) distance matrix for every restart at once."""
    dist = sqdist(xc, flat, xsq, csq).reshape(len(xc), R, k)
    labels = dist.argmin(axis=2)  # (m, R)
    return labels, np.take_along_axis(dist, labels[:, :, None], axis=2)[:, :, 0]


def lloyd_batch(batch: pa.Table, centroids: np.ndarray, column: str, n_far: int, backend: str = "numpy") -> dict:
    """Partial sums of one batch for every restart at once. ``centroids``: (R, k, d) float32.

    Returns one row: sums (R, k, d) float64, counts (R, k), inertia (R,), and per restart the
    ``n_far`` points farthest from their centroid (distances and vectors)."""
    x = vectors_of(batch, column)
    R, k, d = centroids.shape
    with _faiss_threads() if backend == "faiss" else contextlib.nullcontext() as faiss:
        if backend == "faiss":
            indexes = _faiss_indexes(faiss, centroids)
            step = _FAISS_CHUNK
        else:
            flat = centroids.reshape(R * k, d)
            csq, xsq = _rowsq(flat), _rowsq(x)
            step = max(1, _CHUNK_ELEMS // (R * k))
        sums = np.zeros((R, k, d))
        counts = np.zeros((R, k), np.int64)
        inertia = np.zeros(R)
        far_d = np.full((R, n_far), -1.0)
        far_x = np.zeros((R, n_far, d), np.float32)
        offsets = np.arange(R) * k
        for i in range(0, len(x), step):
            xc = x[i : i + step]
            m = len(xc)
            if backend == "faiss":
                labels, mind = _nearest_faiss(indexes, xc)
            else:
                labels, mind = _nearest_numpy(xc, flat, xsq[i : i + step], csq, R, k)
            inertia += mind.sum(axis=0, dtype=np.float64)
            # cluster sums as one sparse (R*k, m) one-hot product: O(R*m*d), whatever k is
            rows = (labels + offsets).T.ravel()
            onehot = _sparse_onehot(rows, np.tile(np.arange(m), R), R * k, m)
            sums += (onehot @ xc).reshape(R, k, d)
            counts += np.bincount(rows, minlength=R * k).reshape(R, k)
            for r in range(R):  # merge this chunk's farthest points into the running top n_far
                top = _top(mind[:, r], n_far)
                cd = np.concatenate([far_d[r], mind[top, r]])
                cx = np.concatenate([far_x[r], xc[top]])
                best = np.argsort(-cd, kind="stable")[:n_far]
                far_d[r], far_x[r] = cd[best], cx[best]
    return {
        "sums": sums[None],
        "counts": counts[None],
        "inertia": inertia[None],
        "far_d": far_d[None],
        "far_x": far_x[None],
    }


def _top(v: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest values, largest first (ties: lower index first)."""
    idx = np.arange(len(v)) if len(v) <= n else np.sort(np.argpartition(-v, n - 1)[:n])
    return idx[np.argsort(-v[idx], kind="stable")]


def _sparse_onehot(rows, cols, n_rows, n_cols):
    import scipy.sparse as sp

    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_rows, n_cols))


def assign_batch(batch: pa.Table, centroids: np.ndarray, column: str, backend: str = "numpy") -> pa.Table:
    """Append ``cluster`` (int32) and ``distance`` (float32, squared) to a batch."""
    x = vectors_of(batch, column)
    if backend == "faiss":
        with _faiss_threads() as faiss:
            labels, dist = _nearest_faiss(_faiss_indexes(faiss, centroids[None]), x)
        labels, dist = labels[:, 0].astype(np.int32), dist[:, 0]
    else:
        csq = _rowsq(centroids)
        labels = np.empty(len(x), np.int32)
        dist = np.empty(len(x), np.float32)
        step = max(1, _CHUNK_ELEMS // len(centroids))
        for i in range(0, len(x), step):
            dm = sqdist(x[i : i + step], centroids, csq=csq)
            labels[i : i + step] = dm.argmin(axis=1)
            dist[i : i + step] = np.take_along_axis(dm, labels[i : i + step, None].astype(np.int64), axis=1)[:, 0]
    return batch.append_column("cluster", pa.array(labels)).append_column("distance", pa.array(dist))


# ---------------------------------------------------------------------------- driver


# ---------------------------------------------------------------------------- passes as plain tasks


def _on_piece(fn, table: pa.Table, start: int, stop: int, *args) -> dict:
    """``fn`` (a batch function) on rows ``[start, stop)`` of one block; its one output row."""
    out = fn(table.slice(start, stop - start), *args)
    return {name: np.asarray(v)[0] for name, v in out.items()}


def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@functools.cache
def _task(fn):
    import ray

    return ray.remote(num_cpus=1, max_retries=3)(fn)


def _pieces(ds, batch_size: int) -> list[tuple]:
    """``(block ref, start, stop)`` of every batch of at most ``batch_size`` rows (a block cut
    into equal pieces, then split further where that evens out the CPUs' work: ``_balance``)
    of a materialised dataset, in block order. The blocks stay where they are (the object store
    of the node that made them); a pass is one plain Ray task per piece, which reads its block
    without a copy: no Ray Data execution per pass."""
    import ray

    refs = ds.to_arrow_refs()
    rows = ray.get([_task(_num_rows).remote(r) for r in refs])
    out = []
    for ref, n in zip(refs, rows):
        size = max(1, -(-n // max(1, -(-n // batch_size))))
        out += [(ref, s, min(s + size, n)) for s in range(0, n, size)]
    return _balance(out, int(ray.cluster_resources().get("CPU", 1)))


def _makespan(sizes: list[int], cpus: int) -> int:
    """Rows on the busiest CPU when pieces go, largest first, to whichever CPU is free first
    (what Ray does with tasks submitted in ``_run``'s order)."""
    load = [0] * max(1, cpus)
    for n in sorted(sizes, reverse=True):
        heapq.heapreplace(load, load[0] + n)
    return max(load)


def _balance(pieces: list[tuple], cpus: int) -> list[tuple]:
    """Halve the largest piece while that shortens the busiest CPU's share by at least 0.5%:
    1M rows in 15 blocks of 65,536 and one of 16,960 gave one of 2 CPUs 8 full pieces and the
    other 7 and the short one, so it idled ~7% of every pass; halving one block brings the
    busiest share from 524,288 to 508,480 rows (the even split is 500,000). At most as many
    splits as there were pieces; pieces stay in block order."""
    pieces = list(pieces)
    best = _makespan([b - a for _, a, b in pieces], cpus)
    for _ in range(len(pieces)):
        i = max(range(len(pieces)), key=lambda j: pieces[j][2] - pieces[j][1])
        ref, a, b = pieces[i]
        if b - a < 2:
            break
        mid = (a + b + 1) // 2
        trial = pieces[:i] + [(ref, a, mid), (ref, mid, b)] + pieces[i + 1:]
        span = _makespan([y - x for _, x, y in trial], cpus)
        if span > 0.995 * best:
            break
        pieces, best = trial, span
    return pieces


def _run(pieces: list[tuple], fn, *args):
    """``fn`` on every piece (``args`` may hold object refs: each is fetched once per worker
    node, not sent with every task), submitted largest first (``_makespan``); the results in
    piece order, so that the driver's float64 additions happen in a fixed order whatever order
    the tasks finish in."""
    import ray

    remote = _task(_on_piece)
    order = sorted(range(len(pieces)), key=lambda i: pieces[i][1] - pieces[i][2])  # stable: largest first
    futures = [None] * len(pieces)
    for i in order:
        ref, start, stop = pieces[i]
        futures[i] = remote.remote(fn, ref, start, stop, *args)
    for f in futures:
        yield ray.get(f)


def _sample(pieces: list, n: int, column: str, seed: int, sample_size: int):
    """-> (sample vectors, weights, exact distinct count or None, mean feature variance)."""
    frac = 1.0
    if n > sample_size:  # ship about 2x the sample; a second, exact pass if that was too few
        frac = min(1.0, (2 * sample_size + 20 * np.sqrt(sample_size)) / n)
    while True:
        threshold = 2**64 - 1 if frac >= 1 else int(frac * 2**64)
        out = _run(pieces, sample_batch, column, seed, threshold, sample_size)
        keys, counts, vecs = np.zeros(0, np.uint64), np.zeros(0), None
        buf: list[tuple] = []  # batch results not merged yet: merged once they reach 2x the sample
        buffered = 0
        total, s, ss = 0, 0.0, 0.0
        for row in out:
            total += int(row["n"])
            s, ss = s + row["sum"], ss + row["sumsq"]
            if row["keys"].size == 0:
                continue
            buf.append((row["keys"], row["counts"], row["vectors"].reshape(row["keys"].size, -1)))
            buffered += row["keys"].size
            if buffered >= 2 * sample_size:
                keys, counts, vecs = _merge_sample(keys, counts, vecs, buf, sample_size)
                buf, buffered = [], 0
        if buf:
            keys, counts, vecs = _merge_sample(keys, counts, vecs, buf, sample_size)
        if len(keys) >= sample_size or frac >= 1:
            break
        frac = 1.0
    distinct = len(keys) if len(keys) < sample_size else None  # exact only below the cap
    var = float(np.mean(ss / total - (s / total) ** 2)) if total else 0.0
    return vecs, counts, distinct, max(var, 0.0)


def _merge_sample(keys, counts, vecs, buf: list[tuple], sample_size: int):
    """The ``sample_size`` smallest distinct keys of the kept sample and the buffered batches,
    each with its summed multiplicity and the vector of its first occurrence (kept sample
    first, then the batches in piece order). One np.unique over the lot instead of one per
    batch: at 1M rows the per-batch merges cost the driver 1.5 s of a 2 s sample."""
    all_keys = np.concatenate([keys] + [b[0] for b in buf])
    all_counts = np.concatenate([counts] + [b[1] for b in buf])
    u, first, inv = np.unique(all_keys, return_index=True, return_inverse=True)
    merged_counts = np.bincount(inv.ravel(), weights=all_counts)[:sample_size]
    sel = first[:sample_size]  # positions in [kept sample, batch 0, batch 1, ...]
    sources = ([vecs] if vecs is not None else []) + [b[2] for b in buf]
    starts = np.cumsum([0] + [len(v) for v in sources])
    which = np.searchsorted(starts, sel, side="right") - 1
    out = np.empty((len(sel), sources[0].shape[1]), np.float32)
    for i in np.unique(which):
        m = which == i
        out[m] = sources[i][sel[m] - starts[i]]
    return u[:sample_size], merged_counts, out


def _lloyd_pass(pieces: list, centroids: np.ndarray, column: str, backend: str):
    """One pass over the data for the given (R, k, d) centroids; partial results reduced here."""
    import ray

    R, k, d = centroids.shape
    n_far = min(k, _MAX_FAR)
    out = _run(pieces, lloyd_batch, ray.put(centroids), column, n_far, backend)
    sums, counts, inertia = np.zeros((R, k, d)), np.zeros((R, k), np.int64), np.zeros(R)
    far_d, far_x = np.full((R, n_far), -1.0), np.zeros((R, n_far, d), np.float32)
    for p in out:  # piece order: the float64 additions happen in a fixed order
        sums += p["sums"]
        counts += p["counts"]
        inertia += p["inertia"]
        cd = np.concatenate([far_d, p["far_d"]], axis=1)
        cx = np.concatenate([far_x, p["far_x"]], axis=1)
        best = np.argsort(-cd, axis=1, kind="stable")[:, :n_far]
        far_d = np.take_along_axis(cd, best, axis=1)
        far_x = np.take_along_axis(cx, best[:, :, None], axis=1)
    return sums, counts, inertia, far_d, far_x


def _update(old, sums, counts, far_d, far_x) -> np.ndarray:
    """New centroids = cluster means; an empty cluster takes the next farthest point."""
    new = old.copy()
    full = counts > 0
    new[full] = (sums[full] / counts[full, None]).astype(np.float32)
    empty = np.flatnonzero(~full)
    usable = np.flatnonzero(far_d > 0)  # farthest first; a point at distance 0 is no help
    for c, j in zip(empty, usable):
        new[c] = far_x[j]
    if len(empty):
        log.info("k-means: re-seeded %d empty cluster(s)", min(len(empty), len(usable)))
    return new


INIT_MIN_ROWS = 10_000  # the initialisation reads at least this many sample rows ...
INIT_ROWS_PER_CLUSTER = 20  # ... and at least this many per cluster


def init_rows(k: int, sample_rows: int, init_size: int | None = None) -> int:
    """Rows of the sample that k-means++ / k-means|| read: ``init_size`` when given, else
    max(10,000, 20 k). A greedy k-means++ step reads every row it is given (2 + log k distance
    columns), so its cost is rows x k x d: on the whole 100,000-row sample at k=1000, d=384 it
    took 25 s, longer than four Lloyd passes over 1M rows; 20 rows per cluster are plenty to
    place k seeds (faiss seeds from k random points). Small inputs are unchanged: a sample of
    at most 10,000 distinct rows is read whole."""
    m = init_size if init_size is not None else max(INIT_MIN_ROWS, INIT_ROWS_PER_CLUSTER * k)
    return min(sample_rows, max(int(m), k))


def _sample_cap(k: int, sample_size: int, init, init_size: int | None) -> int:
    """Distinct rows the sample pass keeps: what the initialisation reads (``init_rows`` of a
    ``max(sample_size, k)`` sample), or k when the centroids are given (the sample then only
    checks that there are at least k distinct vectors). The sample is the smallest keys in key
    order, so its head is the same rows whatever the cap; a larger cap only shipped more vectors
    to the driver (at 1M x 384, k=1000: 200,000 of them, most of a 2.4 s sample pass)."""
    if not isinstance(init, str):
        return k
    return init_rows(k, max(sample_size, k), init_size)


def fit_kmeans(ds, n_clusters: int, **kwargs) -> KMeansResult:
    """k-means with ``n_init`` restarts over a Ray Dataset; the lowest inertia wins (see
    ``_fit``). The dataset is materialised once without a progress bar (on the dataset's own
    context; Ray's global DataContext is left as it was); every pass is plain Ray tasks over
    its blocks, reduced in piece order."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars
    try:
        return _fit(ds, n_clusters, **kwargs)
    finally:
        ctx.enable_progress_bars = saved


def _fit(
    ds,
    n_clusters: int,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: str | np.ndarray = "k-means++",
    sample_size: int = 100_000,
    init_size: int | None = None,
    batch_size: int = 65_536,
    seed: int = 0,
    column: str = "vector",
    backend: str = "auto",
    final_pass: bool = True,
) -> KMeansResult:
    """k-means with ``n_init`` restarts over a Ray Dataset; the lowest inertia wins.

    ``init`` may also be an array of initial centroids, (k, d) or (n_init, k, d). ``backend``:
    how a block finds the nearest centroids, ``auto`` | ``faiss`` | ``numpy`` (module docstring).
    ``init_size``: sample rows the initialisation reads (default ``init_rows``).
    ``final_pass=False`` with one restart: no pass after the last update only to measure the
    final inertia (``inertia`` is then NaN and ``sizes`` None), for a caller whose next pass
    (``assign``) measures it anyway; the centroids are the same. With several restarts the
    winner needs every final inertia, so the measuring pass runs whatever ``final_pass`` says."""
    k = int(n_clusters)
    if k < 1 or n_init < 1 or max_iter < 1:
        raise ValueError("n_clusters, n_init and max_iter must be >= 1")
    backend = resolve_backend(backend, k)
    ds.context.enable_progress_bars = False
    ds = ds.materialize()  # every pass reads the object store, not the source files
    pieces = _pieces(ds, batch_size)
    n = sum(stop - start for _, start, stop in pieces)
    if n == 0:
        raise ValueError("empty dataset: there are no vectors to cluster")
    t0 = time.perf_counter()
    sample, weights, distinct, var = _sample(pieces, n, column, seed, _sample_cap(k, sample_size, init, init_size))
    if distinct is not None and k > distinct:
        raise ValueError(
            f"n_clusters={k} but only {distinct} prompts (distinct vectors, of {n} rows) to cluster; "
            f"lower cluster.n_clusters"
        )
    tol_abs = tol * var
    t1 = time.perf_counter()
    if isinstance(init, str):
        if init not in ("k-means++", "k-means||"):
            raise ValueError(f"init must be 'k-means++' or 'k-means||', not {init!r}")
        pick = kmeans_plusplus if init == "k-means++" else kmeans_parallel
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_init)]
        m = init_rows(k, len(sample), init_size)  # the sample is in key order: its head is uniform too
        C = np.stack([pick(sample[:m], weights[:m], k, rng) for rng in rngs])
    else:
        C = np.asarray(init, np.float32)
        C = np.broadcast_to(C, (n_init, *C.shape)).copy() if C.ndim == 2 else C.copy()
        if C.shape[:2] != (n_init, k) or C.shape[2] != sample.shape[1]:
            raise ValueError(f"init array has shape {C.shape}, expected ({n_init}, {k}, {sample.shape[1]})")
    del sample, weights
    log.debug("k-means: %d rows, k=%d, %d restart(s), init %s, backend %s", n, k, n_init,
              init if isinstance(init, str) else "given", backend)

    t2 = time.perf_counter()
    n_iters, inertias = [0] * n_init, [np.inf] * n_init
    sizes: list = [None] * n_init
    done = [False] * n_init  # converged: the next pass only measures the final inertia
    active = list(range(n_init))
    skip_measure = not final_pass and n_init == 1
    passes = 0
    while active:
        passes += 1
        sums, counts, inertia, far_d, far_x = _lloyd_pass(pieces, C[active], column, backend)
        still = []
        for j, r in enumerate(active):
            inertias[r], sizes[r] = float(inertia[j]), counts[j]
            if done[r]:
                continue
            new = _update(C[r], sums[j], counts[j], far_d[j], far_x[j])
            shift = float(((new.astype(np.float64) - C[r]) ** 2).sum())
            C[r] = new
            n_iters[r] += 1
            done[r] = shift <= tol_abs or n_iters[r] >= max_iter
            if done[r] and skip_measure:
                inertias[r], sizes[r] = float("nan"), None
                continue
            still.append(r)
        log.debug(
            "k-means pass %d: inertia %s (restarts %s); %d of %d restart(s) need another pass",
            passes, [round(float(i), 4) for i in inertia], active, len(still), n_init,
        )
        active = still
    best = 0 if skip_measure else int(np.argmin(inertias))
    return KMeansResult(
        centroids=C[best].copy(),
        inertia=inertias[best],
        n_iter=n_iters[best],
        inertias=inertias,
        best_init=best,
        n_iters=n_iters,
        sizes=None if sizes[best] is None else np.asarray(sizes[best]),
        n_samples=n,
        backend=backend,
        passes=passes,
        seconds={"sample": round(t1 - t0, 3), "init": round(t2 - t1, 3), "lloyd": round(time.perf_counter() - t2, 3)},
    )


def assign(ds, centroids: np.ndarray, batch_size: int = 65_536, column: str = "vector", backend: str = "auto"):
    """``ds`` plus ``cluster`` (int32, nearest centroid) and ``distance`` (float32, squared)."""
    centroids = np.asarray(centroids, np.float32)
    return ds.map_batches(
        assign_batch,
        fn_kwargs={"centroids": centroids, "column": column, "backend": resolve_backend(backend, len(centroids))},
        batch_format="pyarrow",
        batch_size=batch_size,
    )
