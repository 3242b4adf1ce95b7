"""Awkward input never crashes the convert stage nor disappears: CSV / TSV read as strings with
per-row rejects, byte order marks, duplicates, empties, and the stage's own count of its input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from hetray.cli import main
from hetray.config import ConfigError, JobConfig, load_config
from hetray.schema import parquet_files
from hetray.unify import dataflow
from hetray.unify.convert import CountMismatch, count_input, plan_source, run_convert
from hetray.unify.sources import ADAPTERS, generic, oasst, winobias, winogender, winogrande
from hetray.unify.sources.base import account, convert_rows
from hetray.unify.sources.readers import InputError, count_records, iter_records, table_columns

from conftest import FIXTURES

BOM = b"\xef\xbb\xbf"
WG = FIXTURES / "winogrande" / "dev.jsonl"
WGEN = FIXTURES / "winogender"


def job(tmp_path, sources, **kw) -> JobConfig:
    return JobConfig.model_validate({"run_dir": str(tmp_path / "run"), "convert": {"sources": sources, **kw}})


def read(folder) -> list[dict]:
    return [r for f in parquet_files(folder) for r in pq.read_table(f).to_pylist()]


def rejects_of(out) -> dict:
    """{(file name, line): (reason, detail)} of the rejects."""
    return {(Path(o["file"]).name, o["line"]): (o["reason"], o["detail"]) for o in out if o["kind"] == "reject"}


def convert_file(source: dict) -> list[dict]:
    """The plain-Python conversion of one source, planned as the stage plans it."""
    s = JobConfig.model_validate({"convert": {"sources": [source]}}).convert.sources[0]
    adapter, files, s = plan_source(s)
    return convert_rows(adapter, s, iter_records(files))


# ---------------------------------------------------------------------------- CSV / TSV as strings


def test_csv_ragged_row_and_bad_bytes_are_rejects_naming_file_row_and_column(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(
        b"prompt,chosen,rejected\n"
        b"Hi?,Hello.,Go away.\n"
        b"Hey?,Hi there,Bye,EXTRA\n"  # row 2: four fields
        b'"Two\nlines?",Yes.,No.\n'  # row 3 spans lines 4-5
        b"Caf\xe9?,Yes.,No.\n"  # row 4 (line 6): Latin-1, not UTF-8
        b"Short,row\n"  # row 5 (line 7): two fields
    )
    out = convert_file({"name": "g", "format": "generic", "shape": "pairwise", "path": str(path)})
    assert [(o["prompt"], o["provenance"]) for o in out if o["kind"] == "pair"] == [
        ("Hi?", [f"{path}:1"]), ("Two\nlines?", [f"{path}:3"])]
    rejects = rejects_of(out)
    assert rejects == {
        ("pairs.csv", 2): ("wrong_field_count",
                           "row 2 (line 3): expected 3 fields (prompt, chosen, rejected), got 4: "
                           "['Hey?', 'Hi there', 'Bye', 'EXTRA']"),
        ("pairs.csv", 4): ("invalid_utf8", "row 4 (line 6), column 'prompt': not valid UTF-8: b'Caf\\xe9?'"),
        ("pairs.csv", 5): ("wrong_field_count",
                           "row 5 (line 7): expected 3 fields (prompt, chosen, rejected), got 2: ['Short', 'row']"),
    }
    assert not any("\ufffd" in json.dumps(o) for o in out)  # nothing silently replaced
    assert count_records(str(path)) == 5 == len(out)


def test_tsv_ragged_row_is_a_reject_in_winogender(tmp_path):
    path = tmp_path / "all_sentences.tsv"
    lines = (WGEN / "all_sentences.tsv").read_text().splitlines()
    lines.insert(2, "nurse.patient.0.male.txt")  # row 2 (line 3): no sentence column
    path.write_text("\n".join(lines) + "\n")
    out = convert_file({"name": "wgen", "format": "winogender", "path": str(path),
                        "occupation_stats": str(WGEN / "occupations-stats.tsv")})
    reason, detail = rejects_of(out)[("all_sentences.tsv", 2)]
    assert reason == "wrong_field_count"
    assert detail == "row 2 (line 3): expected 2 fields (sentid, sentence), got 1: ['nurse.patient.0.male.txt']"


def test_csv_column_turning_from_numbers_to_text_after_the_first_mib(tmp_path, ray_local):
    """Type inference on the first MiB used to fail the read when a later cell was text; now
    every cell is a string and the adapter rejects the one row whose margin is no number."""
    path = tmp_path / "big.csv"
    rows = [f"question number {i}?,a good answer {i},a bad answer {i},{i % 7}.5" for i in range(30000)]
    rows.insert(25000, "the odd one?,yes,no,n/a")  # far past the first MiB
    path.write_text("prompt,chosen,rejected,margin\n" + "\n".join(rows) + "\n")
    assert path.read_bytes().index(b"the odd one") > 1 << 20
    src = {"name": "big", "format": "generic", "shape": "pairwise", "path": str(path),
           "columns": {"margin": "margin"}}
    m = run_convert(job(tmp_path, [src]))
    c = m["counts"]["big"]
    assert (c["pairs"], c["rejected"], c["input"], c["files"]) == (30000, 1, 30001, {str(path): 30001})
    (bad,) = read(tmp_path / "run" / "rejects")
    assert (bad["file"], bad["line"], bad["reason"]) == (str(path), 25001, "wrong_type")
    assert bad["detail"] == "field 'margin' should be a finite number, got str: 'n/a'"


def test_csv_count_agrees_with_the_reader_on_awkward_files(tmp_path):
    cases = {
        "blank_lines.csv": b"a,b\n1,2\n\n\r\n3,4\n",
        "whitespace_line.csv": b"a,b\n1,2\n   \n3,4\n",
        "quoted_newline.csv": b'a,b\n1,"x\ny"\n3,4\n',
        "cr_only.csv": b"a,b\r1,2\r3,4\r",
        "crlf_no_final_newline.csv": b"a,b\r\n1,2\r\n3,4",
        "unterminated_quote.csv": b'a,b\n1,"xx\n3,4\n',
        "header_only.csv": b"a,b\n",
        "empty.csv": b"",
        "bom.tsv": BOM + b"a\tb\n1\t2\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        records = list(iter_records(str(tmp_path / name)))
        assert count_records(str(tmp_path / name)) == len(records), name
    assert [r["line"] for r in iter_records(str(tmp_path / "whitespace_line.csv"))] == [1, 2, 3]
    assert [r["error"] for r in iter_records(str(tmp_path / "whitespace_line.csv"))] == [None, "wrong_field_count", None]
    assert count_records(str(tmp_path / "blank_lines.csv"), limit=1) == 1


def test_csv_header_problems_fail_before_any_work(tmp_path):
    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,chosen,prompt\nA,B,C\n")
    with pytest.raises(InputError, match=r"twice\.csv: the header \(line 1\) names column\(s\) 'prompt' more than once"):
        table_columns(str(twice))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"prompt,r\xe9ponse\nA,B\n")
    cfg = job(tmp_path, [{"name": "s", "format": "generic", "shape": "sft", "path": str(latin),
                          "columns": {"response": "réponse"}}])
    with pytest.raises(InputError, match=r"source 's': .*latin\.csv: the header \(line 1\) is not valid UTF-8: column b'r\\xe9ponse'$"):
        run_convert(cfg)
    assert not (tmp_path / "run" / "preferences").exists()


def test_oasst_messages_from_csv_get_their_types_back(tmp_path):
    """CSV cells are strings: rank, flags and labels (JSON text) are parsed per row."""
    msgs = [json.loads(line) for line in (FIXTURES / "oasst" / "messages_raw.jsonl").read_text().splitlines()]
    cols = ["message_id", "parent_id", "message_tree_id", "text", "role", "lang", "review_result",
            "deleted", "synthetic", "rank", "labels"]
    import csv

    with open(tmp_path / "messages.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for m in msgs:
            w.writerow(["" if m.get(c) is None else json.dumps(m[c]) if c == "labels" else m[c] for c in cols])
    for label in ("rank", "toxicity"):
        from_csv = convert_file({"name": "o", "format": "oasst", "path": str(tmp_path / "messages.csv"), "label": label})
        from_jsonl = convert_file({"name": "o", "format": "oasst", "label": label,
                                   "path": str(FIXTURES / "oasst" / "messages_raw.jsonl")})
        key = lambda out: sorted((o["prompt"], o["chosen"], o["rejected"], o["quality"]) for o in out if o["kind"] == "pair")
        assert key(from_csv) == key(from_jsonl) and key(from_csv), label
        assert account(from_csv)["reasons"] == account(from_jsonl)["reasons"], label
    assert oasst.from_csv({"rank": "x", "deleted": "maybe", "lang": " "}) == {"rank": "x", "deleted": "maybe", "lang": None}


# ---------------------------------------------------------------------------- byte order marks


def _with_bom(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(BOM + src.read_bytes())
    return str(dst)


def test_bom_is_dropped_by_every_reader(tmp_path):
    # JSONL (WinoGrande): the first record is a pair, not malformed_json
    wg = _with_bom(WG, tmp_path / "wg" / "dev.jsonl")
    out = convert_file({"name": "wg", "format": "winogrande", "path": wg})
    assert account(out) == account(convert_file({"name": "wg", "format": "winogrande", "path": str(WG)}))
    assert next(o for o in out if o["kind"] == "pair")["provenance"] == ["fx-1"]
    # JSON lines in a .json file, and generic's column check on its first line
    pw = _with_bom(FIXTURES / "generic" / "pairwise.jsonl", tmp_path / "gen" / "pairwise.json")
    src = {"name": "g", "format": "generic", "shape": "pairwise", "path": pw, "columns": {"margin": "margin"}}
    generic.check_columns(JobConfig.model_validate({"convert": {"sources": [src]}}).convert.sources[0], [pw])
    assert convert_file(src)[0]["prompt"] == "What is 2 + 2?"
    # CSV: header detection and values
    csv = _with_bom(FIXTURES / "generic" / "scored.csv", tmp_path / "gen" / "scored.csv")
    assert table_columns(csv) == ["prompt", "response", "helpfulness", "toxicity"]
    scored = {"name": "g", "format": "generic", "shape": "scored", "path": csv, "columns": {"scores": ["helpfulness"]}}
    plain = {**scored, "path": str(FIXTURES / "generic" / "scored.csv")}
    assert account(convert_file(scored)) == account(convert_file(plain))
    # TSV: WinoGender's sentences and its occupation statistics
    sent = _with_bom(WGEN / "all_sentences.tsv", tmp_path / "wgen" / "all_sentences.tsv")
    stats = _with_bom(WGEN / "occupations-stats.tsv", tmp_path / "wgen" / "occupations-stats.tsv")
    assert winogender.load_occupation_stats(stats)["nurse"] == 90.0
    wgen = convert_file({"name": "w", "format": "winogender", "path": sent, "occupation_stats": stats})
    ref = convert_file({"name": "w", "format": "winogender", "path": str(WGEN / "all_sentences.tsv"),
                        "occupation_stats": str(WGEN / "occupations-stats.tsv")})
    assert account(wgen) == account(ref) and sorted(p["chosen"] for p in wgen if p["kind"] == "pair") == \
        sorted(p["chosen"] for p in ref if p["kind"] == "pair")
    # WinoBias text files: line 1 keeps its number and pairs as without the BOM
    sample = Path(winobias.__file__).resolve().parents[2] / "samples" / "winobias"
    for f in sample.iterdir():
        _with_bom(f, tmp_path / "wb" / f.name)
    wb = convert_file({"name": "wb", "format": "winobias", "path": str(tmp_path / "wb")})
    assert account(wb)["pairs"] == 48 and account(wb)["rejected"] == 0
    first = next(o for o in wb if o["kind"] == "pair" and o["provenance"][0].endswith("anti_stereotyped_type1.txt.dev:1"))
    assert first["prompt"] == "The mechanic fixed the car for the cashier because"


def test_bom_only_first_line_counts_as_blank(tmp_path):
    path = tmp_path / "wg.jsonl"
    path.write_bytes(BOM + b"\n" + WG.read_bytes())
    assert count_records(str(path)) == len(list(iter_records(str(path)))) == 12


# ---------------------------------------------------------------------------- duplicates and empties


@pytest.mark.parametrize("pass_on, parts", [("driver", None), ("ray", None), ("ray", 1), ("ray", 3)])
def test_duplicate_winogrande_qids_are_rejects_naming_the_qid(tmp_path, ray_local, monkeypatch, pass_on, parts):
    """Found by the narrow pass over (qID, file, line): on the driver for a small input, else
    Ray tasks, one per file, then one per hash part of the keys (``convert.shuffle_partitions``
    of them; default 4 here): a qID's rows meet in one part whatever the number of parts."""
    if pass_on == "ray":
        monkeypatch.setattr("hetray.unify.dataflow.LOCAL_KEY_PASS_BYTES", 0)
    calls = []
    real = dataflow._task_key_pass
    monkeypatch.setattr(dataflow, "_task_key_pass", lambda *a: calls.append(a[-1]) or real(*a))
    lines = WG.read_bytes().splitlines()
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines[:4]) + b"\n")
    (tmp_path / "b.jsonl").write_bytes(b"\n".join([lines[0], lines[2], lines[2]]) + b"\n")  # fx-1 once, fx-3 twice
    src = {"name": "wg", "format": "winogrande", "path": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]}
    m = run_convert(job(tmp_path, [src], shuffle_partitions=parts))
    prefs = read(tmp_path / "run" / "preferences")
    assert sorted(p["provenance"][0] for p in prefs) == ["fx-1", "fx-2", "fx-3", "fx-4"]
    assert len({p["pair_id"] for p in prefs}) == 4
    got = sorted((Path(r["file"]).name, r["line"], r["record_id"], r["reason"], r["detail"])
                 for r in read(tmp_path / "run" / "rejects"))
    a = tmp_path / "a.jsonl"
    assert got == [
        ("b.jsonl", 1, "fx-1", "duplicate_id", f"qID 'fx-1' also at {a}:1, which became the pair"),
        ("b.jsonl", 2, "fx-3", "duplicate_id", f"qID 'fx-3' also at {a}:3, which became the pair"),
        ("b.jsonl", 3, "fx-3", "duplicate_id", f"qID 'fx-3' also at {a}:3, which became the pair"),
    ]
    c = m["counts"]["wg"]
    assert (c["pairs"], c["used"], c["rejected"], c["input"]) == (4, 4, 3, 7)
    assert calls == ([] if pass_on == "driver" else [parts or 4])
    assert not winogrande.needs_shuffle(None)  # found by the narrow pass over qIDs: rows are not shuffled


