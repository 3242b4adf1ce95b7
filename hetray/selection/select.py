"""Stage 4, select: the training set ``D_train`` = the top fraction of each cluster by quality,
stratified so every source keeps its share (paper 2.4, 2.5, A.3).

``run_select(cfg)`` reads ``preferences/`` and ``clusters/`` (the ``convert``, ``embed`` and
``cluster`` stages must have run; ``hetray run`` runs them in order), then, on Ray Data:

1. the narrow view of the pairs (``pair_id``, ``prompt_id`` = hash of the prompt, ``source``,
   ``quality``, ``tie`` = a seeded hash of ``pair_id``, ``file`` = the key of the preference
   file the row comes from) is joined with the cluster assignments on ``prompt_id`` by plain
   Ray tasks, shuffled on disk (``_with_clusters``): a task per preference file and per
   assignments file writes its rows by hash part, a task per part (about ``PARTITION_ROWS``
   pairs) joins that part of both, files the rows by cluster into a scratch folder of the
   stage and returns their counts per (cluster, source) (and each cluster's nearest prompts,
   for the report), which the driver adds up;
2. optional near-duplicate removal inside each cluster (``select.dedup_threshold``), one task
   per cluster, which files the remaining rows and counts them again;
3. the driver turns the counts into quotas (``hetray.selection.rules.quotas``): O(clusters x
   sources) numbers;
4. one task per cluster ranks each cell (cluster and source; the cluster alone without
   ``stratify``) by (quality, tie, pair_id) and keeps its quota (``rules.cut``), writing the
   kept ``pair_id``s by preference file. With ``quality_normalization: percentile`` the
   within-source percentile of every quality comes first (``rules.percentiles``; past one
   partition, from a distributed sort of the distinct (source, quality) values, joined back);
5. a streaming pass over ``preferences/`` keeps, file by file, the rows kept for that file and
   writes ``selected/`` in the input order, with the same schema: same inputs + seed give the
   same files, byte for byte, and the same files as the driver-side implementation that this
   one replaced (``tests/selection/test_select_reference.py``). ``selected/`` holds only data
   (Parquet), its dataset card (``README.md``, ``hetray.datacard``:
   ``datasets.load_dataset("<run>/selected")`` reads it) and the manifest; the selection report
   (markdown + plots) goes beside it into ``selected_report/``, an output of the same stage.

**Two readings of the paper for sources without quality** (WinoGrande, WinoBias, WinoGender:
``quality`` null on every pair), chosen by ``select.keep_unscored``:

* ``False`` (default; paper A.3, "every source keeps its share"): such a source is cut to
  ``fraction`` like any other, by a seeded random sample within each cluster;
* ``True`` (the paper's "WinoGrande ... not filtered" reading): such a source is kept whole, and only the
  scored sources are cut to ``fraction`` per cluster (with ``stratify``, per cluster and source;
  without, per cluster over the scored sources only). The manifest lists them in ``kept_whole``.

Memory: the driver holds O(clusters x sources) numbers and the report's bounded samples (at
most ``REPORT_SAMPLE`` qualities per source, ``examples_per_cluster`` prompts per cluster), never
per-pair data. A worker holds one join part (about ``PARTITION_ROWS`` pairs and the
assignments of their prompts) or a read batch and a 16 MiB buffer, one cluster while ranking
it (its ranking columns and the sort: ~130 MB at its peak for a cluster of a million pairs;
that one grows with the cluster; with near-duplicate removal, also the cluster's vectors), and
the kept ids of one preference file while writing. The join's shuffle goes through files in
the stage's scratch folder, the percentiles' shuffles (past one partition) through Ray Data's
disk-based shuffle; neither through the object store. The scratch folder lies in the
stage's temporary folder under ``run_dir``, so on a multi-node cluster ``run_dir`` must be
storage that every node sees.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from ray.data.aggregate import Count
from ray.data.datasource import Datasink

from hetray.config import JobConfig
from hetray.datacard import write_empty, write_selected_card
from hetray.schema import PREFERENCE_SCHEMA, make_id, parquet_files
from hetray.selection.report import write_report
from hetray.selection.rules import cut, near_duplicates, order, percentiles, quotas, ranking, tie_hash
from hetray.stage import Stage, block_size, read_manifest, require_ray, run_stage, stage_task, wait_tasks
from hetray.unify.dataflow import map_to_disk, read_part, tables_to_disk

log = logging.getLogger(__name__)

REPORT_SAMPLE = 50_000  # pairs per source in the report's quality histograms (a seeded sample)
PARTITION_ROWS = 500_000  # pairs per join partition: bounds a worker's share of a join
# Ray Data blocks while the stage runs (as convert's): the peak PSS of select's join phase on 10M
# pairs (2 CPUs) was 3686-3795 MiB at Ray's 128 MiB in three runs, 3267-3432 at 32 MiB; 1M pairs
# 2797 -> 2716-2723; the selection is the same (blocks only cut the same rows differently)
BLOCK_BYTES = 32 << 20
SHUFFLE_BATCH_BYTES = 64 << 20  # input a shuffle buffers before partitioning it (Ray's default: 1 GiB)
ALL = 2**64 - 1  # a sample threshold that takes every pair


# ---------------------------------------------------------------------------- the stage


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
    def work(tmp: Path) -> dict:
        with block_size(BLOCK_BYTES):
            return _select(cfg, run_dir, pref_files, n_pairs, tmp / out_name, tmp / report_name, tmp.parent / "scratch")

    return run_stage(stage, work, force=force)


def _select(cfg: JobConfig, run_dir: Path, pref_files: list[str], n_pairs: int, out: Path, report_dir: Path,
            scratch: Path) -> dict:
    require_ray("select")
    s = cfg.select
    parts = max(1, math.ceil(n_pairs / PARTITION_ROWS))

    # 1. the narrow view joined with the clusters, filed by cluster; counts per (cluster, source)
    assign_files = parquet_files(run_dir / "clusters" / "assignments")
    joined = _with_clusters(pref_files, assign_files, cfg.seed, parts, scratch, s)
    counts = joined["counts"]
    if int(counts["n"].sum()) != n_pairs:
        raise RuntimeError(f"{n_pairs - int(counts['n'].sum())} pairs have no cluster assignment: re-run `hetray cluster`")
    if s.sources is not None:  # e.g. a WinoGrande-only baseline over the shared clusters
        present = set(counts["source"])
        unknown = sorted(set(s.sources) - present)
        if unknown:
            raise ValueError(
                f"select.sources: {', '.join(unknown)} not in {run_dir / 'preferences'} "
                f"(sources there: {', '.join(sorted(present))})"
            )
        counts = counts[counts["source"].isin(s.sources)].reset_index(drop=True)
    n_pairs = int(counts["n"].sum())
    pairs = scratch / "pairs"

    # 2. near-duplicates, inside each cluster
    dropped_dup = 0
    if s.dedup_threshold is not None:
        emb_files = parquet_files(run_dir / "embeddings")
        deduped = _per_cluster(pairs, counts).map_batches(
            _dedup_cluster, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"emb_files": emb_files, "threshold": s.dedup_threshold, "normalization": s.quality_normalization})
        counts = _file_by_cluster(deduped, scratch / "deduped", with_prompt=False)
        pairs = scratch / "deduped"
        dropped_dup = n_pairs - int(counts["n"].sum())

    # 3. quotas, on the driver, from the counts alone
    scored = counts.groupby("source")["scored"].sum()
    whole = sorted(scored.index[scored.to_numpy() == 0]) if s.keep_unscored else []
    plan = quotas(counts[["cluster", "source", "n"]], s.fraction, s.stratify, keep_whole=whole)
    cells = ["cluster", "source"] if s.stratify else ["cluster"]
    keep = plan[~plan["source"].isin(whole)].groupby(cells)["keep"].sum()
    n_source = counts.groupby("source")["n"].sum()
    sample_below = {src: ALL if n <= REPORT_SAMPLE else int(REPORT_SAMPLE / n * 2.0**64) for src, n in n_source.items()}

    # 4. rank and cut every cell, one task per cluster; the kept ids by preference file
    if s.quality_normalization == "percentile":
        with_pct = _with_percentiles(pairs, scored[scored > 0], parts)
        _file_by_cluster(with_pct, scratch / "ranked", with_prompt=False)
        pairs = scratch / "ranked"
    kept = _per_cluster(pairs, counts).map_batches(
        _cut_cluster, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"scratch": str(scratch), "keep": {_cell(k): int(v) for k, v in keep.items()}, "cells": cells,
                   "whole": whole, "normalization": s.quality_normalization, "sample_below": sample_below},
    ).to_pandas()
    if kept.empty:
        kept = pd.DataFrame({"cluster": pd.Series([], dtype=int), "source": pd.Series([], dtype=str),
                             "kept": pd.Series([], dtype=int)})

    # 5. the kept rows of every preference file, in the input order
    _write_selected(pref_files, scratch / "kept", out)
    table = plan.merge(kept.astype({"cluster": int, "kept": int}), on=["cluster", "source"], how="left")
    table["kept"] = table["kept"].fillna(0).astype(int)
    pairs_selected = int(table["kept"].sum())
    written = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
    if written != pairs_selected:
        raise RuntimeError(f"select kept {pairs_selected} pairs but wrote {written}: is every pair_id of "
                           f"{run_dir / 'preferences'} unique?")
    report = write_report(report_dir, cfg, table, _quality_sample(scratch / "sample"),
                          _examples(joined["nearest"], run_dir), sample_size=REPORT_SAMPLE)
    write_selected_card(out, cfg, table, whole, dropped_dup, PREFERENCE_SCHEMA)
    log.info("select: kept %d of %d pairs (fraction %s)", pairs_selected, n_pairs, s.fraction)
    return {
        "pairs_in": n_pairs,
        "pairs_selected": pairs_selected,
        "dropped_near_duplicates": dropped_dup,
        "kept_whole": whole,
        "n_clusters": int(cfg.cluster.n_clusters),
        "cells": table.to_dict(orient="records"),
        "report": report,
    }


# ---------------------------------------------------------------------------- 1. narrow view, by cluster


def _file_key(path: str) -> str:
    """A preference file's folder name among the kept ids: stable, derived from its path."""
    return make_id(path)


