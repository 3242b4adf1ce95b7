"""Reading input files into raw records (``RAW_SCHEMA``): ``file``, ``line``, ``text``, ``error``.

* Line formats (``.jsonl``, ``.json``, ``.txt``, WinoBias ``.dev``/``.test``, anything else):
  one record per non-blank line, ``line`` is the 1-based line number. Bytes that are not
  UTF-8 give a record with ``error="invalid_utf8"`` and the text decoded with replacement
  characters (so the reject shows what was there).
* Tables (``.parquet``, ``.csv``, ``.tsv``): one record per row, ``text`` is the row as a JSON
  object and ``line`` the 1-based row number (for csv/tsv: the data row, header excluded).
* CSV / TSV are read as text, every cell a string: no type inference, so a column that turns
  from numbers to text half way cannot fail the read; adapters parse the values they need, per
  row. A row with the wrong number of fields (``error="wrong_field_count"``), a cell that is not
  UTF-8 (``"invalid_utf8"``) or a row the csv module cannot parse (``"malformed_csv"``) is a
  record whose ``text`` says what is wrong: row, physical line and column. Header names are
  stripped of whitespace; ``table_columns`` (run before any work) refuses a header that is not
  UTF-8 or names a column twice.
* A UTF-8 byte order mark at the start of any text file is dropped.

Files are read as a stream of small batches: memory does not depend on the file size. A line
file is read in pieces of about 4 MiB that Arrow splits into lines, numbers and checks at once
(``_split_lines``); a piece that is not all UTF-8 is split line by line in Python. The count
that checks the stage (``count_records``) counts newlines and blank lines with the regex engine,
apart from that reader. ``iter_records`` is the plain-Python reader; ``RecordDatasource`` the
Ray Data one; both use the same batch functions, so they agree record for record.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import sys
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetray.formats import BOM
from hetray.schema import RAW_SCHEMA

TABLE_EXTENSIONS = (".parquet", ".csv", ".tsv")
BATCH_LINES = 4096
_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)
csv.field_size_limit(min(sys.maxsize, 1 << 31))  # a long answer is a cell, not an error


class InputError(ValueError):
    """A problem with an input: found before any work starts, or (a label that no record has)
    from the counts of the convert pass, before anything is committed."""


def expand_paths(path: str | os.PathLike | list) -> list[str]:
    """A file, folder, glob or list of them -> sorted list of files. Raises InputError."""
    paths = [os.fspath(path)] if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]
    files: list[str] = []
    for p in paths:
        if any(ch in p for ch in "*?["):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise InputError(f"no input file matches {p!r}")
            files.extend(found)
        elif os.path.isdir(p):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(p)
                for f in names
                if not f.startswith((".", "_"))
            )
            if not found:
                raise InputError(f"input folder {p!r} holds no files")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise InputError(f"input file {p!r} does not exist")
    return files


def is_table(path: str) -> bool:
    return path.lower().endswith(TABLE_EXTENSIONS)


def is_csv(path: str) -> bool:
    return path.lower().endswith((".csv", ".tsv"))


def _line_batch(file: str, numbers: list[int], raws: list[bytes]) -> pa.Table:
    texts, errors = [], []
    for raw in raws:
        try:
            texts.append(raw.decode("utf-8"))
            errors.append(None)
        except UnicodeDecodeError:
            texts.append(raw.decode("utf-8", "replace"))
            errors.append("invalid_utf8")
    return _raw(file, numbers, texts, errors)


def _raw(file: str, numbers: list[int], texts: list, errors: list) -> pa.Table:
    return pa.table(
        {"file": [file] * len(numbers), "line": numbers, "text": texts, "error": errors},
        schema=RAW_SCHEMA,
    )


def _split_lines(data: bytes, end: int, file: str, first: int) -> pa.Table:
    """The non-blank lines of ``data[:end]`` (whole lines joined by ``\\n``, the first one
    numbered ``first``) as a RAW batch, split and checked by Arrow without copying ``data``.
    Falls back to the per-line reader when the piece is not all UTF-8 (the bad lines become
    ``invalid_utf8`` records)."""
    offsets = pa.py_buffer(np.array([0, end], dtype=np.int64))
    piece = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        text = piece.cast(pa.large_string())  # validates UTF-8
    except pa.ArrowInvalid:
        numbers, raws = [], []
        for n, raw in enumerate(data[:end].split(b"\n"), start=first):
            raw = raw.rstrip(b"\r")
            if raw.strip():
                numbers.append(n)
                raws.append(raw)
        return _line_batch(file, numbers, raws)
    lines = pc.utf8_rtrim(pc.split_pattern(text, "\n").flatten(), "\r")
    keep = pc.invert(pc.match_substring_regex(lines, _BLANK))  # bytes.strip() whitespace only
    numbers = np.flatnonzero(keep.to_numpy(zero_copy_only=False)) + first
    texts = lines.filter(keep).cast(pa.string())
    return pa.Table.from_arrays(
        [pa.repeat(pa.scalar(file, pa.string()), len(texts)), pa.array(numbers, pa.int64()), texts,
         pa.nulls(len(texts), pa.string())],
        schema=RAW_SCHEMA,
    )


_BLANK = r"^[ \t\r\x0b\x0c]*$"
CHUNK_BYTES = 4 << 20  # a line file is read, split and yielded in blocks of about this size


def _chunks(f, chunk_size: int) -> Iterator[tuple[bytes, int]]:
    """The file as pieces ``data[:end]`` of whole lines, each without its last ``\\n`` (the
    file's last line need not have one); a UTF-8 byte order mark at the very start is dropped."""
    rest, first = b"", True
    while True:
        chunk = f.read(chunk_size)
        data = rest + chunk if rest else chunk
        if first and (len(data) >= len(BOM) or not chunk):
            data, first = data.removeprefix(BOM), False
        if not chunk:
            if data:
                yield data, len(data) - data.endswith(b"\n")
            return
        if first:
            rest = data
            continue
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        rest = data[cut + 1:]
        yield data, cut


def iter_line_batches(f, file: str, limit: int | None = None, chunk_size: int = CHUNK_BYTES) -> Iterator[pa.Table]:
    """Binary file object -> RAW_SCHEMA batches of its non-blank lines (one batch per piece of
    about ``chunk_size`` bytes). Lines end at ``\\n``; trailing ``\\r`` are dropped; a line of
    ASCII whitespace only is blank."""
    line, count = 1, 0
    for data, end in _chunks(f, chunk_size):
        batch = _split_lines(data, end, file, line)
        line += data.count(b"\n", 0, end) + 1
        if limit is not None and count + batch.num_rows >= limit:
            batch = batch.slice(0, limit - count)
            if batch.num_rows:
                yield batch
            return
        count += batch.num_rows
        if batch.num_rows:
            yield batch


def _json_default(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _clean(v):
    # NaN is not JSON; pandas/arrow use it for missing floats (e.g. OASST `rank`).
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _table_batch(file: str, start: int, batch: pa.RecordBatch) -> pa.Table:
    rows = batch.to_pylist()
    texts = [json.dumps(_clean(r), default=_json_default, ensure_ascii=False) for r in rows]
    return pa.table(
        {
            "file": [file] * len(rows),
            "line": list(range(start, start + len(rows))),
            "text": texts,
            "error": [None] * len(rows),
        },
        schema=RAW_SCHEMA,
    )


def iter_table_batches(f, file: str, limit: int | None = None) -> Iterator[pa.Table]:
    """A parquet / csv / tsv file object -> RAW_SCHEMA batches, one JSON object per row."""
    if is_csv(file):
        yield from iter_csv_batches(f, file, limit)
        return
    import pyarrow.parquet as pq

    row = 1
    for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_LINES):
        if limit is not None:
            batch = batch.slice(0, max(0, limit - (row - 1)))
        if batch.num_rows == 0:
            break
        yield _table_batch(file, row, batch)
        row += batch.num_rows


def _csv_rows(f, file: str) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """``(first physical line, fields, csv error)`` of every non-empty row, header included.

    Text is decoded with ``surrogateescape``: a byte that is not UTF-8 stays visible as a lone
    surrogate in its cell (never silently replaced), and the caller names the cell.
    """
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter="\t" if file.lower().endswith(".tsv") else ",", strict=False)
    try:
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, None, str(e)
                continue
            if fields:  # [] is an empty line
                yield start, fields, None
    finally:
        text.detach()  # closing the file is its owner's business


