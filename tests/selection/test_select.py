"""convert -> embed -> cluster -> select end to end on local Ray, and its bad inputs."""

import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetray.config import ConfigError, JobConfig, load_config
from hetray.unify.convert import run_convert
from hetray.schema import PREFERENCE_SCHEMA
from hetray.schema import parquet_files
from hetray.selection.clustering import run_cluster
from hetray.selection.embed import run_embed
from hetray.selection.select import run_select

from conftest import MIXED_SOURCES as SOURCES

pytestmark = pytest.mark.slow


def cfg(run_dir, **select):
    return JobConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "seed": 3,
            "convert": {"sources": SOURCES},
            "cluster": {"n_clusters": 2, "n_init": 3},
            "select": {"fraction": 0.5, **select},
        }
    )


def table(folder):
    return pq.ParquetDataset(parquet_files(folder)).read()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, ray_local):
    run = tmp_path_factory.mktemp("select") / "run"
    run_convert(cfg(run))
    run_embed(cfg(run))
    run_cluster(cfg(run))
    return run


def test_select_end_to_end(converted):
    m = run_select(cfg(converted))
    prefs = table(converted / "preferences")
    sel = table(converted / "selected")
    assert sel.schema.equals(PREFERENCE_SCHEMA, check_metadata=False)
    # every selected row is a preference row, unchanged
    by_id = {r["pair_id"]: r for r in prefs.to_pylist()}
    assert all(by_id[r["pair_id"]] == r for r in sel.to_pylist())
    # each source keeps round(fraction * its size)
    n_src = prefs.group_by("source").aggregate([("pair_id", "count")]).to_pydict()
    k_src = dict(zip(*sel.group_by("source").aggregate([("pair_id", "count")]).to_pydict().values()))
    for src, n in zip(n_src["source"], n_src["pair_id_count"]):
        assert k_src.get(src, 0) == int(n * 0.5 + 0.5)
    assert m["pairs_selected"] == sel.num_rows
    report = converted / "selected_report"  # beside the data: selected/ holds data, card and manifest only
    assert {p.name for p in report.iterdir()} >= {"report.md", "cluster_sizes.png", "source_shares.png", "quality.png"}
    assert m["report"]["markdown"] == "selected_report/report.md" and (converted / m["report"]["markdown"]).is_file()
    assert {p.suffix for p in (converted / "selected").iterdir()} == {".parquet", ".json", ".md"}
    text = (report / "report.md").read_text()
    assert "| wg |" in text and "cluster 0" in text
    # the prompts nearest each centroid, looked up by a task per embeddings file: real prompt texts
    examples = [line[2:] for line in text.split("## Example prompts")[1].splitlines() if line.startswith("- ")]
    prompts = {p[:200].replace(chr(10), " ") for p in prefs["prompt"].to_pylist()}
    assert examples and set(examples) <= prompts and all(examples)


def test_top_by_quality_within_cells(converted):
    run_select(cfg(converted))
    sel_ids = set(table(converted / "selected")["pair_id"].to_pylist())
    prefs = table(converted / "preferences").to_pandas()
    from hetray.schema import make_id

    assign = table(converted / "clusters" / "assignments").to_pandas().set_index("prompt_id")["cluster"]
    prefs["cluster"] = [assign[make_id(p)] for p in prefs["prompt"]]
    prefs["kept"] = prefs["pair_id"].isin(sel_ids)
    for (_, src), cell in prefs[prefs["quality"].notna()].groupby(["cluster", "source"]):
        kept, dropped = cell[cell.kept]["quality"], cell[~cell.kept]["quality"]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max(), src


def test_same_inputs_and_seed_give_identical_files(converted):
    run_select(cfg(converted), force=True)
    first = {p: open(p, "rb").read() for p in parquet_files(converted / "selected")}
    run_select(cfg(converted), force=True)
    second = {p: open(p, "rb").read() for p in parquet_files(converted / "selected")}
    assert first == second
    wg = lambda: {r["pair_id"] for r in table(converted / "selected").to_pylist() if r["source"] == "wg"}  # noqa: E731
    seed3 = wg()
    run_select(cfg(converted).model_copy(update={"seed": 4}), force=True)
    assert wg() != seed3 and len(wg()) == len(seed3)  # unscored: a different seeded sample


def test_fraction_one_returns_everything(converted):
    run_select(cfg(converted, fraction=1.0))
    prefs = table(converted / "preferences").sort_by("pair_id")
    sel = table(converted / "selected").sort_by("pair_id")
    assert sel.equals(prefs)


