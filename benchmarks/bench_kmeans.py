"""Benchmark: hetray's distributed k-means (each backend) vs scikit-learn KMeans and faiss.Kmeans, same data.

    python benchmarks/bench_kmeans.py            # 200k and 1M vectors, k=10 and k=1000 (~40 min quiet, 2 cores)
    python benchmarks/bench_kmeans.py --quick    # 20k and 50k vectors, k=10 and k=300 (a smoke run)

Data: normalised 384-d vectors (the all-MiniLM-L6-v2 width) drawn around 64 random unit
centres with Gaussian noise about as large as the centres, so the blobs overlap the way
sentence embeddings do. hetray reads them from a materialised Ray Dataset (``ray.data.from_numpy``
in blocks of 65,536 rows, materialised before the timed fits as the cluster stage materialises
its read before it fits; local Ray with 2 CPUs), once per backend (``numpy``, ``faiss``; the
default ``auto`` picks faiss from k=256 up); scikit-learn and faiss get the in-memory array.

Per configuration all use the same ``n_init`` and ``max_iter`` (printed with the results).
scikit-learn and hetray stop earlier when the centroids move less than tol=1e-4 (relative);
faiss has no tolerance and always runs ``max_iter`` iterations. faiss's default subsampling
(256 points per centroid) is switched off so it trains on the same n points. The inertia of
every result is measured the same way (exact nearest-centroid search with faiss.IndexFlatL2,
summed in float64), outside the timings. hetray's time is split into its sample pass, its
k-means++ initialisation on the sample, and its Lloyd passes, run as the cluster stage runs
them (``final_pass=False``): one per update, and with several restarts one more that measures
every restart's final inertia to pick the winner (with one restart the stage's assign pass
measures it, as faiss leaves it to a search after training); "s/pass" and faiss's "s/iter"
compare one pass over the data each.

Driver memory: the growth of the traced peak of Python/numpy allocations while fitting
(tracemalloc) and of the peak RSS; hetray's driver holds the initialisation sample and
O(n_init*k*d) partial sums, so its peak should not grow with n.

BLAS: faiss, in hetray's tasks and for the baseline, is imported through
``hetray.selection.blas.import_faiss``, so both run the same OpenBLAS kernels (faiss-cpu's
bundled OpenBLAS 0.3.15 runs its SSE3 "Prescott" kernels on a CPU newer than it, such as a
Sapphire Rapids Xeon, unless told otherwise; ``bench_blas.py`` measures that). The results record
the core type every loaded BLAS ran.

Crash fix (issue 14): tracemalloc is started once, before Ray starts, and never stopped while
Ray runs. The old benchmark started and stopped it around every hetray fit; on Python < 3.12.9
/ 3.13.2 ``tracemalloc.stop()`` races with a thread that is waiting for the GIL inside
tracemalloc's raw-allocation hook (CPython gh-128679): Ray's core-worker thread
("worker.user_obj") calls into Python for every object that goes out of scope, allocating a
thread state each time, and then dereferences the traceback buffer stop() has just freed
(SIGSEGV in ``traceback_new``). tests/selection/test_kmeans_bench_setup.py runs this set-up
repeatedly in one process.

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

from hetray.selection.blas import import_faiss  # noqa: E402

D, BLOBS, NOISE, BLOCK, SAMPLE = 384, 64, 0.05, 65_536, 100_000
BACKENDS = ("numpy", "faiss")
THREADS = 2  # threads for scikit-learn and faiss: the 2 CPUs hetray's local Ray gets
REPEAT = 1  # rounds of every run (--repeat); ratios are the median of the rounds' paired ratios


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
        return [{"k": 10, "n_init": 10, "max_iter": 25}, {"k": 300, "n_init": 1, "max_iter": 10}]
    big = {"k": 1000, "n_init": 1, "max_iter": 10}
    if n > 200_000:  # 1M x k=1000: ~0.8 TFLOP per iteration per library on 2 cores
        big = {"k": 1000, "n_init": 1, "max_iter": 20, "sklearn": False,
               "note": "scikit-learn left out: its k-means++ on all 1M points alone is ~7 TFLOP (3 iterations "
                       "took 446 s in an earlier run); its inertia is compared at 200k, k=1000"}
    return [{"k": 10, "n_init": 10, "max_iter": 25}, big]


class Peak:
    """Wall time, peak RSS growth (sampled every 20 ms) and, when tracemalloc is running, the
    growth of its traced peak while the block runs. tracemalloc is never started or stopped
    here (see the module docstring): ``reset_peak`` only moves the peak to the current size."""

    def __init__(self):
        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.traced0 = None
        if tracemalloc.is_tracing():
            tracemalloc.reset_peak()
            self.traced0 = tracemalloc.get_traced_memory()[0]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.traced = tracemalloc.get_traced_memory()[1] - self.traced0 if self.traced0 is not None else None
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def result(self) -> dict:
        # 4 decimals: a small fit (the test's 3,000 x 8) takes a few ms, and a ratio over a rounded 0.0 is no ratio
        out = {"wall_s": round(self.wall, 4), "rss_delta_mib": round((self.peak - self.base) / 2**20, 1)}
        if self.traced is not None:
            out["traced_peak_mib"] = round(self.traced / 2**20, 1)
        return out


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Exact sum of squared distances to the nearest centroid, the same yardstick for all."""
    faiss = import_faiss()

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    total = 0.0
    for i in range(0, len(x), BLOCK):
        dist, _ = index.search(x[i : i + BLOCK], 1)
        total += float(dist.sum(dtype=np.float64))
    return total


