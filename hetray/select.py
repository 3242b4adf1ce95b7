"""Stage 4, select: the training set ``D_train`` = the top fraction of each cluster by quality,
stratified so every source keeps its share (paper 2.4, 2.5, A.3).

``run_select(cfg)`` runs ``embed`` and ``cluster`` first (each is skipped when up to date), then:

1. a narrow view of the pairs (``pair_id, prompt_id, source, quality``) is joined with the
   cluster assignments on ``prompt_id`` (a Ray Data hash join: no side holds everything);
2. optional near-duplicate removal inside each cluster (``select.dedup_threshold``);
3. counts per (cluster, source) come back to the driver (a small table) and give the quotas
   (``hetray.quotas``); each cell keeps its top rows, in a group-by over the narrow view;
4. a streaming pass over ``preferences/`` keeps the selected ``pair_id``s and writes
   ``selected/`` in the input order, with the same schema: same inputs + seed give the same
   files, byte for byte.

The driver holds the counts, the selected ids (16 bytes a pair) and a bounded sample of
qualities for the report, never the pairs themselves.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hetray import manifest as mf
from hetray.config import JobConfig
from hetray.quotas import near_duplicates, order, quotas, ranking, tie_hash, top_of_cell
from hetray.schema import PREFERENCE_SCHEMA, make_id
from hetray.summary import parquet_files

log = logging.getLogger(__name__)

REPORT_SAMPLE = 200_000  # qualities per source kept for the report's histograms


def _narrow(batch: pa.Table, seed: int) -> pa.Table:
    pair_ids = batch["pair_id"].to_pylist()
    return pa.table(
        {
            "pair_id": batch["pair_id"],
            "prompt_id": [make_id(p) for p in batch["prompt"].to_pylist()],
            "source": batch["source"],
            "quality": batch["quality"],
            "tie": pa.array(tie_hash(pair_ids, seed), pa.uint64()),
        }
    )


def _dedup_cluster(group: pd.DataFrame, threshold: float, normalization: str) -> pd.DataFrame:
    ranked = order(ranking(group, normalization))
    keep = near_duplicates(np.stack(ranked["vector"].to_numpy()), threshold)
    return ranked.loc[keep].drop(columns=["vector", "score"])


def _select_cells(cell: pd.DataFrame, keep: dict, normalization: str) -> pd.DataFrame:
    key = (int(cell["cluster"].iloc[0]), cell["source"].iloc[0])
    top = top_of_cell(ranking(cell, normalization), keep[key])
    return top[["pair_id", "cluster", "source", "quality"]]


def _keep_selected(batch: pa.Table, ids) -> pa.Table:
    return batch.filter(pc.is_in(batch["pair_id"], value_set=ids))


class _OrderedParquetSink:
    """Writes blocks in order into part-00000.parquet, ... (deterministic names)."""

    def __new__(cls, folder: str, schema: pa.Schema):
        from ray.data.datasource import Datasink

        class Sink(Datasink):
            def write(self, blocks, ctx):
                path = os.path.join(folder, f"part-{ctx.task_idx:05d}.parquet")
                rows = 0
                with pq.ParquetWriter(path, schema) as w:
                    for block in blocks:
                        w.write_table(block.select(schema.names).cast(schema))
                        rows += block.num_rows
                return rows

        return Sink()


def run_select(cfg: JobConfig, force: bool = False, out_name: str = "selected") -> dict:
    """Embed, cluster (both skipped when up to date) and select. Returns the select manifest."""
    import ray

    from hetray.cluster import run_cluster
    from hetray.embed import run_embed
    from hetray.ray_utils import init_ray

    started = time.time()
    run_dir = Path(cfg.run_dir)
    pref_files = [f for f in parquet_files(run_dir / "preferences")]
    if not pref_files:
        raise FileNotFoundError(f"{run_dir / 'preferences'} holds no pairs: run `hetray convert` first")
    n_pairs = sum(pq.ParquetFile(f).metadata.num_rows for f in pref_files)
    if n_pairs == 0:
        raise ValueError(f"{run_dir / 'preferences'} is an empty preference set: nothing to select from")

    init_ray(cfg.ray)
    run_embed(cfg, force=force)
    run_cluster(cfg, force=force)
    out_dir = run_dir / out_name
    config = {"seed": cfg.seed, "select": cfg.select.model_dump(mode="json")}
    inputs = [mf.fingerprint_dir(run_dir / "preferences"), mf.fingerprint_dir(run_dir / "clusters")]
    key = mf.stage_key("select", config, inputs)
    if not force and mf.is_up_to_date(out_dir, key):
        log.info("select: %s is up to date (key %s), skipping", out_dir, key)
        return mf.read_manifest(out_dir)

    s = cfg.select
    partitions = max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)
    narrow = ray.data.read_parquet(pref_files, columns=["pair_id", "prompt", "source", "quality"])
    narrow = narrow.map_batches(_narrow, fn_kwargs={"seed": cfg.seed}, batch_format="pyarrow")
    assign = ray.data.read_parquet(parquet_files(run_dir / "clusters" / "assignments"), columns=["prompt_id", "cluster"])
    joined = narrow.join(assign, join_type="inner", num_partitions=partitions, on=("prompt_id",))
    dropped_dup = 0
    if s.dedup_threshold is not None:
        vectors = ray.data.read_parquet(parquet_files(run_dir / "embeddings"), columns=["prompt_id", "vector"])
        joined = joined.join(vectors, join_type="inner", num_partitions=partitions, on=("prompt_id",))
        joined = joined.groupby("cluster").map_groups(
            _dedup_cluster,
            fn_kwargs={"threshold": s.dedup_threshold, "normalization": s.quality_normalization},
            batch_format="pandas",
        )
    joined = joined.materialize()
    before = joined.groupby(["cluster", "source"]).count().to_pandas()
    before = before.rename(columns={before.columns[-1]: "n"})
    if s.dedup_threshold is not None:
        dropped_dup = n_pairs - int(before["n"].sum())
    elif int(before["n"].sum()) != n_pairs:
        raise RuntimeError(f"{n_pairs - int(before['n'].sum())} pairs have no cluster assignment")
    plan = quotas(before, s.fraction, s.stratify)
    keep = {(int(r.cluster), r.source): int(r.keep) for r in plan.itertuples()}
    cell_keys = ["cluster", "source"]
    if s.stratify:
        kept = joined.groupby(cell_keys).map_groups(
            _select_cells, fn_kwargs={"keep": keep, "normalization": s.quality_normalization}, batch_format="pandas"
        )
    else:  # one cell per cluster, sources compete on (normalised) quality
        per_cluster = plan.groupby("cluster")["keep"].sum().to_dict()
        kept = joined.groupby("cluster").map_groups(
            lambda g: top_of_cell(ranking(g, s.quality_normalization), per_cluster[int(g["cluster"].iloc[0])])[
                ["pair_id", "cluster", "source", "quality"]
            ],
            batch_format="pandas",
        )
    kept_df = kept.to_pandas()
    ids = pa.array(np.sort(kept_df["pair_id"].to_numpy().astype(str)))

    tmp = run_dir / f".{out_name}-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        ctx = ray.data.DataContext.get_current()
        preserve = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True
        try:
            full = ray.data.read_parquet(pref_files)
            full.map_batches(_keep_selected, fn_kwargs={"ids": ids}, batch_format="pyarrow").write_datasink(
                _OrderedParquetSink(str(tmp.resolve()), PREFERENCE_SCHEMA)
            )
        finally:
            ctx.execution_options.preserve_order = preserve
        for f in tmp.glob("part-*.parquet"):  # empty parts carry no rows; drop them
            if pq.ParquetFile(f).metadata.num_rows == 0:
                f.unlink()
        if not any(tmp.glob("*.parquet")):
            pq.write_table(PREFERENCE_SCHEMA.empty_table(), tmp / "part-00000.parquet")
        after = kept_df.groupby(cell_keys).size().rename("kept").reset_index()
        table = plan.merge(after, on=cell_keys, how="left").fillna({"kept": 0})
        table["kept"] = table["kept"].astype(int)
        from hetray.select_report import write_report

        report = write_report(tmp, cfg, table, _quality_sample(joined, before.groupby("source")["n"].sum(), kept_df), _examples(run_dir, s.examples_per_cluster))
        manifest = mf.new_manifest("select", key, config, inputs, started)
        manifest.update(
            {
                "pairs_in": n_pairs,
                "pairs_selected": int(len(kept_df)),
                "dropped_near_duplicates": dropped_dup,
                "n_clusters": int(cfg.cluster.n_clusters),
                "cells": table.to_dict(orient="records"),
                "report": report,
            }
        )
        mf.write_manifest(tmp, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("select: kept %d of %d pairs (fraction %s) -> %s", len(kept_df), n_pairs, s.fraction, out_dir)
    return manifest


def _sample_rows(batch: pd.DataFrame, rate: dict) -> pd.DataFrame:
    u = (batch["tie"].astype(np.uint64) >> np.uint64(11)).astype(float) / float(1 << 53)
    return batch.loc[u < batch["source"].map(rate).astype(float), ["source", "quality"]]


def _quality_sample(joined, sizes: pd.Series, kept_df: pd.DataFrame) -> pd.DataFrame:
    """Qualities before (a seeded sample of about REPORT_SAMPLE per source) and after."""
    rate = {src: min(1.0, REPORT_SAMPLE / max(1, n)) for src, n in sizes.items()}
    before = joined.select_columns(["source", "quality", "tie"]).map_batches(
        _sample_rows, fn_kwargs={"rate": rate}, batch_format="pandas"
    ).to_pandas()
    after = kept_df[["source", "quality"]]
    return pd.concat([before.assign(set="before"), after.assign(set="after")], ignore_index=True)


def _nearest(group: pd.DataFrame, n: int) -> pd.DataFrame:
    return group.sort_values(["distance", "prompt_id"]).head(n)


def _examples(run_dir: Path, n: int) -> dict:
    """The ``n`` prompts nearest each centroid."""
    import ray

    if n == 0:
        return {}
    assign = ray.data.read_parquet(parquet_files(run_dir / "clusters" / "assignments"))
    nearest = assign.groupby("cluster").map_groups(_nearest, fn_kwargs={"n": n}, batch_format="pandas").to_pandas()
    nearest = nearest.sort_values(["cluster", "distance", "prompt_id"])
    ids = pa.array(nearest["prompt_id"].tolist())
    texts = {}
    for f in parquet_files(run_dir / "embeddings"):
        t = pq.read_table(f, columns=["prompt_id", "prompt"])
        t = t.filter(pc.is_in(t["prompt_id"], value_set=ids))
        texts.update(zip(t["prompt_id"].to_pylist(), t["prompt"].to_pylist()))
    out: dict = {}
    for r in nearest.itertuples():
        out.setdefault(int(r.cluster), []).append(texts.get(r.prompt_id, ""))
    return out
