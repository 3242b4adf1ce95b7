"""The convert stage's Ray Data plan: per source ``read -> parse -> [shuffle -> combine]``, and
the batch functions it maps (pure: no Ray, no I/O, testable on plain Arrow tables).

A source takes one of four paths, by what its adapter offers (``hetray.unify.sources.base``):

* **rows are independent** (HH, generic ``pairwise`` / ``sft``, WinoGrande): the adapter's
  ``parse_table`` converts a whole RAW batch with Arrow (``sources.vector``); no shuffle.
  WinoGrande allows one pair per qID: a narrow pass first reads every good row's ``(qID, file,
  line)``, groups those by qID (a shuffle of three short columns, not of the rows: plain Ray
  tasks, one per file and one per hash part, shuffled on disk) and hands ``parse_table`` the
  later rows of a repeated qID, which become ``duplicate_id`` rejects (``find_duplicates``;
  the driver holds only those rows).
* **records must meet, typed** (flat OASST messages: a tree's messages may sit in different
  files): ``flow_table`` parses a batch into typed columns, the stage shuffles them by tree and
  ``combine_table`` pairs every tree of a shuffle part with Arrow joins and sorts. Local files
  are shuffled on disk by plain Ray tasks (``to_disk`` / ``read_part``: a task per file writes
  its rows in hash parts to an Arrow IPC file, a task per part reads its batches of every
  file), hub datasets by Ray Data's group-by.
* **records must meet, per record** (WinoBias, WinoGender, generic ``scored``): ``parse`` per
  record, the items pickled through one shared shuffle, ``combine`` per group
  (``parse_batch`` / ``combine_bucket``). Their data sets are small.
* **independent, per record** (OASST tree lines): ``parse`` per record and ``combine`` within
  the batch.

Ray Data's shuffle groups by ``bucket`` (a hash of the group key), not by the group itself: a
bucket holds many groups, so the per-call cost of ``map_groups`` is paid per bucket, not per
tree; its memory is bounded by the object store (which spills to disk). The on-disk shuffle
holds a 16 MiB buffer per map task and one part (about 32 MiB of input) per reduce task, and
moves nothing through the object store.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import zlib
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from hetray.formats import hub_spec
from hetray.schema import FLOW_SCHEMA, ITEM, OUTPUT_SCHEMA
from hetray.stage import stage_task, wait_tasks
from hetray.unify.sources.base import tally_label_names
from hetray.unify.sources.readers import InputError, iter_file_batches, make_datasource

# kind of the rows that carry a batch's label tally (``detail``: JSON {name: n}) to the sink;
# ``split_output`` writes them nowhere.
LABELS = "labels"


# ---------------------------------------------------------------------------- per-record path


def _combine_local(adapter, s, records: list[dict]) -> list[dict]:
    """Outputs of ``records``; items are grouped within this list (no shuffle needed)."""
    out, groups = [], defaultdict(list)
    for rec in records:
        (groups[rec["group"]] if rec["kind"] == ITEM else out).append(rec)
    for key in sorted(groups):
        out.extend(adapter.combine(groups[key], s))
    return out


def parse_batch(batch: pa.Table, adapter, s, shuffle: bool, index: int = 0, n_buckets: int = 1) -> pa.Table:
    """RAW_SCHEMA batch -> OUTPUT_SCHEMA (no shuffle) or FLOW_SCHEMA + ``bucket`` (items await
    the shuffle), one record at a time.

    Group keys are prefixed with the source's ``index`` so that every per-record source that
    needs a shuffle shares one group-by.
    """
    records = [rec for row in batch.to_pylist() for rec in adapter.parse(row, s)]
    tally = tally_label_names(records)
    if tally:
        records.append({"kind": LABELS, "source": s.name, "detail": json.dumps(tally, sort_keys=True)})
    if not shuffle:
        return pa.Table.from_pylist(_combine_local(adapter, s, records), schema=OUTPUT_SCHEMA)
    buckets = []
    for rec in records:
        if rec["kind"] == ITEM:
            rec["data"] = pickle.dumps(rec["data"], protocol=pickle.HIGHEST_PROTOCOL)
            key = rec["group"]
        else:  # already final (a reject): travels through the shuffle, combine passes it on
            key = rec.get("record_id") or ""
        rec["group"] = f"{index}\x1f{key}"
        buckets.append(zlib.crc32(rec["group"].encode("utf-8", "surrogatepass")) % n_buckets)
    table = pa.Table.from_pylist(records, schema=FLOW_SCHEMA)
    return table.append_column("bucket", pa.array(buckets, pa.int32()))


def combine_bucket(bucket: pa.Table, plans: dict) -> pa.Table:
    """All FLOW rows of one bucket -> OUTPUT_SCHEMA rows, each group combined by its source's
    adapter. ``plans``: source index -> (adapter, settings)."""
    by_source = defaultdict(list)
    for rec in bucket.drop_columns(["bucket"]).to_pylist():
        index, rec["group"] = rec["group"].split("\x1f", 1)
        if rec["kind"] == ITEM:
            rec["data"] = pickle.loads(rec["data"])
        by_source[int(index)].append(rec)
    out = []
    for index in sorted(by_source):
        adapter, s = plans[index]
        out.extend(_combine_local(adapter, s, by_source[index]))
    return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------------------- Arrow paths


def buckets(keys, n_buckets: int) -> pa.Array:
    """A bucket in ``[0, n_buckets)`` for every key (a string column; null counts as "")."""
    import polars as pl

    keys = pc.fill_null(keys, "")
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    return (pl.from_arrow(keys).hash(seed=0) % n_buckets).cast(pl.Int32).to_arrow()


def flow_batch(batch: pa.Table, adapter, s, n_buckets: int) -> pa.Table:
    """RAW batch -> the adapter's typed flow rows + ``bucket`` (a tree's rows share one)."""
    table = adapter.flow_table(batch, s)
    key = pc.coalesce(table["group"], table["record_id"])
    return table.append_column("bucket", buckets(key, n_buckets))


def combine_flow(bucket: pa.Table, adapter, settings: dict) -> pa.Table:
    return adapter.combine_table(bucket.drop_columns(["bucket"]), settings)


def keys_batch(batch: pa.Table, adapter, s, n_buckets: int) -> pa.Table:
    """RAW batch -> ``(record_id, file, line, bucket)`` of the rows whose key must be unique."""
    keys = adapter.unique_keys(batch, s)
    return keys.append_column("bucket", buckets(keys["record_id"], n_buckets))


def duplicates_of(bucket: pa.Table, adapter) -> pa.Table:
    return adapter.find_duplicates(bucket.drop_columns(["bucket"]))


# ---------------------------------------------------------------------------- the plan


def input_bytes(files: list[str]) -> int:
    """Bytes of a source's local files: what sizes its read blocks, buckets and partitions."""
    return sum(os.path.getsize(f) for f in files)