def run_hetray(ds, cfg, backend: str) -> dict:
    from hetray.selection.kmeans import fit_kmeans

    with Peak() as p:
        res = fit_kmeans(ds, cfg["k"], n_init=cfg["n_init"], max_iter=cfg["max_iter"], sample_size=SAMPLE,
                         column="data", backend=backend, final_pass=False)  # as the cluster stage runs it
    s = res.seconds
    return {**p.result(), "n_iter": res.n_iter, "passes": res.passes, "sample_s": s["sample"], "init_s": s["init"],
            "lloyd_s": s["lloyd"], "s_per_pass": round(s["lloyd"] / res.passes, 3), "centroids": res.centroids}


def run_sklearn(x, cfg) -> dict:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with Peak() as p, threadpool_limits(THREADS):
        km = KMeans(n_clusters=cfg["k"], n_init=cfg["n_init"], max_iter=cfg["max_iter"], random_state=0)
        km.fit(x)
    return {**p.result(), "n_iter": int(km.n_iter_), "centroids": km.cluster_centers_}


def run_faiss(x, cfg) -> dict:
    faiss = import_faiss()  # the baseline runs the BLAS kernels hetray's tasks run

    k = cfg["k"]
    faiss.omp_set_num_threads(THREADS)
    with Peak() as p:
        km = faiss.Kmeans(
            x.shape[1], k, niter=cfg["max_iter"], nredo=cfg["n_init"], seed=1234,
            max_points_per_centroid=len(x) // k + 1, verbose=False,
        )
        km.train(x)
    r = p.result()
    return {**r, "n_iter": cfg["max_iter"], "s_per_iter": round(r["wall_s"] / (cfg["max_iter"] * cfg["n_init"]), 4),
            "centroids": km.centroids}


def start(num_cpus: int = 2) -> None:
    """The benchmark's process set-up: tracemalloc first (no Ray thread exists yet), then a
    local Ray whose object store is capped (the machine may be shared), then a warm-up."""
    import ray

    tracemalloc.start()
    from hetray.orchestrate.ray_init import set_worker_env  # as init_ray: Arrow's thread pool left alone

    set_worker_env()
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=3 * 2**30, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # warm-up, not timed: Ray's workers start and import numpy/faiss before the first timed fit
    from hetray.selection.kmeans import fit_kmeans

    small = ray.data.from_numpy(np.array_split(make_data(8192, seed=1), 4))
    for backend in BACKENDS:
        fit_kmeans(small, 2, n_init=1, max_iter=1, batch_size=2048, column="data", backend=backend)


def finish() -> None:
    """Ray down first (its threads call into Python), then tracemalloc may stop."""
    import ray

    ray.shutdown()
    tracemalloc.stop()


