"""Generic jsonl / parquet / csv / tsv with a column mapping (``s.columns``), in three shapes.

* ``pairwise``: ``prompt``, ``chosen``, ``rejected`` [, ``margin``] -> one pair a row. With a
  margin column, ``quality = |margin|`` and ``label`` = that column's name; else both null.
* ``scored``: ``prompt``, ``response`` and score columns ``columns.scores``; ``s.label`` (default
  the first score column) ranks the responses to one prompt (group key ``make_id(prompt)``,
  exact prompt text; ``needs_shuffle`` True). chosen = best, rejected = worst by ``s.direction``;
  ``quality = |chosen_score - rejected_score|``, ``label`` = the score column. When several
  responses share the best (worst) score, the first in file order is used and the others are
  rejected ``tie``; responses strictly between are ``middle_rank``.
* ``sft``: ``prompt``, ``response`` -> one ``schema.sft_row`` a row.

Record ids are ``file:line``. A score or margin is numeric when it is a JSON number or a string
that parses as a finite float (booleans are not). ``check_columns`` verifies the mapped columns
of every file before any work.

Rejects: ``identical_responses``, ``missing_score``, ``fewer_than_two_responses``, ``tie`` (all
responses score the same, or a response ties with the best / worst), ``middle_rank``, and the
shared JSON/field reasons (``malformed_json``, ``invalid_utf8``, ``missing_field``,
``wrong_type`` (also a non-numeric score or margin), ``empty_field``).
"""

from __future__ import annotations

import json
import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from hetray.schema import PAIR, SFT, item, make_id, pair, reject, sft_row
from hetray.unify.sources import vector
from hetray.unify.sources import readers
from hetray.settings import Strict
from hetray.unify.sources.base import SourceSettings, decode_json, require_str
from hetray.unify.sources.readers import InputError


class Columns(Strict):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = None
    response: str = "response"
    scores: list[str] = Field(default_factory=list, description="score columns (scored shape)")


class Settings(SourceSettings):
    format: Literal["generic"] = "generic"
    shape: Literal["pairwise", "scored", "sft"]
    columns: Columns = Field(default_factory=Columns)
    label: str | None = Field(default=None, description="scored shape: which of `scores` ranks responses")
    direction: Literal["lower", "higher"] = "higher"

    @model_validator(mode="after")
    def _check_scores(self):
        if self.shape == "scored":
            if not self.columns.scores:
                raise ValueError("shape 'scored' needs at least one column in columns.scores")
            if self.label is not None and self.label not in self.columns.scores:
                raise ValueError(f"label {self.label!r} is not one of columns.scores {self.columns.scores}")
        return self


def score_column(s: Settings) -> str:
    return s.label or s.columns.scores[0]


def required_columns(s: Settings) -> list[str]:
    c = s.columns
    if s.shape == "pairwise":
        return [c.prompt, c.chosen, c.rejected] + ([c.margin] if c.margin else [])
    if s.shape == "scored":
        return [c.prompt, c.response, *c.scores]
    return [c.prompt, c.response]


def file_columns(file: str) -> list[str] | None:
    """Column names of a table file, or the keys of a jsonl file's first non-blank line.

    None for a file with no non-blank line. Raises InputError when they cannot be read.
    """
    if readers.is_table(file):
        return readers.table_columns(file)
    with open(file, "rb") as f:
        for n, raw in enumerate(f):
            raw = raw.removeprefix(readers.BOM) if n == 0 else raw
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise InputError(f"{file}: cannot read columns, first line is not JSON: {e}") from e
                if not isinstance(obj, dict):
                    raise InputError(f"{file}: cannot read columns, first line is not a JSON object")
                return list(obj)
    return None


def check_columns(s: Settings, files: list[str]) -> None:
    """Raise InputError naming the file and the column when a mapped column is missing."""
    for file in files:
        have = file_columns(file)
        if have is None:
            continue
        for column in required_columns(s):
            if column not in have:
                raise InputError(f"{file}: no column {column!r} (shape {s.shape}; columns: {have})")


def _number(obj: dict, field: str, row: dict, s: Settings, missing: str):
    """``obj[field]`` as a finite float, or ``(None, reject)``."""
    rid = f"{row['file']}:{row['line']}"
    value = obj.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, reject(s.name, row["file"], row["line"], rid, missing, f"field '{field}' is missing")
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
        if not math.isfinite(x):
            raise ValueError
    except (TypeError, ValueError):
        return None, reject(
            s.name, row["file"], row["line"], rid, "wrong_type",
            f"field '{field}' should be a finite number, got {type(value).__name__}: {value!r}",
        )
    return x, None


