"""The k-means benchmark's set-up, run repeatedly in one process (issue 14: "no crash").

``benchmarks/bench_kmeans.py --sizes 200000`` once died with SIGSEGV in the driver. The cause
(evidence in the benchmark's docstring): it started and stopped tracemalloc around each hetray
fit, and on Python < 3.12.9 / 3.13.2 ``tracemalloc.stop()`` frees the traceback buffer that a
thread waiting for the GIL inside tracemalloc's raw-allocation hook then writes to (CPython
gh-128679). Ray's core-worker thread does exactly that each time an object goes out of scope.
Several OpenMP runtimes were the suspect, but at most one (faiss's libgomp) was loaded when it
crashed (scikit-learn is imported later, torch never), and torch + faiss + scikit-learn used
together in one Ray driver did not crash in 3 minutes of the same loop, while toggling
tracemalloc did within a minute, 5 times out of 5.

The test runs the benchmark's own functions (tracemalloc + a local Ray, vectors into the object
store, hetray's fit with each backend, scikit-learn, faiss, the inertia yardstick) for several
rounds in a fresh process, so a crash is a failed test and not a dead pytest. It fails when
tracemalloc is stopped while Ray runs, and when the process holds more than one OpenMP runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys, tracemalloc
sys.path.insert(0, {bench!r})
import ray
import bench_kmeans as bench

stops = []
_stop = tracemalloc.stop
def stop():  # record whether Ray's threads were alive when tracemalloc stopped
    stops.append(ray.is_initialized())
    _stop()
tracemalloc.stop = stop

bench.start()
ratios = []
for _ in range({rounds}):
    row = bench.bench({n}, [{{"k": 8, "n_init": 2, "max_iter": 4}}])[0]
    ratios.append([row["inertia_" + b + "_over_sklearn"] for b in bench.BACKENDS])
openmp = sorted({{t["file"] for t in bench.threadpools() if t["api"] == "openmp"}})
bench.finish()
print("RESULT " + json.dumps({{"ratios": ratios, "stops": stops, "openmp": openmp}}))
"""


@pytest.mark.slow
def test_benchmark_setup_survives_repeated_rounds():
    rounds = 3
    script = SCRIPT.format(bench=str(ROOT / "benchmarks"), rounds=rounds, n=3000)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"exit code {proc.returncode} (-11: SIGSEGV):\n{tail}"
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["stops"] == [False], "tracemalloc.stop() ran while Ray was up: " + str(result["stops"])
    assert len(result["openmp"]) <= 1, f"several OpenMP runtimes in the driver: {result['openmp']}"
    assert len(result["ratios"]) == rounds
    for ratio in sum(result["ratios"], []):  # every backend, every round: within 1% of scikit-learn
        assert 0.9 < ratio <= 1.01, result["ratios"]
