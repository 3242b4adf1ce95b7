"""select.keep_unscored: the two readings of "unscored sources" on a small hand-made run
(preferences + cluster assignments written directly; no embedding model needed)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetray.config import JobConfig
from hetray.schema import ASSIGNMENT_SCHEMA, PREFERENCE_SCHEMA, make_id, pair, parquet_files
from hetray.selection.select import run_select

# (source, cluster, quality) of every pair; None: an unscored source
PAIRS = (
    [("oasst", 0, q) for q in (0.1, 0.9, 0.4, 0.7, 0.3, 0.6)]
    + [("oasst", 1, q) for q in (0.2, 1.0, 0.5, 0.8)]
    + [("winogrande", 0, None)] * 4 + [("winogrande", 1, None)] * 2
    + [("winogender", 0, None)] + [("winogender", 1, None)] * 3
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("keep_unscored") / "run"
    rows, assign = [], []
    for i, (source, cluster, quality) in enumerate(PAIRS):
        prompt = f"{source} prompt {i}"
        p = pair(source, prompt, f"good {i}", f"bad {i}", [f"{source}:{i}"], quality=quality)
        p.pop("kind")
        rows.append(p)
        assign.append({"prompt_id": make_id(prompt), "cluster": cluster, "distance": float(i)})
    (run / "preferences").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), run / "preferences" / "part-0.parquet")
    (run / "clusters" / "assignments").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(assign, schema=ASSIGNMENT_SCHEMA), run / "clusters" / "assignments" / "part-0.parquet")
    (run / "clusters" / "manifest.json").write_text(json.dumps({"stage": "cluster", "key": "hand-made"}))
    return run


def select(run_dir, out_name, **select_cfg):
    cfg = JobConfig.model_validate({
        "run_dir": str(run_dir), "seed": 1,
        "convert": {"sources": [{"name": "unused", "format": "winogrande", "path": "unused.jsonl"}]},
        "cluster": {"n_clusters": 2},
        "select": {"fraction": 0.5, "examples_per_cluster": 0, **select_cfg},
    })
    m = run_select(cfg, out_name=out_name)
    sel = pq.ParquetDataset(parquet_files(run_dir / out_name)).read().to_pylist()
    per_source = {}
    for r in sel:
        per_source[r["source"]] = per_source.get(r["source"], 0) + 1
    return m, sel, per_source


def test_default_every_source_keeps_its_share(run_dir, ray_local):
    m, sel, per_source = select(run_dir, "selected_share")
    assert per_source == {"oasst": 5, "winogrande": 3, "winogender": 2}
    assert m["kept_whole"] == [] and m["pairs_selected"] == 10


def test_keep_unscored_keeps_unscored_sources_whole(run_dir, ray_local):
    m, sel, per_source = select(run_dir, "selected_whole", keep_unscored=True)
    assert per_source == {"oasst": 5, "winogrande": 6, "winogender": 4}
    assert m["kept_whole"] == ["winogender", "winogrande"] and m["pairs_selected"] == 15
    # the scored source is still cut per cluster, best quality first: 3 of cluster 0, 2 of cluster 1
    assert sorted(r["quality"] for r in sel if r["source"] == "oasst") == [0.6, 0.7, 0.8, 0.9, 1.0]
    cells = {(c["cluster"], c["source"]): (c["n"], c["keep"], c["kept"]) for c in m["cells"]}
    assert cells[(0, "oasst")] == (6, 3, 3) and cells[(1, "oasst")] == (4, 2, 2)
    assert cells[(0, "winogrande")] == (4, 4, 4) and cells[(1, "winogender")] == (3, 3, 3)


def test_keep_unscored_without_stratify(run_dir, ray_local):
    # per cluster over the scored pairs only: the unscored ones neither take nor share a quota
    m, sel, per_source = select(run_dir, "selected_whole_flat", keep_unscored=True, stratify=False)
    assert per_source == {"oasst": 5, "winogrande": 6, "winogender": 4}
    assert sorted(r["quality"] for r in sel if r["source"] == "oasst") == [0.6, 0.7, 0.8, 0.9, 1.0]
