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
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


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


def near_duplicates(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy near-duplicate removal over rows given best-first: a row is dropped when its
    cosine similarity to an already kept row is at least ``threshold``. Returns a keep mask.

    Vectors must be L2-normalised. Cost is O(n * kept * d) per call: meant for one cluster.
    """
    import faiss

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
