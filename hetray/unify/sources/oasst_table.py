"""The OASST adapter's Arrow path: flat messages parsed a batch at a time, trees combined a
shuffle partition at a time, with ``pyarrow.compute`` and numpy instead of a loop per message.

``flow_table(raw, s)`` is ``oasst.parse`` of a RAW batch as typed columns (``FLOW_SCHEMA``: one
row per message item, reject, and one row with the batch's label tally) that the stage shuffles
by tree. ``combine_table(rows, settings)`` is ``oasst.combine`` of every tree in a shuffle
bucket: it gives the same rows in the same order as the per-tree ``combine`` (the outputs of the
parse rejects first, then each tree's pairs and rejects, trees in key order), which
``tests/unify/test_vector.py`` checks on generated trees. Trees that need more than a join
with their parents (``thread_context``, or a message id twice in a tree) go through
``oasst.combine`` itself.

What the vectorised parse keeps is exact by construction: a row that Arrow cannot read with the
expected types, or whose labels are not in a plain form, goes through ``oasst.parse``.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetray.schema import ITEM, OUTPUT_SCHEMA, PAIR, REJECT
from hetray.unify.sources import oasst, vector
from hetray.unify.sources.base import tally_label_names
from hetray.unify.sources.readers import is_csv

LABELS = "labels"  # kind of the row that carries a batch's label tally (see hetray.unify.convert)

FLOW_SCHEMA = pa.schema([
    ("kind", pa.string()), ("source", pa.string()), ("file", pa.string()), ("line", pa.int64()),
    ("record_id", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("group", pa.string()),  # the tree (items only)
    ("id", pa.string()), ("parent", pa.string()), ("role", pa.string()), ("text", pa.string()),
    ("lang", pa.string()), ("deleted", pa.bool_()), ("review_result", pa.bool_()),
    ("synthetic", pa.bool_()), ("score", pa.float64()), ("pos", pa.int64()),
])
_DATA = ("id", "role", "text", "lang", "deleted", "review_result", "synthetic", "score", "parent", "pos")
_FIELDS = pa.schema(
    [(f, pa.string()) for f in ("message_id", "parent_id", "message_tree_id", "role", "text", "lang")]
    + [(f, pa.bool_()) for f in ("deleted", "review_result", "synthetic")]
    + [("rank", pa.float64())]
)


# ---------------------------------------------------------------------------- parse


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def _child(arr, name: str):
    """Field ``name`` of a struct column (null where the struct is null), or None."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not pa.types.is_struct(arr.type) or arr.type.get_field_index(name) < 0:
        return None
    return pc.struct_field(arr, name)


def _labels(obj: pa.Table, s) -> tuple[np.ndarray, pa.Array, dict]:
    """``(rows the fast path can take, score, per-row label names as a tally)`` for ``s.label``.

    Plain forms only: ``labels`` null or ``{name: {value, count}}`` with numeric values,
    ``detoxify`` null or an object of numbers; any other row takes the per-row path."""
    n = obj.num_rows
    ok = np.ones(n, dtype=bool)
    names: list[tuple[str, np.ndarray]] = []
    if s.label == "rank":
        return ok, pc.cast(obj["rank"], pa.float64()), {}
    score = pa.nulls(n, pa.float64())
    for column in ("labels", "detoxify"):
        if column not in obj.column_names:
            continue
        arr = obj[column].combine_chunks()
        present = vector.as_numpy(pc.is_valid(arr))
        if pa.types.is_null(arr.type):
            continue
        if not pa.types.is_struct(arr.type):
            ok &= ~present
            continue
        for field in arr.type:
            child = pc.struct_field(arr, field.name)
            valid = vector.as_numpy(pc.is_valid(child)) & present
            if column == "labels":
                plain = pa.types.is_null(field.type) or (
                    pa.types.is_struct(field.type)
                    and all(_numeric(f.type) for f in field.type if f.name == "value")
                    and not field.name.startswith(oasst.DETOXIFY))
                if not plain or field.name == "name":  # "name" could be the hub form
                    ok &= ~valid
                    continue
                names.append((field.name, valid))
                if field.name == s.label and pa.types.is_struct(field.type):
                    value = _child(child, "value")
                    if value is not None and not pa.types.is_null(value.type):
                        score = pc.cast(value, pa.float64())
            else:
                if not _numeric(field.type):
                    ok &= ~valid
                    continue
                key = oasst.DETOXIFY + field.name
                names.append((key, valid))
                if key == s.label and not pa.types.is_null(field.type):
                    score = pc.cast(child, pa.float64())
    return ok, score, names