def _narrow(batch: pa.Table, seed: int, file: str) -> pa.Table:
    """The narrow view of a batch of one preference file (``file``: its key, ``_file_key``)."""
    q = batch["quality"]
    q = pc.if_else(pc.is_nan(q), pa.scalar(None, pa.float64()), pc.add(q, 0.0))  # NaN: no score; -0.0 == 0.0
    return pa.table(
        {
            "file": pa.repeat(pa.scalar(file, pa.string()), batch.num_rows),
            "pair_id": batch["pair_id"],
            "prompt_id": [make_id(p) for p in batch["prompt"].to_pylist()],
            "source": batch["source"],
            "quality": q,
            "tie": pa.array(tie_hash(batch["pair_id"].to_pylist(), seed), pa.uint64()),
        }
    )


NARROW = pa.schema([("file", pa.string()), ("pair_id", pa.string()), ("prompt_id", pa.string()),
                    ("source", pa.string()), ("quality", pa.float64()), ("tie", pa.uint64()), ("cluster", pa.int32())])
JOIN_BATCH_ROWS = 65_536  # rows of a preference or assignments file read at a time by the join's map tasks


def _prompt_key(table: pa.Table):
    return table["prompt_id"]


def _batches(file: str, columns: list[str]):
    for batch in pq.ParquetFile(file).iter_batches(batch_size=JOIN_BATCH_ROWS, columns=columns):
        yield pa.Table.from_batches([batch])


