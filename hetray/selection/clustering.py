"""Stage 3, cluster (k-means; not to be confused with a Ray cluster): embeddings -> k-means centroids and the cluster of every prompt.

``run_cluster(cfg)`` reads ``<run_dir>/embeddings/*.parquet`` (written by ``hetray embed``),
fits the distributed k-means of ``hetray.selection.kmeans`` with ``cfg.cluster`` and ``cfg.seed``, and
writes::

    clusters/centroids.npy       (k, d) float32, the best restart's centroids
    clusters/assignments/        ASSIGNMENT_SCHEMA: prompt_id, cluster, squared distance
    clusters/manifest.json       config, input fingerprint, inertia(s), iterations, backend, sizes, time

The stage runner (``hetray.stage``) skips it when the settings and the embeddings are
unchanged, and commits ``clusters/`` only once everything has succeeded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hetray.config import JobConfig
from hetray.schema import ASSIGNMENT_SCHEMA
from hetray.selection.kmeans import assign, fit_kmeans
from hetray.stage import Stage, require_ray, run_stage

log = logging.getLogger(__name__)


def to_assignments(batch: pa.Table) -> pa.Table:
    """An assigned embeddings batch -> ASSIGNMENT_SCHEMA (drops prompt text and vector)."""
    return batch.select(ASSIGNMENT_SCHEMA.names).cast(ASSIGNMENT_SCHEMA)


def embedding_files(run_dir: Path) -> list[str]:
    folder = run_dir / "embeddings"
    files = sorted(str(p) for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no embeddings in {folder}: run `hetray embed` first")
    return files


def assignment_stats(folder: Path, k: int) -> tuple[list[int], float]:
    """(points per cluster, inertia) from the written assignments, file by file: the inertia
    is the float64 sum of the squared distances the assign pass wrote."""
    sizes, inertia = np.zeros(k, np.int64), 0.0
    for f in sorted(folder.glob("*.parquet")):
        t = pq.read_table(f, columns=["cluster", "distance"])
        sizes += np.bincount(t.column("cluster").to_numpy(), minlength=k)
        inertia += float(t.column("distance").to_numpy().sum(dtype=np.float64))
    return sizes.tolist(), inertia


def run_cluster(cfg: JobConfig, force: bool = False) -> dict:
    """Cluster the run's embeddings into ``cfg.cluster.n_clusters`` groups. Returns the manifest."""
    run_dir = Path(cfg.run_dir)
    files = embedding_files(run_dir)
    stage = Stage("cluster", run_dir, outputs=("clusters",), required=("centroids.npy", "assignments"),
                  config={"seed": cfg.seed, "cluster": cfg.cluster.model_dump(mode="json")},
                  inputs=[run_dir / "embeddings"])

    def work(tmp: Path) -> dict:
        import ray

        require_ray("cluster")
        c, out = cfg.cluster, tmp / "clusters"
        ds = ray.data.read_parquet(files).select_columns(["prompt_id", "vector"])
        ds.context.enable_progress_bars = False  # a pass over the vectors takes seconds: no bar each
        ds = ds.materialize()
        res = fit_kmeans(ds, c.n_clusters, n_init=c.n_init, max_iter=c.max_iter, tol=c.tol, init=c.init,
                         sample_size=c.sample_size, batch_size=c.batch_size, seed=cfg.seed, backend=c.backend,
                         final_pass=False)  # the assign pass below measures the final inertia
        np.save(out / "centroids.npy", res.centroids)
        assigned = assign(ds, res.centroids, c.batch_size, backend=res.backend)
        assigned = assigned.map_batches(to_assignments, batch_format="pyarrow")
        assigned.write_parquet(str(out / "assignments"))
        sizes, inertia = assignment_stats(out / "assignments", c.n_clusters)
        inertias = [inertia if np.isnan(i) else i for i in res.inertias]
        log.info("cluster: inertia %.4f after %d iterations (restart %d, %s backend)", inertia, res.n_iter,
                 res.best_init, res.backend)
        return {"rows": res.n_samples, "dim": int(res.centroids.shape[1]), "inertia": inertia,
                "n_iter": res.n_iter, "best_init": res.best_init, "inertias": inertias, "n_iters": res.n_iters,
                "backend": res.backend, "passes": res.passes, "seconds": res.seconds, "sizes": sizes}

    return run_stage(stage, work, force=force)
