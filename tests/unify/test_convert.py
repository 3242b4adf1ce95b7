"""The convert stage on local Ray: outputs, accounting, manifest, re-runs, bad input."""

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hetray.cli import main
from hetray.config import JobConfig
from hetray.unify.convert import run_convert
from hetray.unify.sources import winogrande
from hetray.unify.sources.base import account, convert_rows
from hetray.unify.sources.readers import InputError, iter_records
from hetray.schema import parquet_files

from conftest import FIXTURES

WG = str(FIXTURES / "winogrande" / "dev.jsonl")


def job(tmp_path, sources, **kw) -> JobConfig:
    return JobConfig.model_validate(
        {"run_dir": str(tmp_path / "run"), "convert": {"sources": sources, **kw}}
    )


def read(folder):
    files = parquet_files(folder)
    return pq.ParquetDataset(files).read() if files else None


def test_convert_matches_reference_and_accounts_every_record(tmp_path, ray_local):
    cfg = job(tmp_path, [{"name": "wg", "format": "winogrande", "path": WG}], batch_size=3)
    m = run_convert(cfg)
    run = tmp_path / "run"
    prefs = read(run / "preferences").to_pylist()
    rejects = read(run / "rejects").to_pylist()
    ref = convert_rows(winogrande, cfg.convert.sources[0], iter_records(WG))
    assert sorted(p["pair_id"] for p in prefs) == sorted(o["pair_id"] for o in ref if o["kind"] == "pair")
    assert len(rejects) == sum(o["kind"] == "reject" for o in ref)
    # rejects carry where they came from and why
    utf8 = [r for r in rejects if r["reason"] == "invalid_utf8"]
    assert utf8 and utf8[0]["file"] == WG and utf8[0]["line"] == 13
    # accounting: input records (counted here independently) = used + rejected
    n_records = len(list(iter_records(WG)))
    c = m["counts"]["wg"]
    assert c["used"] + c["rejected"] == n_records == 12
    assert c["pairs"] == len(prefs) == 4
    assert c["reasons"] == account(ref)["reasons"]
    stored = json.loads((run / "preferences" / "manifest.json").read_text())
    assert stored["inputs"][0]["file"] == os.path.basename(WG)  # outside the run dir: its name, not its path
    assert stored["inputs"][0]["size"] == os.path.getsize(WG) and len(stored["inputs"][0]["hash"]) == 32
    assert stored["config"]["convert"]["sources"][0]["format"] == "winogrande"
    assert (run / "sft_only").is_dir() and read(run / "sft_only").num_rows == 0


def test_rerun_is_skipped_and_changed_config_reruns(tmp_path, ray_local):
    src = [{"name": "wg", "format": "winogrande", "path": WG}]
    first = run_convert(job(tmp_path, src))
    again = run_convert(job(tmp_path, src))
    assert again["created"] == first["created"] and again["key"] == first["key"]
    changed = run_convert(job(tmp_path, [{**src[0], "limit": 2}]))
    assert changed["key"] != first["key"]
    assert changed["counts"]["wg"]["used"] + changed["counts"]["wg"]["rejected"] == 2