def bench(n: int, configs: list[dict], backends=BACKENDS) -> list[dict]:
    import ray

    t0 = time.perf_counter()
    x = make_data(n)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # materialised before the fits, as the cluster stage materialises its read before it fits:
    # a fit then starts from blocks in the object store, as faiss starts from the array in memory
    ds = ray.data.from_numpy([x[i : i + BLOCK] for i in range(0, n, BLOCK)]).materialize()
    put_s = time.perf_counter() - t0
    print(f"n={n:,}: generated in {gen_s:.1f}s, put into the object store and materialised in {put_s:.1f}s", flush=True)
    rows = []
    for cfg in configs:
        row = {"n": n, "d": D, "data_mib": round(x.nbytes / 2**20, 1), **cfg}
        runs = [(f"hetray_{b}", lambda b=b: run_hetray(ds, cfg, b)) for b in backends]
        if cfg.get("sklearn", True):
            runs.append(("sklearn", lambda: run_sklearn(x, cfg)))
        runs.append(("faiss", lambda: run_faiss(x, cfg)))
        done: dict[str, list] = {name: [] for name, _ in runs}
        for rep in range(REPEAT):  # rounds: every run once per round, in the same order
            for name, fn in runs:
                load = os.getloadavg()[0]
                r = fn()
                r["load_avg_1m"] = round(max(load, os.getloadavg()[0]), 1)
                r["inertia"] = inertia(x, r.pop("centroids"))
                done[name].append(r)
                print(f"  k={cfg['k']} round {rep + 1}/{REPEAT} {name}: {json.dumps(r)}", flush=True)
        for name, rs in done.items():  # the run of median wall time stands for the name; all are kept
            row[name] = {**sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2],
                         "walls": [r["wall_s"] for r in rs], "loads": [r["load_avg_1m"] for r in rs]}
        for b in backends:
            hs = done[f"hetray_{b}"]
            h = row[f"hetray_{b}"]
            for ref in ("sklearn", "faiss"):
                if ref in done:  # "sklearn": False in a config means left out
                    ratios = [a["wall_s"] / z["wall_s"] for a, z in zip(hs, done[ref])]  # paired by round
                    row[f"time_{b}_over_{ref}"] = round(float(np.median(ratios)), 3)
                    row[f"time_{b}_over_{ref}_rounds"] = [round(v, 3) for v in ratios]
                    row[f"inertia_{b}_over_{ref}"] = round(h["inertia"] / row[ref]["inertia"], 5)
            ratios = [a["s_per_pass"] / max(z["s_per_iter"], 1e-9) for a, z in zip(hs, done["faiss"])]
            row[f"pass_{b}_over_faiss_iter"] = round(float(np.median(ratios)), 3)
            row[f"pass_{b}_over_faiss_iter_rounds"] = [round(v, 3) for v in ratios]
        rows.append(row)
    del ds
    return rows


def _cell(r: dict, key: str, fmt=str) -> str:
    return fmt(r[key]) if key in r else "-"


def _rounds(r: dict, key: str) -> str:
    """A ratio, with every round's paired ratio when there were several."""
    rounds = r.get(f"{key}_rounds", [])
    return _cell(r, key) + (f" ({', '.join(map(str, rounds))})" if len(rounds) > 1 else "")


def _walls(x: dict) -> str:
    walls = x.get("walls", [])
    return str(x["wall_s"]) + (f" ({', '.join(map(str, walls))})" if len(walls) > 1 else "")


def _loads(x: dict) -> str:
    loads = x.get("loads", [])
    return f"{min(loads)}-{max(loads)}" if len(loads) > 1 else str(x["load_avg_1m"])


