"""WinoGrande (allenai/winogrande) -> preference pairs (paper appendix A.1).

Input: jsonl, one object a line: ``qID``, ``sentence`` (with one ``_`` blank), ``option1``,
``option2``, ``answer`` ("1" or "2"). Output: prompt = the sentence, chosen = the correct
option, rejected = the other. WinoGrande has no ordered score, so ``quality`` is null.

Rejects: ``no_answer`` (the test split has no ``answer``), ``bad_answer`` (not "1"/"2"),
``no_blank`` (the sentence has no ``_``), ``same_options``, ``held_out`` (``holdout`` is set and
the row's ``qID`` is kept for evaluation: ``hetray.pairs.holdout``, the same rows
``eval.winogrande.holdout`` scores), ``duplicate_id`` (a good row whose ``qID`` an earlier good
row has, in file then line order: one pair per qID, so no two pairs share a ``pair_id``), and the
shared JSON/field reasons. In ``parse`` / ``combine`` (the per-record reference) a good row is
an item grouped by its qID. The stage does not shuffle the rows: every row is a pair by itself
unless its qID repeats, so it finds the repeated qIDs from three short columns first and then
converts the rows a batch at a time (``parse_table``, below).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from hetray.pairs import holdout
from hetray.schema import ITEM, PAIR, item, pair, reject
from hetray.unify.sources import vector
from hetray.unify.sources.base import SourceSettings, decode_json, require_str


class Settings(SourceSettings):
    format: Literal["winogrande"] = "winogrande"
    holdout: float | None = Field(
        default=None, gt=0, lt=1,
        description="share of qIDs kept out of training for evaluation (set eval.winogrande.holdout "
        "to the same value to evaluate on exactly those rows); None: train on every row",
    )


def parse(row: dict, s: Settings) -> list[dict]:
    obj, bad = decode_json(row, s.name)
    if bad:
        return [bad]
    rid = str(obj.get("qID") or f"{row['file']}:{row['line']}")
    if s.holdout is not None and holdout(rid, s.holdout):
        return [reject(s.name, row["file"], row["line"], rid, "held_out", f"qID kept for evaluation (holdout {s.holdout:g})")]
    fields = {}
    for name in ("sentence", "option1", "option2"):
        fields[name], bad = require_str(obj, name, row, s.name, rid)
        if bad:
            return [bad]
    answer = obj.get("answer")
    if answer is None or answer == "":
        return [reject(s.name, row["file"], row["line"], rid, "no_answer", "field 'answer' is missing (test split?)")]
    answer = str(answer).strip()
    if answer not in ("1", "2"):
        return [reject(s.name, row["file"], row["line"], rid, "bad_answer", f"field 'answer' is {answer!r}, expected '1' or '2'")]
    if "_" not in fields["sentence"]:
        return [reject(s.name, row["file"], row["line"], rid, "no_blank", "field 'sentence' has no '_' blank")]
    if fields["option1"].strip() == fields["option2"].strip():
        return [reject(s.name, row["file"], row["line"], rid, "same_options", f"both options are {fields['option1']!r}")]
    chosen, rejected = (
        (fields["option1"], fields["option2"]) if answer == "1" else (fields["option2"], fields["option1"])
    )
    data = {"prompt": fields["sentence"], "chosen": chosen, "rejected": rejected}
    return [item(rid, row["file"], row["line"], rid, data)]


def combine(items: list[dict], s: Settings) -> list[dict]:
    """The rows of one qID: the first (file, line) is the pair, any other a ``duplicate_id``."""
    first, *later = sorted(items, key=lambda it: (it["file"], it["line"]))
    d = first["data"]
    out = [pair(s.name, d["prompt"], d["chosen"], d["rejected"], [first["record_id"]])]
    for it in later:
        detail = f"qID {it['record_id']!r} also at {first['file']}:{first['line']}, which became the pair"
        out.append(reject(s.name, it["file"], it["line"], it["record_id"], "duplicate_id", detail))
    return out


def needs_shuffle(s: Settings) -> bool:
    return False  # rows are pairs by themselves; duplicates are found by ``unique_keys``


# ---------------------------------------------------------------------------- the Arrow path
#
# The stage converts WinoGrande rows one batch at a time, without a shuffle of the rows: a
# narrow pass first reads every good row's (qID, file, line) (``unique_keys``), the stage groups
# those by qID and keeps the later rows of a repeated qID (``find_duplicates``), and then
# ``parse_table`` turns exactly those rows into ``duplicate_id`` rejects, as ``combine`` does.

_FIELDS = pa.schema([(name, pa.string()) for name in ("qID", "sentence", "option1", "option2", "answer")])
DUPLICATES_SCHEMA = pa.schema([("file", pa.string()), ("line", pa.int64()), ("record_id", pa.string()),
                               ("first_file", pa.string()), ("first_line", pa.int64())])
KEYS_SCHEMA = pa.schema([("record_id", pa.string()), ("file", pa.string()), ("line", pa.int64())])


def _fast(raw: pa.Table, s: Settings):
    """The rows Arrow can decide: ``(obj, fast_rows, record ids)`` of the good rows (items)."""
    obj, rows = vector.read_json_rows(raw, _FIELDS)
    file, line = raw["file"].take(rows), raw["line"].take(rows)
    qid = obj["qID"]
    rid = pc.if_else(pc.fill_null(pc.greater(pc.utf8_length(qid), 0), False), qid, vector.record_ids(file, line))
    ok = np.ones(len(rows), dtype=bool)
    if s.holdout is not None:  # held-out rows are rejects: the per-row path writes them
        ok &= ~np.array([int(h, 16) / 16**16 < s.holdout for h in vector.make_ids("holdout", rid)], dtype=bool)
    for name in ("sentence", "option1", "option2"):
        ok &= vector.nonempty(obj[name])
    ok &= vector.as_numpy(pc.is_in(vector.strip(obj["answer"]), pa.array(["1", "2"])))
    ok &= vector.as_numpy(pc.match_substring(obj["sentence"], "_"))
    ok &= ~vector.as_numpy(pc.equal(vector.strip(obj["option1"]), vector.strip(obj["option2"])))
    keep = pa.array(ok)
    return obj.filter(keep), rows[ok], rid.filter(keep)


def _location_keys(file, line):
    return pc.binary_join_element_wise(file, pc.cast(line, pa.string()), "\x00")


def unique_keys(raw: pa.Table, s: Settings) -> pa.Table:
    """``(record_id, file, line)`` of every good row of a RAW batch (KEYS_SCHEMA)."""
    _, fast_rows, rid = _fast(raw, s)
    keys = pa.table({"record_id": rid, "file": raw["file"].take(fast_rows), "line": raw["line"].take(fast_rows)},
                    schema=KEYS_SCHEMA)
    _, rows = vector.other_rows(raw, fast_rows)
    items = [rec for row in rows for rec in parse(row, s) if rec["kind"] == ITEM]
    if items:
        keys = pa.concat_tables([keys, pa.Table.from_pylist(
            [{"record_id": it["record_id"], "file": it["file"], "line": it["line"]} for it in items], schema=KEYS_SCHEMA)])
    return keys


def find_duplicates(keys: pa.Table) -> pa.Table:
    """KEYS_SCHEMA rows (every row of a qID among them) -> the rows that are not the first of
    their qID in (file, line) order, with that first row's place (DUPLICATES_SCHEMA)."""
    keys = keys.sort_by([("record_id", "ascending"), ("file", "ascending"), ("line", "ascending")])
    rid = keys["record_id"].to_numpy(zero_copy_only=False)
    if len(rid) < 2:
        return DUPLICATES_SCHEMA.empty_table()
    later = np.concatenate([[False], rid[1:] == rid[:-1]])
    run_start = np.maximum.accumulate(np.where(~later, np.arange(len(rid)), 0))
    first = pa.array(run_start[later])
    dup = keys.filter(pa.array(later))
    return pa.table({"file": dup["file"], "line": dup["line"], "record_id": dup["record_id"],
                     "first_file": keys["file"].take(first), "first_line": keys["line"].take(first)},
                    schema=DUPLICATES_SCHEMA)