def _header(fields: list[str]) -> list[str]:
    return [name.strip() for name in fields]


def _csv_error(number: int, start: int, fields: list[str] | None, header: list[str], error: str | None):
    """``(reason, detail)`` when a data row cannot be a record, else None."""
    where = f"row {number} (line {start})"
    if error is not None:
        return "malformed_csv", f"{where}: {error}"
    if len(fields) != len(header):
        return "wrong_field_count", (
            f"{where}: expected {len(header)} fields ({', '.join(header)}), got {len(fields)}: {_excerpt(fields)}"
        )
    for name, value in zip(header, fields):
        if _UNDECODED.search(value):
            raw = value.encode("utf-8", "surrogateescape")
            return "invalid_utf8", f"{where}, column {name!r}: not valid UTF-8: {raw[:200]!r}"
    return None


def _excerpt(fields: list[str]) -> str:
    text = repr([v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for v in fields])
    return text if len(text) <= 300 else text[:300] + "..."


def iter_csv_batches(f, file: str, limit: int | None = None) -> Iterator[pa.Table]:
    """A csv / tsv file object -> RAW_SCHEMA batches; every cell a string (see the module doc)."""
    header, numbers, texts, errors = None, [], [], []
    number = 0
    for start, fields, error in _csv_rows(f, file):
        if header is None:  # table_columns, run before any work, refuses a bad header
            header = [_UNDECODED.sub("\ufffd", n) for n in _header(fields or [])]
            continue
        if limit is not None and number >= limit:
            break
        number += 1
        bad = _csv_error(number, start, fields, header or [], error)
        numbers.append(number)
        texts.append(bad[1] if bad else json.dumps(dict(zip(header, fields)), ensure_ascii=False))
        errors.append(bad[0] if bad else None)
        if len(numbers) >= BATCH_LINES:
            yield _raw(file, numbers, texts, errors)
            numbers, texts, errors = [], [], []
    if numbers:
        yield _raw(file, numbers, texts, errors)