def _pairs_to_disk(path: str, parts: int, file: str, seed: int):
    """Map side of the join: the narrow view of one preference file, by hash part of ``prompt_id``."""
    key = _file_key(file)
    tables = (_narrow(t, seed, key) for t in _batches(file, ["pair_id", "prompt", "source", "quality"]))
    return tables_to_disk(path, parts, tables, key=_prompt_key)


def _assignments_to_disk(path: str, parts: int, file: str):
    """Map side of the join: one file of cluster assignments, by hash part of ``prompt_id``."""
    return tables_to_disk(path, parts, _batches(file, ["prompt_id", "cluster", "distance"]), key=_prompt_key)


def _join_part(folder: str, sources: list[str] | None, with_prompt: bool, examples: int, part: int,
               pair_paths: list[str], assign_paths: list[str], *index) -> dict:
    """Reduce side of the join: part ``part`` of the pairs meets the same part of the
    assignments (``index``: the batch parts of every pair file, then of every assignments
    file), filed by cluster (``_file_rows``)."""
    n = len(pair_paths)
    pairs = read_part(list(zip(pair_paths, index[:n])), part)
    assign = read_part(list(zip(assign_paths, index[n:])), part)
    if pairs is None or assign is None:  # no pairs here, or none with a cluster (the driver's count says so)
        return _file_rows(NARROW.empty_table().append_column("distance", pa.array([], pa.float32())), folder,
                          f"part-{part:05d}", sources, with_prompt, examples)
    joined = pairs.join(assign, keys="prompt_id", join_type="inner")
    return _file_rows(joined, folder, f"part-{part:05d}", sources, with_prompt, examples)