def shuffle_partitions(files: list[str], configured: int | None, n_buckets: int) -> int:
    """Partitions for a group-by: enough to spread work and keep each one small, and no more
    than there are buckets (a partition beyond that could only ever be empty). Some partitions
    may still be empty (buckets hash unevenly); the sink skips empty blocks."""
    import ray

    if configured:
        return configured
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = input_bytes(files)
    return int(min(200, n_buckets, max(2 * cpus, size // (128 << 20))))


def n_shuffle_buckets(files: list[str], per_bucket: int = 1 << 20) -> int:
    """About one bucket per ``per_bucket`` bytes of input, at least 16."""
    size = input_bytes(files)
    return int(max(16, size // per_bucket))


# the typed (Arrow) shuffles combine a bucket with a few dozen vectorised calls: bigger buckets
TYPED_BUCKET_BYTES = 16 << 20


def group_by_bucket(ds, partitions: int):
    """``ds.groupby("bucket")`` with Ray Data's sort-based shuffle (plain tasks, spilled through
    the object store). Ray 2.60's default shuffle strategy (``shuffle_v2``) took 36-50 s for a
    100k-row group-by on this 2-core machine where the sort-based one took 1-11 s (under load
    ~30, 2026-11-25), so the stage sets it on its own datasets (their context, not the global)."""
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds.groupby("bucket", num_partitions=partitions)


def read_blocks(files: list[str]) -> int:
    """Read blocks for local ``files``: one per file when there are at least as many files as
    CPUs, so that each Ray task reads, parses and writes whole files in one fused task. Ray
    Data's default asks for ~200 blocks and splits every file's output to reach them, which
    stops the fusion: for 8 files of 1M HH rows that was 8 read tasks and then 200 parse+write
    tasks of 5,000 rows and 200 output files (22.6 s of the write against 17.5 s fused, on 2
    loaded cores). With fewer files than CPUs, a large input is split to up to 2 blocks per CPU
    (one per 64 MiB), so its parse still spreads; a small one is not split at all."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = input_bytes(files)
    return int(max(len(files), min(2 * cpus, size // (64 << 20))))


def read_raw(files: list[str], s):
    """A source's RAW records as a Ray Dataset (local files, or a hub dataset)."""
    import ray

    if files:
        return ray.data.read_datasource(make_datasource(files, s.limit), override_num_blocks=read_blocks(files))
    spec = s.path if isinstance(s.path, str) else s.path[0]
    return hub_dataset(spec, s.limit)


# below this much input the narrow pass runs on the driver: a Ray execution costs seconds
LOCAL_KEY_PASS_BYTES = 32 << 20


def _unique_keys_of(file: str, adapter, s) -> pa.Table:
    """KEYS rows of one local file (``adapter.unique_keys`` over its RAW batches)."""
    with open(file, "rb") as f:
        keys = [adapter.unique_keys(b, s) for b in iter_file_batches(f, file, s.limit)]
    return pa.concat_tables(keys) if keys else adapter.KEYS_SCHEMA.empty_table()


def ranked_keys(raw: pa.Table, adapter, s, rank: int) -> pa.Table:
    """KEYS rows of a RAW batch (``adapter.unique_keys``) with ``file`` as the file's ``rank``
    among the source's sorted names (int32: 4 bytes a row, not the path's ~40; it keeps the
    (file, line) order)."""
    import numpy as np

    keys = adapter.unique_keys(raw, s)
    return keys.set_column(keys.schema.get_field_index("file"), "file",
                           pa.array(np.full(keys.num_rows, rank, dtype=np.int32)))


def duplicates_in(names: list[str], adapter, paths: list[str], part: int, *index) -> pa.Table:
    """The duplicate rows among one hash part of every file's keys (``to_disk`` of
    ``ranked_keys``; ``index``: each map file's batch parts), with the file ranks turned back
    into the names."""
    keys = read_part(list(zip(paths, index)), part)
    if keys is None:
        return adapter.DUPLICATES_SCHEMA.empty_table()
    dups = adapter.find_duplicates(keys)  # DUPLICATES_SCHEMA: the ranks as strings
    names = pa.array(names, pa.string())
    for column in ("file", "first_file"):
        dups = dups.set_column(dups.schema.get_field_index(column), column,
                               names.take(pc.cast(dups[column], pa.int32())))
    return dups


def _task_key_pass(adapter, files: list[str], s, scratch: str, parts: int) -> pa.Table:
    """The narrow pass over local files as plain Ray tasks, shuffled on disk (``map_to_disk``):
    one per file streams its keys into ``scratch`` by hash part, one per part finds the
    duplicates among that part of every file. A task holds a batch or a part, never a file's
    keys (which at 10M rows in 8 files had kept 770 MiB in the idle workers). Through Ray Data
    (a read, a sort-based group-by and its sampling pass) the pass took 7.4 s of a 13.3 s stage
    on 3M WinoGrande rows in 8 files; as tasks 3.7 s (2 CPUs, load 0.2, 2026-12-07)."""
    import ray

    names = sorted(set(files))
    rank = {name: i for i, name in enumerate(names)}
    jobs = [(f, s.limit, None, functools.partial(ranked_keys, adapter=adapter, s=s, rank=rank[f])) for f in files]
    paths, index = map_to_disk(scratch, f"keys-{s.name}", jobs, parts, "convert: qID keys shuffled to disk")
    reduce = stage_task(duplicates_in)
    tables = ray.get([reduce.remote(names, adapter, paths, p, *index) for p in range(parts)])
    return pa.concat_tables(tables).cast(adapter.DUPLICATES_SCHEMA)


def find_duplicates(planned: list, batch_size: int, scratch: str, partitions: int | None = None) -> dict:
    """{source name: DUPLICATES rows} for the sources whose adapter wants unique keys
    (``unique_keys``): the narrow pass of the module doc, on the driver for a small local
    input, as plain Ray tasks for larger local files (``_task_key_pass``), through Ray Data
    for a hub dataset. The driver holds only the duplicate rows. ``scratch``: a folder on storage every node reaches (the stage's
    own), which the caller removes."""
    out = {}
    for adapter, files, s in planned:
        if not hasattr(adapter, "unique_keys"):
            continue
        if files and input_bytes(files) <= LOCAL_KEY_PASS_BYTES:
            out[s.name] = adapter.find_duplicates(pa.concat_tables([_unique_keys_of(f, adapter, s) for f in files]))
            continue
        if files:
            out[s.name] = _task_key_pass(adapter, files, s, scratch, disk_parts(files, partitions))
            continue
        n = n_shuffle_buckets(files, TYPED_BUCKET_BYTES)
        keys = read_raw(files, s).map_batches(
            keys_batch, fn_kwargs={"adapter": adapter, "s": s, "n_buckets": n},
            batch_format="pyarrow", batch_size=batch_size)
        dups = group_by_bucket(keys, shuffle_partitions(files, partitions, n)).map_groups(
            duplicates_of, fn_kwargs={"adapter": adapter}, batch_format="pyarrow")
        tables = [b for b in dups.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
        out[s.name] = pa.concat_tables(tables) if tables else adapter.DUPLICATES_SCHEMA.empty_table()
    return out


def build_dataset(planned: list, batch_size: int, partitions: int | None = None, duplicates: dict | None = None):
    """The whole stage as one lazy Dataset: per-source reads and parses, a shuffle per typed
    adapter and one shared by the per-record sources, and the union of everything."""
    duplicates = duplicates or {}
    direct, grouped, plans, typed = [], [], {}, defaultdict(list)
    shuffled_files = [f for adapter, files, s in planned
                      if adapter.needs_shuffle(s) and not hasattr(adapter, "flow_table") for f in files]
    n_buckets = n_shuffle_buckets(shuffled_files)
    for index, (adapter, files, s) in enumerate(planned):
        raw = read_raw(files, s)
        shuffle = adapter.needs_shuffle(s)
        if shuffle and hasattr(adapter, "flow_table"):
            typed[adapter].append((raw, files, s))
            continue
        if not shuffle and hasattr(adapter, "parse_table"):
            kwargs = {"duplicates": duplicates[s.name]} if s.name in duplicates else {}
            direct.append(raw.map_batches(adapter.parse_table, fn_kwargs={"s": s, **kwargs},
                                          batch_format="pyarrow", batch_size=batch_size))
            continue
        parsed = raw.map_batches(
            parse_batch,
            fn_kwargs={"adapter": adapter, "s": s, "shuffle": shuffle, "index": index, "n_buckets": n_buckets},
            batch_format="pyarrow",
            batch_size=batch_size,
        )
        if shuffle:
            grouped.append(parsed)
            plans[index] = (adapter, s)
        else:
            direct.append(parsed)
    for adapter, sources in typed.items():  # one shuffle per typed adapter, all its sources
        files = [f for _, fs, _ in sources for f in fs]
        n = n_shuffle_buckets(files, TYPED_BUCKET_BYTES)
        flows = [raw.map_batches(flow_batch, fn_kwargs={"adapter": adapter, "s": s, "n_buckets": n},
                                 batch_format="pyarrow", batch_size=batch_size) for raw, _, s in sources]
        flow = flows[0].union(*flows[1:]) if len(flows) > 1 else flows[0]
        direct.append(group_by_bucket(flow, shuffle_partitions(files, partitions, n)).map_groups(
            combine_flow, fn_kwargs={"adapter": adapter, "settings": {s.name: s for _, _, s in sources}},
            batch_format="pyarrow"))
    if grouped:
        flow = grouped[0].union(*grouped[1:]) if len(grouped) > 1 else grouped[0]
        n = shuffle_partitions(shuffled_files, partitions, n_buckets)
        direct.append(
            group_by_bucket(flow, n).map_groups(
                combine_bucket, fn_kwargs={"plans": plans}, batch_format="pyarrow"
            )
        )
    return direct[0].union(*direct[1:]) if len(direct) > 1 else direct[0]


# ---------------------------------------------------------------------------- typed shuffle on disk

# input bytes per hash part of the on-disk shuffle: a reduce task holds about one part's rows
PART_BYTES = 32 << 20


def disk_parts(files: list[str], configured: int | None = None) -> int:
    """Hash parts of the on-disk shuffle: ``convert.shuffle_partitions`` when set, else one per
    ``PART_BYTES`` of input and at least 2 per CPU, so a part's size, not its count, stays
    fixed as the input grows."""
    import ray

    if configured:
        return configured
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return int(max(2 * cpus, -(-input_bytes(files) // PART_BYTES)))


def shuffle_key(table: pa.Table):
    """What the on-disk shuffle hashes: a flow row's group (an OASST tree; ``record_id`` where
    it has none, as ``flow_batch``), a key row's ``record_id``."""
    if "group" in table.column_names:
        return pc.coalesce(table["group"], table["record_id"])
    return table["record_id"]


# rows the map side of the on-disk shuffle buffers before it writes them out, a record batch per part
FLUSH_BYTES = 16 << 20


def tables_to_disk(path: str, parts: int, tables, key=None):
    """Map side of the on-disk shuffle: ``tables`` (an iterable of Arrow tables of one
    schema) hashed into ``parts`` parts by ``key(table)`` (``shuffle_key`` when None) and
    written to the Arrow IPC file ``path``. Rows are buffered up to ``FLUSH_BYTES``, then
    written as one record batch per part that has rows; returns the part of every record batch
    (int32, in file order). Memory is the buffer, whatever the size of the input; an input
    without rows writes nothing."""
    import numpy as np

    key = key or shuffle_key
    index, pending, size, writer = [], [], 0, None

    def flush():
        nonlocal writer, pending, size
        table = pa.concat_tables(pending)
        part = buckets(key(table), parts).to_numpy()
        order = np.argsort(part, kind="stable")
        table, part = table.take(pa.array(order)), part[order]
        cuts = np.searchsorted(part, np.arange(parts + 1))
        writer = writer or pa.ipc.new_file(path, table.schema)
        for p in np.flatnonzero(np.diff(cuts)):
            writer.write_batch(table.slice(cuts[p], cuts[p + 1] - cuts[p]).combine_chunks().to_batches()[0])
            index.append(p)
        pending, size = [], 0

    try:
        for table in tables:
            if table.num_rows:
                pending.append(table)
                size += table.nbytes
            if size >= FLUSH_BYTES:
                flush()
        if pending:
            flush()
    finally:
        if writer is not None:
            writer.close()
    return np.asarray(index, np.int32)


def to_disk(path: str, parts: int, file: str, limit: int | None, batch_size: int | None, rows_of):
    """``tables_to_disk`` of the rows ``rows_of`` makes of each RAW batch (``batch_size``
    rows at a time) of one local file (``adapter.flow_table``; ``ranked_keys``)."""

    def tables():
        with open(file, "rb") as f:
            for raw in iter_file_batches(f, file, limit):
                step = batch_size or max(raw.num_rows, 1)
                for i in range(0, raw.num_rows, step):
                    yield rows_of(raw.slice(i, step))

    return tables_to_disk(path, parts, tables())


def read_part(maps: list[tuple[str, object]], part: int) -> pa.Table | None:
    """Reduce side: the record batches of part ``part`` in every map file (``to_disk``: path
    and the part of each batch; None when none has a row). Plain reads of those batches only:
    a memory map of the files had the kernel map 64 KiB around every small slice it touched, so
    a reduce task's resident memory grew with the number of batches (10M OASST messages: 3.1
    GiB in the combine tasks against 1.0 at 1M)."""
    import numpy as np

    tables = []
    for path, index in maps:
        wanted = np.flatnonzero(index == part)
        if len(wanted) == 0:
            continue
        with pa.OSFile(path, "rb") as f:
            reader = pa.ipc.open_file(f)
            tables += [pa.Table.from_batches([reader.get_batch(int(b))]) for b in wanted]
    return pa.concat_tables(tables) if tables else None


def map_to_disk(scratch: str, prefix: str, jobs: list[tuple], parts: int, what: str, fn=to_disk) -> tuple[list[str], list]:
    """The map side of an on-disk shuffle: a task ``fn(path, parts, *job)`` per job of
    ``jobs`` (``to_disk``: ``(file, limit, batch_size, rows_of)``), writing
    ``scratch/<prefix>-<j>.arrow``; returns once all are done (progress logged as ``what``),
    with the files' paths and the object refs of their batch parts, for the reduce tasks
    (``read_part``)."""
    os.makedirs(scratch, exist_ok=True)
    to = stage_task(fn)
    paths = [os.path.join(scratch, f"{prefix}-{j:05d}.arrow") for j in range(len(jobs))]
    index = [to.remote(path, parts, *job) for path, job in zip(paths, jobs)]
    for _ in wait_tasks(index, what):
        pass
    return paths, index


# ---------------------------------------------------------------------------- hub datasets


def hub_error(name: str, split: str, cause: Exception) -> InputError:
    return InputError(
        f"could not load the Hugging Face dataset {name!r} (split {split!r}): the hub is "
        f"not reachable from here or the dataset does not exist. Download it and give a local "
        f"path instead. Cause: {type(cause).__name__}: {cause}"
    )


def hub_dataset(spec: str, limit: int | None):
    """``hf:ORG/NAME[:SPLIT[:CONFIG]]`` -> a Ray Dataset of RAW rows (needs network)."""
    import ray

    name, split, config = hub_spec(spec)
    try:
        import datasets

        hf = datasets.load_dataset(name, config, split=split, streaming=False)
    except Exception as e:  # noqa: BLE001
        raise hub_error(name, split, e) from None
    if limit:
        hf = hf.select(range(min(limit, len(hf))))
    if os.path.exists(name):
        # a local dataset folder: from_huggingface would still ask the hub for parquet URLs
        # (and fail offline), so hand Ray the memory-mapped Arrow table instead.
        ds = ray.data.from_arrow(hf.data.table)
    else:
        ds = ray.data.from_huggingface(hf)

    def to_raw(batch: pa.Table) -> pa.Table:
        from hetray.unify.sources.readers import _table_batch

        return _table_batch(spec, 1, batch)  # every chunk of the batch, not only the first

    return ds.map_batches(to_raw, batch_format="pyarrow", batch_size=None)
