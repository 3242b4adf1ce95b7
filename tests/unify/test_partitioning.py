"""Convert is right for any partitioning of its shuffle.

The sources that need the shuffle (flat OASST messages through the typed Arrow shuffle; WinoBias,
WinoGender, generic ``scored`` through the per-record one) and WinoGrande (its qIDs found by a
narrow pass) are converted alone and mixed on a local Ray with 16 CPUs (32
default partitions, capped at the 16 buckets: small inputs leave many partitions empty, which
once failed the sink with ``KeyError: 'Field "kind" does not exist in schema'``), and mixed with
2 CPUs (with the default and with 64 configured partitions). Each Ray runs in its own subprocess, so the session's
2-CPU ``ray_local`` is not disturbed; the outputs must equal the plain-Python reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hetray.config import JobConfig
from hetray.unify.convert import plan_source
from hetray.unify.sources.base import account, convert_rows
from hetray.unify.sources.readers import iter_records

from conftest import FIXTURES, ROOT

F = FIXTURES
SOURCES = {
    "oasst": {"name": "oasst", "format": "oasst", "path": str(F / "oasst" / "messages_raw.jsonl"), "label": "toxicity"},
    "winobias": {"name": "winobias", "format": "winobias", "path": "sample:winobias"},
    "winogender": {"name": "winogender", "format": "winogender", "path": str(F / "winogender" / "all_sentences.tsv"),
                   "occupation_stats": str(F / "winogender" / "occupations-stats.tsv")},
    "winogrande": {"name": "winogrande", "format": "winogrande", "path": str(F / "winogrande" / "dev.jsonl")},
    "scored": {"name": "scored", "format": "generic", "shape": "scored", "path": "ONE_ROW_CSV",
               "columns": {"scores": ["score"]}},
}
# (pairs, used, rejected) of each source, from the reference; a regression guard on the fixtures
EXPECTED = {"oasst": (2, 6, 3), "winobias": (48, 96, 0), "winogender": (2, 4, 13), "winogrande": (4, 4, 8),
            "scored": (0, 0, 1)}

# Runs in a subprocess: one local Ray with the given CPUs, every job of the spec, outputs as JSON.
SCRIPT = r"""
import json, sys
import pyarrow.parquet as pq
import ray
from hetray.config import JobConfig
from hetray.schema import parquet_files
from hetray.unify.convert import run_convert

spec = json.loads(open(sys.argv[1]).read())
ray.init(address="local", num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False)
out = {}
for name, job in spec["jobs"].items():
    m = run_convert(JobConfig.model_validate(job))
    rows = {}
    for folder in ("preferences", "rejects"):
        rows[folder] = [r for f in parquet_files(job["run_dir"] + "/" + folder) for r in pq.read_table(f).to_pylist()]
    out[name] = {"counts": m["counts"], **rows}
open(sys.argv[2], "w").write(json.dumps(out))
"""


def _sources(tmp_path) -> dict:
    csv = tmp_path / "one_row.csv"
    csv.write_text("prompt,response,score\nHow far is the moon?,About 384000 km.,4\n")
    return {k: {**v, "path": str(csv)} if v["path"] == "ONE_ROW_CSV" else v for k, v in SOURCES.items()}


def _run(tmp_path, cpus: int, jobs: dict) -> dict:
    spec = {"cpus": cpus, "jobs": {
        name: {"run_dir": str(tmp_path / f"run-{cpus}-{name}"), "convert": {"sources": srcs, **kw}}
        for name, (srcs, kw) in jobs.items()
    }}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "out.json").read_text())


def _reference(source: dict) -> list[dict]:
    s = JobConfig.model_validate({"convert": {"sources": [source]}}).convert.sources[0]
    adapter, files, s = plan_source(s)
    return convert_rows(adapter, s, iter_records(files))


def _check(result: dict, sources: list[dict]) -> None:
    for source in sources:
        name, ref = source["name"], _reference(source)
        pairs = sorted((p["pair_id"], p["prompt"], p["chosen"], p["rejected"], p["provenance"])
                       for p in result["preferences"] if p["source"] == name)
        assert pairs == sorted((o["pair_id"], o["prompt"], o["chosen"], o["rejected"], o["provenance"])
                               for o in ref if o["kind"] == "pair"), name
        rejects = sorted((r["file"], r["line"], r["record_id"], r["reason"]) for r in result["rejects"] if r["source"] == name)
        assert rejects == sorted((o["file"], o["line"], o["record_id"], o["reason"]) for o in ref if o["kind"] == "reject"), name
        c, want = result["counts"][name], account(ref)
        assert (c["pairs"], c["used"], c["rejected"]) == EXPECTED[name] == (want["pairs"], want["used"], want["rejected"])
        assert c["input"] == c["used"] + c["rejected"], name
    assert len({p["pair_id"] for p in result["preferences"]}) == len(result["preferences"])


def _jobs(sources: dict, **kw) -> dict:
    jobs = {name: ([s], kw) for name, s in sources.items()}
    jobs["mixed"] = (list(sources.values()), kw)
    return jobs


@pytest.mark.slow
def test_every_shuffled_format_alone_and_mixed_on_16_cpus(tmp_path):
    sources = _sources(tmp_path)
    out = _run(tmp_path, 16, _jobs(sources))
    for name, s in sources.items():
        _check(out[name], [s])
    _check(out["mixed"], list(sources.values()))
    wb = [p for p in out["winobias"]["preferences"]]
    assert {(p["chosen"], p["rejected"]) for p in wb} >= {("she was good with engines.", "he was good with engines.")}


@pytest.mark.slow
def test_every_shuffled_format_mixed_on_2_cpus_and_64_partitions(tmp_path):
    # each source alone on 2 CPUs is what the rest of tests/unify does on the session's Ray;
    # here the mixed job with the default and with 64 partitions (most of them empty)
    sources = _sources(tmp_path)
    jobs = {"mixed": (list(sources.values()), {}), "mixed-64": (list(sources.values()), {"shuffle_partitions": 64})}
    out = _run(tmp_path, 2, jobs)
    _check(out["mixed"], list(sources.values()))
    _check(out["mixed-64"], list(sources.values()))