def iter_file_batches(f, file: str, limit: int | None = None) -> Iterator[pa.Table]:
    if is_table(file):
        yield from iter_table_batches(f, file, limit)
    else:
        yield from iter_line_batches(f, file, limit)


def iter_records(path: str | list[str], limit: int | None = None) -> Iterator[dict]:
    """Plain-Python reader: every raw record of every file, as dicts."""
    for file in expand_paths(path):
        with open(file, "rb") as f:
            for batch in iter_file_batches(f, file, limit):
                yield from batch.to_pylist()


def peek_record(path: str | list[str]) -> dict | None:
    """The first record of the first file (used to detect a format's shape), or None."""
    return next(iter_records(path, limit=1), None)


def table_columns(file: str) -> list[str]:
    """Column names of a parquet / csv / tsv file without reading its rows (csv / tsv: as the
    reader names them; [] for an empty file). Raises InputError for a header that is not UTF-8
    or names a column twice."""
    if not is_csv(file):
        import pyarrow.parquet as pq

        return pq.read_schema(file).names
    with open(file, "rb") as f:
        start, fields, error = next(_csv_rows(f, file), (1, [], None))
    if error is not None:
        raise InputError(f"{file}: cannot read the header (line {start}): {error}")
    names = _header(fields)
    for name in names:
        if _UNDECODED.search(name):
            raw = name.encode("utf-8", "surrogateescape")
            raise InputError(f"{file}: the header (line {start}) is not valid UTF-8: column {raw!r}")
    twice = sorted({n for n in names if n and names.count(n) > 1})
    if twice:
        names_twice = ", ".join(map(repr, twice))
        raise InputError(f"{file}: the header (line {start}) names column(s) {names_twice} more than once")
    return names


# ---------------------------------------------------------------------------- counting


