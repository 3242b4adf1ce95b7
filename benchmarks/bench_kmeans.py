"""Benchmark: hetray's distributed k-means vs scikit-learn KMeans and faiss.Kmeans, same data.

    python benchmarks/bench_kmeans.py            # 200k and 1M vectors, k=10 and k=1000 (~25 min, 2 cores)
    python benchmarks/bench_kmeans.py --quick    # 20k and 50k vectors, k=10 and k=100 (a smoke run)

Data: normalised 384-d vectors (the all-MiniLM-L6-v2 width) drawn around 64 random unit
centres with Gaussian noise about as large as the centres, so the blobs overlap the way
sentence embeddings do. hetray reads them from a Ray Dataset (``ray.data.from_numpy`` in
blocks of 65,536 rows, local Ray with 2 CPUs); scikit-learn and faiss get the in-memory array.

Per configuration all three use the same ``n_init`` and ``max_iter`` (printed with the
results). scikit-learn and hetray stop earlier when the centroids move less than tol=1e-4
(relative); faiss has no tolerance and always runs ``max_iter`` iterations. faiss's default
subsampling (256 points per centroid) is switched off so it trains on the same n points.
The inertia of every result is measured the same way (exact nearest-centroid search with
faiss.IndexFlatL2, summed in float64), outside the timings.

Driver memory: for hetray the peak of Python/numpy allocations in the driver while fitting
(tracemalloc) and the peak RSS growth; for the others the RSS growth while fitting (their
input array is already resident). hetray's driver holds the initialisation sample and
O(n_init*k*d) partial sums, so its peak should not grow with n.

Results: benchmarks/results/bench_kmeans.{json,md} (``--quick``: bench_kmeans_quick.*).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import write_results  # noqa: E402

D, BLOBS, NOISE, BLOCK, SAMPLE = 384, 64, 0.05, 65_536, 100_000


def make_data(n: int, seed: int = 0) -> np.ndarray:
    """n unit vectors around BLOBS random unit centres (float32, generated in chunks)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((BLOBS, D), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, D), np.float32)
    for i in range(0, n, BLOCK):
        m = min(BLOCK, n - i)
        part = centres[rng.integers(BLOBS, size=m)] + NOISE * rng.standard_normal((m, D), dtype=np.float32)
        x[i : i + m] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def plan(n: int, quick: bool) -> list[dict]:
    """The configurations for one size; every cap is stated in the config itself."""
    if quick:
        return [
            {"k": 10, "n_init": 10, "max_iter": 25},
            {"k": 100, "n_init": 1, "max_iter": 10},
        ]
    big = {"k": 1000, "n_init": 1, "max_iter": 10}
    if n > 200_000:  # 1M x k=1000: ~0.8 TFLOP per iteration per library on 2 cores
        big = {
            "k": 1000, "n_init": 1, "max_iter": 3, "sklearn_init": "k-means++ on a 100k subsample",
            "note": "capped at 3 iterations (each ~0.8 TFLOP); scikit-learn's k-means++ on all 1M "
            "points alone would cost ~7 TFLOP, so it is initialised on a 100k subsample like hetray",
        }
    return [{"k": 10, "n_init": 10, "max_iter": 25}, big]


class Peak:
    """Peak RSS growth of this process while the block runs (sampled every 20 ms), and with
    ``trace=True`` the tracemalloc peak of Python/numpy allocations."""

    def __init__(self, trace: bool = False):
        self.trace, self.proc = trace, psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if self.trace:
            tracemalloc.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.traced = tracemalloc.get_traced_memory()[1] if self.trace else None
        if self.trace:
            tracemalloc.stop()
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def result(self) -> dict:
        out = {"wall_s": round(self.wall, 2), "rss_delta_mib": round((self.peak - self.base) / 2**20, 1)}
        if self.traced is not None:
            out["traced_peak_mib"] = round(self.traced / 2**20, 1)
        return out


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Exact sum of squared distances to the nearest centroid, the same yardstick for all."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    total = 0.0
    for i in range(0, len(x), BLOCK):
        dist, _ = index.search(x[i : i + BLOCK], 1)
        total += float(dist.sum(dtype=np.float64))
    return total


def run_hetray(ds, cfg) -> dict:
    from hetray.selection.kmeans import fit_kmeans

    with Peak(trace=True) as p:
        res = fit_kmeans(ds, cfg["k"], n_init=cfg["n_init"], max_iter=cfg["max_iter"], sample_size=SAMPLE, column="data")
    return {**p.result(), "n_iter": res.n_iter, "centroids": res.centroids}


THREADS = 2  # threads for scikit-learn and faiss: the 2 CPUs hetray's local Ray gets


def run_sklearn(x, cfg) -> dict:
    from sklearn.cluster import KMeans, kmeans_plusplus
    from threadpoolctl import threadpool_limits

    with Peak() as p, threadpool_limits(THREADS):
        init = "k-means++"
        if cfg.get("sklearn_init"):
            sub = x[np.random.default_rng(0).choice(len(x), SAMPLE, replace=False)]
            init, _ = kmeans_plusplus(sub, cfg["k"], random_state=0)
        km = KMeans(n_clusters=cfg["k"], n_init=cfg["n_init"], max_iter=cfg["max_iter"], init=init, random_state=0)
        km.fit(x)
    return {**p.result(), "n_iter": int(km.n_iter_), "centroids": km.cluster_centers_}