def test_bad_inputs_fail_clearly(converted, tmp_path):
    with pytest.raises(ValueError, match="n_clusters=1000"):
        run_cluster(cfg(converted).model_copy(update={"cluster": cfg(converted).cluster.model_copy(update={"n_clusters": 1000})}))
    no_clusters = tmp_path / "no_clusters"
    shutil.copytree(converted / "preferences", no_clusters / "preferences")
    with pytest.raises(FileNotFoundError, match="run `hetray embed` and `hetray cluster` first"):
        run_select(cfg(no_clusters))  # a stage never runs another stage
    empty = tmp_path / "empty"
    (empty / "preferences").mkdir(parents=True)
    pq.write_table(PREFERENCE_SCHEMA.empty_table(), empty / "preferences" / "part-empty.parquet")
    with pytest.raises(ValueError, match="empty preference set"):
        run_select(cfg(empty))
    with pytest.raises(FileNotFoundError, match="run `hetray convert` first"):
        run_select(cfg(tmp_path / "nothing"))
    job = tmp_path / "job.yaml"
    job.write_text("convert:\n  sources: [{name: w, format: winogrande, path: x}]\n")
    for bad in ("0", "1.5", "-1"):
        with pytest.raises(ConfigError, match="select.fraction"):
            load_config(job, [f"select.fraction={bad}"])


def test_sources_keeps_only_the_named_sources(converted):
    m = run_select(cfg(converted, sources=["wg"]), out_name="selected_wg")
    sel = table(converted / "selected_wg")
    n_wg = sum(1 for s in table(converted / "preferences").column("source").to_pylist() if s == "wg")
    assert set(sel.column("source").to_pylist()) == {"wg"}
    assert m["pairs_in"] == n_wg and sel.num_rows == int(n_wg * 0.5 + 0.5)
    with pytest.raises(ValueError, match="select.sources: nope not in"):
        run_select(cfg(converted, sources=["nope"]), out_name="selected_nope")


def test_small_preference_files_share_an_output_file(tmp_path):
    """Consecutive files are gathered, in order, until a group (one task, one output file)
    holds 64 MiB: preference files of that size or more are each a group of their own."""
    from hetray.selection.select import _file_groups

    sizes = {"a": 10, "b": 10, "c": 100, "d": 5, "e": 60, "f": 70, "g": 1}
    files = []
    for name, mib in sizes.items():
        f = tmp_path / name
        with open(f, "wb") as fh:
            fh.truncate(mib << 20)  # sparse
        files.append(str(f))
    groups = [[p.rsplit("/", 1)[1] for p in g] for g in _file_groups(files)]
    assert groups == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]


def test_select_sets_its_block_size_only_while_it_runs(converted, monkeypatch):
    from ray.data import DataContext

    from hetray.selection import select

    seen = []
    join = select._with_clusters
    monkeypatch.setattr(select, "_with_clusters",
                        lambda *a, **k: seen.append(DataContext.get_current().target_max_block_size) or join(*a, **k))
    before = DataContext.get_current().target_max_block_size
    run_select(cfg(converted), force=True)
    assert seen == [select.BLOCK_BYTES] and select.BLOCK_BYTES == 32 << 20
    assert DataContext.get_current().target_max_block_size == before != select.BLOCK_BYTES


@pytest.mark.parametrize("parts", [1, 3])
def test_the_join_files_every_pair_once_in_its_prompts_cluster(converted, tmp_path, parts):
    """``_with_clusters`` (map tasks by hash part of ``prompt_id``, a join task per part): every
    pair lands once, in the folder of its prompt's cluster, with the counts the quotas need;
    the shuffle's files are gone afterwards."""
    from hetray.schema import make_id
    from hetray.selection import select

    prefs = table(converted / "preferences").to_pandas()
    assign = table(converted / "clusters" / "assignments").to_pandas().set_index("prompt_id")["cluster"]
    prefs["cluster"] = [int(assign[make_id(p)]) for p in prefs["prompt"]]
    got = select._with_clusters(parquet_files(converted / "preferences"),
                                parquet_files(converted / "clusters" / "assignments"), 3, parts, tmp_path,
                                cfg(converted).select)
    filed = {int(c.name): pq.read_table(c).to_pandas() for c in (tmp_path / "pairs").iterdir()}
    rows = pd.concat([f.assign(folder=c) for c, f in filed.items()], ignore_index=True)
    assert sorted(rows["pair_id"]) == sorted(prefs["pair_id"])  # each pair once
    assert (rows["folder"] == rows["cluster"]).all()
    assert dict(zip(rows["pair_id"], rows["cluster"])) == dict(zip(prefs["pair_id"], prefs["cluster"]))
    want = prefs.groupby(["cluster", "source"]).agg(n=("pair_id", "size"), scored=("quality", "count")).reset_index()
    assert got["counts"].to_dict("records") == want.to_dict("records")
    assert set(got["nearest"]["cluster"]) == set(prefs["cluster"])
    assert not (tmp_path / "join").exists()


def test_pairs_without_a_cluster_fail_clearly(converted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(converted / "preferences", run / "preferences")
    shutil.copytree(converted / "clusters", run / "clusters")
    first = parquet_files(run / "clusters" / "assignments")[0]
    t = pq.read_table(first)
    pq.write_table(t.slice(1), first)  # one prompt loses its cluster
    with pytest.raises(RuntimeError, match=r"pairs have no cluster assignment: re-run `hetray cluster`"):
        run_select(cfg(run))
