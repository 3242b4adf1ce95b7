"""Benchmark: faiss's nearest-centroid search as installed vs through hetray.selection.blas.import_faiss.

    python benchmarks/bench_blas.py        # ~1 min on 2 cores

faiss-cpu's wheel bundles OpenBLAS 0.3.15, which runs its SSE3 ("Prescott") kernels on a CPU
model newer than it (OpenMathLib/OpenBLAS#3453); ``import_faiss`` loads it with the core type
numpy's own OpenBLAS detected (hetray/selection/blas.py). Each variant runs in a fresh process
(the core type is fixed when the library loads), on one thread, the k-means pass's workload:
``IndexFlatL2.search(x, 1)`` of 65,536 x 384 float32 rows against 1,000 centroids, and numpy's
``x @ c.T`` of the same shapes as the yardstick of what the CPU does with a current OpenBLAS.
Each time is the median of 5 runs after one warm-up; the two variants alternate, 3 rounds.

Results: benchmarks/results/bench_blas.{json,md}.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROUNDS = 3

PROBE = r"""
import json, sys, time
import numpy as np
from hetray.selection.blas import blas_cores, import_faiss
if sys.argv[1] == "as-installed":
    import faiss
else:
    faiss = import_faiss()
faiss.omp_set_num_threads(1)
rng = np.random.default_rng(0)
x = rng.standard_normal((65536, 384), dtype=np.float32)
c = rng.standard_normal((1000, 384), dtype=np.float32)
index = faiss.IndexFlatL2(384)
index.add(c)

def median(f):
    f()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[2]

cores = {("faiss" if "faiss" in p else "numpy" if "numpy" in p else p): v for p, v in blas_cores().items()}
print(json.dumps({"search_s": median(lambda: index.search(x, 1)), "numpy_matmul_s": median(lambda: x @ c.T),
                  "cores": cores}))
"""


def run(variant: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("OPENBLAS_CORETYPE", None)
    out = subprocess.run([sys.executable, "-c", PROBE, variant], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    runs = {"as-installed": [], "import_faiss": []}
    for _ in range(ROUNDS):
        for variant in runs:
            runs[variant].append(run(variant))
            print(variant, runs[variant][-1], flush=True)
    med = {v: statistics.median(r["search_s"] for r in rs) for v, rs in runs.items()}
    numpy_s = statistics.median(r["numpy_matmul_s"] for rs in runs.values() for r in rs)
    result = {
        "rounds": ROUNDS,
        "runs": runs,
        "search_s": med,
        "numpy_matmul_s": numpy_s,
        "speedup": round(med["as-installed"] / med["import_faiss"], 3),
        "import_faiss_over_numpy": round(med["import_faiss"] / numpy_s, 3),
    }
    lines = [
        "| import | faiss's OpenBLAS core | numpy's OpenBLAS core | search s (median) | search / numpy matmul | load 1m |",
        "|---|---|---|---|---|---|",
    ]
    for v, rs in runs.items():
        cores = rs[0]["cores"]
        loads = "-".join(f"{x:g}" for x in (min(r["load_1m"] for r in rs), max(r["load_1m"] for r in rs)))
        lines.append(f"| {v} | {cores.get('faiss', '-')} | {cores.get('numpy', '-')} | {med[v]:.3f} "
                     f"| {med[v] / numpy_s:.2f} | {loads} |")
    md = (
        "\n".join(lines) + "\n\n"
        f"**import_faiss is {result['speedup']}x as fast as a plain `import faiss`** on this machine "
        f"(numpy's matmul of the same shapes: {numpy_s:.3f} s). One thread, `IndexFlatL2.search(x, 1)` of "
        "65,536 x 384 float32 rows against 1,000 centroids (one k-means piece at k=1000), median of 5 after a "
        f"warm-up, per fresh process; {ROUNDS} rounds, variants alternating; the table's time is the median "
        "over rounds."
    )
    path = write_results("bench_blas", result, md)
    print(md)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
