"""The data folders as Hugging Face datasets: ``datasets.load_dataset`` reads ``preferences/``,
``sft_only/`` (empty too) and ``selected/`` with the rows and columns of their Parquet files, and
their dataset cards parse and agree with the stage manifests."""

from __future__ import annotations


import pyarrow.parquet as pq
import pytest

from hetray.config import JobConfig
from hetray.datacard import read_metadata
from hetray.schema import PREFERENCE_SCHEMA, SFT_SCHEMA, parquet_files
from hetray.selection.clustering import run_cluster
from hetray.selection.embed import run_embed
from hetray.selection.select import run_select
from hetray.stage import read_manifest
from hetray.unify.convert import run_convert

from conftest import FIXTURES, MIXED_SOURCES

pytestmark = pytest.mark.slow

SOURCES = [
    *MIXED_SOURCES,
    {"name": "gen_sft", "format": "generic", "shape": "sft", "path": str(FIXTURES / "generic" / "sft.jsonl"),
     "columns": {"prompt": "question", "response": "answer"}},
]
SCHEMAS = {"preferences": PREFERENCE_SCHEMA, "selected": PREFERENCE_SCHEMA, "sft_only": SFT_SCHEMA}


def job(run_dir, sources=SOURCES) -> JobConfig:
    return JobConfig.model_validate({"name": "hf-test", "run_dir": str(run_dir), "seed": 3, "convert": {"sources": sources},
                                     "cluster": {"n_clusters": 2, "n_init": 3}, "select": {"fraction": 0.5}})


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("hf") / "run"
    for stage in (run_convert, run_embed, run_cluster, run_select):
        stage(job(root))
    return root


@pytest.fixture(scope="module")
def empty_sft(tmp_path_factory, ray_local):
    """A run whose only source gives pairs and no SFT-only row."""
    root = tmp_path_factory.mktemp("hf-empty") / "run"
    run_convert(job(root, SOURCES[:1]))
    return root


@pytest.fixture
def load(tmp_path):
    import datasets

    def load(path, **kw):
        return datasets.load_dataset(str(path), cache_dir=str(tmp_path / "hf-cache"), **kw)["train"]

    return load


def parquet(folder):
    return pq.ParquetDataset(parquet_files(folder)).read()


def same(ds, folder, schema) -> None:
    """``ds`` holds exactly the rows and columns of the Parquet files in ``folder``."""
    import datasets

    table = parquet(folder)
    assert ds.num_rows == table.num_rows > 0
    assert ds.column_names == table.column_names == schema.names
    assert ds.features == datasets.Features.from_arrow_schema(schema)
    key = "pair_id"
    assert sorted(ds.to_list(), key=lambda r: r[key]) == sorted(table.to_pylist(), key=lambda r: r[key])


@pytest.mark.parametrize("folder", ["preferences", "selected", "sft_only"])
def test_load_dataset_reads_each_folder_through_its_card(run, load, folder):
    same(load(run / folder), run / folder, SCHEMAS[folder])


@pytest.mark.parametrize("folder", ["preferences", "selected", "sft_only"])
def test_the_parquet_builder_on_a_stage_folder(run, load, folder):
    """``load_dataset("parquet", data_dir=...)`` on the stage folder itself: the data files are
    named ``train-*.parquet`` (the hub's split-in-file-name convention), so the builder picks them
    and leaves ``manifest.json`` and the card alone; the selection report lives beside selected/."""
    assert (run / folder / "README.md").is_file()
    if folder != "sft_only":  # convert writes its manifest into preferences/
        assert (run / folder / "manifest.json").is_file()
    assert not (run / folder / "report").exists()
    same(load("parquet", data_dir=str(run / folder)), run / folder, SCHEMAS[folder])


def test_an_empty_split_loads_with_its_columns(empty_sft, load):
    import datasets

    folder = empty_sft / "sft_only"
    files = parquet_files(folder)
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [0]  # schema, no empty row group
    features = datasets.Features.from_arrow_schema(SFT_SCHEMA)
    streamed = load(folder, streaming=True)
    assert list(streamed) == [] and streamed.features == features
    try:
        ds = load(folder)
    except ValueError as e:  # datasets 5.2 refuses to build a split of 0 rows (huggingface/datasets#8401)
        assert "corresponds to no data" in str(e)
    else:
        assert ds.num_rows == 0 and ds.features == features
    assert read_metadata(folder)["size_categories"] == ["n<1K"]


def _rows(card: str, first: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``| first |``."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_cards_parse_and_agree_with_the_manifests(run):
    from huggingface_hub import DatasetCard

    convert = read_manifest(run / "preferences")
    counts = convert["counts"]
    for folder, rows, tags in (("preferences", convert["totals"]["pairs"], ["hetray", "preference"]),
                               ("sft_only", convert["totals"]["sft"], ["hetray", "sft"])):
        meta = read_metadata(run / folder)
        assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "*.parquet"}]}]
        assert meta["tags"] == tags and meta["task_categories"] == ["text-generation"]
        assert meta["size_categories"] == ["n<1K"] and rows > 0
        assert DatasetCard.load(run / folder / "README.md").data.to_dict()["configs"] == meta["configs"]
        body = (run / folder / "README.md").read_text()
        table = {r[0]: r for r in _rows(body, "source")}
        assert set(table) == set(counts)
        for src, c in counts.items():
            assert [int(x) for x in table[src][3:7]] == [c["input"], c["pairs"], c["sft"], c["rejected"]]
    body = (run / "preferences" / "README.md").read_text()
    reasons = {(r[0], r[1]): int(r[2]) for r in _rows(body[body.index("## Rejects"):], "source")}
    assert reasons == {(s, k): n for s, c in counts.items() for k, n in c["reasons"].items()} != {}

    select = read_manifest(run / "selected")
    meta = read_metadata(run / "selected")
    assert meta["tags"] == ["hetray", "preference"] and meta["configs"][0]["data_files"][0]["path"] == "*.parquet"
    body = (run / "selected" / "README.md").read_text()
    settings = dict(_rows(body, "setting"))
    assert int(settings["n_clusters"]) == select["n_clusters"] == 2
    assert float(settings["fraction"]) == select["config"]["select"]["fraction"] and int(settings["seed"]) == 3
    kept: dict = {}
    for cell in select["cells"]:
        n, k = kept.get(cell["source"], (0, 0))
        kept[cell["source"]] = (n + cell["n"], k + cell["kept"])
    table = {r[0]: r for r in _rows(body, "source")}
    assert {s: (int(r[2]), int(r[3])) for s, r in table.items()} == kept
    assert sum(k for _, k in kept.values()) == select["pairs_selected"]
    assert table["oasst"][1] == "toxicity" and table["scored"][1] == "helpfulness" and table["wg"][1] == "–"
    for s, r in table.items():
        assert float(r[4]) == pytest.approx(kept[s][1] / kept[s][0], abs=1e-3)
        assert float(r[5]) == pytest.approx(kept[s][1] / select["pairs_selected"], abs=1e-3)
