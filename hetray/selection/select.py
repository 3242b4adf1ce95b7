"""Stage 4, select: the training set ``D_train`` = the top fraction of each cluster by quality,
stratified so every source keeps its share (paper 2.4, 2.5, A.3).

``run_select(cfg)`` reads ``preferences/`` and ``clusters/`` (the ``convert``, ``embed`` and
``cluster`` stages must have run; ``hetray run`` runs them in order), then:

1. Ray Data reads the narrow view of the pairs in parallel (``pair_id``, ``prompt_id`` = hash
   of the prompt, ``source``, ``quality``, and ``tie``, a seeded hash of ``pair_id``) and the
   driver joins it with the cluster assignments on ``prompt_id`` (an Arrow hash join);
2. optional near-duplicate removal inside each cluster (``select.dedup_threshold``);
3. counts per (cluster, source) give the quotas (``hetray.selection.rules``); each cell keeps its top
   rows by (quality, tie), a vectorised sort on the narrow view;
4. a streaming Ray Data pass over ``preferences/`` keeps the selected ``pair_id``s and writes
   ``selected/`` in the input order, with the same schema: same inputs + seed give the same
   files, byte for byte. ``selected/`` holds only data (Parquet), its dataset card
   (``README.md``, ``hetray.datacard``: ``datasets.load_dataset("<run>/selected")`` reads it) and
   the manifest; the selection report (markdown + plots) goes beside it into
   ``selected_report/``, an output of the same stage.

**Two readings of the paper for sources without quality** (WinoGrande, WinoBias, WinoGender:
``quality`` null on every pair), chosen by ``select.keep_unscored``:

* ``False`` (default; paper A.3, "every source keeps its share"): such a source is cut to
  ``fraction`` like any other, by a seeded random sample within each cluster;
* ``True`` (the paper's "WinoGrande ... not filtered" reading): such a source is kept whole, and only the
  scored sources are cut to ``fraction`` per cluster (with ``stratify``, per cluster and source;
  without, per cluster over the scored sources only). The manifest lists them in ``kept_whole``.

Memory: the driver holds the narrow view, about 80 bytes a pair (10M pairs: ~0.8 GB), never
the texts. Ray shuffles (join, group-by) would bound that too, but on one machine they cost
minutes of actor start-up for what a vectorised sort does in seconds; the narrow view stops
fitting on a driver only around a billion pairs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray.data.datasource import Datasink

from hetray.config import JobConfig
from hetray.datacard import write_empty, write_selected_card
from hetray.schema import PREFERENCE_SCHEMA, make_id, parquet_files
from hetray.selection.report import write_report
from hetray.selection.rules import near_duplicates, order, quotas, ranking, tie_hash, unscored_sources
from hetray.stage import Stage, read_manifest, require_ray, run_stage

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


def _keep_selected(batch: pa.Table, ids) -> pa.Table:
    return batch.filter(pc.is_in(batch["pair_id"], value_set=ids))


class OrderedParquetSink(Datasink):
    """Writes blocks in order into train-00000.parquet, ... (deterministic names)."""

    def __init__(self, folder: str, schema: pa.Schema):
        self.folder, self.schema = folder, schema

    def write(self, blocks, ctx) -> int:
        path = os.path.join(self.folder, f"train-{ctx.task_idx:05d}.parquet")
        rows = 0
        with pq.ParquetWriter(path, self.schema) as w:
            for block in blocks:
                w.write_table(block.select(self.schema.names).cast(self.schema))
                rows += block.num_rows
        return rows


def run_select(cfg: JobConfig, force: bool = False, out_name: str = "selected") -> dict:
    """Select ``D_train`` from the run's pairs and clusters. Returns the select manifest."""
    run_dir = Path(cfg.run_dir)
    pref_files = parquet_files(run_dir / "preferences")
    if not pref_files:
        raise FileNotFoundError(f"{run_dir / 'preferences'} holds no pairs: run `hetray convert` first")
    n_pairs = sum(pq.ParquetFile(f).metadata.num_rows for f in pref_files)
    if n_pairs == 0:
        raise ValueError(f"{run_dir / 'preferences'} is an empty preference set: nothing to select from")
    if read_manifest(run_dir / "clusters") is None:
        raise FileNotFoundError(f"{run_dir / 'clusters'} is missing: run `hetray embed` and `hetray cluster` first")
    report_name = f"{out_name}_report"  # beside the data, so that the data folder holds data only
    stage = Stage("select", run_dir, outputs=(out_name, report_name),
                  config={"seed": cfg.seed, "select": cfg.select.model_dump(mode="json")},
                  inputs=[run_dir / "preferences", run_dir / "clusters"])
    return run_stage(stage, lambda tmp: _select(cfg, run_dir, pref_files, n_pairs, tmp / out_name, tmp / report_name),
                     force=force)