def test_missing_file_fails_before_any_work(tmp_path):
    cfg = job(tmp_path, [{"name": "wg", "format": "winogrande", "path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(InputError, match="nope.jsonl' does not exist"):
        run_convert(cfg)
    assert not (tmp_path / "run").exists()


def test_empty_file_gives_empty_outputs(tmp_path, ray_local):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    m = run_convert(job(tmp_path, [{"name": "wg", "format": "winogrande", "path": str(empty)}]))
    assert m["totals"] == {"pairs": 0, "sft": 0, "used": 0, "rejected": 0}
    assert read(tmp_path / "run" / "preferences").num_rows == 0


@pytest.mark.parametrize("plan", ["ray_data", "tasks"])
def test_failed_run_keeps_previous_outputs(tmp_path, ray_local, monkeypatch, plan):
    """A run that fails after some of its files were written (by Ray Data's sink, or by the
    tasks of ``by_file``) leaves the previous outputs as they were."""
    src = [{"name": "wg", "format": "winogrande", "path": WG}]
    run_convert(job(tmp_path, src))
    before = read(tmp_path / "run" / "preferences").num_rows

    def boom(*a, **k):
        raise RuntimeError("worker died")

    if plan == "ray_data":
        monkeypatch.setattr("hetray.unify.convert.SplitParquetSink.on_write_complete", boom)
        overrides = {"num_output_files": 1}  # one Dataset: no tasks per file
    else:
        monkeypatch.setattr("hetray.unify.convert.wait_file_tasks", boom)
        overrides = {}
    with pytest.raises(RuntimeError, match="worker died"):
        run_convert(job(tmp_path, [{**src[0], "limit": 3}], **overrides))
    assert read(tmp_path / "run" / "preferences").num_rows == before
    assert not list((tmp_path / "run").glob(".convert-tmp-*"))


def test_cli_convert_and_inspect(tmp_path, ray_local, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\nconvert:\n  sources:\n"
        f"    - {{name: wg, format: winogrande, path: {WG}}}\n"
    )
    assert main(["convert", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "[wg]  pairs 4" in out and "no_answer 1" in out
    assert main(["inspect", str(tmp_path / "run" / "rejects")]) == 0
    assert "wg  invalid_utf8: 1" in capsys.readouterr().out
    assert main(["convert", "--config", str(cfg), "convert.sources.0.colour=red"]) == 2
    assert "unknown key 'convert.sources[0].colour'" in capsys.readouterr().err


def test_hub_dataset_offline_is_a_clear_error_before_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = job(tmp_path, [{"name": "oa", "format": "oasst", "path": "hf:OpenAssistant/oasst1:validation"}])
    with pytest.raises(InputError, match="could not load the Hugging Face dataset 'OpenAssistant/oasst1'"):
        run_convert(cfg)
    assert not (tmp_path / "run").exists()


def test_hub_loader_runs_on_a_local_dataset_folder(tmp_path, ray_local):
    """`hf:` goes through `datasets.load_dataset` + `ray.data.from_huggingface`, the code path a
    user with network takes; here it reads a local folder, as the hub loader also accepts."""
    import json

    data = tmp_path / "hubdata"
    data.mkdir()
    lines = (FIXTURES / "winogrande" / "dev.jsonl").read_bytes().splitlines()[:4]
    rows = [json.loads(line) for line in lines]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    m = run_convert(job(tmp_path, [{"name": "wg", "format": "winogrande", "path": f"hf:{data}:train"}]))
    assert m["counts"]["wg"]["pairs"] == 4
    prefs = read(tmp_path / "run" / "preferences").to_pylist()
    assert {p["chosen"] for p in prefs} == {"Anna", "ice", "Carl", "pot"}


OASST_DETOX = str(FIXTURES / "oasst" / "messages_detoxify.jsonl")


def test_detoxify_label_through_the_stage_and_label_tally(tmp_path, ray_local):
    src = [{"name": "oasst", "format": "oasst", "path": OASST_DETOX, "label": "detoxify.toxicity"}]
    m = run_convert(job(tmp_path, src, batch_size=2))
    c = m["counts"]["oasst"]
    assert (c["pairs"], c["used"], c["rejected"]) == (1, 3, 2)
    assert c["reasons"] == {"middle_rank": 1, "missing_detoxify": 1}
    # label names tallied during the pass, per message that carries them (d1-a4 has no detoxify)
    assert c["labels"]["detoxify.toxicity"] == 4 and c["labels"]["quality"] == 5 and c["labels"]["toxicity"] == 3
    (p,) = read(tmp_path / "run" / "preferences").to_pylist()
    assert (p["chosen_score"], p["rejected_score"], p["label"]) == (0.00038284, 0.91, "detoxify.toxicity")
    assert set(read(tmp_path / "run" / "rejects")["reason"].to_pylist()) == {"middle_rank", "missing_detoxify"}


def test_label_found_on_no_message_fails_the_stage(tmp_path, ray_local):
    src = [
        {"name": "wg", "format": "winogrande", "path": WG},
        {"name": "oasst", "format": "oasst", "path": OASST_DETOX, "label": "toxicty"},
    ]
    with pytest.raises(InputError) as e:
        run_convert(job(tmp_path, src))
    assert str(e.value) == (
        f"source 'oasst': label 'toxicty' occurs in none of the 5 messages of {OASST_DETOX}; labels present: "
        "detoxify.identity_attack, detoxify.insult, detoxify.obscene, detoxify.severe_toxicity, "
        "detoxify.sexual_explicit, detoxify.threat, detoxify.toxicity, helpfulness, quality, spam, toxicity"
    )
    assert not (tmp_path / "run" / "preferences").exists()  # nothing committed
    # the same source through the grouped path of a tree file (no shuffle): also refused
    trees = str(FIXTURES / "oasst" / "trees.jsonl")
    with pytest.raises(InputError, match=r"label 'detoxify.toxicity' occurs in none of the \d+ messages of .*trees.jsonl; labels present: quality, toxicity$"):
        run_convert(job(tmp_path, [{"name": "oasst", "format": "oasst", "path": trees, "label": "detoxify.toxicity"}]))


def test_label_missing_from_real_trees_is_refused(tmp_path, ray_local, shared_data):
    """The 100 real trees have ranks but no labels and no Detoxify scores."""
    path = str(shared_data / "oasst" / "en_100_tree.jsonl")
    with pytest.raises(InputError) as e:
        run_convert(job(tmp_path, [{"name": "oasst", "format": "oasst", "path": path, "label": "toxicity"}]))
    assert str(e.value) == (
        f"source 'oasst': label 'toxicity' occurs in none of the 1,167 messages of {path}; "
        "labels present: none (no message has labels or Detoxify scores)"
    )


def test_each_input_file_is_read_parsed_and_written_by_one_task(tmp_path, ray_local):
    """With at least as many files as CPUs, read -> parse -> write fuse: one task, and so one
    output file, per input file (Ray Data's default split 8 files into 200 small tasks)."""
    src = tmp_path / "hh"
    src.mkdir()
    for i in range(3):  # 3 files, 2 CPUs
        rows = [{"chosen": f"\n\nHuman: q{i}-{j}\n\nAssistant: yes {j}", "rejected": f"\n\nHuman: q{i}-{j}\n\nAssistant: no"}
                for j in range(40)]
        (src / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_convert(job(tmp_path, [{"name": "hh", "format": "hh", "path": str(src)}]))
    assert m["counts"]["hh"]["pairs"] == 120
    files = parquet_files(tmp_path / "run" / "preferences")
    assert len(files) == 3
    origins = [{p[0].split(":")[0] for p in pq.read_table(f).column("provenance").to_pylist()} for f in files]
    assert all(len(o) == 1 for o in origins) and len(set.union(*origins)) == 3


def test_read_blocks_split_only_a_large_input_with_few_files(tmp_path, ray_local):
    from hetray.unify.dataflow import read_blocks

    small = [str(tmp_path / f"s{i}.jsonl") for i in range(3)]
    for f in small:
        open(f, "w").write("{}\n")
    assert read_blocks(small[:1]) == 1  # small: never split
    assert read_blocks(small) == 3  # as many files as CPUs or more: one block each
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(200 << 20)  # 200 MiB (sparse): one block per 64 MiB, at most 2 per CPU
    assert read_blocks([str(big)]) == 3
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    assert read_blocks([str(big)]) == 4


def test_convert_sets_its_block_size_only_while_it_runs(tmp_path, ray_local, monkeypatch):
    from ray.data import DataContext

    from hetray.unify import convert, dataflow

    seen = []
    build = dataflow.build_dataset
    monkeypatch.setattr(convert, "build_dataset",
                        lambda *a, **k: seen.append(DataContext.get_current().target_max_block_size) or build(*a, **k))
    before = DataContext.get_current().target_max_block_size
    # flat OASST messages with num_output_files: Ray Data's plan (its group-by, then a repartition)
    run_convert(job(tmp_path, [{"name": "o", "format": "oasst", "path": str(FIXTURES / "oasst" / "messages_raw.jsonl")}],
                    num_output_files=1))
    assert seen == [convert.BLOCK_BYTES] and convert.BLOCK_BYTES == 32 << 20
    assert DataContext.get_current().target_max_block_size == before


def _sorted_rows(folder) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for f in parquet_files(folder) for r in pq.read_table(f).to_pylist())


def _split_into(src, folder, parts: int, extra: list[bytes] = ()) -> str:
    """``src``'s lines (and ``extra``) dealt over ``parts`` files in ``folder``."""
    folder.mkdir()
    lines = open(src, "rb").read().splitlines() + list(extra)
    for i in range(parts):
        (folder / f"part-{i}.jsonl").write_bytes(b"\n".join(lines[i::parts]) + b"\n")
    return str(folder)


def test_a_task_per_file_writes_what_the_ray_data_plan_writes(tmp_path, ray_local, monkeypatch):
    """Sources whose rows are independent, in at least as many files as CPUs, are converted by
    plain Ray tasks, one per file (``by_file``); the Ray Data plan (read -> parse -> write) gives
    the same rows in all three outputs and the same counts. The WinoGrande files repeat a qID
    across files and hold a malformed line; ``batch_size`` cuts every file into several parses."""
    from hetray.unify import convert

    wg_lines = open(WG, "rb").read().splitlines()
    sources = [
        {"name": "hh", "format": "hh", "path": _split_into(FIXTURES / "hh" / "train.jsonl", tmp_path / "hh", 2)},
        {"name": "wg", "format": "winogrande", "path": _split_into(WG, tmp_path / "wg", 3, [wg_lines[0], b"{not json"])},
        {"name": "pw", "format": "generic", "shape": "pairwise",
         "path": _split_into(FIXTURES / "generic" / "pairwise.jsonl", tmp_path / "pw", 2)},
    ]
    chosen = []
    real = convert.by_file
    monkeypatch.setattr(convert, "by_file", lambda planned, c: chosen.append(real(planned, c)) or chosen[-1])
    runs = {}
    for plan in ("tasks", "ray_data"):
        if plan == "ray_data":
            monkeypatch.setattr(convert, "by_file", lambda planned, c: ([], planned))
        cfg = JobConfig.model_validate({"run_dir": str(tmp_path / plan), "convert": {"sources": sources, "batch_size": 3}})
        m = run_convert(cfg)
        runs[plan] = (m["counts"], {f: _sorted_rows(tmp_path / plan / f) for f in ("preferences", "sft_only", "rejects")})
    tasks, rest = chosen[0]
    assert [s.name for _, _, s in tasks] == ["hh", "wg", "pw"] and rest == []
    assert runs["tasks"] == runs["ray_data"]
    counts, rows = runs["tasks"]
    assert counts["wg"]["reasons"].get("duplicate_id") == 1 and counts["wg"]["rejected"] >= 2
    assert len(parquet_files(tmp_path / "tasks" / "preferences")) == 7  # one file per input file
    assert sum(c["pairs"] for c in counts.values()) == sum(1 for r in rows["preferences"])


@pytest.mark.parametrize("partitions", [None, 1, 5])
def test_the_disk_shuffle_writes_what_ray_datas_group_by_writes(tmp_path, ray_local, monkeypatch, partitions):
    """Flat OASST messages of local files meet in a shuffle on disk (``on_disk``: a task per
    file writes its rows sorted by hash part, a task per part combines them); Ray Data's
    group-by gives the same rows in all three outputs and the same counts. Each tree's messages
    are dealt over three files, with a malformed line; ``batch_size`` 2 cuts every file into
    several batches; 1, the default and 5 parts."""
    from hetray.unify import convert

    sources = [
        {"name": "oa", "format": "oasst", "path": _split_into(FIXTURES / "oasst" / "messages_raw.jsonl", tmp_path / "oa", 3,
                                                              [b'{"message_id": "x", "role": 7}'])},
        {"name": "dx", "format": "oasst", "path": OASST_DETOX, "label": "detoxify.toxicity"},
    ]
    chosen, runs = [], {}
    real = convert.on_disk
    monkeypatch.setattr(convert, "on_disk", lambda planned, c: chosen.append(real(planned, c)) or chosen[-1])
    for plan in ("disk", "ray_data"):
        if plan == "ray_data":
            monkeypatch.setattr(convert, "on_disk", lambda planned, c: ({}, planned))
        cfg = JobConfig.model_validate({"run_dir": str(tmp_path / plan), "convert": {
            "sources": sources, "batch_size": 2, "shuffle_partitions": partitions}})
        m = run_convert(cfg)
        runs[plan] = (m["counts"], {f: _sorted_rows(tmp_path / plan / f) for f in ("preferences", "sft_only", "rejects")})
    typed, rest = chosen[0]
    assert [[s.name for _, _, s in v] for v in typed.values()] == [["oa", "dx"]] and rest == []
    assert runs["disk"] == runs["ray_data"]
    counts, rows = runs["disk"]
    assert counts["oa"]["pairs"] > 0 and counts["oa"]["rejected"] >= 1 and counts["dx"]["labels"]["detoxify.toxicity"] > 0
    assert sum(c["pairs"] for c in counts.values()) == len(rows["preferences"])
    n_files = len(parquet_files(tmp_path / "disk" / "preferences"))
    assert n_files <= (partitions or 4)  # a file per part with pairs (default: 2 per CPU)
    assert not (tmp_path / "disk" / "shuffle").exists() and not list((tmp_path / "disk").glob("**/*.arrow"))


@pytest.mark.parametrize("flush_bytes", [1, 16 << 20])
def test_a_disk_shuffle_part_is_every_row_of_its_hash_part(tmp_path, monkeypatch, flush_bytes):
    """``to_disk`` then ``read_part``: every flow row comes back exactly once, in the part of
    its tree, and a tree's rows all in one part; with a buffer that flushes after every batch
    (1 byte) and with one that holds the whole file."""
    import functools

    from hetray.unify import dataflow
    from hetray.unify.dataflow import buckets, read_part, to_disk
    from hetray.unify.sources import oasst

    monkeypatch.setattr(dataflow, "FLUSH_BYTES", flush_bytes)
    src = tmp_path / "messages.jsonl"  # four trees (r1, h1, h2, d2), 18 lines
    src.write_bytes(b"".join(open(FIXTURES / "oasst" / f, "rb").read() for f in (
        "messages_raw.jsonl", "messages_hub_b.jsonl", "messages_detoxify_hub.jsonl")))
    s = job(tmp_path, [{"name": "oa", "format": "oasst", "path": str(src)}]).convert.sources[0]
    index = to_disk(str(tmp_path / "m.arrow"), 3, str(src), None, 2, functools.partial(oasst.flow_table, s=s))
    whole = oasst.flow_table(next(iter_file_batches_of(src)), s)
    assert len(index) == (2 if flush_bytes > 1 else 9 + 1)  # parts 0 and 2; 9 batches of 2, one with 2 trees
    parts = {p: read_part([(str(tmp_path / "m.arrow"), index)], p) for p in range(3)}
    assert parts[1] is None  # no tree hashes to part 1
    parts = {p: t for p, t in parts.items() if t is not None}
    assert sum(t.num_rows for t in parts.values()) == whole.num_rows
    for p, t in parts.items():
        assert set(buckets(pc.coalesce(t["group"], t["record_id"]), 3).to_pylist()) == {p}
    trees = [set(pc.drop_null(t["group"]).to_pylist()) for t in parts.values()]
    assert not (trees[0] & trees[1]) and trees[0] | trees[1] == {"r1", "h1", "h2", "d2"}


def iter_file_batches_of(path):
    from hetray.unify.sources.readers import iter_file_batches

    with open(path, "rb") as f:
        yield from iter_file_batches(f, str(path), None)


def test_which_sources_take_a_task_per_file(tmp_path, ray_local):
    from hetray.unify.convert import by_file, plan_source

    hh = _split_into(FIXTURES / "hh" / "train.jsonl", tmp_path / "hh", 2)
    sources = [{"name": "hh", "format": "hh", "path": hh},
               {"name": "hh1", "format": "hh", "path": str(FIXTURES / "hh" / "train.jsonl")},  # small: one block
               {"name": "oasst", "format": "oasst", "path": str(FIXTURES / "oasst" / "messages_raw.jsonl")}]
    planned = [plan_source(s) for s in job(tmp_path, sources).convert.sources]
    tasks, rest = by_file(planned, job(tmp_path, sources).convert)
    assert [s.name for _, _, s in tasks] == ["hh", "hh1"] and [s.name for _, _, s in rest] == ["oasst"]
    tasks, rest = by_file(planned, job(tmp_path, sources, num_output_files=2).convert)
    assert tasks == [] and len(rest) == 3  # a repartition needs the one Dataset


def test_a_file_task_streams_its_file(tmp_path, monkeypatch):
    """``convert_file`` holds one piece of its file at a time (Ray Data's fused write kept all of
    a task's blocks): the Arrow memory alive during a parse is about the same for a file of 30
    read pieces as for a file of 3 (holding them all would be 10x)."""
    import pyarrow as pa

    from hetray.unify import convert
    from hetray.unify.sources import hh
    from hetray.unify.sources.readers import CHUNK_BYTES

    peak = [0]
    parse = hh.parse_table

    def watched(*a, **k):
        out = parse(*a, **k)
        peak[0] = max(peak[0], pa.total_allocated_bytes())
        return out

    monkeypatch.setattr(hh, "parse_table", watched)
    cfg = job(tmp_path, [{"name": "hh", "format": "hh", "path": str(FIXTURES / "hh" / "train.jsonl")}])
    s = cfg.convert.sources[0]
    row = json.dumps({"chosen": "\n\nHuman: " + "q " * 150 + "\n\nAssistant: yes", "rejected": "\n\nHuman: " + "q " * 150 + "\n\nAssistant: no"})
    peaks = {}
    for pieces in (3, 30):
        path = tmp_path / f"hh-{pieces}.jsonl"
        n = pieces * CHUNK_BYTES // (len(row) + 1)
        path.write_text((row + "\n") * n)
        root = tmp_path / f"out-{pieces}"
        for folder in convert.OUTPUTS:
            (root / folder).mkdir(parents=True)
        peak[0] = 0
        counts = convert.convert_file(str(root), "train.parquet", str(path), hh, s, None)
        assert counts["hh"]["pairs"] == n
        peaks[pieces] = peak[0]
    assert peaks[30] < 1.5 * peaks[3], peaks
