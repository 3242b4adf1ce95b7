"""Benchmark: convert -> select on many preference rows (embedding excluded, vectors synthetic).

    python benchmarks/bench_select.py               # 10M pairs
    python benchmarks/bench_select.py --pairs 1000000

Data: generic pairwise parquet shards from three sources (two scored with a margin column,
one unscored), four pairs per distinct prompt. The embedding stage is replaced by synthetic
normalised 32-d vectors around 10 centres written straight into ``embeddings/`` (embedding
speed is bench_embed's subject); then ``cluster`` (k=10, n_init=10) and ``select``
(fraction 0.4) run as in a real job. Reports the wall time and peak memory (PSS of the whole
process tree) of convert, and of cluster + select, into benchmarks/results/bench_select.*.
"""

from __future__ import annotations

import argparse
import json
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
ray: {{num_cpus: 2}}
convert:
  sources:
{sources}
cluster: {{n_clusters: 10, n_init: 10}}
select: {{fraction: 0.4}}
"""

SELECT = textwrap.dedent(
    """
    import sys
    from hetray.config import load_config
    from hetray.orchestrate.ray_init import init_ray
    from hetray.selection.clustering import run_cluster
    from hetray.selection.select import run_select
    cfg = load_config(sys.argv[1])
    init_ray(cfg.ray)
    run_cluster(cfg)  # over the synthetic vectors
    m = run_select(cfg, force=True)
    print("SELECTED", m["pairs_selected"], "OF", m["pairs_in"])
    """
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=10_000_000)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hetray-bench-select-"))
    src = work / "src"
    make_pairs(args.pairs, src)
    sources = "\n".join(
        f"    - {{name: {s}, format: generic, shape: pairwise, path: {src / s}"
        + (", columns: {margin: margin}}" if s != "gamma" else "}")
        for s in SOURCES
    )
    job = work / "job.yaml"
    job.write_text(JOB.format(run_dir=work / "run", sources=sources))
    convert = run_measured([sys.executable, "-m", "hetray.cli", "convert", "--config", str(job), "--force"])
    prompts = write_vectors(work / "run")
    script = work / "select_synthetic.py"
    script.write_text(SELECT)
    select = run_measured([sys.executable, str(script), str(job)])
    selected = select["output_tail"].split("SELECTED")[-1].split()
    res = {
        "pairs": args.pairs,
        "distinct_prompts": prompts,
        "convert": {k: convert[k] for k in ("wall_s", "peak_mem_mib")},
        "cluster_and_select": {k: select[k] for k in ("wall_s", "peak_mem_mib")},
        "pairs_selected": int(selected[0]),
    }
    res["convert"]["pairs_per_s"] = round(args.pairs / convert["wall_s"])
    res["cluster_and_select"]["pairs_per_s"] = round(args.pairs / select["wall_s"])
    print(json.dumps(res, indent=2))
    md = (
        "| pairs | distinct prompts | convert s | convert peak MiB | cluster+select s | cluster+select peak MiB | selected |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {args.pairs:,} | {prompts:,} | {res['convert']['wall_s']} | {res['convert']['peak_mem_mib']} "
        f"| {res['cluster_and_select']['wall_s']} | {res['cluster_and_select']['peak_mem_mib']} | {res['pairs_selected']:,} |\n\n"
        "Peak memory: PSS of the whole process tree (driver, raylet, workers), sampled every 0.5 s. "
        "Vectors are synthetic 32-d (the embedding stage is excluded); k=10, n_init=10, fraction 0.4."
    )
    print(f"results: {write_results('bench_select', res, md)}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
