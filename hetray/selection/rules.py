"""The pure logic of selection (paper 2.4, 2.5, A.3): quotas, ranking keys, the top of a cell.

All functions work on pandas frames with the columns ``pair_id``, ``source``, ``quality``,
``cluster`` (and ``tie``, a seeded hash of ``pair_id``); no Ray, no files.

* ``quotas``: how many pairs each (cluster, source) cell keeps. Every source keeps
  ``round(fraction * its size)`` pairs (so each source keeps its share of the data), spread over
  the clusters in proportion to the cell sizes by the largest-remainder method. Fraction 1.0
  keeps every pair. Sources named in ``keep_whole`` (``select.keep_unscored``: the sources
  without quality scores) keep every pair, and the others are cut as if they were alone.
* ``unscored_sources``: the sources whose pairs all have a null quality (WinoGrande, WinoBias,
  WinoGender).
* ``ranking``: scored rows rank by quality, highest first (optionally as a percentile within
  their source); rows without a quality rank by the seeded hash alone, i.e. a seeded random
  sample. Ties in quality are broken by the same hash, so the order is total and reproducible.
* ``top_of_cell``: the first ``keep`` rows of a cell in that order.
* ``cut`` and ``percentiles``: the same rules on Arrow tables, for the distributed stage: ``cut``
  ranks the cells of one cluster and keeps their quotas; ``percentiles`` gives the within-source
  percentile of each distinct quality from one block of the sorted distinct values. Both give
  exactly what ``ranking`` and ``order`` give on the whole frame.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from hetray.selection.blas import import_faiss


def tie_hash(pair_ids, seed: int) -> np.ndarray:
    """A seeded, platform-independent uint64 hash of each pair id."""
    key = f"hetray{seed:010d}"[-16:]
    return pd.util.hash_array(np.asarray(pair_ids, dtype=object), hash_key=key, categorize=False)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def unscored_sources(df: pd.DataFrame) -> list[str]:
    """Sources of ``df`` (columns source, quality) whose every pair has a null quality, sorted."""
    scored = df["quality"].notna().groupby(df["source"]).any()
    return sorted(scored.index[~scored.to_numpy()].tolist())


def quotas(counts: pd.DataFrame, fraction: float, stratify: bool = True, keep_whole=()) -> pd.DataFrame:
    """``counts``: columns cluster, source, n -> the same rows plus ``keep``.

    With ``stratify`` (the paper), each source's total keep is ``round(fraction * N_source)``
    and is spread over its clusters by largest remainder; without, each cluster keeps
    ``round(fraction * N_cluster)`` spread over its sources the same way. Cells of the sources
    in ``keep_whole`` keep all their pairs and do not count towards the other cells' quotas.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    out = counts.copy()
    out["n"] = out["n"].astype(int)
    if fraction == 1:
        out["keep"] = out["n"]
        return out
    group = "source" if stratify else "cluster"
    order = "cluster" if stratify else "source"
    whole = out["source"].isin(list(keep_whole))
    keep = out["n"].where(whole, 0)
    for _, cells in out[~whole].groupby(group, sort=True):
        exact = cells["n"] * fraction
        base = np.floor(exact).astype(int)
        extra = _round_half_up(cells["n"].sum() * fraction) - int(base.sum())
        # largest fractional part first; equal parts go to the lower cluster (source) id
        rest = pd.DataFrame({"frac": exact - base, "by": cells[order]}).sort_values(
            ["frac", "by"], ascending=[False, True]
        )
        base.loc[rest.index[:extra]] += 1
        keep.loc[cells.index] = np.minimum(base, cells["n"])
    out["keep"] = keep.astype(int)
    return out


def ranking(df: pd.DataFrame, normalization: str = "none") -> pd.DataFrame:
    """Add ``score`` (higher is better; -inf for unscored rows) to ``df``.

    ``normalization="percentile"`` replaces quality by its percentile within its source, and
    gives unscored rows a seeded uniform percentile: then sources of different scales (a
    toxicity gap, a rank gap) and unscored sources compete fairly when cells mix sources.
    """
    df = df.copy()
    q = df["quality"].astype(float)
    if normalization == "percentile":
        pct = q.groupby(df["source"]).rank(pct=True, method="average")
        uniform = (df["tie"].astype(np.uint64) >> np.uint64(11)).astype(float) / float(1 << 53)
        df["score"] = pct.where(q.notna(), uniform)
    elif normalization == "none":
        df["score"] = q.fillna(-np.inf)
    else:
        raise ValueError(f"unknown quality normalization {normalization!r}")
    return df


def order(df: pd.DataFrame) -> pd.DataFrame:
    """Best first: score descending, then the seeded hash, then pair_id (total order)."""
    return df.sort_values(["score", "tie", "pair_id"], ascending=[False, True, True], kind="mergesort")


def top_of_cell(cell: pd.DataFrame, keep: int) -> pd.DataFrame:
    return order(cell).head(keep)