def _with_clusters(pref_files: list[str], assign_files: list[str], seed: int, parts: int, scratch: Path,
                   s) -> dict:
    """The narrow view joined with the cluster assignments (``cluster``, ``distance``) on
    ``prompt_id`` and filed by cluster into ``scratch/pairs``, as plain Ray tasks shuffled on
    disk (``hetray.unify.dataflow.map_to_disk``, as convert's): a task per preference file and
    per assignments file writes its rows by hash part of ``prompt_id``, then a task per part
    joins that part of both and files the rows (``_join_part``). A task holds a read batch and
    a 16 MiB buffer, or one part (about ``PARTITION_ROWS`` pairs and their prompts' clusters),
    so memory stays flat however many pairs there are; nothing goes through the object store.
    Ray Data's hash join, which this replaced, ran aggregator actors that held their
    partitions (~200 MB each) and stayed in the workers. Returns the parts' results
    (``_file_rows``), summed (``_sum_counts``)."""
    join_scratch = str(scratch / "join")
    pair_paths, pair_index = map_to_disk(join_scratch, "pairs", [(f, seed) for f in pref_files], parts,
                                         "select: pairs shuffled to disk", fn=_pairs_to_disk)
    assign_paths, assign_index = map_to_disk(join_scratch, "clusters", [(f,) for f in assign_files], parts,
                                             "select: assignments shuffled to disk", fn=_assignments_to_disk)
    join = stage_task(_join_part)
    refs = [join.remote(str(scratch / "pairs"), s.sources, s.dedup_threshold is not None, s.examples_per_cluster, p,
                        pair_paths, assign_paths, *pair_index, *assign_index) for p in range(parts)]
    results = list(wait_tasks(refs, "select: pairs joined with their clusters"))
    shutil.rmtree(join_scratch, ignore_errors=True)
    return _sum_counts(results, s.examples_per_cluster)


def _disk_shuffle(ctx, parts: int) -> None:
    """Shuffle through local files, a bounded batch of input at a time: flat memory at any size.

    The aggregator actors (one process each, ~200 MB) are capped at one per CPU of the cluster:
    Ray's default, min(partitions, 2 x CPUs), grows with the data until the cluster is full
    (2 aggregators at 1M pairs, 4 at 10M on 2 CPUs), which made the stage's peak grow with n."""
    ctx.use_disk_based_hash_shuffle = True
    ctx.shuffle_input_batch_bytes = SHUFFLE_BATCH_BYTES
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    ctx.max_hash_shuffle_aggregators = max(1, min(parts, cpus))


