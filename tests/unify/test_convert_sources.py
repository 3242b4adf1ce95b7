"""Every adapter through the Ray stage agrees with the plain-Python reference, and the real
samples in ../shared/data convert to known counts."""

import pyarrow.parquet as pq
import pytest

from hetray.config import JobConfig
from hetray.unify.convert import resolve_files, run_convert
from hetray.unify.sources import ADAPTERS
from hetray.unify.sources.base import account, convert_rows
from hetray.unify.sources.readers import iter_records
from hetray.schema import parquet_files

from conftest import FIXTURES

F = FIXTURES
SOURCES = [
    {"name": "wg", "format": "winogrande", "path": str(F / "winogrande")},
    # flat messages of tree h1 are split over two files: grouping must cross files
    {"name": "oa_hub", "format": "oasst", "path": [str(F / "oasst" / "messages_hub_a.jsonl"), str(F / "oasst" / "messages_hub_b.jsonl")], "label": "toxicity"},
    {"name": "oa_raw", "format": "oasst", "path": str(F / "oasst" / "messages_raw.jsonl"), "label": "toxicity"},
    {"name": "oa_tree", "format": "oasst", "path": str(F / "oasst" / "trees.jsonl"), "label": "toxicity", "thread_context": True},
    {"name": "oa_bad", "format": "oasst", "path": str(F / "oasst" / "malformed.jsonl")},
    {"name": "hh", "format": "hh", "path": str(F / "hh" / "train.jsonl")},
    {"name": "wb", "format": "winobias", "path": str(F / "winobias")},
    {"name": "wgen", "format": "winogender", "path": str(F / "winogender" / "all_sentences.tsv"), "occupation_stats": str(F / "winogender" / "occupations-stats.tsv")},
    {"name": "gen_pair", "format": "generic", "shape": "pairwise", "path": str(F / "generic" / "pairwise.jsonl")},
    {"name": "gen_scored", "format": "generic", "shape": "scored", "path": str(F / "generic" / "scored.csv"), "columns": {"scores": ["helpfulness", "toxicity"]}, "label": "helpfulness"},
    {"name": "gen_sft", "format": "generic", "shape": "sft", "path": str(F / "generic" / "sft.jsonl"), "columns": {"prompt": "question", "response": "answer"}},
]


def _table(folder):
    return pq.ParquetDataset(parquet_files(folder)).read()


def _reference(s):
    adapter = ADAPTERS[s.format][0]
    files = resolve_files(s.path)
    if hasattr(adapter, "resolve"):
        s = adapter.resolve(s, next(iter_records(files))["text"])
    return convert_rows(adapter, s, iter_records(files)), sum(1 for _ in iter_records(files))


def test_every_adapter_through_ray_matches_reference(tmp_path, ray_local):
    import pyarrow as pa

    # a Parquet input too: Ray must open it for random access (its footer)
    rows = [
        {"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(7)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    sources = SOURCES + [{"name": "gen_parquet", "format": "generic", "shape": "pairwise", "path": str(tmp_path / "pairs.parquet")}]
    cfg = JobConfig.model_validate(
        {"run_dir": str(tmp_path / "run"), "convert": {"sources": sources, "batch_size": 4}}
    )
    m = run_convert(cfg)
    prefs = _table(tmp_path / "run" / "preferences").to_pylist()
    sft = _table(tmp_path / "run" / "sft_only").to_pylist()
    rejects = _table(tmp_path / "run" / "rejects").to_pylist()
    for s in cfg.convert.sources:
        ref, n_records = _reference(s)
        got_pairs = sorted((p["pair_id"], p["prompt"], p["chosen"], p["rejected"], p["quality"]) for p in prefs if p["source"] == s.name)
        want_pairs = sorted((o["pair_id"], o["prompt"], o["chosen"], o["rejected"], o["quality"]) for o in ref if o["kind"] == "pair")
        assert got_pairs == want_pairs, s.name
        assert sorted(r["pair_id"] for r in sft if r["source"] == s.name) == sorted(o["pair_id"] for o in ref if o["kind"] == "sft")
        got_rej = sorted((r["record_id"], r["reason"]) for r in rejects if r["source"] == s.name)
        assert got_rej == sorted((o["record_id"], o["reason"]) for o in ref if o["kind"] == "reject"), s.name
        c = m["counts"][s.name]
        assert c["reasons"] == account(ref)["reasons"]
        if s.format != "oasst":  # OASST records are messages; a tree line holds many
            assert c["used"] + c["rejected"] == n_records, s.name
    # the split tree really produced a pair from messages in both files
    hub = [p for p in prefs if p["source"] == "oa_hub"]
    assert hub and all(p["label"] == "toxicity" and p["quality"] is not None for p in hub)
    assert m["counts"]["gen_sft"]["sft"] > 0
    assert m["counts"]["gen_parquet"]["pairs"] == len(rows) > 0


def test_shared_data_known_counts(tmp_path, ray_local, shared_data):
    d = shared_data
    sources = [
        {"name": "winogrande", "format": "winogrande", "path": str(d / "winogrande" / "dev.jsonl")},
        {"name": "oasst", "format": "oasst", "path": str(d / "oasst" / "en_100_tree.jsonl"), "label": "rank"},
        {"name": "winobias", "format": "winobias", "path": str(d / "winobias" / "*_stereotyped_type*.txt.dev")},
        {"name": "winogender", "format": "winogender", "path": str(d / "winogender" / "all_sentences.tsv"),
         "occupation_stats": str(d / "winogender" / "occupations-stats.tsv")},
    ]
    cfg = JobConfig.model_validate({"run_dir": str(tmp_path / "run"), "convert": {"sources": sources}})
    m = run_convert(cfg)
    c = m["counts"]
    assert c["winogrande"]["pairs"] == 1267 and c["winogrande"]["rejected"] == 0
    assert c["oasst"]["pairs"] == 207
    assert c["oasst"]["used"] + c["oasst"]["rejected"] == 1167  # messages in the 100 trees
    assert c["winobias"]["pairs"] == 792 and c["winobias"]["used"] == 4 * 396
    assert c["winogender"]["pairs"] == 224 and c["winogender"]["used"] + c["winogender"]["rejected"] == 720
    assert c["winogender"]["reasons"] == {"neutral_pronoun": 240, "no_stereotype": 32}
    prefs = _table(tmp_path / "run" / "preferences")
    assert prefs.num_rows == 1267 + 207 + 792 + 224
    oasst = [p for p in prefs.to_pylist() if p["source"] == "oasst"]
    assert all(p["chosen_score"] < p["rejected_score"] for p in oasst)  # rank: lower is better
    assert all(p["quality"] == p["rejected_score"] - p["chosen_score"] for p in oasst)
