"""What init_ray sets up for the Ray it starts: Arrow's thread pool left alone in every worker."""

import os

import pyarrow as pa
import pyarrow.parquet as pq


def test_a_ray_data_parquet_read_leaves_arrows_thread_pool_alone(ray_local, tmp_path):
    """Ray Data 2.60's Parquet reader resizes Arrow's CPU pool in the worker that reads (to 32
    threads) unless RAY_DATA_PARQUET_READER_CPU_COUNT is 0; a worker that had run an Arrow
    group-by or join before then failed its next threaded one ("thread index 10 is out of range
    [0, 10)", select's percentile task after the join's tasks). With ``WORKER_ENV`` (set by
    init_ray, and here by conftest) the pool keeps its size through a read."""
    ray = ray_local
    pq.write_table(pa.table({"x": list(range(100))}), tmp_path / "x.parquet")

    @ray.remote
    def pool():
        return pa.cpu_count()

    before = set(ray.get([pool.remote() for _ in range(4)]))

    def during(batch):
        return {"n": [pa.cpu_count()]}

    read = ray.data.read_parquet(str(tmp_path / "x.parquet")).map_batches(during, batch_format="pyarrow")
    assert {r["n"] for r in read.take_all()} == before  # without the setting: {32}
    assert set(ray.get([pool.remote() for _ in range(4)])) == before


def test_init_ray_sets_the_worker_env_before_a_local_ray_starts(monkeypatch):
    import ray

    from hetray.config import JobConfig
    from hetray.orchestrate import ray_init

    for key in ray_init.WORKER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = {}

    class Stop(Exception):
        pass

    def fake_init(**kwargs):
        seen.update({k: os.environ.get(k) for k in ray_init.WORKER_ENV})
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    cfg = JobConfig.model_validate({"convert": {"sources": [{"name": "w", "format": "winogrande", "path": "x"}]}})
    try:
        ray_init.init_ray(cfg.ray)
    except Stop:
        pass
    assert seen == ray_init.WORKER_ENV