def _file_rows(table: pa.Table, folder: str, name: str, sources: list[str] | None, with_prompt: bool,
               examples: int) -> dict:
    """Files narrow rows by cluster (``<folder>/<cluster>/<name>.parquet``, only the rows of
    ``sources`` when given) and returns the rows per (cluster, source) and how many of them
    have a quality: the counts that the quotas need, aggregated where the rows are. With
    ``examples``, also each cluster's ``examples`` nearest prompts among the rows."""
    schema = NARROW if with_prompt else NARROW.remove(NARROW.get_field_index("prompt_id"))
    nearest = _nearest(table.select(["prompt_id", "cluster", "distance"]), examples) if examples else None
    if "pct" in table.column_names:  # once the percentiles are joined on
        schema = schema.append(pa.field("pct", pa.float64()))
    table = table.select(schema.names).cast(schema)
    counts = table.group_by(["cluster", "source"]).aggregate([("pair_id", "count"), ("quality", "count")])
    if sources is not None:
        table = table.filter(pc.is_in(table["source"], value_set=pa.array(sources, pa.string())))
    table = table.sort_by([("cluster", "ascending")])
    clusters = table["cluster"].to_numpy()
    starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]]) if len(clusters) else []
    for a, b in zip(starts, [*starts[1:], len(clusters)]):
        sub = os.path.join(folder, str(int(clusters[a])))
        os.makedirs(sub, exist_ok=True)
        pq.write_table(table.slice(a, b - a), os.path.join(sub, f"{name}.parquet"))
    return {"counts": counts, "nearest": nearest}


def _sum_counts(results: list[dict], examples: int = 0) -> dict:
    """The ``_file_rows`` results of several tasks, added up: ``counts`` per (cluster, source)
    (``n`` rows, ``scored`` of them with a quality) and each cluster's ``nearest`` prompts."""
    parts = [r["counts"] for r in results if r["counts"].num_rows]
    total = pa.concat_tables(parts).group_by(["cluster", "source"]).aggregate(
        [("pair_id_count", "sum"), ("quality_count", "sum")]) if parts else None
    counts = pd.DataFrame({
        "cluster": total["cluster"].to_numpy().astype(int) if total else [],
        "source": total["source"].to_pylist() if total else [],
        "n": total["pair_id_count_sum"].to_numpy().astype(int) if total else [],
        "scored": total["quality_count_sum"].to_numpy().astype(int) if total else [],
    }).sort_values(["cluster", "source"], ignore_index=True)
    nearest = [r["nearest"] for r in results if r["nearest"] is not None]
    nearest = _nearest(pa.Table.from_pandas(pd.concat(nearest), preserve_index=False), examples) \
        if examples and nearest else None
    return {"counts": counts, "nearest": nearest}


class ClusterSink(Datasink):
    """A Ray Data sink that files narrow rows by cluster (``_file_rows``, a file per write
    task) and keeps their summed counts (``_sum_counts``) as ``counts``."""

    def __init__(self, folder: str, with_prompt: bool = True):
        self.folder, self.with_prompt = folder, with_prompt
        self.counts = None

    def write(self, blocks, ctx) -> dict:
        tables = [b for b in blocks if b.num_rows]
        schema = NARROW if self.with_prompt else NARROW.remove(NARROW.get_field_index("prompt_id"))
        table = pa.concat_tables(tables, promote_options="permissive") if tables else schema.empty_table()
        return _file_rows(table, self.folder, f"part-{ctx.task_idx:05d}", None, self.with_prompt, 0)

    def on_write_complete(self, write_result) -> None:
        self.counts = _sum_counts(write_result.write_returns)["counts"]


def _file_by_cluster(ds, folder: Path, with_prompt: bool = True) -> pd.DataFrame:
    """Write ``ds`` (narrow rows) by cluster into ``folder``; its counts per (cluster, source)."""
    sink = ClusterSink(str(folder), with_prompt=with_prompt)
    ds.write_datasink(sink)
    return sink.counts


def _per_cluster(folder: Path, counts: pd.DataFrame):
    """One row per cluster (its folder of narrow rows): the input of the per-cluster tasks."""
    clusters = sorted(set(int(c) for c in counts["cluster"]))
    items = [{"folder": str(folder / str(c)), "cluster": c} for c in clusters]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 200)))