def run_faiss(x, cfg) -> dict:
    import faiss

    k = cfg["k"]
    faiss.omp_set_num_threads(THREADS)
    with Peak() as p:
        km = faiss.Kmeans(
            x.shape[1], k, niter=cfg["max_iter"], nredo=cfg["n_init"], seed=1234,
            max_points_per_centroid=len(x) // k + 1, verbose=False,
        )
        km.train(x)
    return {**p.result(), "n_iter": cfg["max_iter"], "centroids": km.centroids}


def bench(n: int, quick: bool) -> list[dict]:
    import ray

    t0 = time.perf_counter()
    x = make_data(n)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = ray.data.from_numpy([x[i : i + BLOCK] for i in range(0, n, BLOCK)])
    put_s = time.perf_counter() - t0
    print(f"n={n:,}: generated in {gen_s:.1f}s, put into the object store in {put_s:.1f}s", flush=True)
    rows = []
    for cfg in plan(n, quick):
        row = {"n": n, "d": D, "data_mib": round(x.nbytes / 2**20, 1), **cfg}
        for name, fn in (("hetray", lambda: run_hetray(ds, cfg)), ("sklearn", lambda: run_sklearn(x, cfg)), ("faiss", lambda: run_faiss(x, cfg))):
            load = os.getloadavg()[0]
            r = fn()
            r["load_avg_1m"] = round(max(load, os.getloadavg()[0]), 1)
            r["inertia"] = inertia(x, r.pop("centroids"))
            row[name] = r
            print(f"  k={cfg['k']} {name}: {json.dumps(r)}", flush=True)
        h, s, f = row["hetray"], row["sklearn"], row["faiss"]
        row["inertia_hetray_over_sklearn"] = round(h["inertia"] / s["inertia"], 5)
        row["inertia_hetray_over_faiss"] = round(h["inertia"] / f["inertia"], 5)
        row["time_hetray_over_sklearn"] = round(h["wall_s"] / s["wall_s"], 3)
        row["time_hetray_over_faiss"] = round(h["wall_s"] / f["wall_s"], 3)
        rows.append(row)
    del ds
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| n | k | n_init | max_iter | hetray s | sklearn s | faiss s | time hetray/sklearn | time hetray/faiss "
        "| inertia hetray/sklearn | inertia hetray/faiss | iterations (h/s/f) | hetray driver peak MiB (traced / RSS) "
        "| sklearn RSS MiB | faiss RSS MiB |\n" + "|---" * 15 + "|\n"
    )
    lines = []
    for r in rows:
        h, s, f = r["hetray"], r["sklearn"], r["faiss"]
        lines.append(
            f"| {r['n']:,} | {r['k']} | {r['n_init']} | {r['max_iter']} | {h['wall_s']} | {s['wall_s']} | {f['wall_s']} "
            f"| {r['time_hetray_over_sklearn']} | {r['time_hetray_over_faiss']} | {r['inertia_hetray_over_sklearn']} "
            f"| {r['inertia_hetray_over_faiss']} | {h['n_iter']}/{s['n_iter']}/{f['n_iter']} "
            f"| {h['traced_peak_mib']} / {h['rss_delta_mib']} | {s['rss_delta_mib']} | {f['rss_delta_mib']} |"
        )
    notes = sorted({f"- n={r['n']:,}, k={r['k']}: {r['note']}" for r in rows if r.get("note")})
    return (
        head + "\n".join(lines) + "\n\n"
        f"Data: normalised {D}-d vectors around {BLOBS} random unit centres (noise sd {NOISE} per dimension). "
        "Same n_init and max_iter for all three in a row; hetray and scikit-learn stop early at tol=1e-4, "
        "faiss always runs max_iter iterations and trains on all n points (subsampling off). "
        f"hetray initialises on a {SAMPLE:,}-row sample (k-means++), scikit-learn on all points, faiss at random. "
        "Inertia: exact nearest-centroid search (faiss.IndexFlatL2), float64 sum. "
        "Driver peak: hetray's tracemalloc peak (Python + numpy allocations) and RSS growth while fitting; "
        "the others' RSS growth while fitting (the input array is already resident and not counted). "
        f"scikit-learn and faiss ran with {THREADS} thread(s), hetray on a local Ray with 2 CPUs. "
        "Load average (1 min) during each fit: " + ", ".join(
            f"{r['n']:,}/k={r['k']}: {r['hetray']['load_avg_1m']}/{r['sklearn']['load_avg_1m']}/{r['faiss']['load_avg_1m']}"
            for r in rows
        ) + " (hetray/sklearn/faiss; above 2 means other processes competed for the 2 cores).\n"
        + ("\n" + "\n".join(notes) + "\n" if notes else "")
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (20k and 50k vectors)")
    p.add_argument("--sizes", type=int, nargs="*", help="numbers of vectors (default 200k and 1M)")
    p.add_argument("--threads", type=int, default=2, help="threads for scikit-learn and faiss (default 2)")
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    sizes = args.sizes or ([20_000, 50_000] if args.quick else [200_000, 1_000_000])
    logging.basicConfig(level=logging.WARNING)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = []
    name = "bench_kmeans_quick" if args.quick else "bench_kmeans"
    meta = {"threads_sklearn_faiss": THREADS, "ray_cpus": 2, "sample_size": SAMPLE}
    for n in sizes:
        rows.extend(bench(n, args.quick))
        path = write_results(name, {**meta, "runs": rows}, markdown(rows))  # after every size: partial results survive
    ray.shutdown()
    print(markdown(rows))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
