"""Vectorised pieces of the adapters' Arrow paths: whole RAW batches through ``pyarrow.compute``.

An adapter's ``parse_table(raw, s)`` decides for every row of a RAW batch at once, with Arrow,
whether it is an ordinary record (the usual case) and builds the outputs of those rows as
columns. Every other row (a reader error, JSON that Arrow cannot read with the expected types,
a missing or empty field, anything the fast checks do not cover exactly) goes through the
adapter's per-row ``parse``, which names the file, line, field and reason as before. So the
fast path never has to reproduce a reject: it only has to be sure of the rows it keeps, and
``tests/unify/test_vector.py`` checks it against the per-row path on awkward input.

JSON is read by Arrow's JSON reader from the batch's lines. Arrow accepts a few things that
``orjson`` (the per-row path) refuses, e.g. ``NaN`` and ``Infinity`` and a byte order mark;
rows that may hold them take the per-row path (``maybe_lenient``).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from hetray.schema import OUTPUT_SCHEMA

# What ``str.strip()`` strips (every character with ``str.isspace()``; a test recomputes it), so
# that ``utf8_trim`` agrees with Python.
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                 "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# Tokens Arrow's JSON reader takes as numbers and orjson refuses; a BOM inside a line.
_LENIENT = r"[:,\[]\s*[-+]?(?:NaN|Inf)|\x{feff}"
MIN_SPLIT = 256  # a failing JSON batch is halved down to this many rows before the per-row path


def maybe_lenient(text: pa.Array) -> np.ndarray:
    """Rows whose JSON may use what only Arrow accepts (conservative: also inside strings)."""
    return as_numpy(pc.match_substring_regex(text, _LENIENT))


def as_numpy(mask) -> np.ndarray:
    """A boolean Arrow array (nulls are False) as numpy."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _lines_buffer(text: pa.Array) -> pa.Buffer:
    """The rows as one buffer of lines, for Arrow's JSON reader."""
    joined = pc.binary_join_element_wise(text, "", "\n")  # each row + "\n"
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset:joined.offset + len(joined) + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    return joined.buffers()[2].slice(start, end - start)


def _read(text: pa.Array, schema: pa.Schema, infer: bool) -> pa.Table | None:
    buf = _lines_buffer(text)
    try:
        table = pj.read_json(
            pa.BufferReader(buf),
            read_options=pj.ReadOptions(use_threads=False, block_size=max(buf.size, 1) + 1),
            parse_options=pj.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="infer" if infer else "ignore"),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return table if table.num_rows == len(text) else None  # e.g. two objects on one line


def read_json_rows(raw: pa.Table, schema: pa.Schema, infer: bool = False) -> tuple[pa.Table, np.ndarray]:
    """``raw["text"]`` of the rows Arrow can read as JSON objects with ``schema``'s field types.

    Returns ``(table, rows)``: the parsed rows (``schema``'s fields; with ``infer`` also every
    other field, typed as Arrow infers it) and their indices in ``raw``. A row the reader
    refuses (not an object, malformed, a field of another type) is left out with the rows read
    beside it, down to ``MIN_SPLIT`` rows: those go through the per-row path. Rows with a
    reader error are left out too.
    """
    text = raw.column("text")
    candidate = as_numpy(pc.is_null(raw.column("error"))) & as_numpy(pc.is_valid(text)) & ~maybe_lenient(text)
    rows = np.flatnonzero(candidate)
    tables, kept = [], []
    stack = [rows]
    while stack:
        part = stack.pop()
        if len(part) == 0:
            continue
        table = _read(text.take(pa.array(part)), schema, infer)
        if table is not None:
            tables.append(table)
            kept.append(part)
        elif len(part) > MIN_SPLIT:
            half = len(part) // 2
            stack += [part[half:], part[:half]]  # first half next: rows stay in order
    if not tables:
        return schema.empty_table(), np.zeros(0, dtype=np.int64)
    if len(tables) > 1:  # inferred fields may differ between the reads: unify them
        try:
            return pa.concat_tables(tables, promote_options="permissive"), np.concatenate(kept)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            pass  # the rows of the other reads take the per-row path
    return tables[0], kept[0]


