"""The Arrow paths agree with the per-record reference, row for row, on awkward generated input:
the line reader and counter, ``parse_table`` of HH / generic / WinoGrande, OASST's typed
``flow_table`` and ``combine_table`` (no Ray)."""

from __future__ import annotations

import collections
import io
import json
import random
import zlib

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from hetray.schema import ITEM, OUTPUT_SCHEMA, RAW_SCHEMA
from hetray.unify.dataflow import LABELS, _combine_local
from hetray.unify.sources import generic, hh, oasst, oasst_table, vector, winogrande
from hetray.unify.sources.base import convert_rows, tally_label_names
from hetray.unify.sources.readers import BOM, _count_lines, iter_line_batches


def test_python_whitespace_is_what_str_strip_strips():
    assert vector.PY_WHITESPACE == "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


# ---------------------------------------------------------------------------- reading lines


def reference_lines(data: bytes, limit=None) -> list[tuple]:
    """The reader's rules, one line at a time: lines end at \\n, trailing \\r dropped, a BOM
    on line 1 dropped, ASCII-whitespace lines skipped, bad UTF-8 kept with an error."""
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    out = []
    for n, raw in enumerate(parts, start=1):
        raw = raw.rstrip(b"\r\n").removeprefix(BOM if n == 1 else b"")
        if not raw.strip():
            continue
        try:
            out.append((n, raw.decode("utf-8"), None))
        except UnicodeDecodeError:
            out.append((n, raw.decode("utf-8", "replace"), "invalid_utf8"))
        if limit is not None and len(out) >= limit:
            break
    return out