def _tally(names: list[tuple[str, np.ndarray]], keep: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, valid in names:
        k = int((valid & keep).sum())
        if k:
            out[name] = out.get(name, 0) + k
    return out


def flow_table(raw: pa.Table, s) -> pa.Table:
    """``oasst.parse`` of a RAW batch as FLOW_SCHEMA rows: items (message columns typed),
    rejects, and one ``labels`` row with the label tally when a label is counted."""
    fast_rows, items, tally = np.zeros(0, dtype=np.int64), None, {}
    if s.shape == "messages":
        csv = pa.array([is_csv(f) for f in pc.unique(raw["file"]).to_pylist()] or [False])
        csv_files = pc.unique(raw["file"]).filter(csv)
        obj, rows = vector.read_json_rows(raw, _FIELDS, infer=s.label != "rank")
        ok = ~vector.as_numpy(pc.is_in(raw["file"].take(rows), csv_files))  # csv rows: from_csv
        for f in ("message_id", "role", "text"):
            ok &= vector.nonempty(obj[f])
        ok &= vector.as_numpy(pc.is_in(obj["role"], pa.array(list(oasst.ROLES))))
        labels_ok, score, names = _labels(obj, s)
        ok &= labels_ok
        parent = pc.if_else(pc.equal(obj["parent_id"], ""), pa.scalar(None, pa.string()), obj["parent_id"])
        tree_given = vector.as_numpy(pc.greater(pc.utf8_length(obj["message_tree_id"]), 0))
        ok &= tree_given | ~vector.as_numpy(pc.is_valid(parent))  # a reply without its tree: a reject
        tally = _tally(names, ok)
        keep = pa.array(ok)
        fast_rows = rows[ok]
        mid = obj["message_id"].filter(keep)
        score = score.filter(keep) if isinstance(score, (pa.Array, pa.ChunkedArray)) else score
        score = pc.if_else(pc.is_finite(score), score, pa.scalar(None, pa.float64()))
        items = pa.table({
            "kind": pa.repeat(pa.scalar(ITEM), len(fast_rows)),
            "source": pa.repeat(pa.scalar(s.name), len(fast_rows)),
            "file": raw["file"].take(fast_rows), "line": raw["line"].take(fast_rows),
            "record_id": mid, "reason": pa.nulls(len(fast_rows), pa.string()),
            "detail": pa.nulls(len(fast_rows), pa.string()),
            "group": pc.if_else(pa.array(tree_given[ok]), obj["message_tree_id"].filter(keep), mid),
            "id": mid, "parent": parent.filter(keep), "role": obj["role"].filter(keep),
            "text": obj["text"].filter(keep), "lang": obj["lang"].filter(keep),
            "deleted": obj["deleted"].filter(keep), "review_result": obj["review_result"].filter(keep),
            "synthetic": obj["synthetic"].filter(keep), "score": score,
            "pos": pa.array(np.zeros(len(fast_rows), dtype=np.int64)),
        }, schema=FLOW_SCHEMA)
    rest, rows = vector.other_rows(raw, fast_rows)
    records, where = [], []
    for i, row in zip(rest, rows):
        out = oasst.parse(row, s)
        records += out
        where += [i] * len(out)
    for name, n in tally_label_names(records).items():
        tally[name] = tally.get(name, 0) + n
    slow = pa.Table.from_pylist([_flow_row(rec, s.name) for rec in records], schema=FLOW_SCHEMA)
    table = vector.merge_rows(items if items is not None else FLOW_SCHEMA.empty_table(), fast_rows,
                              slow, np.array(where, dtype=np.int64))
    if tally:
        row = {"kind": LABELS, "source": s.name, "detail": json.dumps(dict(sorted(tally.items())), sort_keys=True)}
        table = pa.concat_tables([table, pa.Table.from_pylist([row], schema=FLOW_SCHEMA)])
    return table


def _flow_row(rec: dict, source: str) -> dict:
    if rec["kind"] != ITEM:
        return rec
    row = {k: rec[k] for k in ("kind", "group", "file", "line", "record_id")}
    row.update(source=source, **{k: rec["data"].get(k) for k in _DATA})
    return row


# ---------------------------------------------------------------------------- combine


def combine_table(rows: pa.Table, settings: dict) -> pa.Table:
    """FLOW_SCHEMA rows of one shuffle bucket -> OUTPUT_SCHEMA rows: per source (in the order of
    ``settings``: source name -> settings), the rows that are already outputs, then every tree
    combined, trees in key order."""
    out = []
    for name, s in settings.items():
        part = rows.filter(pc.equal(rows["source"], name))
        if part.num_rows == 0:
            continue
        is_item = vector.as_numpy(pc.equal(part["kind"], ITEM))
        done = part.filter(pa.array(~is_item))
        if done.num_rows:
            out.append(_as_output(done))
        items = part.filter(pa.array(is_item))
        if items.num_rows:
            out.append(combine_items(items, s))
    return pa.concat_tables(out) if out else OUTPUT_SCHEMA.empty_table()


def _as_output(rows: pa.Table) -> pa.Table:
    return vector.output_table(rows.num_rows, {
        name: rows[name] for name in ("kind", "source", "file", "line", "record_id", "reason", "detail")})


def _items(rows: pa.Table) -> list[dict]:
    """FLOW rows -> the item dicts ``oasst.combine`` takes."""
    out = []
    for r in rows.to_pylist():
        out.append({"kind": ITEM, "group": r["group"], "file": r["file"], "line": r["line"],
                    "record_id": r["record_id"], "data": {k: r[k] for k in _DATA}})
    return out


def _runs(values) -> np.ndarray:
    """Run number of every element of a sorted Arrow column."""
    if len(values) < 2:
        return np.zeros(len(values), dtype=np.int64)
    change = vector.as_numpy(pc.not_equal(values.slice(1), values.slice(0, len(values) - 1)))
    return np.concatenate([[0], np.cumsum(change)])


def combine_items(t: pa.Table, s) -> pa.Table:
    """``oasst.combine`` of every tree in ``t`` (the items of one source), trees in key order."""
    t = t.sort_by([("group", "ascending"), ("file", "ascending"), ("line", "ascending"), ("pos", "ascending")])
    n = t.num_rows
    gid = _runs(t["group"])
    # trees that the per-tree combine handles: thread context, or an id twice in one tree
    if s.thread_context:
        special = np.ones(n, dtype=bool)
    else:
        counts = pa.table({"g": gid, "id": t["id"]}).group_by(["g", "id"]).aggregate([("id", "count")])
        twice = counts.filter(pc.greater(counts["id_count"], 1))["g"].to_numpy()
        special = np.isin(gid, twice)
    parts = [] if not special.any() else [_combine_special(t.filter(pa.array(special)), gid[special], s)]
    if not special.all():
        simple = pa.array(~special)
        parts.append(_combine_simple(t.filter(simple), gid[~special], s))
    table = pa.concat_tables([p[0] for p in parts])
    order = np.lexsort(tuple(np.concatenate([p[1][k] for p in parts]) for k in (2, 1, 0)))
    return table.take(pa.array(order))


def _combine_special(t: pa.Table, gid: np.ndarray, s):
    items = _items(t)
    out, keys = [], []
    bounds = np.concatenate([[0], np.flatnonzero(gid[1:] != gid[:-1]) + 1, [len(gid)]])
    for start, end in zip(bounds[:-1], bounds[1:]):
        recs = oasst.combine(items[start:end], s)
        out += recs
        keys += [(gid[start], 0, k) for k in range(len(recs))]
    keys = np.array(keys, dtype=np.int64).reshape(-1, 3)
    return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA), (keys[:, 0], keys[:, 1], keys[:, 2])