def nonempty(col) -> np.ndarray:
    """Rows where ``col`` is a string that is not empty after ``str.strip()`` (not null)."""
    length = pc.utf8_length(pc.utf8_trim(col, PY_WHITESPACE))
    return as_numpy(pc.greater(length, 0))


def strip(col):
    return pc.utf8_trim(col, PY_WHITESPACE)


def record_ids(file, line) -> pa.Array:
    """``file:line`` of every row (``schema.record_id``)."""
    return pc.binary_join_element_wise(file, pc.cast(line, pa.string()), ":")


def make_ids(source: str, *parts) -> list[str]:
    """``schema.make_id(source, *row)`` of every row of the string columns ``parts``."""
    base = hashlib.sha1((source + "\x1f").encode("utf-8", "surrogatepass"))
    sep = "\x1f"
    joined = pc.binary_join_element_wise(*parts, "", sep)  # "a\x1fb\x1f": as make_id hashes them
    out = []
    copy = base.copy
    for value in pc.cast(joined, pa.binary()).to_pylist():
        h = copy()
        h.update(value)
        out.append(h.hexdigest()[:16])
    return out


def single_lists(values) -> pa.ListArray:
    """``[[v] for v in values]`` without Python."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pa.ListArray.from_arrays(pa.array(np.arange(len(values) + 1, dtype=np.int32)), values)


def lists_of(*columns) -> pa.ListArray:
    """Row-wise lists ``[a, b, c]`` of equally long string columns."""
    n, k = len(columns[0]), len(columns)
    flat = pa.concat_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns])
    order = (np.arange(k)[None, :] * n + np.arange(n)[:, None]).ravel()
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), flat.take(pa.array(order)))


def output_table(n: int, columns: dict) -> pa.Table:
    """An OUTPUT_SCHEMA table of ``n`` rows: ``columns`` given, every other column null."""
    arrays = []
    for field in OUTPUT_SCHEMA:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
        elif isinstance(value, (str, int, float)):
            arrays.append(pa.repeat(pa.scalar(value, field.type), n))
        else:
            arrays.append(pa.array(value, field.type) if isinstance(value, list) else value.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def other_rows(raw: pa.Table, fast_rows: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """The rows of ``raw`` not in ``fast_rows``: their indices and the rows as dicts."""
    mask = np.ones(raw.num_rows, dtype=bool)
    mask[fast_rows] = False
    rest = np.flatnonzero(mask)
    return rest, (raw.take(pa.array(rest)).to_pylist() if len(rest) else [])


def merge_rows(fast: pa.Table, fast_rows: np.ndarray, slow: pa.Table, slow_rows: np.ndarray) -> pa.Table:
    """``fast`` and ``slow`` (one output row per entry of ``fast_rows`` / ``slow_rows``, the
    input row it came from) in input row order; a row's outputs keep their order."""
    if slow.num_rows == 0:
        return fast
    if fast.num_rows == 0:
        return slow
    order = np.argsort(np.concatenate([fast_rows, slow_rows]), kind="stable")
    return pa.concat_tables([fast, slow]).take(pa.array(order))


def with_slow_rows(raw: pa.Table, fast: pa.Table, fast_rows: np.ndarray,
                   parse_row: Callable[[dict], list[dict]]) -> pa.Table:
    """The OUTPUT_SCHEMA rows of a batch: ``fast`` for the rows in ``fast_rows`` and
    ``parse_row`` (the adapter's per-row ``parse``) of every other row, in input order."""
    rest, rows = other_rows(raw, fast_rows)
    records, where = [], []
    for i, row in zip(rest, rows):
        out = parse_row(row)
        records += out
        where += [i] * len(out)
    slow = pa.Table.from_pylist(records, schema=OUTPUT_SCHEMA)
    return merge_rows(fast, fast_rows, slow, np.array(where, dtype=np.int64))