def count_records(file: str, limit: int | None = None, units=None) -> int:
    """Input records of one file, counted without the conversion path, for the stage's check
    ``input == used + rejected``: non-blank lines (a first-line BOM dropped), csv / tsv rows by
    Arrow's own CSV parser (not the csv module the reader uses), Parquet rows from the file's
    metadata. ``units(obj) -> int``, when given, says how many records one line or Parquet row
    holds (an OASST tree line: its messages); it gets the parsed JSON object, or None when the
    line is not JSON."""
    if is_csv(file):
        return _count_csv(file, limit)
    if file.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(file)
        if units is None:
            n = pf.metadata.num_rows
            return n if limit is None else min(n, limit)
        total = rows = 0
        for batch in pf.iter_batches(batch_size=BATCH_LINES):
            for obj in batch.to_pylist():
                if limit is not None and rows >= limit:
                    return total
                rows += 1
                total += units(_clean(obj))
        return total
    if units is None and limit is None:
        return _count_lines(file)
    import orjson

    total = rows = 0
    with open(file, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            if limit is not None and rows >= limit:
                break
            rows += 1
            if units is None:
                total += 1
                continue
            try:
                obj = orjson.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                obj = None
            total += units(obj)
    return total


# a blank line (``bytes.strip()`` whitespace only) after a newline; the lookahead lets
# consecutive blank lines each count
_BLANK_AFTER_NEWLINE = re.compile(rb"\n(?=[ \t\r\x0b\x0c]*\n)")


def _count_lines(file: str, chunk_size: int = 16 << 20) -> int:
    """Non-blank lines of a file, by counting newlines and blank lines chunk by chunk (the
    regex engine, not a Python loop per line)."""
    total, rest, first = 0, b"", True
    with open(file, "rb") as f:
        while chunk := f.read(chunk_size):
            data = rest + chunk
            if first and len(data) >= len(BOM):
                data, first = data.removeprefix(BOM), False
            cut = data.rfind(b"\n") + 1
            if first or cut == 0:
                rest = data
                continue
            whole, rest = data[:cut], data[cut:]  # lines ending in \n
            total += whole.count(b"\n") - len(_BLANK_AFTER_NEWLINE.findall(b"\n" + whole))
    if first:
        rest = rest.removeprefix(BOM)
    return total + sum(1 for line in rest.split(b"\n") if line.strip())  # the last few lines


def _count_csv(file: str, limit: int | None) -> int:
    import pyarrow.csv as pcsv

    ragged = 0

    def count_ragged(row) -> str:
        nonlocal ragged
        ragged += 1
        return "skip"

    try:
        reader = pcsv.open_csv(
            file,
            # the header is read as a row too, then subtracted; f0 only, as bytes: nothing decoded
            read_options=pcsv.ReadOptions(autogenerate_column_names=True, block_size=1 << 26),
            parse_options=pcsv.ParseOptions(
                delimiter="\t" if file.lower().endswith(".tsv") else ",",
                newlines_in_values=True, invalid_row_handler=count_ragged,
            ),
            convert_options=pcsv.ConvertOptions(include_columns=["f0"], column_types={"f0": pa.binary()}),
        )
        rows = sum(batch.num_rows for batch in reader)
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            return 0
        raise InputError(f"{file}: cannot count its rows: {e}") from None
    n = max(0, rows + ragged - 1)
    return n if limit is None else min(n, limit)


def make_datasource(files: list[str], limit: int | None = None):
    """A Ray Data datasource over ``files`` producing RAW_SCHEMA blocks (one read task a file)."""
    from ray.data.datasource import FileBasedDatasource

    class RecordDatasource(FileBasedDatasource):
        _FILE_EXTENSIONS = None

        def __init__(self, paths, limit=None):
            super().__init__(paths)
            self._limit = limit

        def _open_input_source(self, filesystem, path, **open_args):
            if path.lower().endswith(".parquet"):  # Parquet needs random access (its footer)
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str):
            # Ray hands us the path without the original relative form; keep what the user
            # wrote so rejects name the file as they know it.
            yield from iter_file_batches(f, self._names.get(path, path), self._limit)

    ds = RecordDatasource(files, limit=limit)
    ds._names = {os.path.abspath(p): p for p in files}
    return ds