def test_line_reader_and_counter_agree_with_the_reference(tmp_path):
    rng = random.Random(1)
    pieces = [b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\n", b"\x0b", b"\xc3\xa9", b"\xe9", BOM, b"{",
              b"\x0c", b"\x1c", b"\xe2\x80\xa8"]
    path = tmp_path / "x.jsonl"
    for _ in range(400):
        data = (BOM if rng.random() < 0.2 else b"") + b"".join(rng.choices(pieces, k=rng.randint(0, 60)))
        limit = rng.choice([None, None, 1, 2, 3])
        chunk = rng.choice([1, 3, 8, 1 << 20])
        got = [(r["line"], r["text"], r["error"])
               for b in iter_line_batches(io.BytesIO(data), "f", limit, chunk_size=chunk) for r in b.to_pylist()]
        assert got == reference_lines(data, limit), (data, limit, chunk)
        path.write_bytes(data)
        assert _count_lines(str(path), chunk_size=chunk) == len(reference_lines(data)), (data, chunk)


# ---------------------------------------------------------------------------- row-independent formats


def raw_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def per_row(adapter, s, raw: pa.Table) -> pa.Table:
    return pa.Table.from_pylist([o for row in raw.to_pylist() for o in adapter.parse(row, s)], schema=OUTPUT_SCHEMA)


def same_as_per_row(adapter, s, raw: pa.Table, sizes=(None, 97, 5)) -> pa.Table:
    """``parse_table`` of ``raw`` in batches of several sizes equals ``parse`` row by row (the
    smallest batches on the first 300 rows only)."""
    for size in sizes:
        size = size or raw.num_rows
        for start in range(0, raw.num_rows if size > 50 else 300, size):
            part = raw.slice(start, size)
            got, want = adapter.parse_table(part, s), per_row(adapter, s, part)
            assert got.to_pylist() == want.to_pylist()
            assert got.equals(want)
    return adapter.parse_table(raw, s)


def _odd(rng) -> str | int | None:
    r = rng.random()
    return None if r < 0.04 else 3 if r < 0.07 else "".join(
        rng.choices(["a", " ", "\u3000", "\x1c", "b", "", "é", "NaN", "\ufeff"], k=rng.randint(0, 4)))


def _lines(rng, objects) -> list[dict]:
    rows = []
    for i, obj in enumerate(objects):
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.02:
            text = text[:-2]  # truncated
        elif rng.random() < 0.01:
            text = text.replace('"', "", 1)
        elif rng.random() < 0.01:
            text = text[:-1] + ', "x": NaN}'  # Arrow reads it, orjson does not
        rows.append({"file": rng.choice(["a.jsonl", "b.csv"]), "line": i + 1, "text": text,
                     "error": "invalid_utf8" if rng.random() < 0.005 else None})
    return rows


def test_hh_table_path_equals_per_row():
    rng = random.Random(3)
    turns = ["\n\nHuman: hi", "\n\nAssistant:", " ok", "\u2028", " ", "", "\n\nAssistant: x", "é"]
    objects = []
    for _ in range(3000):
        prompt = "".join(rng.choices(turns, k=rng.randint(0, 4))) + "\n\nAssistant:"
        obj = {"chosen": prompt + rng.choice([" good", " same", "", "  "]),
               "rejected": rng.choice([prompt, prompt, "\n\nHuman: other\n\nAssistant:"]) + rng.choice([" bad", " same", " "])}
        for field in ("chosen", "rejected"):
            if rng.random() < 0.05:
                obj[field] = _odd(rng)
            if rng.random() < 0.02:
                del obj[field]
        objects.append(obj)
    out = same_as_per_row(hh, hh.Settings(name="hh", path="x"), raw_table(_lines(rng, objects)))
    reasons = collections.Counter(out["reason"].to_pylist())
    assert reasons[None] > 300 and len(reasons) >= 9  # pairs, and every kind of reject


@pytest.mark.parametrize("shape,columns", [("pairwise", {}), ("pairwise", {"margin": "m"}), ("sft", {}),
                                           ("pairwise", {"chosen": "prompt"}), ("sft", {"prompt": "q", "response": "a"})])
def test_generic_table_path_equals_per_row(shape, columns):
    rng = random.Random(4)
    objects = []
    for _ in range(1500):
        obj = {k: (_odd(rng) if rng.random() < 0.15 else f"{k} {rng.randint(0, 9)}")
               for k in ("prompt", "chosen", "rejected", "response", "q", "a") if rng.random() > 0.02}
        if rng.random() < 0.1 and "chosen" in obj:
            obj["rejected"] = obj["chosen"]
        if rng.random() < 0.95:
            obj["m"] = rng.choice([None, 1, -2.5, "3", True, 0, 1e300, "x", -0.0, 0.25])
        objects.append(obj)
    s = generic.Settings(name="g", path="x", shape=shape, columns=columns)
    out = same_as_per_row(generic, s, raw_table(_lines(rng, objects)))
    assert set(out["kind"].to_pylist()) == {"reject", "sft" if shape == "sft" else "pair"}


def test_winogrande_table_path_equals_the_reference():
    """Pairs, rejects and duplicate qIDs (found as the stage does: keys, then duplicates)."""
    rng = random.Random(5)
    for holdout in (None, 0.3):
        s = winogrande.Settings(name="wg", path="x", holdout=holdout)
        objects = []
        for _ in range(2000):
            obj = {k: _odd(rng) for k in ("sentence", "option1", "option2") if rng.random() > 0.02}
            if rng.random() < 0.6:
                obj.update(sentence="Anna _ Bella.", option1="Anna", option2=rng.choice(["Bella", "Anna ", "Carl"]))
            obj["qID"] = rng.choice([None, "", f"q{rng.randint(0, 600)}", 5])
            obj["answer"] = rng.choice(["1", "2", " 2 ", "", None, 1, "3"])
            objects.append(obj)
        rows = _lines(rng, objects)
        raw = raw_table(rows)
        keys = pa.concat_tables([winogrande.unique_keys(raw.slice(i, 300), s) for i in range(0, raw.num_rows, 300)])
        duplicates = winogrande.find_duplicates(keys)
        got = pa.concat_tables([winogrande.parse_table(raw.slice(i, 211), s, duplicates)
                                for i in range(0, raw.num_rows, 211)])

        def key(o):
            where = (o["file"], o["line"], o["record_id"]) if o["kind"] == "reject" else None
            return (o["kind"], o["pair_id"], o["prompt"], o["chosen"], o["rejected"], tuple(o["provenance"] or ()),
                    where, o["reason"], o["detail"])

        want = pa.Table.from_pylist(convert_rows(winogrande, s, rows), schema=OUTPUT_SCHEMA)
        assert sorted(map(key, got.to_pylist())) == sorted(map(key, want.to_pylist()))
        assert collections.Counter(got["reason"].to_pylist())["duplicate_id"] == duplicates.num_rows > 10


# ---------------------------------------------------------------------------- OASST


def oasst_messages(rng, n_trees=250) -> list[dict]:
    """Flat messages of generated trees with every awkward case: missing or repeated ids, replies
    to nothing or to assistants, filtered messages, missing, tied and odd scores, labels in other
    forms, bad lines."""
    msgs = []
    for t in range(n_trees):
        tree = rng.choice([f"t{t}"] * 12 + ["", None, f"t{rng.randint(0, t + 1)}"])
        root = f"m{t}-0"
        ids, tree_msgs = [root], [{"message_id": root, "parent_id": None, "role": "prompter"}]
        for j in range(1, rng.randint(1, 9)):
            mid = rng.choice([f"m{t}-{j}"] * 30 + [rng.choice(ids), "", None])
            tree_msgs.append({"message_id": mid, "parent_id": rng.choice([root] * 12 + ids * 6 + [None, "", "ghost"]),
                              "role": rng.choice(["assistant"] * 12 + ["prompter"] * 3 + ["bad"])})
            if isinstance(mid, str) and mid:
                ids.append(mid)
        for m in tree_msgs:
            m["message_tree_id"] = tree
            m["text"] = f"text {rng.randint(0, 3)}" if rng.random() < 0.93 else rng.choice(["  ", "", None, 5])
            for flag in ("deleted", "review_result", "synthetic"):
                odd = rng.random() < 0.02
                m[flag] = rng.choice([None, False, True, "no"] if odd else [None] + [False] * 20 + [True])
            if rng.random() < 0.8:
                m["review_result"] = True
            m["lang"] = rng.choice(["en", "en", "en", "de", None])
            m["rank"] = rng.choice([None, 0, 1, 2, 0.5, True] if rng.random() < 0.1 else [None, 0, 1, 2, 3])
            value = rng.choice([0.1, 0.2, 0.2, 0.5, 0.9, 1, None, -0.0, 0.0, 0.3, 0.7])
            form = rng.random()
            if form < 0.6:
                m["labels"] = {"toxicity": {"value": value, "count": 3}, "quality": {"value": rng.random(), "count": 2}}
                if rng.random() < 0.1:
                    m["labels"]["toxicity"] = None
            elif form < 0.7:
                m["labels"] = None
            elif form < 0.72:
                m["labels"] = {"name": ["toxicity"], "value": [value], "count": [1]}  # the hub form
            elif form < 0.74:
                m["labels"] = {"toxicity": value}  # not {value, count}: a reject for label toxicity
            if rng.random() < 0.5:
                m["detoxify"] = {"toxicity": rng.choice([0.001, 0.5, 0.5, None, 1]), "insult": 0.1}
            elif rng.random() < 0.04:
                m["detoxify"] = "bad"
        msgs += tree_msgs
    rng.shuffle(msgs)
    rows = []
    for i, m in enumerate(msgs):
        text = json.dumps(m)
        if rng.random() < 0.006:
            text = rng.choice([text[:-2], "[1]"])
        file = rng.choice(["a.jsonl", "b.jsonl"]) if rng.random() < 0.95 else "c.csv"
        rows.append({"file": file, "line": i + 1, "text": text, "error": None})
    return rows


def _legacy_records(flow: pa.Table) -> list[dict]:
    """FLOW rows as the per-record path's records."""
    out = []
    for r in flow.to_pylist():
        if r["kind"] == ITEM:
            out.append({"kind": ITEM, "group": r["group"], "file": r["file"], "line": r["line"],
                        "record_id": r["record_id"], "data": {k: r[k] for k in oasst_table._DATA}})
        else:
            out.append({k: r[k] for k in ("kind", "source", "file", "line", "record_id", "reason", "detail")})
    return out


@pytest.mark.parametrize("kw", [
    {"label": "toxicity"}, {"label": "rank"}, {"label": "detoxify.toxicity"},
    {"label": "quality", "direction": "higher", "lang": ["en"]}, {"label": "toxicity", "thread_context": True},
    {"label": "rank", "skip_deleted": False, "skip_synthetic": False},
], ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_oasst_flow_and_combine_tables_equal_per_record(kw):
    rng = random.Random(7)
    s = oasst.Settings(name="o", path="x", shape="messages", **kw)
    raw = raw_table(oasst_messages(rng))
    size = 400
    flow = pa.concat_tables([oasst_table.flow_table(raw.slice(i, size), s) for i in range(0, raw.num_rows, size)])
    want = []  # the per-record parse, as typed rows, with each batch's label tally
    for i in range(0, raw.num_rows, size):
        records = [r for row in raw.slice(i, size).to_pylist() for r in oasst.parse(row, s)]
        tally = tally_label_names(records)
        want += [oasst_table._flow_row(r, s.name) for r in records]
        if tally:
            want.append({"kind": LABELS, "source": s.name, "detail": json.dumps(tally, sort_keys=True)})
    assert flow.equals(pa.Table.from_pylist(want, schema=oasst_table.FLOW_SCHEMA))
    # every shuffle bucket combines to exactly what the per-group combine gives, in the same order
    keys = pc.coalesce(flow["group"], flow["record_id"]).to_pylist()
    bucket = pa.array([zlib.crc32((k or "").encode()) % 5 for k in keys])
    reasons = collections.Counter()
    for b in range(5):
        part = flow.filter(pc.equal(bucket, b))
        got = oasst_table.combine_table(part, {s.name: s})
        assert got.equals(pa.Table.from_pylist(_combine_local(oasst, s, _legacy_records(part)), schema=OUTPUT_SCHEMA))
        reasons.update(r or "pair" for r in got["reason"].to_pylist())
    expected = {"pair", "duplicate_id", "parent_missing", "parent_not_prompter", "parent_skipped",
                "fewer_than_two_responses", "malformed_json", "missing_field", "wrong_type", "empty_field"}
    assert expected <= set(reasons), reasons


def test_plain_rows_take_the_arrow_path(monkeypatch):
    """Only the rows the fast checks cannot keep reach the per-row ``parse``: none in clean
    input, and one malformed line sends at most ``MIN_SPLIT`` rows beside it."""
    calls = collections.Counter()

    def counting(module):
        real = module.parse

        def parse(row, s):
            calls[module.__name__] += 1
            return real(row, s)
        monkeypatch.setattr(module, "parse", parse)

    for module in (hh, oasst):
        counting(module)
    good = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    rows = [{"file": "a.jsonl", "line": i + 1, "text": json.dumps(good), "error": None} for i in range(2000)]
    rows[1500]["text"] = "{broken"
    out = hh.parse_table(raw_table(rows), hh.Settings(name="hh", path="x"))
    assert out["reason"].to_pylist().count("malformed_json") == 1 and out.num_rows == 2000
    assert 1 <= calls["hetray.unify.sources.hh"] <= vector.MIN_SPLIT
    messages = [{"message_id": f"m{i}", "parent_id": None if i % 3 == 0 else f"m{i - i % 3}", "message_tree_id": f"t{i // 3}",
                 "role": "prompter" if i % 3 == 0 else "assistant", "text": "x", "lang": "en", "review_result": True,
                 "deleted": False, "synthetic": False, "labels": {"toxicity": {"value": i % 3 / 3, "count": 1}}}
                for i in range(900)]
    raw = raw_table([{"file": "a.jsonl", "line": i + 1, "text": json.dumps(m), "error": None} for i, m in enumerate(messages)])
    s = oasst.Settings(name="o", path="x", shape="messages", label="toxicity")
    flow = oasst_table.flow_table(raw, s)
    assert calls["hetray.unify.sources.oasst"] == 0
    assert oasst_table.combine_table(flow, {"o": s})["kind"].to_pylist().count("pair") == 300