def _select(cfg: JobConfig, run_dir: Path, pref_files: list[str], n_pairs: int, out: Path, report_dir: Path) -> dict:
    import ray

    require_ray("select")
    s = cfg.select
    narrow = ray.data.read_parquet(pref_files).select_columns(["pair_id", "prompt", "source", "quality"])
    narrow = narrow.map_batches(_narrow, fn_kwargs={"seed": cfg.seed}, batch_format="pyarrow")
    narrow = pa.concat_tables(ray.get(narrow.to_arrow_refs()))
    assign = pq.ParquetDataset(parquet_files(run_dir / "clusters" / "assignments")).read(
        columns=["prompt_id", "cluster", "distance"]
    )
    joined = narrow.join(assign.select(["prompt_id", "cluster"]), keys="prompt_id", join_type="inner").to_pandas()
    if len(joined) != n_pairs:
        raise RuntimeError(f"{n_pairs - len(joined)} pairs have no cluster assignment: re-run `hetray cluster`")
    if s.sources is not None:  # e.g. a WinoGrande-only baseline over the shared clusters
        present = set(joined["source"].unique())
        unknown = sorted(set(s.sources) - present)
        if unknown:
            raise ValueError(
                f"select.sources: {', '.join(unknown)} not in {run_dir / 'preferences'} "
                f"(sources there: {', '.join(sorted(present))})"
            )
        joined = joined[joined["source"].isin(s.sources)].reset_index(drop=True)
        n_pairs = len(joined)
    dropped_dup = 0
    if s.dedup_threshold is not None:
        joined = _dedup(joined, run_dir, s)
        dropped_dup = n_pairs - len(joined)
    cells = ["cluster", "source"] if s.stratify else ["cluster"]
    before = joined.groupby(["cluster", "source"]).size().rename("n").reset_index()
    whole = unscored_sources(joined) if s.keep_unscored else []
    plan = quotas(before, s.fraction, s.stratify, keep_whole=whole)
    is_whole = joined["source"].isin(whole)
    keep = plan[~plan["source"].isin(whole)].groupby(cells)["keep"].sum()
    ranked = order(ranking(joined[~is_whole], s.quality_normalization))
    rank_in_cell = ranked.groupby(cells, sort=False).cumcount()
    limit = ranked.set_index(cells).index.map(keep).to_numpy()
    kept_df = pd.concat([ranked[rank_in_cell.to_numpy() < limit], joined[is_whole]], ignore_index=True)
    ids = pa.array(np.sort(kept_df["pair_id"].to_numpy().astype(str)))

    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        full = ray.data.read_parquet(pref_files)
        full.map_batches(_keep_selected, fn_kwargs={"ids": ids}, batch_format="pyarrow").write_datasink(
            OrderedParquetSink(str(out), PREFERENCE_SCHEMA)
        )
    finally:
        ctx.execution_options.preserve_order = preserve
    for f in out.glob("train-*.parquet"):  # empty parts carry no rows; drop them
        if pq.ParquetFile(f).metadata.num_rows == 0:
            f.unlink()
    if not any(out.glob("*.parquet")):
        write_empty(out / "train-00000.parquet", PREFERENCE_SCHEMA)
    after = kept_df.groupby(["cluster", "source"]).size().rename("kept").reset_index()
    table = plan.merge(after, on=["cluster", "source"], how="left").fillna({"kept": 0})
    table["kept"] = table["kept"].astype(int)
    report = write_report(report_dir, cfg, table, _quality_sample(joined, kept_df),
                          _examples(assign, run_dir, s.examples_per_cluster))
    write_selected_card(out, cfg, table, whole, dropped_dup, PREFERENCE_SCHEMA)
    log.info("select: kept %d of %d pairs (fraction %s)", len(kept_df), n_pairs, s.fraction)
    return {
        "pairs_in": n_pairs,
        "pairs_selected": int(len(kept_df)),
        "dropped_near_duplicates": dropped_dup,
        "kept_whole": whole,
        "n_clusters": int(cfg.cluster.n_clusters),
        "cells": table.to_dict(orient="records"),
        "report": report,
    }


def _dedup(joined: pd.DataFrame, run_dir: Path, s) -> pd.DataFrame:
    """Near-duplicate removal inside each cluster, best pairs first (see quotas.near_duplicates)."""
    kept = []
    files = parquet_files(run_dir / "embeddings")
    for cluster, group in joined.groupby("cluster", sort=True):
        ids = pa.array(group["prompt_id"].unique())
        vecs = {}
        for f in files:
            t = pq.read_table(f, columns=["prompt_id", "vector"], filters=pc.is_in(pc.field("prompt_id"), value_set=ids))
            vecs.update(zip(t["prompt_id"].to_pylist(), t["vector"].to_numpy(zero_copy_only=False)))
        ranked = order(ranking(group, s.quality_normalization))
        mask = near_duplicates(np.stack([vecs[p] for p in ranked["prompt_id"]]), s.dedup_threshold)
        kept.append(ranked.loc[mask].drop(columns=["score"]))
    return pd.concat(kept, ignore_index=True)


def _quality_sample(joined: pd.DataFrame, kept_df: pd.DataFrame) -> pd.DataFrame:
    """Qualities before (a seeded sample of at most REPORT_SAMPLE per source) and after."""
    before = joined.sort_values("tie").groupby("source").head(REPORT_SAMPLE)[["source", "quality"]]
    after = kept_df[["source", "quality"]]
    return pd.concat([before.assign(set="before"), after.assign(set="after")], ignore_index=True)


def _examples(assign: pa.Table, run_dir: Path, n: int) -> dict:
    """The ``n`` prompts nearest each centroid."""
    if n == 0:
        return {}
    nearest = (
        assign.to_pandas().sort_values(["cluster", "distance", "prompt_id"]).groupby("cluster").head(n)
    )
    ids = pa.array(nearest["prompt_id"].tolist())
    texts = {}
    for f in parquet_files(run_dir / "embeddings"):
        t = pq.read_table(f, columns=["prompt_id", "prompt"], filters=pc.is_in(pc.field("prompt_id"), value_set=ids))
        texts.update(zip(t["prompt_id"].to_pylist(), t["prompt"].to_pylist()))
    out: dict = {}
    for r in nearest.itertuples():
        out.setdefault(int(r.cluster), []).append(texts.get(r.prompt_id, ""))
    return out