def parse(row: dict, s: Settings) -> list[dict]:
    obj, bad = decode_json(row, s.name)
    if bad:
        return [bad]
    c, rid = s.columns, f"{row['file']}:{row['line']}"
    names = [c.prompt, c.chosen, c.rejected] if s.shape == "pairwise" else [c.prompt, c.response]
    text = []
    for name in names:
        value, bad = require_str(obj, name, row, s.name, rid)
        if bad:
            return [bad]
        text.append(value)
    if s.shape == "sft":
        return [sft_row(s.name, text[0], text[1], [rid])]
    if s.shape == "scored":
        score, bad = _number(obj, score_column(s), row, s, "missing_score")
        if bad:
            return [bad]
        data = {"prompt": text[0], "response": text[1], "score": score}
        return [item(make_id(text[0]), row["file"], row["line"], rid, data)]
    prompt, chosen, rejected = text
    if chosen.strip() == rejected.strip():
        detail = f"fields '{c.chosen}' and '{c.rejected}' are the same: {chosen!r}"
        return [reject(s.name, row["file"], row["line"], rid, "identical_responses", detail)]
    if not c.margin:
        return [pair(s.name, prompt, chosen, rejected, [rid])]
    margin, bad = _number(obj, c.margin, row, s, "missing_field")
    if bad:
        return [bad]
    return [pair(s.name, prompt, chosen, rejected, [rid], quality=abs(margin), label=c.margin)]


def parse_table(raw: pa.Table, s: Settings) -> pa.Table:
    """``parse`` of a whole RAW batch of the ``pairwise`` or ``sft`` shape (OUTPUT_SCHEMA rows in
    input order): Arrow reads and checks the columns; other rows go through ``parse``."""
    c = s.columns
    names = [c.prompt, c.chosen, c.rejected] if s.shape == "pairwise" else [c.prompt, c.response]
    margin = c.margin if s.shape == "pairwise" else None
    columns = names + ([margin] if margin else [])
    if len(set(columns)) < len(columns):  # one column mapped twice: the per-row path only
        return vector.with_slow_rows(raw, vector.output_table(0, {}), np.zeros(0, np.int64), lambda r: parse(r, s))
    fields = [pa.field(n, pa.string()) for n in names] + ([pa.field(margin, pa.float64())] if margin else [])
    obj, rows = vector.read_json_rows(raw, pa.schema(fields))
    ok = np.ones(len(rows), dtype=bool)
    for name in names:
        ok &= vector.nonempty(obj[name])
    if s.shape == "pairwise":
        ok &= ~vector.as_numpy(pc.equal(vector.strip(obj[c.chosen]), vector.strip(obj[c.rejected])))
    if margin:
        ok &= vector.as_numpy(pc.is_valid(obj[margin]))
    keep = pa.array(ok)
    fast_rows = rows[ok]
    rid = vector.record_ids(raw["file"].take(fast_rows), raw["line"].take(fast_rows))
    columns = {
        "source": s.name, "pair_id": pa.array(vector.make_ids(s.name, rid), pa.string()),
        "prompt": obj[c.prompt].filter(keep), "provenance": vector.single_lists(rid),
    }
    if s.shape == "sft":
        columns.update(kind=SFT, response=obj[c.response].filter(keep))
    else:
        columns.update(kind=PAIR, chosen=obj[c.chosen].filter(keep), rejected=obj[c.rejected].filter(keep))
        if margin:
            columns.update(quality=pc.abs(obj[margin].filter(keep)), label=margin)
    return vector.with_slow_rows(raw, vector.output_table(len(fast_rows), columns), fast_rows, lambda r: parse(r, s))


def combine(items: list[dict], s: Settings) -> list[dict]:
    items = sorted(items, key=lambda it: (it["file"], it["line"]))
    label = score_column(s)

    def no(it: dict, reason: str, detail: str) -> dict:
        return reject(s.name, it["file"], it["line"], it["record_id"], reason, detail)

    if len(items) < 2:
        return [no(items[0], "fewer_than_two_responses", "the only response to its prompt")]
    scores = [it["data"]["score"] for it in items]
    best_score = max(scores) if s.direction == "higher" else min(scores)
    worst_score = min(scores) if s.direction == "higher" else max(scores)
    if best_score == worst_score:
        return [no(it, "tie", f"all {len(items)} responses have {label} = {best_score}") for it in items]
    best = next(it for it in items if it["data"]["score"] == best_score)
    worst = next(it for it in items if it["data"]["score"] == worst_score)
    if best["data"]["response"].strip() == worst["data"]["response"].strip():
        detail = f"best and worst response by {label} are the same text"
        out = [no(best, "identical_responses", detail), no(worst, "identical_responses", detail)]
    else:
        out = [
            pair(
                s.name, best["data"]["prompt"], best["data"]["response"], worst["data"]["response"],
                [best["record_id"], worst["record_id"]], quality=abs(best_score - worst_score),
                chosen_score=best_score, rejected_score=worst_score, label=label,
            )
        ]
    for it in items:
        if it is best or it is worst:
            continue
        x = it["data"]["score"]
        if x in (best_score, worst_score):
            side = "chosen" if x == best_score else "rejected"
            out.append(no(it, "tie", f"{label} = {x} ties with the {side} response"))
        else:
            out.append(no(it, "middle_rank", f"{label} = {x} is between {worst_score} and {best_score}"))
    return out


def needs_shuffle(s: Settings) -> bool:
    return s.shape == "scored"
