"""Shared helpers for the benchmarks: machine description, peak memory of a process tree,
and writing results (JSON + markdown) into benchmarks/results/ with the command that made them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _tree_pss(proc: psutil.Process, parts: dict | None = None) -> int:
    """Proportional set size of a process and all its descendants (shared pages split fairly,
    so Ray's shared-memory object store is not counted once per worker). With ``parts``, also
    fills it with the PSS of each process by name (Ray sets ``ray::<task>`` titles)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            pss = p.memory_full_info().pss
            total += pss
            if parts is not None:
                name = p.name() if p is not proc else "driver"
                parts[name] = parts.get(name, 0) + pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.5) -> dict:
    """Run ``cmd``; return its wall time, exit code, the peak PSS of its process tree and, at
    that peak, the PSS per process name (MiB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    at_peak: dict = {}
    loads: list[float] = []
    stop = threading.Event()

    def sample():
        nonlocal peak, at_peak
        while not stop.is_set():
            try:
                parts: dict = {}
                now = _tree_pss(ps, parts)
                if now > peak:
                    peak, at_peak = now, parts
            except psutil.NoSuchProcess:
                break
            loads.append(os.getloadavg()[0])
            stop.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    stop.set()
    t.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(out[-5000:])
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {
        "wall_s": round(wall, 2),
        "peak_mem_mib": round(peak / 2**20, 1),
        "peak_by_process_mib": {k: round(v / 2**20, 1) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])},
        "load_avg_1min_after": round(os.getloadavg()[0], 2),  # above the core count: contended
        "load_avg_1min_during": {"min": round(min(loads), 2), "mean": round(sum(loads) / len(loads), 2),
                                 "max": round(max(loads), 2)} if loads else None,
        "output_tail": out[-2000:],
    }


def write_results(name: str, result: dict, markdown: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg_at_write": [round(v, 2) for v in os.getloadavg()],
        **result,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    header = (
        f"# {name}\n\ncommand: `{result['command']}`  \n"
        f"machine: {result['machine']['cpus']} CPUs ({result['machine']['cpu_model']}), "
        f"{result['machine']['memory_gib']} GiB, {result['machine']['platform']}  \n"
        f"date: {result['date']}  \n"
        f"load average (1/5/15 min) when written: {' / '.join(map(str, result['load_avg_at_write']))}\n\n"
    )
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown + "\n")
    return path


def job_benchmark_args(doc: str, run_dir: str):
    """The command line of a benchmark that runs one job on ../shared/data: ``--run-dir``,
    ``--report-only`` and dotted overrides. Exits when ../shared/data is absent."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--run-dir", default=run_dir)
    ap.add_argument("--report-only", action="store_true", help="rebuild the tables from the last run's outputs")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not (Path(__file__).resolve().parents[2] / "shared" / "data").is_dir():
        sys.exit("../shared/data is absent: this benchmark needs the real data samples")
    return args