def parse_table(raw: pa.Table, s: Settings, duplicates: pa.Table | None = None) -> pa.Table:
    """``parse`` + ``combine`` of a RAW batch, given the stage's ``duplicates``
    (DUPLICATES_SCHEMA): OUTPUT_SCHEMA rows in input order. Pair rows also carry their row's
    ``file``, ``line`` and ``record_id`` (the writer keeps only the pair columns)."""
    obj, fast_rows, rid = _fast(raw, s)
    dup_at: dict = {}
    if duplicates is not None and duplicates.num_rows:
        is_dup = vector.as_numpy(pc.is_in(_location_keys(raw["file"].take(fast_rows), raw["line"].take(fast_rows)),
                                          _location_keys(duplicates["file"], duplicates["line"])))
        if is_dup.any():  # rare: the per-row path writes them
            keep = pa.array(~is_dup)
            obj, fast_rows, rid = obj.filter(keep), fast_rows[~is_dup], rid.filter(keep)
        dup_at = {(r["file"], r["line"]): r for r in duplicates.to_pylist()}
    one = pc.equal(vector.strip(obj["answer"]), "1")  # else "2": the fast rows have one of them
    fast = vector.output_table(len(fast_rows), {
        "kind": PAIR, "source": s.name, "pair_id": pa.array(vector.make_ids(s.name, rid), pa.string()),
        "prompt": obj["sentence"],
        "chosen": pc.if_else(one, obj["option1"], obj["option2"]),
        "rejected": pc.if_else(one, obj["option2"], obj["option1"]),
        "provenance": vector.single_lists(rid),
        "file": raw["file"].take(fast_rows), "line": raw["line"].take(fast_rows), "record_id": rid,
    })

    def parse_row(row: dict) -> list[dict]:
        out = []
        for rec in parse(row, s):
            if rec["kind"] != ITEM:
                out.append(rec)
            elif (rec["file"], rec["line"]) in dup_at:
                d = dup_at[(rec["file"], rec["line"])]
                detail = f"qID {rec['record_id']!r} also at {d['first_file']}:{d['first_line']}, which became the pair"
                out.append(reject(s.name, rec["file"], rec["line"], rec["record_id"], "duplicate_id", detail))
            else:
                (p,) = combine([rec], s)
                out.append({**p, "file": rec["file"], "line": rec["line"], "record_id": rec["record_id"]})
        return out

    return vector.with_slow_rows(raw, fast, fast_rows, parse_row)