def _read_cluster(folder: str) -> pa.Table:
    return pq.read_table(folder) if os.path.isdir(folder) else NARROW.empty_table()


# ---------------------------------------------------------------------------- 2. near-duplicates


def _dedup_cluster(item: pa.Table, emb_files: list[str], threshold: float, normalization: str) -> pa.Table:
    """Near-duplicate removal inside one cluster, best pairs first (see rules.near_duplicates)."""
    group = _read_cluster(item["folder"][0].as_py())
    ids = pc.unique(group["prompt_id"])
    vecs = pads.dataset(emb_files).to_table(columns=["prompt_id", "vector"], filter=pc.field("prompt_id").isin(ids))
    at = pc.index_in(group["prompt_id"], value_set=vecs["prompt_id"])
    if at.null_count:
        missing = group["prompt_id"].filter(pc.is_null(at))[0].as_py()
        raise RuntimeError(f"prompt {missing} of cluster {item['cluster'][0]} has no embedding: re-run `hetray embed`")
    ranked = order(ranking(group.to_pandas(), normalization))
    rows = ranked.index.to_numpy()
    vectors = np.stack(vecs["vector"].to_numpy(zero_copy_only=False))[at.to_numpy()[rows]]
    return group.take(pa.array(rows[near_duplicates(vectors, threshold)]))


# ---------------------------------------------------------------------------- 4. ranking and cut


def _with_percentiles(folder: Path, scored: pd.Series, parts: int):
    """The narrow rows of ``folder`` plus ``pct``: each quality's percentile within its source
    (pandas' rank, method "average", pct=True), null for unscored pairs. Pairs that fit one
    partition get it in one task. More pairs: the distinct (source, quality) values are counted
    and sorted on Ray Data; a running count per source over the sorted blocks (O(blocks x
    sources) numbers on the driver) gives each value the pairs below it (``rules.percentiles``),
    and a join brings the percentiles back to the pairs."""
    n_scored = {src: int(n) for src, n in scored.items()}
    rows = ray.data.read_parquet(str(folder))
    if parts == 1:
        return rows.repartition(1).map_batches(_percentiles_in_one, fn_kwargs={"n_scored": n_scored}, batch_size=None,
                                               batch_format="pyarrow")
    _disk_shuffle(rows.context, parts)
    values = (rows.map_batches(_scored_only, batch_format="pyarrow")
              .groupby(["source", "quality"], num_partitions=parts).aggregate(Count(alias_name="dups"))
              .sort(["source", "quality"]).materialize())
    refs = values.to_arrow_refs()
    below, running = [], {}
    for block in ray.get([_per_source.remote(r) for r in refs]):
        below.append(dict(running))
        for src, n in block.items():
            running[src] = running.get(src, 0) + n
    pct = ray.data.from_arrow_refs([_block_percentiles.remote(r, b, n_scored) for r, b in zip(refs, below)])
    return rows.join(pct, "left_outer", num_partitions=parts, on=("source", "quality"))


def _percentiles_in_one(rows: pa.Table, n_scored: dict) -> pa.Table:
    values = _scored_only(rows).group_by(["source", "quality"]).aggregate([("quality", "count")])
    values = values.select(["source", "quality", "quality_count"]).rename_columns(["source", "quality", "dups"])
    values = values.sort_by([("source", "ascending"), ("quality", "ascending")])
    return rows.join(percentiles(values, {}, n_scored), keys=["source", "quality"], join_type="left outer")


def _scored_only(batch: pa.Table) -> pa.Table:
    return batch.select(["source", "quality"]).filter(pc.is_valid(batch["quality"]))


@ray.remote
def _per_source(block: pa.Table) -> dict:
    t = block.group_by("source").aggregate([("dups", "sum")])
    return dict(zip(t["source"].to_pylist(), t["dups_sum"].to_pylist()))


@ray.remote
def _block_percentiles(block: pa.Table, below: dict, n_scored: dict) -> pa.Table:
    return percentiles(block, below, n_scored)


