"""The embed stage keeps Ray Data's actor restarts, without Ray's notice about them on stderr.

In a fresh process (Ray prints its notice once per process, so an earlier test would hide it): a
local Ray, and an embedding actor that kills itself (SIGKILL, as the kernel's OOM killer would)
in its first call. Ray restarts it and retries the call; the stage writes every vector, equal to
a direct encode; and the driver's stderr does not carry "... has constructor arguments in the
object store and max_restarts > 0 ..." (ray-project/ray#53727), which it does without
``ray_notice_to_log``.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = r"""
import json, os, signal, sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

import hetray.selection.embed as embed
from hetray.config import JobConfig
from hetray.models import load_embedder
from hetray.schema import PREFERENCE_SCHEMA, pair, prompt_id

run, marker = Path(sys.argv[1]), Path(sys.argv[2])


class DiesOnce(embed.Embedder):  # defined in __main__: Ray ships it by value to the actor
    def __call__(self, batch):
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        yield from super().__call__(batch)


embed.Embedder = DiesOnce
jobs = ["nurse", "pilot", "baker", "judge"] * 5
prompts = [f"Question {i}: what does the {w} do all day?" for i, w in enumerate(jobs)]
(run / "preferences").mkdir(parents=True)
rows = [pair("x", p, "good", "bad", [str(i)]) for i, p in enumerate(prompts)]
pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), run / "preferences" / "part-0.parquet")
ray.init(address="local", num_cpus=2, object_store_memory=150_000_000, include_dashboard=False, log_to_driver=False)
cfg = JobConfig.model_validate({"run_dir": str(run), "embed": {"batch_size": 4},
                                "convert": {"sources": [{"name": "x", "format": "winogrande", "path": "x"}]}})
m = embed.run_embed(cfg)
ray.shutdown()
table = pa.concat_tables(pq.read_table(f) for f in sorted((run / "embeddings").glob("*.parquet")))
got = dict(zip(table.column("prompt_id").to_pylist(), np.array(table.column("vector").to_pylist(), np.float32)))
want = load_embedder("all-minilm-l6-v2", device="cpu").encode(prompts, normalize_embeddings=True)
error = max(float(np.abs(got[prompt_id(p)] - w).max()) for p, w in zip(prompts, want))
print(json.dumps({"distinct": m["distinct_prompts"], "rows": table.num_rows, "max_error": error,
                  "actor_starts": m["timings"]["actor_starts"]}))
"""


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_the_notice_stays_off_stderr(tmp_path):
    marker = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), str(marker)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert marker.exists()  # an actor died in a call ...
    assert out["actor_starts"] == 2  # ... and was started again
    assert out["distinct"] == out["rows"] == 20 and out["max_error"] < 1e-5  # every vector, right
    assert "has constructor arguments in the object store" not in proc.stderr
