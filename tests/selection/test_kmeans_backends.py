"""The k-means backends (``cluster.backend``: faiss / numpy / auto), faiss's threads inside a Ray
task, and the sample keys. Quality and reproducibility of whole fits are in test_kmeans.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError
from sklearn.cluster import KMeans

from hetray.config import JobConfig
from hetray.selection.config import ClusterConfig
from hetray.selection.kmeans import (
    _faiss_threads,
    _row_keys,
    assign,
    assign_batch,
    fit_kmeans,
    kmeans_inertia,
    lloyd_batch,
    resolve_backend,
)
from test_kmeans import blobs, embeddings_table


def test_backend_setting_is_validated():
    assert ClusterConfig().backend == "auto"
    assert ClusterConfig(backend="faiss").backend == "faiss"
    with pytest.raises(ValidationError, match="backend"):
        ClusterConfig(backend="cuda")
    with pytest.raises(ValidationError, match=r"cluster\.backend"):
        JobConfig.model_validate({"run_dir": "r", "convert": {"sources": [{"name": "x", "format": "winogrande", "path": "x"}]},
                                  "cluster": {"backend": "gpu"}})
    assert [resolve_backend("auto", k) for k in (1, 10, 255, 256, 1000)] == ["numpy"] * 3 + ["faiss"] * 2
    assert resolve_backend("numpy", 5000) == "numpy" and resolve_backend("faiss", 2) == "faiss"
    with pytest.raises(ValueError, match="backend must be one of auto, faiss, numpy, not 'gpu'"):
        resolve_backend("gpu", 10)


@pytest.mark.parametrize("R,k", [(3, 7), (1, 300)])
def test_faiss_and_numpy_block_pass_agree(R, k):
    """One block, the same centroids: both backends give the float64 brute-force answer."""
    x = blobs(n=4000, d=48, centers=20, std=3.0, seed=5)
    rng = np.random.default_rng(1)
    cents = (x[rng.choice(len(x), R * k, replace=False)] + rng.normal(0, 0.01, (R * k, 48))).astype(np.float32)
    cents = cents.reshape(R, k, 48)
    t = embeddings_table(x)
    out = {b: lloyd_batch(t, cents, "vector", n_far=5, backend=b) for b in ("numpy", "faiss")}
    x64 = x.astype(np.float64)
    for r in range(R):
        d2 = ((x64[:, None, :] - cents[r].astype(np.float64)[None]) ** 2).sum(-1)
        labels = d2.argmin(1)
        ref_sums = np.zeros((k, 48))
        np.add.at(ref_sums, labels, x64)
        far = np.sort(d2.min(1))[::-1][:5]
        for b, o in out.items():
            np.testing.assert_array_equal(o["counts"][0, r], np.bincount(labels, minlength=k), err_msg=b)
            np.testing.assert_allclose(o["sums"][0, r], ref_sums, rtol=0, atol=2e-4, err_msg=b)
            assert o["inertia"][0, r] == pytest.approx(d2.min(1).sum(), rel=1e-5), b
            np.testing.assert_allclose(o["far_d"][0, r], far, rtol=1e-4, err_msg=b)
    # the final labelling too
    a, b = (assign_batch(t, cents[0], "vector", backend=name) for name in ("numpy", "faiss"))
    assert a["cluster"].equals(b["cluster"]) and b.schema.field("cluster").type == pa.int32()
    np.testing.assert_allclose(a["distance"].to_numpy(), b["distance"].to_numpy(), rtol=0, atol=1e-5)


def test_faiss_backend_fit_is_reproducible_and_close_to_sklearn(ray_local):
    """k=256 (auto -> faiss): the same bytes run to run, inertia within 1% of scikit-learn."""
    x = blobs(n=3000, d=32, centers=40, std=2.0, seed=11)
    ds = ray_local.data.from_numpy(np.array_split(x, 3))
    kw = dict(n_init=2, max_iter=10, batch_size=800, column="data", seed=3)
    a, b = fit_kmeans(ds, 256, **kw), fit_kmeans(ds, 256, **kw)
    assert a.backend == "faiss" and a.centroids.tobytes() == b.centroids.tobytes()
    assert a.inertias == b.inertias and a.n_iters == b.n_iters
    assert abs(a.inertia - kmeans_inertia(x, a.centroids)) <= 1e-4 * a.inertia
    ref = KMeans(n_clusters=256, n_init=2, max_iter=10, random_state=0).fit(x).inertia_  # the same cap
    assert a.inertia <= 1.01 * ref, (a.inertia, ref)
    print(f"k=256: hetray/sklearn inertia {a.inertia / ref:.4f}, iterations {a.n_iters}")
    labels = [
        np.concatenate([t["cluster"].to_numpy() for t in assign(ds, a.centroids, 800, "data").iter_batches(
            batch_format="pyarrow", batch_size=None)])
        for _ in range(2)
    ]
    assert np.array_equal(labels[0], labels[1]) and len(labels[0]) == len(x)


def test_faiss_threads_follow_the_ray_task(ray_local):
    import faiss

    @ray_local.remote
    def threads():
        import faiss

        before = faiss.omp_get_max_threads()
        with _faiss_threads() as f:
            inside = f.omp_get_max_threads()
        return before, inside, faiss.omp_get_max_threads()

    one = ray_local.get(threads.options(num_cpus=1).remote())
    two = ray_local.get(threads.options(num_cpus=2).remote())
    assert one[1] == 1 and two[1] == 2  # the task's CPUs, whatever OMP_NUM_THREADS said
    assert one[0] == one[2] and two[0] == two[2]  # and the old setting comes back
    faiss.omp_set_num_threads(2)
    with _faiss_threads() as f:  # the driver holds no CPU of its own: one thread
        assert f.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == 2


def test_row_keys_are_fixed_uniform_and_layout_free():
    # pinned: a change of the hash changes every sample (and so the clusters); do it on purpose
    assert _row_keys(np.arange(8, dtype=np.float32).reshape(2, 4), 0).tolist() == [
        11173486085496456711, 3793460982542229381]
    assert _row_keys(np.arange(6, dtype=np.float32).reshape(2, 3), 7).tolist() == [  # odd width: padded
        8851693800870568028, 9676981259692575753]
    x = np.random.default_rng(0).standard_normal((20000, 5)).astype(np.float32)
    keys = _row_keys(x, 1)
    assert np.array_equal(keys[:7000], _row_keys(x[:7000], 1, chunk=333))  # per row: no block or chunk effect
    assert not np.array_equal(keys, _row_keys(x, 2))  # seeded
    assert len(np.unique(keys)) == len(x)
    y = x.copy()
    y[:, 4] = np.nextafter(y[:, 4], np.float32(np.inf))  # one bit in one word differs
    assert not np.isin(_row_keys(y, 1), keys).any()
    counts = np.histogram(keys / 2**64, bins=10, range=(0, 1))[0]
    assert counts.min() > 1800 and counts.max() < 2200, counts  # uniform: 2000 +- ~45 each
