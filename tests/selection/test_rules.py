"""Pure selection logic: quotas, stratification, ranking, near duplicates."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from hetray.selection.rules import (cut, near_duplicates, order, percentiles, quotas, ranking, tie_hash, top_of_cell,
                                    unscored_sources)


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


# ---------------------------------------------------------------------------- the distributed forms


def _frame(rng, n, sources=("tox", "rank", "wg")):
    ids = [f"p{i:05d}" for i in range(n)]
    src = rng.choice(list(sources), n)
    q = np.round(rng.random(n) * 4, 1)  # few levels: many ties
    q[(src == "wg") | (rng.random(n) < 0.1)] = np.nan  # wg unscored; some unscored rows elsewhere
    return pd.DataFrame({"pair_id": ids, "source": src, "quality": q, "cluster": rng.integers(0, 3, n).astype(np.int32),
                         "tie": tie_hash(ids, 5), "file": np.uint64(7)})


def _percentile_table(df):
    """What the stage feeds ``cut``: the frame plus ``pct`` from ``percentiles`` over two blocks."""
    scored = df.dropna(subset=["quality"])
    values = scored.groupby(["source", "quality"]).size().rename("dups").reset_index()
    t = pa.Table.from_pandas(values, preserve_index=False)
    n_scored = scored.groupby("source").size().to_dict()
    half = len(t) // 2  # the stage hands the sorted values over block by block
    below = t.slice(0, half).to_pandas().groupby("source")["dups"].sum().to_dict()
    pct = pa.concat_tables([percentiles(t.slice(0, half), {}, n_scored), percentiles(t.slice(half), below, n_scored)])
    return df.merge(pct.to_pandas(), on=["source", "quality"], how="left")


def test_percentiles_are_pandas_rank_bit_for_bit():
    df = _frame(np.random.default_rng(2), 3000)
    got = _percentile_table(df).set_index("pair_id")["pct"]
    want = df.set_index("pair_id")["quality"].groupby(df.set_index("pair_id")["source"]).rank(pct=True, method="average")
    scored = df["quality"].notna().to_numpy()
    assert np.array_equal(got.to_numpy()[scored], want.to_numpy()[scored])  # exact, not approx
    assert got.isna().to_numpy()[~scored].all()


@pytest.mark.parametrize("normalization,stratify", [("none", True), ("none", False), ("percentile", True),
                                                    ("percentile", False)])
def test_cut_keeps_what_the_whole_frame_ranking_keeps(normalization, stratify):
    df = _frame(np.random.default_rng(3), 2000)
    cells = ["cluster", "source"] if stratify else ["cluster"]
    plan = quotas(df.groupby(["cluster", "source"]).size().rename("n").reset_index(), 0.3, stratify)
    keep = plan.groupby(cells)["keep"].sum()
    # reference: one ranking of the whole frame, the top of each cell
    ranked = order(ranking(df, normalization))
    want = set(ranked[ranked.groupby(cells, sort=False).cumcount().to_numpy()
                      < ranked.set_index(cells).index.map(keep).to_numpy()]["pair_id"])
    table = _percentile_table(df) if normalization == "percentile" else df
    got, sampled = set(), 0
    for c, cluster in table.groupby("cluster"):  # one cluster at a time, in a scrambled row order
        cluster = cluster.sample(frac=1, random_state=0)
        quota = keep[c].to_dict() if stratify else int(keep[c])
        k, s = cut(pa.Table.from_pandas(cluster, preserve_index=False), quota, stratify, [], normalization,
                   {src: 2**63 for src in ("tox", "rank", "wg")})
        got |= set(cluster["pair_id"][k])
        sampled += s.sum()
    assert got == want and len(got) == plan["keep"].sum()
    assert 0.4 * len(df) < sampled < 0.6 * len(df)  # tie <= 2**63: about half the pairs


def test_cut_keeps_whole_sources_whole():
    df = _frame(np.random.default_rng(4), 300)
    cluster = df[df["cluster"] == 0].reset_index(drop=True)
    kept, sampled = cut(pa.Table.from_pandas(cluster, preserve_index=False), 5, False, ["wg"], "none",
                        {"tox": 0, "rank": 0, "wg": 2**64 - 1})
    assert (cluster["source"][kept] == "wg").sum() == (cluster["source"] == "wg").sum()
    assert (cluster["source"][kept] != "wg").sum() == 5
    best = order(ranking(cluster[cluster["source"] != "wg"])).head(5)["pair_id"]
    assert set(cluster["pair_id"][kept & (cluster["source"] != "wg").to_numpy()]) == set(best)
    assert set(cluster["pair_id"][sampled]) == set(cluster["pair_id"][cluster["source"] == "wg"])  # tie <= 0: none
