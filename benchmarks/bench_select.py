"""Benchmark: peak memory of the select stage at several sizes (embedding excluded, vectors synthetic).

    python benchmarks/bench_select.py                          # 1M and 10M pairs (issue 14's goal)
    python benchmarks/bench_select.py --sizes 100000 300000    # a quick sanity run
    python benchmarks/bench_select.py --sizes 100000 600000 --partition-rows 50000   # the shuffle join, small

Data: generic pairwise parquet shards from three sources (two scored with a margin column,
one unscored), four pairs per distinct prompt. For each size: ``convert`` (hetray's CLI), then
synthetic normalised 32-d vectors around 10 centres written straight into ``embeddings/``
(embedding speed is bench_embed's subject), ``cluster`` (k=10, n_init=10), and ``select``
(fraction 0.4), each in its own process with its own local Ray, the object store capped
(``ray.object_store_memory``, ``--object-store-mib``). Reported per stage: wall time and peak
memory = PSS of the whole process tree (driver, raylet, GCS, workers, the object store's shared
pages counted once), sampled every 0.5 s; for select also the driver's own peak RSS (its
``ru_maxrss``). The goal (issue 14): select's peak at the largest size at most 1.2x the peak at
the smallest, the driver holding no per-pair data. Writes benchmarks/results/bench_select.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_measured, write_results  # noqa: E402

ROWS_PER_SHARD = 500_000
SOURCES = ("alpha", "beta", "gamma")  # gamma has no margin: an unscored source


def make_pairs(n: int, out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for src_i, src in enumerate(SOURCES):
        folder = out / src
        folder.mkdir(parents=True)
        count = n // len(SOURCES) + (1 if src_i < n % len(SOURCES) else 0)
        for shard, start in enumerate(range(0, count, ROWS_PER_SHARD)):
            m = min(ROWS_PER_SHARD, count - start)
            idx = np.arange(start, start + m)
            prompt = [f"{src} question {i // 4} about topic {(i // 4) % 97}?" for i in idx]
            cols = {
                "prompt": prompt,
                "chosen": [f"a helpful answer number {i}" for i in idx],
                "rejected": [f"an unhelpful answer number {i}" for i in idx],
            }
            if src != "gamma":
                cols["margin"] = rng.random(m).round(4)
            pq.write_table(pa.table(cols), folder / f"part-{shard:04d}.parquet")


def write_vectors(run_dir: Path, dim: int = 32, seed: int = 0) -> int:
    """Synthetic normalised vectors for every distinct prompt of preferences/ (in place of embed)."""
    from hetray.schema import embedding_schema, make_id

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dim))
    out = run_dir / "embeddings"
    out.mkdir(parents=True, exist_ok=True)
    seen: set = set()
    for i, f in enumerate(sorted((run_dir / "preferences").glob("*.parquet"))):
        prompts = [p for p in dict.fromkeys(pq.read_table(f, columns=["prompt"])["prompt"].to_pylist()) if p not in seen]
        seen.update(prompts)
        if not prompts:
            continue
        v = centres[rng.integers(0, 10, len(prompts))] + 0.3 * rng.normal(size=(len(prompts), dim))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        table = pa.table(
            {
                "prompt_id": [make_id(p) for p in prompts],
                "prompt": prompts,
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim),
            },
            schema=embedding_schema(dim),
        )
        pq.write_table(table, out / f"part-{i:05d}.parquet")
    return len(seen)


JOB = """
run_dir: {run_dir}
ray: {{num_cpus: 2, object_store_memory: {object_store}}}
convert:
  sources:
{sources}
cluster: {{n_clusters: 10, n_init: 10}}
select: {{fraction: 0.4}}
"""

# One stage per process: its own local Ray, so that each peak is that stage's alone.
STAGE = textwrap.dedent(
    """
    import resource, sys
    from hetray.config import load_config
    from hetray.orchestrate.ray_init import init_ray
    cfg = load_config(sys.argv[1])
    init_ray(cfg.ray)
    if sys.argv[2] == "cluster":
        from hetray.selection.clustering import run_cluster
        run_cluster(cfg, force=True)  # over the synthetic vectors
    else:
        from hetray.selection import select
        if sys.argv[3] != "default":
            select.PARTITION_ROWS = int(sys.argv[3])
        m = select.run_select(cfg, force=True)
        print("SELECTED", m["pairs_selected"], "OF", m["pairs_in"])
    print("DRIVER_MAXRSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)

MEASURED = ("wall_s", "peak_mem_mib", "peak_by_process_mib", "load_avg_1min_during", "load_avg_1min_after")


def one_size(n: int, work: Path, object_store: int, partition_rows: str) -> dict:
    src = work / "src"
    make_pairs(n, src)
    sources = "\n".join(
        f"    - {{name: {s}, format: generic, shape: pairwise, path: {src / s}"
        + (", columns: {margin: margin}}" if s != "gamma" else "}")
        for s in SOURCES
    )
    job = work / "job.yaml"
    job.write_text(JOB.format(run_dir=work / "run", sources=sources, object_store=object_store))
    convert = run_measured([sys.executable, "-m", "hetray.cli", "convert", "--config", str(job), "--force"])
    prompts = write_vectors(work / "run")
    script = work / "stage.py"
    script.write_text(STAGE)
    cluster = run_measured([sys.executable, str(script), str(job), "cluster"])
    select = run_measured([sys.executable, str(script), str(job), "select", partition_rows])
    tail = select["output_tail"]
    res = {
        "pairs": n,
        "distinct_prompts": prompts,
        "convert": {k: convert[k] for k in MEASURED},
        "cluster": {k: cluster[k] for k in MEASURED},
        "select": {k: select[k] for k in MEASURED},
        "pairs_selected": int(tail.split("SELECTED")[-1].split()[0]),
    }
    res["select"]["driver_peak_rss_mib"] = round(int(tail.split("DRIVER_MAXRSS_KIB")[-1].split()[0]) / 1024, 1)
    res["select"]["pairs_per_s"] = round(n / select["wall_s"])
    print(json.dumps(res, indent=2), flush=True)
    return res


def breakdown(runs: list[dict]) -> str:
    """Where select's peak lies: PSS at the peak moment by process (the driver, Ray worker
    processes by their current title, Ray's own daemons)."""
    if not all("peak_by_process_mib" in r["select"] for r in runs):
        return ""
    daemons = ("gcs_server", "raylet", "python", "ray::_StatsActor", "ray::_AutoscalingCoordinatorActor",
               "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray-dashboard")
    lines = ["At select's peak, PSS by process (MiB): driver / Ray worker processes (tasks, actors, idle "
             "workers that keep what their last tasks allocated) / Ray's daemons (GCS, raylet, dashboard, "
             "log monitor, stats actors), and the largest worker processes:", ""]
    for r in runs:
        parts = r["select"]["peak_by_process_mib"]
        driver = parts.get("driver", 0)
        own = sum(v for k, v in parts.items() if k.startswith(daemons))
        workers = {k: v for k, v in parts.items() if k != "driver" and not k.startswith(daemons)}
        top = ", ".join(f"{k} {v:g}" for k, v in sorted(workers.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"- {r['pairs']:,} pairs: driver {driver:g} / workers {sum(workers.values()):.0f} / "
                     f"daemons {own:.0f} (largest: {top})")
    return "\n".join(lines) + "\n\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="pairs per run")
    p.add_argument("--object-store-mib", type=int, default=1024, help="ray.object_store_memory of each stage")
    p.add_argument("--partition-rows", default="default",
                   help="select's PARTITION_ROWS (pairs per join partition; default: the module's value)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        work = Path(tempfile.mkdtemp(prefix=f"hetray-bench-select-{n}-", dir=args.workdir))
        try:
            runs.append(one_size(n, work, args.object_store_mib << 20, args.partition_rows))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    first, last = runs[0]["select"], runs[-1]["select"]
    from hetray.selection.select import PARTITION_ROWS

    res = {
        "load_avg_before": load_before,
        "object_store_mib": args.object_store_mib,
        "partition_rows": PARTITION_ROWS if args.partition_rows == "default" else int(args.partition_rows),
        "runs": runs,
        "select_peak_ratio": round(last["peak_mem_mib"] / first["peak_mem_mib"], 3),
        "select_driver_ratio": round(last["driver_peak_rss_mib"] / first["driver_peak_rss_mib"], 3),
    }
    rows = "\n".join(
        f"| {r['pairs']:,} | {r['distinct_prompts']:,} | {r['select']['wall_s']} | {r['select']['peak_mem_mib']} "
        f"| {r['select']['driver_peak_rss_mib']} | {r['select']['load_avg_1min_during']['mean']} "
        f"| {r['convert']['wall_s']} | {r['convert']['peak_mem_mib']} | {r['cluster']['wall_s']} "
        f"| {r['cluster']['peak_mem_mib']} | {r['pairs_selected']:,} |"
        for r in runs
    )
    ratio = f"{runs[-1]['pairs']:,} / {runs[0]['pairs']:,} pairs"
    md = (
        f"load average (1, 5, 15 min) before the runs: {load_before}; the machine has {os.cpu_count()} CPUs "
        "(a load above that means the timings are contended)\n\n"
        "| pairs | distinct prompts | select s | select peak MiB | select driver peak RSS MiB | load during select "
        "| convert s | convert peak MiB | cluster s | cluster peak MiB | selected |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"{rows}\n\n"
        f"select peak memory ratio {ratio}: **{res['select_peak_ratio']}** (goal <= 1.2); "
        f"driver peak RSS ratio: **{res['select_driver_ratio']}**.\n\n"
        + breakdown(runs) +
        "Peak memory: PSS of the whole process tree of one stage (driver, raylet, GCS, workers; Ray's "
        f"object store capped at {args.object_store_mib} MiB; {res['partition_rows']:,} pairs per join partition: "
        "the join's hash parts go through files on disk), sampled every 0.5 s; driver peak RSS: the "
        "select process's own ru_maxrss. Each stage runs in its own process with its own local Ray (2 CPUs). "
        "Vectors are synthetic 32-d (the embedding stage is excluded); k=10, n_init=10, fraction 0.4."
    )
    print(f"results: {write_results('bench_select', res, md)}")


if __name__ == "__main__":
    main()