def _uniform(tie: np.ndarray) -> np.ndarray:
    """The seeded uniform percentile of an unscored row (as in ``ranking``)."""
    return (tie.astype(np.uint64) >> np.uint64(11)).astype(float) / float(1 << 53)


def cut(group: pa.Table, quota, by_source: bool, whole: list[str], normalization: str,
        sample_below: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rank the cells of one cluster and keep their quotas. ``group``: the pairs of one cluster
    (columns pair_id, source, quality, tie, and ``pct`` with ``normalization="percentile"``);
    ``quota``: how many pairs each cell keeps: a dict source -> keep when the cells are
    (cluster, source) (``by_source``), else one number for the cluster. Pairs of the ``whole``
    sources are all kept and take no part in the ranking. Returns two masks over the rows: kept,
    and in the report's sample (``tie <= sample_below[source]``)."""
    source = group["source"]
    if not pa.types.is_dictionary(source.type):
        source = pc.dictionary_encode(source)
    source = pa.chunked_array(source).unify_dictionaries() if isinstance(source, pa.ChunkedArray) else source
    chunks = source.chunks if isinstance(source, pa.ChunkedArray) else [source]
    names = chunks[0].dictionary.to_pylist() if chunks else []
    code = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks]) if chunks else np.zeros(0, int)
    tie = group["tie"].to_numpy()
    sampled = tie <= np.array([sample_below[s] for s in names], dtype=np.uint64)[code]
    kept = np.isin(code, [i for i, s in enumerate(names) if s in set(whole)])
    ranked = np.flatnonzero(~kept)
    if len(ranked) == 0:
        return kept, sampled
    q = group["quality"].to_numpy().astype(float)[ranked]
    if normalization == "percentile":
        score = np.where(np.isnan(q), _uniform(tie[ranked]), group["pct"].to_numpy().astype(float)[ranked])
    elif normalization == "none":
        score = np.where(np.isnan(q), -np.inf, q)
    else:
        raise ValueError(f"unknown quality normalization {normalization!r}")
    pair_id = group["pair_id"] if len(ranked) == group.num_rows else group["pair_id"].take(pa.array(ranked))
    keys = {"cell": code[ranked] if by_source else np.zeros(len(ranked), np.int32), "score": score,
            "tie": tie[ranked], "pair_id": pair_id}
    best = pc.sort_indices(pa.table(keys), [("cell", "ascending"), ("score", "descending"), ("tie", "ascending"),
                                            ("pair_id", "ascending")]).to_numpy()
    cell = keys["cell"][best]
    first = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])  # where each cell starts in that order
    rank = np.arange(len(best)) - np.repeat(first, np.diff(np.r_[first, len(best)]))
    limit = np.array([quota.get(s, 0) for s in names])[cell] if by_source else np.full(len(best), int(quota))
    kept[ranked[best[rank < limit]]] = True
    return kept, sampled


def percentiles(values: pa.Table, below: dict, n_scored: dict) -> pa.Table:
    """``values``: distinct (source, quality) with ``dups`` (the pairs that have it), sorted by
    source then quality; ``below``: per source, the scored pairs under this block's first value;
    ``n_scored``: the scored pairs of each source. Returns (source, quality, pct), where ``pct``
    is pandas' ``rank(pct=True, method="average")`` within the source, bit for bit:
    ``(less + (dups + 1) / 2) / n`` with ``less`` the pairs of lower quality."""
    source = values["source"].to_numpy(zero_copy_only=False)
    dups = values["dups"].to_numpy().astype(np.int64)
    if len(source) == 0:
        return pa.table({"source": values["source"], "quality": values["quality"], "pct": pa.array([], pa.float64())})
    starts = np.r_[True, source[1:] != source[:-1]]
    run = np.cumsum(starts) - 1  # which run of one source each row is in
    first = np.flatnonzero(starts)
    before_in_block = np.cumsum(dups) - dups
    less = before_in_block - before_in_block[first][run] + np.array([below.get(s, 0) for s in source[first]])[run]
    n = np.array([n_scored[s] for s in source[first]], dtype=np.int64)[run]
    pct = (less + (dups + 1) / 2) / n
    return pa.table({"source": values["source"], "quality": values["quality"], "pct": pa.array(pct, pa.float64())})


def near_duplicates(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy near-duplicate removal over rows given best-first: a row is dropped when its
    cosine similarity to an already kept row is at least ``threshold``. Returns a keep mask.

    Vectors must be L2-normalised. Cost is O(n * kept * d) per call: meant for one cluster.
    """
    faiss = import_faiss()
    keep = np.zeros(len(vectors), dtype=bool)
    index = faiss.IndexFlatIP(vectors.shape[1])
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    for i in range(len(vecs)):
        if index.ntotal:
            sim, _ = index.search(vecs[i : i + 1], 1)
            if sim[0, 0] >= threshold:
                continue
        keep[i] = True
        index.add(vecs[i : i + 1])
    return keep