def test_duplicate_source_names_are_a_config_error(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "convert:\n  sources:\n"
        f"    - {{name: wg, format: winogrande, path: {WG}}}\n"
        f"    - {{name: hh, format: hh, path: {FIXTURES / 'hh' / 'train.jsonl'}}}\n"
        f"    - {{name: wg, format: hh, path: {FIXTURES / 'hh' / 'train.jsonl'}}}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == (f"{cfg}: 'convert.sources[2].name': source name 'wg' is already used by "
                            "convert.sources[0]; every source needs its own name (got 'wg')")


def test_empty_path_list_is_a_config_error_naming_the_source(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("convert:\n  sources:\n    - {name: mine, format: hh, path: []}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == (f"{cfg}: 'convert.sources[0].path': Value error, source 'mine': path is an empty "
                            "list; give a file, folder or glob (got [])")
    with pytest.raises(ValidationError, match="source 'mine': path has an empty entry"):
        job(tmp_path, [{"name": "mine", "format": "hh", "path": [str(WG), " "]}])


def test_unknown_label_is_an_error(tmp_path):
    # generic: a label that is not one of the score columns, or a score column the file lacks
    with pytest.raises(ValidationError, match=r"label 'helpfulnes' is not one of columns.scores \['helpfulness'\]"):
        job(tmp_path, [{"name": "g", "format": "generic", "shape": "scored", "path": "x",
                        "columns": {"scores": ["helpfulness"]}, "label": "helpfulnes"}])
    scored = str(FIXTURES / "generic" / "scored.csv")
    cfg = job(tmp_path, [{"name": "g", "format": "generic", "shape": "scored", "path": scored,
                          "columns": {"scores": ["helpfulnes"]}}])
    with pytest.raises(InputError, match=r"source 'g': .*scored\.csv: no column 'helpfulnes'"):
        run_convert(cfg)
    # OASST: a label that no message has fails after the pass (see test_convert for the Ray run)
    s = oasst.Settings(name="o", path="x", label="toxicty")
    with pytest.raises(InputError, match="label 'toxicty' occurs in none of the 9 messages"):
        oasst.check_counts(s, {"used": 6, "rejected": 3, "labels": {"toxicity": 9}})


def test_same_file_twice_in_one_source_is_an_error(tmp_path):
    cfg = job(tmp_path, [{"name": "wg", "format": "winogrande", "path": [str(WG), str(WG.parent / "*.jsonl")]}])
    with pytest.raises(InputError, match=f"source 'wg': the path names {WG} more than once"):
        run_convert(cfg)


def test_empty_input_file_in_the_cli_summary_and_manifest(tmp_path, ray_local, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\nconvert:\n  sources:\n"
        f"    - {{name: wg, format: winogrande, path: [{WG}, {empty}]}}\n"
        f"    - {{name: nothing, format: hh, path: {empty}}}\n"
    )
    assert main(["convert", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "[nothing]  pairs 0  sft-only 0  rejected records 0  input records 0" in out
    assert f"  empty input files (0 records): {empty}" in out
    assert "[wg]  pairs 4  sft-only 0  rejected records 8  input records 12" in out
    assert f"  files: {WG} 12, {empty} 0" in out
    manifest = json.loads((tmp_path / "run" / "preferences" / "manifest.json").read_text())
    assert manifest["counts"]["nothing"]["files"] == {str(empty): 0}
    assert manifest["counts"]["wg"]["input"] == 12


# ---------------------------------------------------------------------------- the count check


FIXTURE_SOURCES = [
    {"name": "wg", "format": "winogrande", "path": str(WG)},
    {"name": "oa_trees", "format": "oasst", "path": str(FIXTURES / "oasst" / "trees.jsonl"), "label": "toxicity"},
    {"name": "oa_nested", "format": "oasst", "path": str(FIXTURES / "oasst" / "nested.jsonl")},
    {"name": "oa_bad", "format": "oasst", "path": str(FIXTURES / "oasst" / "malformed.jsonl")},
    {"name": "oa_bad_trees", "format": "oasst", "path": str(FIXTURES / "oasst" / "malformed.jsonl"), "shape": "trees"},
    {"name": "oa_msgs", "format": "oasst", "path": str(FIXTURES / "oasst" / "messages_raw.jsonl")},
    {"name": "hh", "format": "hh", "path": str(FIXTURES / "hh" / "train.jsonl")},
    {"name": "wb", "format": "winobias", "path": str(FIXTURES / "winobias")},
    {"name": "wgen", "format": "winogender", "path": str(WGEN / "all_sentences.tsv"),
     "occupation_stats": str(WGEN / "occupations-stats.tsv")},
    {"name": "gen", "format": "generic", "shape": "scored", "path": str(FIXTURES / "generic" / "scored.csv"),
     "columns": {"scores": ["helpfulness"]}},
]


@pytest.mark.parametrize("source", FIXTURE_SOURCES, ids=lambda s: s["name"])
@pytest.mark.parametrize("limit", [None, 2])
def test_independent_input_count_matches_used_plus_rejected(source, limit):
    src = {**source, "limit": limit} if limit else source
    s = JobConfig.model_validate({"convert": {"sources": [src]}}).convert.sources[0]
    adapter, files, s = plan_source(s)
    c = account(convert_rows(adapter, s, iter_records(files, limit)))
    assert sum(count_input(adapter, files, s).values()) == c["used"] + c["rejected"] > 0


def test_count_mismatch_fails_the_stage_and_commits_nothing(tmp_path, ray_local, monkeypatch):
    import hetray.unify.convert as convert

    real = convert.count_records
    monkeypatch.setattr(convert, "count_records", lambda f, limit=None, units=None: real(f, limit, units) + 1)
    with pytest.raises(CountMismatch) as e:
        run_convert(job(tmp_path, [{"name": "wg", "format": "winogrande", "path": str(WG)}]))
    assert str(e.value).endswith(
        "source 'wg': 13 input records in its files (dev.jsonl: 13), but the outputs account for 12 "
        "(4 used in pairs or SFT rows + 8 rejected)")
    assert "records were lost or counted twice, so nothing was written" in str(e.value)
    assert not (tmp_path / "run" / "preferences").exists()


def test_every_adapter_can_be_counted():
    """An adapter whose record holds several input units says so with ``count_records``."""
    assert [name for name, (mod, _) in ADAPTERS.items() if hasattr(mod, "count_records")] == ["oasst"]
    s = oasst.Settings(name="o", path="x")
    tree = {"prompt": {"message_id": "p", "replies": [{"message_id": "a", "replies": [{}, 3]}, "junk"]}}
    assert oasst.count_records(tree, s) == 5
    assert oasst.count_records(None, s) == 1 and oasst.count_records({"replies": "x"}, s) == 1
