"""What every source adapter shares: its settings base and the contract of its functions.

An adapter is one module in ``hetray.unify.sources`` with:

``Settings``
    a pydantic model (subclass of ``SourceSettings``) whose ``format`` is a ``Literal`` tag.
``parse(row, s) -> list[dict]``
    one raw input record -> output dicts (``schema.pair`` / ``schema.sft_row`` /
    ``schema.reject``) and/or ``schema.item`` dicts that wait for the rest of their group.
    ``row`` is ``{"file", "line", "text", "error"}`` (``RAW_SCHEMA``): ``text`` is the line, or
    a table row as a JSON object; ``error`` is set (and ``text`` may be null) when the reader
    could not decode the record. Must never raise on bad data: a bad record is a reject.
``combine(items, s) -> list[dict]``
    all items of one group (``data`` already decoded to a dict) -> output dicts. Every item's
    record must end in exactly one output: in the provenance of a pair / SFT row, or a reject.
``needs_shuffle(s) -> bool``
    True when the items of one group can come from different input records (flat OASST
    messages, WinoBias pro/anti files): the stage then groups them with a Ray Data shuffle.
    False when a group never spans input records (an OASST tree per line): grouped per batch.
``check_counts(s, counts)`` (optional)
    after the stage's single pass, the source's counts (``pairs``, ``used``, ``rejected``,
    ``reasons``, ``labels``) -> raise InputError when they show a misconfiguration, e.g. a
    configured label that no record carries. ``labels`` tallies ``LABEL_NAMES``: an item's
    ``data`` may list under that key the label names its record has; the stage counts them
    per source (``tally_label_names``) and drops them before the shuffle.
``count_records(obj, s) -> int`` (optional)
    how many records (units of accounting) one input line or Parquet row holds, from its parsed
    JSON object (None when it is not JSON); without it, one. The stage counts its input with it,
    apart from ``parse``/``combine``, and fails unless ``input == used + rejected`` (an OASST tree
    line holds one record per message).

The Arrow paths (optional; the stage takes them when they are there, ``hetray.unify.dataflow``):

``parse_table(raw, s) -> pa.Table``
    ``parse`` (and ``combine``) of a whole RAW batch as OUTPUT_SCHEMA rows in input order, for a
    source without a shuffle; built with ``sources.vector``, which sends every row that is not
    a plain record through ``parse``, so outputs and rejects are the same as per record.
``unique_keys(raw, s)``, ``find_duplicates(keys)``, ``DUPLICATES_SCHEMA`` (WinoGrande)
    rows whose ``record_id`` must be unique in the whole source: the stage finds the repeated
    ones with a narrow shuffle of ``(record_id, file, line)`` and passes them to
    ``parse_table(raw, s, duplicates)``.
``flow_table(raw, s)``, ``combine_table(rows, settings)`` (flat OASST messages)
    a typed ``parse`` whose rows the stage shuffles by group, and ``combine`` of every group of
    a shuffle bucket.

The functions are pure: no Ray, no I/O. ``convert_rows`` below runs an adapter over plain
rows (``parse`` and ``combine`` per group): the reference the Ray stage must agree with, for
tests and for small inputs.
"""

from __future__ import annotations

import orjson
from collections import defaultdict
from typing import Iterable

from pydantic import Field, ValidationInfo, field_validator

from hetray.schema import ITEM, REJECT, reject
from hetray.settings import Strict


class SourceSettings(Strict):
    """Settings every source has."""

    name: str = Field(description="source name written to the `source` column")
    path: str | list[str] = Field(
        description="local file, folder or glob (or a list); `sample:NAME` for a bundled "
        "sample; `hf:ORG/NAME[:SPLIT[:CONFIG]]` for a Hugging Face dataset (needs network)"
    )
    limit: int | None = Field(
        default=None, ge=1, description="read at most this many records per file (for smoke runs)"
    )

    @field_validator("path")
    @classmethod
    def _some_path(cls, path, info: ValidationInfo):
        name = info.data.get("name", "?")
        if isinstance(path, list) and not path:
            raise ValueError(f"source {name!r}: path is an empty list; give a file, folder or glob")
        if any(not p.strip() for p in ([path] if isinstance(path, str) else path)):
            raise ValueError(f"source {name!r}: path has an empty entry; give a file, folder or glob")
        return path


LABEL_NAMES = "label_names"  # optional key of an item's data: the label names its record carries


def tally_label_names(records: Iterable[dict]) -> dict[str, int]:
    """Label name -> number of items that carry it; removes ``LABEL_NAMES`` from their data."""
    tally: dict[str, int] = {}
    for rec in records:
        if rec["kind"] == ITEM:
            for name in set(rec["data"].pop(LABEL_NAMES, None) or ()):
                tally[name] = tally.get(name, 0) + 1
    return tally


def decode_json(row: dict, source: str) -> tuple[dict | None, dict | None]:
    """``row["text"]`` as a JSON object, or ``(None, reject)`` naming what was wrong."""
    file, line = row["file"], row["line"]
    rid = f"{file}:{line}"
    if row.get("error"):
        return None, reject(source, file, line, rid, row["error"], row.get("text"))
    try:
        obj = orjson.loads(row["text"])
    except (orjson.JSONDecodeError, TypeError) as e:
        return None, reject(source, file, line, rid, "malformed_json", f"{e}: {row['text']!r}")
    if not isinstance(obj, dict):
        return None, reject(
            source, file, line, rid, "malformed_json", f"expected a JSON object, got {type(obj).__name__}"
        )
    return obj, None


def require_str(obj: dict, field: str, row: dict, source: str, rid: str | None = None):
    """``obj[field]`` as a non-empty string, or ``(None, reject)`` naming the field."""
    rid = rid or f"{row['file']}:{row['line']}"
    value = obj.get(field)
    if value is None:
        return None, reject(source, row["file"], row["line"], rid, "missing_field", f"field '{field}' is missing")
    if not isinstance(value, str):
        return None, reject(
            source, row["file"], row["line"], rid, "wrong_type",
            f"field '{field}' should be a string, got {type(value).__name__}: {value!r}",
        )
    if not value.strip():
        return None, reject(source, row["file"], row["line"], rid, "empty_field", f"field '{field}' is empty")
    return value, None


def convert_rows(adapter, s: SourceSettings, rows: Iterable[dict]) -> list[dict]:
    """Run an adapter over raw rows without Ray: parse, group items by key, combine.

    Returns output dicts (kind pair / sft / reject). Used by tests and as the reference that
    the Ray stage must agree with.
    """
    out: list[dict] = []
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        for rec in adapter.parse(row, s):
            if rec["kind"] == ITEM:
                groups[rec["group"]].append(rec)
            else:
                out.append(rec)
    for key in sorted(groups):
        out.extend(adapter.combine(groups[key], s))
    return out


def account(outputs: Iterable[dict]) -> dict:
    """Count input records by outcome: used (in a pair / SFT row's provenance) or rejected.

    ``{"pairs": n, "sft": n, "used": n, "rejected": n, "reasons": {reason: n}}``
    """
    counts = {"pairs": 0, "sft": 0, "used": 0, "rejected": 0, "reasons": defaultdict(int)}
    for o in outputs:
        if o["kind"] == REJECT:
            counts["rejected"] += 1
            counts["reasons"][o["reason"]] += 1
        else:
            counts["pairs" if o["kind"] == "pair" else "sft"] += 1
            counts["used"] += len(o["provenance"])
    counts["reasons"] = dict(counts["reasons"])
    return counts
