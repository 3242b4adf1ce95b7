"""Reading input files into raw records (``RAW_SCHEMA``): ``file``, ``line``, ``text``, ``error``.

* Line formats (``.jsonl``, ``.json``, ``.txt``, WinoBias ``.dev``/``.test``, anything else):
  one record per non-blank line, ``line`` is the 1-based line number. Bytes that are not
  UTF-8 give a record with ``error="invalid_utf8"`` and the text decoded with replacement
  characters (so the reject shows what was there).
* Tables (``.parquet``, ``.csv``, ``.tsv``): one record per row, ``text`` is the row as a JSON
  object and ``line`` the 1-based row number (for csv/tsv: the data row, header excluded).

Files are read as a stream of small batches: memory does not depend on the file size.
``iter_records`` is the plain-Python reader; ``RecordDatasource`` the Ray Data one; both use
the same batch functions, so they agree record for record.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Iterator

import pyarrow as pa

from hetray.schema import RAW_SCHEMA

TABLE_EXTENSIONS = (".parquet", ".csv", ".tsv")
BATCH_LINES = 4096


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


def _line_batch(file: str, numbers: list[int], raws: list[bytes]) -> pa.Table:
    texts, errors = [], []
    for raw in raws:
        try:
            texts.append(raw.decode("utf-8"))
            errors.append(None)
        except UnicodeDecodeError:
            texts.append(raw.decode("utf-8", "replace"))
            errors.append("invalid_utf8")
    return pa.table(
        {"file": [file] * len(numbers), "line": numbers, "text": texts, "error": errors},
        schema=RAW_SCHEMA,
    )


def _lines(f, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    # pyarrow's NativeFile (what Ray hands a datasource) cannot iterate lines; read chunks.
    rest = b""
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def iter_line_batches(f, file: str, limit: int | None = None) -> Iterator[pa.Table]:
    """Binary file object -> RAW_SCHEMA batches of its non-blank lines."""
    numbers: list[int] = []
    raws: list[bytes] = []
    count = 0
    for n, raw in enumerate(_lines(f), start=1):
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        numbers.append(n)
        raws.append(raw)
        count += 1
        if len(raws) >= BATCH_LINES:
            yield _line_batch(file, numbers, raws)
            numbers, raws = [], []
        if limit is not None and count >= limit:
            break
    if raws:
        yield _line_batch(file, numbers, raws)


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
    lower = file.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(f).iter_batches(batch_size=BATCH_LINES)
    else:
        import pyarrow.csv as pcsv

        delimiter = "\t" if lower.endswith(".tsv") else ","
        batches = pcsv.open_csv(
            f,
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            read_options=pcsv.ReadOptions(block_size=1 << 20),
        )
    row = 1
    for batch in batches:
        if limit is not None:
            batch = batch.slice(0, max(0, limit - (row - 1)))
        if batch.num_rows == 0:
            break
        yield _table_batch(file, row, batch)
        row += batch.num_rows


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
    """Column names of a parquet / csv / tsv file without reading its rows."""
    lower = file.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_schema(file).names
    with open(file, "rb") as f:
        header = f.readline().decode("utf-8", "replace").rstrip("\r\n")
    return header.split("\t" if lower.endswith(".tsv") else ",")


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