def markdown(rows: list[dict], backends=BACKENDS) -> str:
    head = (
        "| n | k | n_init | max_iter | run | wall s | time / faiss | time / sklearn | inertia / sklearn | inertia / faiss "
        "| iterations | passes | sample / init / Lloyd s | s per pass (faiss: per iteration) | pass / faiss iteration "
        "| driver peak MiB (traced / RSS) | load 1m |\n" + "|---" * 17 + "|\n"
    )
    lines = []
    for r in rows:
        for name in [f"hetray_{b}" for b in backends] + ["sklearn", "faiss"]:
            if not isinstance(r.get(name), dict):
                continue
            x = r[name]
            b = name.removeprefix("hetray_")
            is_h = name.startswith("hetray_")
            lines.append(
                f"| {r['n']:,} | {r['k']} | {r['n_init']} | {r['max_iter']} | {name} | {_walls(x)} "
                f"| {_rounds(r, f'time_{b}_over_faiss') if is_h else '-'} | {_rounds(r, f'time_{b}_over_sklearn') if is_h else '-'} "
                f"| {_cell(r, f'inertia_{b}_over_sklearn') if is_h else '-'} | {_cell(r, f'inertia_{b}_over_faiss') if is_h else '-'} "
                f"| {x['n_iter']} | {x.get('passes', '-')} "
                f"| {str(x['sample_s']) + ' / ' + str(x['init_s']) + ' / ' + str(x['lloyd_s']) if is_h else '-'} "
                f"| {x.get('s_per_pass', x.get('s_per_iter', '-'))} | {_rounds(r, f'pass_{b}_over_faiss_iter') if is_h else '-'} "
                f"| {x.get('traced_peak_mib', '-')} / {x['rss_delta_mib']} | {_loads(x)} |"
            )
    notes = sorted({f"- n={r['n']:,}, k={r['k']}: {r['note']}" for r in rows if r.get("note")})
    return (
        head + "\n".join(lines) + "\n\n"
        f"Data: normalised {D}-d vectors around {BLOBS} random unit centres (noise sd {NOISE} per dimension). "
        "Same n_init and max_iter for every run in a row; hetray and scikit-learn stop early at tol=1e-4, "
        "faiss always runs max_iter iterations and trains on all n points (subsampling off). "
        "hetray fits a Dataset already materialised in the object store (as the cluster stage hands it over; not "
        "timed, as faiss's array is already in memory). "
        f"hetray draws a {SAMPLE:,}-row sample and initialises on its first max(10,000, 20 k) rows (k-means++), scikit-learn on all points, faiss at random. "
        "hetray_numpy / hetray_faiss: `cluster.backend` numpy / faiss (the default `auto` is numpy below k=256, "
        "faiss from 256 up). hetray's passes = updates, + 1 with several restarts (a pass that measures every final "
        "inertia to pick the winner; with one restart the cluster stage's assign pass measures it, as for faiss). "
        "s per pass: one pass over the data; a hetray pass serves every active restart at once, a faiss "
        "iteration one restart (its s per iteration = wall / (max_iter x n_init)), so pass / faiss iteration "
        "compares like with like only at n_init=1. "
        "Inertia: exact nearest-centroid search (faiss.IndexFlatL2), float64 sum. "
        "Driver peak: growth of tracemalloc's peak (Python + numpy allocations; tracemalloc runs for the whole "
        "process) and of the RSS while fitting; the input array is already resident and not counted. "
        f"scikit-learn and faiss ran with {THREADS} thread(s), hetray on a local Ray with 2 CPUs "
        "(2 tasks x 1 faiss/BLAS thread). "
        f"Rounds: {REPEAT} (every run once per round, same order); with more than one, wall s is the median run's "
        "(each round's in brackets), time / faiss and pass / faiss iteration are medians of the ratios paired within a "
        "round (each round's in brackets), the other columns are the median run's, load is the range. "
        "Load 1m: the 1-minute load average during the run "
        "(above 2 means other processes competed for the 2 cores). BLAS kernels (threadpoolctl's core type, "
        f"the driver's libraries; hetray's tasks import faiss the same way): {blas_line()}.\n"
        + ("\n" + "\n".join(notes) + "\n" if notes else "")
    )


def blas_line() -> str:
    return ", ".join(f"{t['file']} {t['version']} {t['core']}" for t in threadpools() if t["api"] == "openblas") or "-"


def threadpools() -> list[dict]:
    """The BLAS / OpenMP runtimes loaded in this process (threadpoolctl), for the record."""
    from threadpoolctl import threadpool_info

    return [{"api": i["internal_api"], "prefix": i["prefix"], "file": Path(i["filepath"]).name,
             "version": i.get("version"), "core": i.get("architecture"), "threads": i["num_threads"]} for i in threadpool_info()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run (20k and 50k vectors, k=10 and k=300)")
    p.add_argument("--sizes", type=int, nargs="*", help="numbers of vectors (default 200k and 1M)")
    p.add_argument("--threads", type=int, default=2, help="threads for scikit-learn and faiss (default 2)")
    p.add_argument("--k", type=int, nargs="*", help="run only the configurations with these k (default: all)")
    p.add_argument("--backends", nargs="*", choices=BACKENDS, default=list(BACKENDS),
                   help="hetray backends to run (default: both)")
    p.add_argument("--max-iter", type=int, help="override every configuration's max_iter (same cap for all runs)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every run, in the same order each round; a ratio is the median of the rounds' paired "
                        "ratios, and a row's other columns are those of its median-time run (default 1)")
    args = p.parse_args()
    global THREADS, REPEAT
    THREADS, REPEAT = args.threads, max(1, args.repeat)
    sizes = args.sizes or ([20_000, 50_000] if args.quick else [200_000, 1_000_000])
    logging.basicConfig(level=logging.WARNING)
    start()
    rows = []
    name = "bench_kmeans_quick" if args.quick else "bench_kmeans"
    meta = {"repeat": REPEAT, "threads_sklearn_faiss": THREADS, "ray_cpus": 2, "sample_size": SAMPLE, "python": sys.version.split()[0]}
    for n in sizes:
        configs = [c for c in plan(n, args.quick) if not args.k or c["k"] in args.k]
        if args.max_iter:
            configs = [{**c, "max_iter": args.max_iter} for c in configs]
        rows.extend(bench(n, configs, tuple(args.backends)))
        meta["threadpools"] = threadpools()  # after every size: partial results survive
        path = write_results(name, {**meta, "runs": rows}, markdown(rows, tuple(args.backends)))
    finish()
    print(markdown(rows, tuple(args.backends)))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
