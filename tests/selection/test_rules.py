"""Pure selection logic: quotas, stratification, ranking, near duplicates."""

import numpy as np
import pandas as pd
import pytest

from hetray.selection.rules import near_duplicates, order, quotas, ranking, tie_hash, top_of_cell, unscored_sources


def counts(rows):
    return pd.DataFrame(rows, columns=["cluster", "source", "n"])


def test_each_source_keeps_its_share_within_rounding():
    rng = np.random.default_rng(0)
    rows = [(c, s, int(rng.integers(0, 500))) for c in range(10) for s in ("oasst", "winogrande", "hh")]
    c = counts(rows)
    for fraction in (0.2, 0.4, 0.6, 0.33):
        q = quotas(c, fraction)
        per_source = q.groupby("source")[["n", "keep"]].sum()
        target = np.floor(per_source["n"] * fraction + 0.5)
        assert (per_source["keep"] == target).all()
        # shares preserved within rounding
        share_before = per_source["n"] / per_source["n"].sum()
        share_after = per_source["keep"] / per_source["keep"].sum()
        assert np.abs(share_before - share_after).max() < 3 / per_source["keep"].sum()
        # every cell within one of its exact share, never above its size
        assert ((q["keep"] - q["n"] * fraction).abs() < 1).all()
        assert (q["keep"] <= q["n"]).all()


def test_fraction_one_keeps_everything_and_bad_fraction_fails():
    c = counts([(0, "a", 3), (1, "a", 0), (1, "b", 5)])
    assert quotas(c, 1.0)["keep"].tolist() == [3, 0, 5]
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            quotas(c, bad)


def test_largest_remainder_is_deterministic():
    c = counts([(0, "a", 5), (1, "a", 5), (2, "a", 5)])
    q = quotas(c, 0.5)  # 7.5 -> 8 spread over 2.5 + 2.5 + 2.5: the lower clusters get the extra
    assert q["keep"].tolist() == [3, 3, 2]


def test_unstratified_quota_is_per_cluster():
    c = counts([(0, "a", 10), (0, "b", 30), (1, "a", 10)])
    q = quotas(c, 0.5, stratify=False)
    assert q.groupby("cluster")["keep"].sum().tolist() == [20, 5]


def _cell(quality, source="s", seed=0):
    ids = [f"p{i}" for i in range(len(quality))]
    return pd.DataFrame({"pair_id": ids, "source": source, "quality": quality, "cluster": 0, "tie": tie_hash(ids, seed)})


def test_top_by_quality_is_really_the_top():
    rng = np.random.default_rng(1)
    q = rng.random(200)
    top = top_of_cell(ranking(_cell(q)), 40)
    assert len(top) == 40
    assert top["quality"].min() >= np.sort(q)[-40]


def test_unscored_sources_are_random_but_seeded():
    cell = _cell([None] * 100)
    a = top_of_cell(ranking(cell), 10)["pair_id"].tolist()
    b = top_of_cell(ranking(cell), 10)["pair_id"].tolist()
    c = top_of_cell(ranking(_cell([None] * 100, seed=1)), 10)["pair_id"].tolist()
    assert a == b and a != c
    assert a != [f"p{i}" for i in range(10)]  # not just the first rows


def test_percentile_normalisation_puts_sources_on_one_scale():
    df = pd.concat([_cell([0.1, 0.2, 0.3], "tox"), _cell([10.0, 20.0, 30.0], "rank")], ignore_index=True)
    df["pair_id"] = [f"x{i}" for i in range(6)]
    r = ranking(df, "percentile")
    assert r.groupby("source")["score"].max().tolist() == [1.0, 1.0]
    best = order(r).head(2)
    assert sorted(best["source"]) == ["rank", "tox"]


def test_near_duplicates_keep_the_first_best_row():
    v = np.array([[1, 0], [0.999, 0.04], [0, 1], [0.7, 0.7]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert near_duplicates(v, 0.95).tolist() == [True, False, True, True]


def test_quotas_keep_whole_and_unscored_sources():
    c = counts([(0, "oasst", 6), (1, "oasst", 4), (0, "winogrande", 4), (1, "winogrande", 2)])
    q = quotas(c, 0.5, keep_whole=["winogrande"])
    assert q["keep"].tolist() == [3, 2, 4, 2]
    assert quotas(c, 0.5)["keep"].tolist() == [3, 2, 2, 1]
    # without stratification the quota of a cluster counts its scored pairs only
    assert quotas(c, 0.5, stratify=False, keep_whole=["winogrande"])["keep"].tolist() == [3, 2, 4, 2]
    df = pd.DataFrame({"source": ["oasst", "oasst", "wg", "wg", "mixed", "mixed"],
                       "quality": [0.5, 0.1, None, None, None, 0.3]})
    assert unscored_sources(df) == ["wg"]  # one scored pair makes a source scored