def _cell(key) -> tuple:
    """A cell of the quota map: ``(cluster, source)``, or ``(cluster,)`` without ``stratify``."""
    key = key if isinstance(key, tuple) else (key,)
    return tuple(int(k) if isinstance(k, (int, np.integer)) else str(k) for k in key)


def _cut_cluster(item: pa.Table, scratch: str, keep: dict, cells: list[str], whole: list[str], normalization: str,
                 sample_below: dict) -> pa.Table:
    """Rank and cut the cells of one cluster (``rules.cut``). Writes the kept ids by preference
    file (``kept/<file key>/<cluster>.parquet``) and the report's sample
    (``sample/<cluster>.parquet``); returns the kept pairs per (cluster, source)."""
    cluster = item["cluster"][0].as_py()
    columns = ["file", "pair_id", "source", "quality", "tie"] + (["pct"] if normalization == "percentile" else [])
    group = pq.read_table(item["folder"][0].as_py(), columns=columns, read_dictionary=["file", "source"])
    group = group.unify_dictionaries().combine_chunks()
    by_source = "source" in cells
    quota = ({src: n for (c, src), n in keep.items() if c == cluster} if by_source else keep.get((cluster,), 0))
    kept, sampled = cut(group, quota, by_source, whole, normalization, sample_below)
    ids = group.select(["file", "pair_id", "source"]).filter(pa.array(kept))
    for key in ids["file"].chunk(0).dictionary.to_pylist() if ids.num_rows else []:
        part = ids.filter(pc.equal(ids["file"], key))
        if part.num_rows:
            os.makedirs(os.path.join(scratch, "kept", key), exist_ok=True)
            pq.write_table(part.select(["pair_id"]), os.path.join(scratch, "kept", key, f"{cluster}.parquet"))
    sample = group.select(["source", "quality", "tie", "pair_id"]).append_column("kept", pa.array(kept)).filter(
        pa.array(sampled))
    os.makedirs(os.path.join(scratch, "sample"), exist_ok=True)
    pq.write_table(sample.cast(sample.schema.set(0, pa.field("source", pa.string()))),
                   os.path.join(scratch, "sample", f"{cluster}.parquet"))
    per_source = ids.group_by("source").aggregate([("pair_id", "count")])
    return pa.table({"cluster": pa.array([cluster] * per_source.num_rows, pa.int64()),
                     "source": per_source["source"].cast(pa.string()), "kept": per_source["pair_id_count"]})


# ---------------------------------------------------------------------------- 5. the selected rows


@functools.lru_cache(maxsize=4)
def _kept_ids(kept_dir: str, key: str) -> pa.Array:
    folder = os.path.join(kept_dir, key)
    if not os.path.isdir(folder):
        return pa.array([], pa.string())
    return pq.read_table(folder, columns=["pair_id"])["pair_id"].combine_chunks()


SELECT_BATCH_ROWS = 65_536  # rows of a preference file filtered and written at a time
SELECT_FILE_BYTES = 64 << 20  # smaller preference files share an output file (and a task)


def _select_files(index: int, paths: list[str], kept_dir: str, out: str) -> int:
    """The kept rows of some preference files, in their order, streamed a batch at a time into
    ``train-{index:05d}.parquet``; returns their count. Through Ray Data (read -> filter ->
    write) the write step kept every block of a task until it ended (``itertools.tee`` in Ray
    2.60's ``plan_write_op``), so a worker's memory grew with the file."""
    rows, buffer = 0, []  # kept rows are gathered into row groups of about SELECT_BATCH_ROWS

    def flush(w):
        w.write_table(pa.concat_tables(buffer))
        buffer.clear()

    with pq.ParquetWriter(os.path.join(out, f"train-{index:05d}.parquet"), PREFERENCE_SCHEMA) as w:
        for path in paths:
            ids = _kept_ids(kept_dir, _file_key(path))
            for batch in pq.ParquetFile(path).iter_batches(batch_size=SELECT_BATCH_ROWS):
                table = pa.Table.from_batches([batch])
                buffer.append(table.filter(pc.is_in(table["pair_id"], value_set=ids))
                              .select(PREFERENCE_SCHEMA.names).cast(PREFERENCE_SCHEMA))
                rows += buffer[-1].num_rows
                if sum(b.num_rows for b in buffer) >= SELECT_BATCH_ROWS:
                    flush(w)
        if buffer:
            flush(w)
    return rows


