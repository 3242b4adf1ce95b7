"""Telling an effect from noise: bootstrap confidence intervals for every metric of every suite,
and paired differences between two models scored on the same items.

One implementation for all suites. The unit of resampling is a suite's item (a WinoBias or
WinoGender pair, a WinoGrande row, a reward pair, a chat prompt): ``eval.bootstrap`` resamples
(default 1000) of the n items, drawn with replacement from ``numpy.random.default_rng(seed)``
with the run's seed. Every metric is recomputed on every resample by the suite's own
``aggregate``, and the interval is the percentile interval at ``eval.confidence`` (default 0.95:
the 2.5% and 97.5% quantiles of the resampled values). Only float metrics get one; counts
(``pairs``, ``items``, ``responses``: ints) and names do not.

Fast path. Most metrics are means over items of a per-item value (Bias = mean |logp_pro -
logp_anti|, Accuracy, Similarity, WinoGrande accuracy, ...). A metric is treated as such when
``aggregate([record])`` of each single record, averaged, gives ``aggregate(records)`` both on all
items and on one random resample (checked on the data, to 1e-9). Its resampled values are then
one matrix product: (resamples x n) draw counts @ (n) per-item values / n; 792 WinoBias pairs x
1000 resamples take a fraction of a second. Any other metric is recomputed by calling
``aggregate`` on every resampled record list (correct for any statistic, slower).

Paired differences. Every model of a suite sees the same items in the same order (the runner
loads them once), and the draws depend only on (n, resamples, seed), so model A and model B are
resampled on the SAME items: the difference A - B on each resample gives its paired interval.
Items are checked to be aligned (``Suite.item_id``); a model compared with itself gets exactly 0
and the zero-width interval [0.0, 0.0]. ``excludes_zero``: the interval lies wholly above or
below 0. For suites that generate answers (``Suite.answers``) the share of answers that changed
(the generated text differs) is reported per side and overall.

In ``metrics.json`` (``hetray.eval.outputs``):

* ``{model: {suite: {..., "<metric>": v, "<metric>_ci": [lo, hi], ...}}}``: each float metric's
  interval right after it (absent with ``eval.bootstrap: 0``);
* ``_meta.bootstrap``: ``{"resamples", "confidence", "seed", "baseline"}``;
* ``_meta.paired``: ``{model: {suite: {"items": n, "metrics": {metric: {"diff": d, "ci": [lo, hi],
  "excludes_zero": bool}}, "changed_answers": {"overall": s, "<side>": s, ...}}}}`` for every
  model but the baseline (``"ci": null`` with ``eval.bootstrap: 0``; a suite whose items differ
  between the two models holds ``{"skipped": reason}`` instead).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# at most this many draws (resamples x items) in memory at once
CHUNK = 1 << 22


class Resampled:
    """A suite's metrics on its records (``point``) and on every bootstrap resample of them
    (``samples[metric]``: one value per resample). Two ``Resampled`` of the same number of
    items, resamples and seed were drawn on the same items, resample by resample."""

    def __init__(self, aggregate: Callable[[list[dict]], dict], records: list[dict], resamples: int, seed: int):
        self.point = aggregate(records)
        self.n, self.resamples, self.seed = len(records), resamples, seed
        keys = [k for k, v in self.point.items() if isinstance(v, float)]
        self.samples: dict[str, np.ndarray] = {}
        if not keys or not self.n or resamples < 1:
            return
        per_item = _per_item(aggregate, records, self.point, keys, seed)
        if per_item:
            names = list(per_item)
            means = resample_means(np.column_stack([per_item[k] for k in names]), resamples, seed)
            self.samples.update({k: means[:, j] for j, k in enumerate(names)})
        rest = [k for k in keys if k not in per_item]
        if rest:
            values = {k: [] for k in rest}
            for idx in index_chunks(self.n, resamples, seed):
                for row in idx:
                    out = aggregate([records[i] for i in row])
                    for k in rest:
                        values[k].append(_float(out.get(k)))
            self.samples.update({k: np.array(v) for k, v in values.items()})


def index_chunks(n: int, resamples: int, seed: int):
    """The bootstrap draws, in chunks of rows: each row is n item indices drawn with replacement.
    The same (n, resamples, seed) give the same rows."""
    rng = np.random.default_rng(seed)
    rows = max(1, min(resamples, CHUNK // max(n, 1)))
    for start in range(0, resamples, rows):
        yield rng.integers(0, n, size=(min(rows, resamples - start), n))


def resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples x m) column means of ``values`` (n x m) over the rows of every resample: the
    draw counts of a chunk (via ``bincount``) times ``values``, divided by n."""
    n = values.shape[0]
    out = []
    for idx in index_chunks(n, resamples, seed):
        k = idx.shape[0]
        counts = np.bincount((idx + n * np.arange(k)[:, None]).ravel(), minlength=k * n).reshape(k, n)
        out.append(counts.astype(np.float64) @ values / n)
    return np.concatenate(out)


