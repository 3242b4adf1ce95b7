"""select picks the same pairs, byte for byte, as the implementation it replaced.

``tests/fixtures/select_reference/expected.json`` was written by the select stage as it was
before issue 14 (the whole narrow view joined and ranked on the driver), on the small hand-made
run below: four sources (two scored with ties in quality, one of them with some unscored rows;
two unscored), five clusters of very different sizes (one of a single prompt), prompts shared
by several pairs and by two sources, three preference files. Each case is one ``select:``
setting; the reference holds the selected ``pair_id``s in output order, the rows of each
output file (and its sha256 when written by the same pyarrow), and the manifest's counts.

Regenerate only on purpose (it freezes whatever the current code selects):
``python tests/selection/test_select_reference.py``
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetray.config import JobConfig
from hetray.schema import ASSIGNMENT_SCHEMA, PREFERENCE_SCHEMA, embedding_schema, make_id, pair, parquet_files
from hetray.selection import select
from hetray.selection.select import run_select

pytestmark = pytest.mark.slow  # 12 runs of the stage: a minute or two

EXPECTED = Path(__file__).resolve().parents[1] / "fixtures" / "select_reference" / "expected.json"

CASES = {
    "default": {"fraction": 0.4},
    "seed_2": {"fraction": 0.4, "_seed": 2},
    "flat": {"fraction": 0.25, "stratify": False},
    "percentile": {"fraction": 0.3, "quality_normalization": "percentile"},
    "percentile_flat": {"fraction": 0.3, "quality_normalization": "percentile", "stratify": False},
    "keep_unscored": {"fraction": 0.2, "keep_unscored": True},
    "keep_unscored_flat_percentile": {"fraction": 0.5, "keep_unscored": True, "stratify": False,
                                      "quality_normalization": "percentile"},
    "tiny": {"fraction": 0.01},
    "dedup": {"fraction": 0.5, "dedup_threshold": 0.97},
    "dedup_percentile_flat": {"fraction": 0.6, "dedup_threshold": 0.97, "quality_normalization": "percentile",
                              "stratify": False},
    "sources": {"fraction": 0.6, "sources": ["tox", "wg"]},
}


def _u(*parts) -> float:
    """A deterministic number in [0, 1) from its arguments (no RNG whose stream could change)."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:12], 16) / 16**12


def build_run(run: Path) -> Path:
    """preferences/ (3 files), clusters/assignments/ (2 files) and embeddings/ of the hand-made run."""
    # clusters of very different sizes: prompt i goes to cluster SIZES-weighted; cluster 4 has one prompt
    prompts = [f"prompt {i}: {'why' if i % 3 else 'how'} is the sky {i % 7}?" for i in range(60)]
    cluster_of = [0 if i < 30 else 1 if i < 45 else 2 if i < 53 else 3 if i < 59 else 4 for i in range(60)]
    rows = []
    for i in range(240):
        p = int(_u("prompt", i) ** 2 * 60)  # skewed: low prompt numbers (big clusters) get more pairs
        r = _u("source", i)
        source = "tox" if r < 0.45 else "rank" if r < 0.75 else "wg" if r < 0.97 else "bias"
        if source == "tox":
            quality = round(_u("q", i), 1)  # ten levels: many ties
        elif source == "rank":
            quality = None if i % 7 == 0 else float(int(_u("q", i) * 5))  # 0..4, some rows unscored
        else:
            quality = None
        row = pair(source, prompts[p], f"good answer {i}", f"bad answer {i}", [f"{source}:{i}"], quality=quality)
        row.pop("kind")
        rows.append(row)
    (run / "preferences").mkdir(parents=True)
    for k, (a, b) in enumerate(((0, 100), (100, 170), (170, 240))):
        pq.write_table(pa.Table.from_pylist(rows[a:b], schema=PREFERENCE_SCHEMA), run / "preferences" / f"part-{k}.parquet")
    # vectors: the cluster's axis plus a spread; every fourth prompt nearly repeats the one before
    dim = 8
    vecs = []
    for i in range(60):
        v = np.zeros(dim)
        v[cluster_of[i]] = 1.0
        j = i - 1 if i % 4 == 3 else i
        for d in (5, 6, 7):
            v[d] = 2.0 * (_u("dir", j, d) - 0.5) + (0.01 * _u("noise", i, d) if j != i else 0)
        vecs.append(v / np.linalg.norm(v))
    used = sorted({r["prompt"] for r in rows}, key=prompts.index)
    emb = pa.table({"prompt_id": [make_id(p) for p in used], "prompt": used,
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(np.stack([vecs[prompts.index(p)] for p in used]).astype(np.float32).ravel()), dim)},
                   schema=embedding_schema(dim))
    (run / "embeddings").mkdir()
    pq.write_table(emb, run / "embeddings" / "part-00000.parquet")
    assign = pa.table({"prompt_id": [make_id(p) for p in used],
                       "cluster": [cluster_of[prompts.index(p)] for p in used],
                       "distance": [float(_u("d", p)) for p in used]}, schema=ASSIGNMENT_SCHEMA)
    (run / "clusters" / "assignments").mkdir(parents=True)
    half = len(used) // 2
    pq.write_table(assign.slice(0, half), run / "clusters" / "assignments" / "part-0.parquet")
    pq.write_table(assign.slice(half), run / "clusters" / "assignments" / "part-1.parquet")
    (run / "clusters" / "manifest.json").write_text(json.dumps({"stage": "cluster", "key": "hand-made"}))
    return run