def _file_groups(files: list[str], min_bytes: int = SELECT_FILE_BYTES) -> list[list[str]]:
    """Consecutive files, gathered until a group holds ``min_bytes``: one group per large file."""
    groups, size = [], min_bytes
    for f in files:
        if size >= min_bytes:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += os.path.getsize(f)
    return groups


def _write_selected(pref_files: list[str], kept_dir: Path, out: Path) -> None:
    """The kept rows of the preference files into ``out`` in the files' order: one Ray task
    and one output file per preference file (small ones gathered, ``_file_groups``)."""
    out.mkdir(parents=True, exist_ok=True)
    task = stage_task(_select_files)
    groups = _file_groups(pref_files)
    refs = [task.remote(i, g, str(kept_dir), str(out)) for i, g in enumerate(groups)]
    for _ in wait_tasks(refs, "select: output files written"):
        pass
    for f in out.glob("train-*.parquet"):  # empty parts carry no rows; drop them
        if pq.ParquetFile(f).metadata.num_rows == 0:
            f.unlink()
    if not any(out.glob("*.parquet")):
        write_empty(out / "train-00000.parquet", PREFERENCE_SCHEMA)


# ---------------------------------------------------------------------------- the report's inputs


def _quality_sample(folder: Path) -> pd.DataFrame:
    """Qualities before (a seeded sample of at most about REPORT_SAMPLE pairs per source) and
    after (those of the sample that were kept)."""
    files = parquet_files(folder)
    if not files:
        return pd.DataFrame({"source": [], "quality": [], "set": []})
    rows = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    rows = rows.sort_values(["source", "tie", "pair_id"], ignore_index=True)
    before = rows[["source", "quality"]].assign(set="before")
    after = rows.loc[rows["kept"], ["source", "quality"]].assign(set="after")
    return pd.concat([before, after], ignore_index=True)


def _nearest(rows: pa.Table, n: int) -> pd.DataFrame:
    """The ``n`` distinct prompts nearest each cluster's centroid among ``rows``."""
    near = rows.to_pandas().drop_duplicates("prompt_id").sort_values(["cluster", "distance", "prompt_id"])
    return near.groupby("cluster").head(n)


def _texts_in(file: str, ids: pa.Array) -> pa.Table:
    """(prompt_id, prompt) of the rows of one embeddings file whose id is in ``ids``, streamed a
    batch at a time without Arrow's read-ahead."""
    return pads.dataset(file).scanner(columns=["prompt_id", "prompt"], filter=pc.field("prompt_id").isin(ids),
                                      batch_readahead=1, fragment_readahead=1).to_table()


def _examples(nearest: pd.DataFrame | None, run_dir: Path) -> dict:
    """The texts of the prompts nearest each centroid (the join's tasks found them), looked up
    by a Ray task per embeddings file: the driver gets the few texts, never reads the prompts
    (it did, streamed: on 2.5M prompts its RSS rose 287 -> 387 MiB, and more with the data)."""
    if nearest is None:
        return {}
    ids = ray.put(pa.array(nearest["prompt_id"].tolist(), pa.string()))
    refs = [stage_task(_texts_in).remote(f, ids) for f in parquet_files(run_dir / "embeddings")]
    found = [t for t in wait_tasks(refs, "select: example prompts looked up") if t.num_rows]
    texts = pa.concat_tables(found) if found else pa.table({"prompt_id": [], "prompt": []})
    texts = dict(zip(texts["prompt_id"].to_pylist(), texts["prompt"].to_pylist()))
    out: dict = {}
    for r in nearest.itertuples():
        out.setdefault(int(r.cluster), []).append(texts.get(r.prompt_id, ""))
    return out