def interval(samples: np.ndarray, confidence: float) -> list[float]:
    """The percentile interval ``[lo, hi]`` (NaN when any resample gave NaN)."""
    if not len(samples) or np.isnan(samples).any():
        return [math.nan, math.nan]
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(samples, [tail, 1 - tail])
    return [float(lo), float(hi)]


def intervals(res: Resampled, confidence: float) -> dict[str, list[float]]:
    """``{metric: [lo, hi]}`` for every resampled metric (empty with 0 resamples)."""
    return {k: interval(s, confidence) for k, s in res.samples.items()}


def stderrs(res: Resampled) -> dict[str, float]:
    """``{metric: bootstrap standard error}``: the standard deviation (ddof 1) of the metric over
    the resamples behind its CI (NaN when a resample gave NaN; empty with fewer than 2 resamples).
    lm-evaluation-harness reports the same statistic as ``<metric>_stderr`` for its bootstrapped
    metrics."""
    return {k: float(np.std(s, ddof=1)) for k, s in res.samples.items() if len(s) > 1}


def with_intervals(overall: dict, cis: dict[str, list[float]]) -> dict:
    """``overall`` with ``"<metric>_ci": [lo, hi]`` right after each metric that has one."""
    out = {}
    for k, v in overall.items():
        out[k] = v
        if k in cis:
            out[f"{k}_ci"] = cis[k]
    return out


def paired(res: Resampled, base: Resampled, confidence: float) -> dict[str, dict]:
    """``{metric: {"diff", "ci", "excludes_zero"}}``: ``res`` minus ``base``, with the interval
    of the difference on the same resampled items (``ci`` None without resamples)."""
    if (res.n, res.resamples, res.seed) != (base.n, base.resamples, base.seed):
        raise ValueError(f"not paired: {res.n} vs {base.n} items, or other resamples / seed")
    out = {}
    for k, v in res.point.items():
        b = base.point.get(k)
        if not isinstance(v, float) or not isinstance(b, float):
            continue
        ci = interval(res.samples[k] - base.samples[k], confidence) if k in res.samples and k in base.samples else None
        excludes = ci is not None and (ci[0] > 0 or ci[1] < 0)
        out[k] = {"diff": v - b, "ci": ci, "excludes_zero": bool(excludes)}
    return out


def changed_answers(records: list[dict], base: list[dict], answers: tuple[tuple[str, str], ...]) -> dict:
    """The share of answers that differ from the baseline's on the same items: ``{"overall": s,
    side: s, ...}``; ``answers`` = ``(side, record field)`` pairs (e.g. ``("pro", "generation_pro")``)."""
    if len(records) != len(base):
        raise ValueError(f"not paired: {len(records)} vs {len(base)} records")
    changed = {side: [a[f] != b[f] for a, b in zip(records, base)] for side, f in answers}
    every = [c for side in changed.values() for c in side]
    out = {"overall": sum(every) / len(every) if every else math.nan}
    out.update({side: sum(c) / len(c) if c else math.nan for side, c in changed.items()})
    return out


def _float(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _per_item(aggregate, records: list[dict], point: dict, keys: list[str], seed: int) -> dict[str, np.ndarray]:
    """``{metric: per-item values}`` for the metrics that are the mean of their one-item values
    (checked on all records and on one random resample); the others are left out."""
    try:
        singles = [aggregate([r]) for r in records]
    except Exception:  # noqa: BLE001 - an aggregate that needs more than one item: the slow path
        return {}
    values = {k: np.array([_float(s.get(k)) for s in singles]) for k in keys}
    check = np.random.default_rng([seed, 1]).integers(0, len(records), size=len(records))
    other = aggregate([records[i] for i in check])
    return {k: v for k, v in values.items()
            if _close(float(v.mean()), point[k]) and _close(float(v[check].mean()), _float(other.get(k)))}