def select_case(run: Path, name: str, out_name: str | None = None) -> dict:
    """Run one case; what the reference records of it."""
    settings = dict(CASES[name])
    seed = settings.pop("_seed", 1)
    cfg = JobConfig.model_validate({
        "run_dir": str(run), "seed": seed,
        "convert": {"sources": [{"name": "unused", "format": "winogrande", "path": "unused.jsonl"}]},
        "cluster": {"n_clusters": 5},
        "select": {"examples_per_cluster": 2, **settings},
    })
    out_name = out_name or f"sel_{name}"
    m = run_select(cfg, out_name=out_name)
    files = parquet_files(run / out_name)
    ids = [i for f in files for i in pq.read_table(f, columns=["pair_id"])["pair_id"].to_pylist()]
    return {
        "selected": ids,
        "files": [{"name": Path(f).name, "rows": pq.ParquetFile(f).metadata.num_rows,
                   "sha256": hashlib.sha256(Path(f).read_bytes()).hexdigest()} for f in files],
        "manifest": {k: m[k] for k in ("pairs_in", "pairs_selected", "dropped_near_duplicates", "kept_whole",
                                       "n_clusters", "cells")},
    }


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, ray_local):
    return build_run(tmp_path_factory.mktemp("select_reference") / "run")


@pytest.fixture(scope="module")
def expected():
    return json.loads(EXPECTED.read_text())


def test_inputs_are_the_reference_inputs(reference_run, expected):
    prefs = pq.ParquetDataset(parquet_files(reference_run / "preferences")).read()
    digest = hashlib.sha256(json.dumps(prefs.to_pylist(), sort_keys=True).encode()).hexdigest()
    assert digest == expected["inputs_sha256"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_selection_as_the_reference(reference_run, expected, name):
    got, want = select_case(reference_run, name), expected["cases"][name]
    assert got["manifest"] == want["manifest"]
    assert got["selected"] == want["selected"]  # the same pairs, in the same order
    assert [(f["name"], f["rows"]) for f in got["files"]] == [(f["name"], f["rows"]) for f in want["files"]]
    if pa.__version__ == expected["pyarrow"]:  # Parquet bytes carry the writer's version
        assert [f["sha256"] for f in got["files"]] == [f["sha256"] for f in want["files"]]


def test_same_selection_with_the_shuffle_join(reference_run, expected, monkeypatch):
    """Inputs of more than one partition: the join in several hash parts, the percentiles
    through Ray Data's disk-based shuffles: the same pairs."""
    monkeypatch.setattr(select, "PARTITION_ROWS", 100)  # 240 pairs: 3 partitions
    got, want = select_case(reference_run, "percentile_flat", out_name="sel_disk"), expected["cases"]["percentile_flat"]
    assert got["manifest"] == want["manifest"] and got["selected"] == want["selected"]


if __name__ == "__main__":
    import tempfile

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=1_500_000_000)
    run = build_run(Path(tempfile.mkdtemp(prefix="select-reference-")) / "run")
    prefs = pq.ParquetDataset(parquet_files(run / "preferences")).read()
    out = {"written_by": sys.argv[0], "pyarrow": pa.__version__,
           "inputs_sha256": hashlib.sha256(json.dumps(prefs.to_pylist(), sort_keys=True).encode()).hexdigest(),
           "cases": {name: select_case(run, name) for name in sorted(CASES)}}
    EXPECTED.parent.mkdir(parents=True, exist_ok=True)
    EXPECTED.write_text(json.dumps(out, indent=1) + "\n")
    ray.shutdown()
    print(f"wrote {EXPECTED}: " + ", ".join(f"{k} {len(v['selected'])}" for k, v in out["cases"].items()))