def _fmt(x: float) -> str:
    return f"{x:g}"


def _combine_simple(t: pa.Table, gid: np.ndarray, s):
    """Trees without duplicate ids, no thread context: a join with the parents and sorts."""
    n = t.num_rows
    idx = np.arange(n)
    ids = t["id"].to_numpy(zero_copy_only=False)
    parents = t["parent"].to_numpy(zero_copy_only=False)
    role = t["role"].to_numpy(zero_copy_only=False)
    prompter = role == "prompter"
    score = t["score"].to_numpy(zero_copy_only=False).astype(float)
    has_score = vector.as_numpy(pc.is_valid(t["score"]))

    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)
    # filters, the first that applies
    filters = []
    if s.skip_deleted:
        filters.append(("deleted", vector.as_numpy(t["deleted"])))
    if s.skip_review_failed:
        filters.append(("review_failed", vector.as_numpy(pc.equal(t["review_result"], False))))
    if s.skip_synthetic:
        filters.append(("synthetic", vector.as_numpy(t["synthetic"])))
    if s.lang is not None:
        filters.append(("filtered_lang", ~vector.as_numpy(pc.is_in(t["lang"], pa.array(s.lang, pa.string())))))
    for name, mask in reversed(filters):
        reason[mask] = name
    filtered = reason != None  # noqa: E711 - numpy elementwise
    filter_reason = reason.copy()

    # each message's parent within its tree (-1: none)
    left = pa.table({"g": gid, "p": t["parent"], "i": idx})
    right = pa.table({"g": gid, "p": t["id"], "j": idx})
    joined = left.join(right, keys=["g", "p"], join_type="left outer").sort_by("i")
    pidx = joined["j"].fill_null(-1).to_numpy()
    has_parent = pidx >= 0
    pid = np.where(has_parent, pidx, 0)

    assistant = (role == "assistant") & ~filtered
    missing = assistant & ~has_parent
    for i in np.flatnonzero(missing):
        reason[i], detail[i] = "parent_missing", f"parent {parents[i]} is not in the tree"
    wrong = assistant & has_parent & ~prompter[pid]
    for i in np.flatnonzero(wrong):
        reason[i], detail[i] = "parent_not_prompter", f"parent {ids[pidx[i]]} is an assistant message"
    skipped = assistant & has_parent & prompter[pid] & filtered[pid]
    for i in np.flatnonzero(skipped):
        reason[i], detail[i] = "parent_skipped", f"parent {ids[pidx[i]]} was rejected: {filter_reason[pidx[i]]}"
    unscored = assistant & has_parent & prompter[pid] & ~filtered[pid] & ~has_score
    if s.label.startswith(oasst.DETOXIFY):
        reason[unscored], detail[unscored] = "missing_detoxify", f"no Detoxify score '{s.label[len(oasst.DETOXIFY):]}'"
    else:
        reason[unscored], detail[unscored] = "missing_score", f"no value for '{s.label}'"
    reply = assistant & has_parent & prompter[pid] & ~filtered[pid] & has_score

    lower = s.direction == "lower" or (
        s.direction == "auto" and (s.label in oasst.LOWER_IS_BETTER or s.label.startswith(oasst.DETOXIFY)))
    sign = 1.0 if lower else -1.0
    r = np.flatnonzero(reply)
    by = pa.table({"p": pidx[r], "k": sign * score[r], "w": -sign * score[r], "id": t["id"].take(pa.array(r))})
    best_order = r[pc.sort_indices(by, [("p", "ascending"), ("k", "ascending"), ("id", "ascending")]).to_numpy()]
    worst_order = r[pc.sort_indices(by, [("p", "ascending"), ("w", "ascending"), ("id", "ascending")]).to_numpy()]
    count = np.bincount(pidx[r], minlength=n)
    best, worst = np.full(n, -1), np.full(n, -1)
    if len(r):
        first = np.concatenate([[True], pidx[best_order][1:] != pidx[best_order][:-1]])
        best[pidx[best_order[first]]] = best_order[first]
        first = np.concatenate([[True], pidx[worst_order][1:] != pidx[worst_order][:-1]])
        worst[pidx[worst_order[first]]] = worst_order[first]

    eligible = prompter & ~filtered
    few = eligible & (count < 2)
    b, w = np.where(best >= 0, best, 0), np.where(worst >= 0, worst, 0)
    tie = eligible & ~few & (score[b] == score[w])
    paired = eligible & ~few & ~tie
    label = s.label
    for p in np.flatnonzero(few):
        reason[p], detail[p] = "fewer_than_two_responses", f"{count[p]} scored eligible replies"
    for p in np.flatnonzero(tie):
        reason[p], detail[p] = "tie", f"all {count[p]} replies score {_fmt(score[b[p]])} on '{label}'"
    # replies of prompters without a pair share the prompter's fate; middle replies are middle_rank
    rp = pidx[r]
    for i, p in zip(r, rp):
        if few[p] or tie[p]:
            reason[i], detail[i] = reason[p], detail[p]
        elif i != best[p] and i != worst[p]:
            reason[i] = "middle_rank"
            detail[i] = f"score {_fmt(score[i])}, best {_fmt(score[best[p]])}, worst {_fmt(score[worst[p]])}"

    # pairs, by tree and prompter id
    pp = np.flatnonzero(paired)
    pt = pa.table({"g": gid[pp], "id": t["id"].take(pa.array(pp))})
    pp = pp[pc.sort_indices(pt, [("g", "ascending"), ("id", "ascending")]).to_numpy()]
    bp, wp = best[pp], worst[pp]
    text = t["text"]
    take = lambda rows: pa.array(rows, pa.int64())  # noqa: E731
    pid_col, bid_col, wid_col = (t["id"].take(take(x)) for x in (pp, bp, wp))
    pairs = vector.output_table(len(pp), {
        "kind": PAIR, "source": s.name,
        "pair_id": pa.array(vector.make_ids(s.name, pid_col, bid_col, wid_col), pa.string()),
        "prompt": text.take(take(pp)), "chosen": text.take(take(bp)), "rejected": text.take(take(wp)),
        "quality": pa.array(np.abs(score[bp] - score[wp])), "chosen_score": pa.array(score[bp]),
        "rejected_score": pa.array(score[wp]), "label": label,
        "provenance": vector.lists_of(pid_col, bid_col, wid_col),
    })

    rej = np.flatnonzero(reason != None)  # noqa: E711
    details = [d if d is None or len(d) <= 500 else d[:500] + "..." for d in detail[rej]]
    rejects = vector.output_table(len(rej), {
        "kind": REJECT, "source": s.name, "file": t["file"].take(take(rej)), "line": t["line"].take(take(rej)),
        "record_id": t["id"].take(take(rej)), "reason": pa.array(list(reason[rej]), pa.string()),
        "detail": pa.array(details, pa.string()),
    })
    keys = (np.concatenate([gid[pp], gid[rej]]),
            np.concatenate([np.zeros(len(pp), dtype=np.int64), np.ones(len(rej), dtype=np.int64)]),
            np.concatenate([np.arange(len(pp)), rej]))
    return pa.concat_tables([pairs, rejects]), keys
