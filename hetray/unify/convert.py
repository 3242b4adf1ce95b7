"""Stage 1, convert: every source -> the unified preference format, on Ray Data.

``run_convert(cfg)`` reads each configured source, runs its adapter (``hetray.unify.sources``) and
writes into ``cfg.run_dir``::

    preferences/   pairs (PREFERENCE_SCHEMA), + manifest.json: counts, config, input fingerprints
    sft_only/      prompts with a single reference answer (SFT_SCHEMA)
    rejects/       every input record that gave nothing, with file, line and reason

``preferences/`` and ``sft_only/`` carry a dataset card (``README.md``, ``hetray.datacard``) so
``datasets.load_dataset("<run>/preferences")`` reads them; an empty folder holds one Parquet
file of its schema without rows.

Per source the pipeline is ``read -> parse (map_batches) -> [groupby(bucket) -> combine] ->
write`` (``hetray.unify.dataflow``): rows that are independent are converted a batch at a time
with Arrow (local files of such a source, at least as many as CPUs, by plain Ray tasks, one per
file, that stream read -> parse -> write: ``by_file``), and the shuffle only runs where records
must meet (flat OASST messages of a tree: on disk, by plain Ray tasks, ``run_disk_shuffles``;
WinoBias pro/anti files, WinoGender pairs, generic scored responses: Ray Data's group-by);
WinoGrande's duplicate qIDs are found by a narrow pass over (qID, file, line) only, shuffled
on disk too. Replies of one prompt may sit in different files and memory stays bounded. The writer splits each block
by kind into the three folders and returns counts (an empty shuffle partition is an empty block
without columns: skipped). Label names that the adapters' items carry (``base.LABEL_NAMES``)
are tallied per batch into one ``kind="labels"`` row (never written); after the pass each
adapter's ``check_counts`` can refuse what the counts show, e.g. an OASST label that no message
has.

Nothing is dropped silently, and that is checked, not assumed: while Ray converts, the driver
counts each file's input records apart from the conversion (``readers.count_records``: lines,
Arrow's count of csv rows, Parquet metadata; OASST messages per tree line), records them in the
manifest (``counts[source]["input"]`` and ``["files"]``, zero for an empty file) and fails the
stage with ``CountMismatch`` unless ``input == used + rejected`` for every source.

The stage runner (``hetray.stage``) skips the stage when its key is unchanged and commits the
three folders together: a failed or killed run never leaves half an output behind, nor
destroys the previous one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from hetray.config import JobConfig
from hetray.datacard import write_convert_cards, write_empty
from hetray.formats import hub_spec, is_hub
from hetray.models import resolve_sample
from hetray.schema import (
    PAIR,
    PREFERENCE_SCHEMA,
    REJECT,
    REJECT_SCHEMA,
    SFT,
    SFT_SCHEMA,
    split_output,
)
from hetray.stage import Stage, block_size, require_ray, run_stage, stage_task, wait_tasks
from hetray.unify.dataflow import (
    LABELS,
    build_dataset,
    disk_parts,
    find_duplicates,
    hub_error,
    read_blocks,
    map_to_disk,
    read_part,
)
from hetray.unify.sources import adapter_for
from hetray.unify.sources.readers import (
    InputError,
    count_records,
    expand_paths,
    iter_file_batches,
    is_csv,
    peek_record,
    table_columns,
)

log = logging.getLogger(__name__)

OUTPUTS = {"preferences": PREFERENCE_SCHEMA, "sft_only": SFT_SCHEMA, "rejects": REJECT_SCHEMA}


# ---------------------------------------------------------------------------- writing


class SplitParquetSink(Datasink):
    """Ray Data sink: each block is split by ``kind`` into the three output folders.

    Each write task streams its blocks into at most one Parquet file per folder and returns
    its counts per source; ``on_write_complete`` adds them up on the driver in ``counts``.
    """

    def __init__(self, root: str):
        self.root = root
        self.counts: dict = {}

    def write(self, blocks, ctx) -> dict:
        tables = (b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks)
        return write_tables(self.root, f"train-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet", tables)

    def on_write_complete(self, write_result) -> None:
        for part in write_result.write_returns:
            _merge(self.counts, part)


def write_tables(root: str, name: str, tables) -> dict:
    """Stream ``tables`` (OUTPUT_SCHEMA) into at most one Parquet file ``name`` per output
    folder under ``root``; return their counts per source (``_tally``)."""
    writers: dict = {}
    counts: dict = {}
    try:
        for table in tables:
            if table.num_rows == 0:  # an empty shuffle partition comes without columns
                continue
            _tally(table, counts)
            for folder, part in zip(OUTPUTS, split_output(table)):
                if part.num_rows == 0:
                    continue
                if folder not in writers:
                    writers[folder] = pq.ParquetWriter(os.path.join(root, folder, name), OUTPUTS[folder])
                writers[folder].write_table(part)
    finally:
        for w in writers.values():
            w.close()
    return counts


def convert_file(root: str, name: str, file: str, adapter, s, batch_size: int | None, duplicates=None) -> dict:
    """One local file of a source whose rows are independent, read, parsed (``parse_table``)
    and written in one streaming pass: the counts of its rows (``write_tables``)."""
    kwargs = {"duplicates": duplicates} if duplicates is not None else {}

    def tables():
        with open(file, "rb") as f:
            for raw in iter_file_batches(f, file, s.limit):
                step = batch_size or max(raw.num_rows, 1)
                for i in range(0, raw.num_rows, step):
                    yield adapter.parse_table(raw.slice(i, step), s, **kwargs)

    return write_tables(root, name, tables())


def by_file(planned: list, cfg_convert) -> tuple[list, list]:
    """Split the planned sources into those converted by plain Ray tasks, one per file
    (``convert_file``), and the rest (Ray Data, ``build_dataset``). A task per file is taken
    where Ray Data's plan would be one fused read -> parse -> write task per file anyway
    (local files, rows independent, at least as many files as CPUs or as the read wants
    blocks, no ``num_output_files``); fewer, larger files stay on Ray Data, which splits their
    blocks so the parse spreads over the CPUs. Ray Data's write step keeps every block a task
    wrote until the task ends (``itertools.tee`` in ``plan_write_op``, Ray 2.60), so its memory grew with the file:
    3M WinoGrande rows in 2 files peaked at 2866 MiB, in 8 files at 2019 MiB; the same parse
    streamed in one process stays at 287 MiB."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    tasks, rest = [], []
    for adapter, files, s in planned:
        independent = hasattr(adapter, "parse_table") and not adapter.needs_shuffle(s)
        if (independent and files and not cfg_convert.num_output_files
                and (len(files) >= cpus or read_blocks(files) == len(files))):
            tasks.append((adapter, files, s))
        else:
            rest.append((adapter, files, s))
    return tasks, rest


def run_file_tasks(root: str, tasks: list, batch_size: int | None, duplicates: dict) -> list:
    """Start ``convert_file`` for every file of ``tasks``; the object refs of their counts."""
    remote = stage_task(convert_file)
    refs, i = [], 0
    for adapter, files, s in tasks:
        dups = duplicates.get(s.name)
        for file in files:
            name = f"train-f{i:05d}-{uuid.uuid4().hex[:8]}.parquet"
            refs.append(remote.remote(root, name, file, adapter, s, batch_size, dups))
            i += 1
    return refs


def wait_file_tasks(refs: list) -> dict:
    """The summed counts of the ``convert_file`` tasks, logging progress as files finish."""
    counts: dict = {}
    for part in wait_tasks(refs, "convert: files written"):
        _merge(counts, part)
    return counts


def on_disk(planned: list, cfg_convert) -> tuple[dict, list]:
    """Split the sources whose records must meet and whose adapter has the Arrow path
    (``flow_table``: flat OASST messages) off the rest when their files are local: {adapter:
    [(adapter, files, settings)]}, shuffled on disk by plain Ray tasks (``run_disk_shuffles``).
    Hub datasets and ``num_output_files`` keep Ray Data's group-by. Ray's shuffle moves every
    row through the object store: capped (1.5 GiB) it spilled and restored, and the peak of a
    10M-message convert was 1.43x that of 1M (2026-12-07)."""
    typed, rest = defaultdict(list), []
    for adapter, files, s in planned:
        if hasattr(adapter, "flow_table") and adapter.needs_shuffle(s) and files and not cfg_convert.num_output_files:
            typed[adapter].append((adapter, files, s))
        else:
            rest.append((adapter, files, s))
    return dict(typed), rest


def combine_part(root: str, name: str, paths: list[str], part: int, adapter, settings: dict, *index) -> dict:
    """Reduce side of the on-disk shuffle: part ``part`` of every map file (``index``: each
    file's batch parts), combined (``adapter.combine_table``) and written: its counts
    (``write_tables``)."""
    rows = read_part(list(zip(paths, index)), part)
    return {} if rows is None else write_tables(root, name, [adapter.combine_table(rows, settings)])


def run_disk_shuffles(root: str, scratch: str, typed: dict, batch_size: int | None, partitions: int | None) -> list:
    """Per adapter of ``typed`` (``on_disk``): a task per file writes its flow rows by hash
    part to ``scratch`` (``map_to_disk``); once all have, a task per part combines that part of
    every file (``combine_part``). Each task holds a batch or a part, never a whole file or the
    whole input, so memory stays flat as the input grows. Returns the object refs of the parts'
    counts."""
    combine = stage_task(combine_part)
    refs = []
    for a, sources in enumerate(typed.values()):
        jobs = [(f, s.limit, batch_size, functools.partial(adapter.flow_table, s=s))
                for adapter, files, s in sources for f in files]
        parts = disk_parts([f for f, *_ in jobs], partitions)
        paths, index = map_to_disk(scratch, f"map-{a:02d}", jobs, parts, "convert: files shuffled to disk")
        adapter, settings = sources[0][0], {s.name: s for _, _, s in sources}
        refs += [combine.remote(root, f"train-s{a:02d}-{p:05d}-{uuid.uuid4().hex[:8]}.parquet", paths, p,
                                adapter, settings, *index) for p in range(parts)]
    return refs


def _tally(table: pa.Table, counts: dict) -> None:
    """Add a block's counts per source: rows by kind and reason, records used (provenance
    lengths), and the label tallies of its ``labels`` rows."""
    t = table.select(["kind", "source", "reason"]).append_column(
        "used", pc.fill_null(pc.list_value_length(table["provenance"]), 0))
    for row in t.group_by(["source", "kind", "reason"]).aggregate([([], "count_all"), ("used", "sum")]).to_pylist():
        c = counts.setdefault(row["source"], _empty_counts())
        if row["kind"] == REJECT:
            c["rejected"] += row["count_all"]
            c["reasons"][row["reason"]] = c["reasons"].get(row["reason"], 0) + row["count_all"]
        elif row["kind"] in (PAIR, SFT):
            c["pairs" if row["kind"] == PAIR else "sft"] += row["count_all"]
            c["used"] += row["used_sum"]
    labels = table.filter(pc.equal(table["kind"], LABELS))
    for row in labels.select(["source", "detail"]).to_pylist():
        c = counts.setdefault(row["source"], _empty_counts())
        for name, n in json.loads(row["detail"]).items():
            c["labels"][name] = c["labels"].get(name, 0) + n


def _empty_counts() -> dict:
    return {"pairs": 0, "sft": 0, "used": 0, "rejected": 0, "reasons": {}, "labels": {}}


def _merge(into: dict, part: dict) -> None:
    for source, c in part.items():
        t = into.setdefault(source, _empty_counts())
        for k in ("pairs", "sft", "used", "rejected"):
            t[k] += c[k]
        for key in ("reasons", "labels"):
            for name, n in c[key].items():
                t[key][name] = t[key].get(name, 0) + n


# ---------------------------------------------------------------------------- planning


def resolve_files(path: str | list[str]) -> list[str]:
    """Local files of a source path; ``sample:NAME`` points into the bundled samples."""
    paths = [path] if isinstance(path, str) else list(path)
    return expand_paths([resolve_sample(p) for p in paths])


def _check_hub(spec: str) -> None:
    """Fail before any work when a hub dataset cannot be reached (e.g. offline)."""
    name, split, config = hub_spec(spec)
    try:
        import datasets

        datasets.load_dataset_builder(name, config)
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same clear message
        raise hub_error(name, split, e) from None


def plan_source(s) -> tuple[object, list[str], object]:
    """Check a source before any work: files exist, columns/file names fit. -> (adapter, files, s)."""
    adapter = adapter_for(s)
    paths = [s.path] if isinstance(s.path, str) else s.path
    if any(is_hub(p) for p in paths):
        if len(paths) != 1:
            raise InputError(f"source {s.name!r}: a hub dataset cannot be mixed with other paths")
        _check_hub(paths[0])
        return adapter, [], s
    try:
        files = resolve_files(s.path)
    except InputError as e:
        raise InputError(f"source {s.name!r}: {e}") from None
    real = [os.path.realpath(f) for f in files]
    twice = next((f for f, r in zip(files, real) if real.count(r) > 1), None)
    if twice is not None:  # its records would be converted twice
        raise InputError(f"source {s.name!r}: the path names {twice} more than once (overlapping globs "
                         "or folders?); list every file once")
    for file in files:
        if is_csv(file):  # every csv / tsv: a header that is not UTF-8 or names a column twice
            try:
                table_columns(file)
            except InputError as e:
                raise InputError(f"source {s.name!r}: {e}") from None
    for check in ("check_files", "check_columns"):
        fn = getattr(adapter, check, None)
        if fn is not None:
            try:
                fn(files) if check == "check_files" else fn(s, files)
            except InputError as e:
                raise InputError(f"source {s.name!r}: {e}") from None
    if hasattr(adapter, "resolve"):
        first = peek_record(files)
        if first is not None and first.get("text") is not None:
            s = adapter.resolve(s, first["text"])
    return adapter, files, s


def check_counts(planned: list, counts: dict) -> None:
    """Each adapter's ``check_counts`` on its source's counts; one InputError naming every
    source that fails (e.g. a label that occurs on none of its messages)."""
    errors = []
    for adapter, _, s in planned:
        check = getattr(adapter, "check_counts", None)
        if check is None:
            continue
        try:
            check(s, counts[s.name])
        except InputError as e:
            errors.append(str(e))
    if errors:
        raise InputError("\n".join(errors))


class CountMismatch(ValueError):
    """The outputs do not account for every input record: a bug, never committed."""


def count_input(adapter, files: list[str], s) -> dict[str, int]:
    """{file: input records}, read apart from the conversion (``readers.count_records``, with
    the adapter's ``count_records`` when one record can hold several, e.g. an OASST tree line)."""
    units = getattr(adapter, "count_records", None)
    lines_only = getattr(adapter, "one_record_per_line", lambda s: False)(s)
    units = functools.partial(units, s=s) if units and not lines_only else None
    if files:
        return {f: count_records(f, s.limit, units) for f in files}
    spec = s.path if isinstance(s.path, str) else s.path[0]
    return {spec: _hub_count(spec, s.limit, units)}


def _hub_count(spec: str, limit: int | None, units) -> int:
    import datasets

    from hetray.unify.sources.readers import _clean

    name, split, config = hub_spec(spec)
    hf = datasets.load_dataset(name, config, split=split)  # the stage's own load: cached
    n = len(hf) if limit is None else min(limit, len(hf))
    return n if units is None else sum(units(_clean(row)) for row in hf.select(range(n)))


def check_input_counts(planned: list, counts: dict) -> None:
    """Raise CountMismatch naming every source whose input records (counted apart from the
    conversion) differ from ``used + rejected`` (counted from the outputs)."""
    errors = []
    for adapter, _, s in planned:
        c = counts[s.name]
        out = c["used"] + c["rejected"]
        if c["input"] != out:
            files = ", ".join(f"{os.path.basename(f)}: {n:,}" for f, n in list(c["files"].items())[:5])
            more = f", ... ({len(c['files'])} files)" if len(c["files"]) > 5 else ""
            errors.append(
                f"source {s.name!r}: {c['input']:,} input records in its files ({files}{more}), but the "
                f"outputs account for {out:,} ({c['used']:,} used in pairs or SFT rows + {c['rejected']:,} "
                f"rejected)"
            )
    if errors:
        raise CountMismatch(
            "convert: records were lost or counted twice, so nothing was written. This is a bug in "
            "hetray (a reader or an adapter); please report it with the input.\n" + "\n".join(errors)
        )


# ---------------------------------------------------------------------------- entry point

# Ray Data blocks of the stage: a read task joins the reader's ~4 MiB pieces into blocks of up to
# this size, and a parse call gets one block. With Ray's default, 128 MiB, a worker's memory grew
# with the input files (a 52 MiB file is one block, a 520 MiB file 128 MiB ones). Measured on 2
# cores, 8 files of HH rows, peak PSS of the process tree: 3M rows 2402 MiB at 128 MiB, 2106 at
# 32, 1781 at 8 (1M rows: 1680 at 32, 1472 at 8); but 8 MiB blocks slowed the OASST shuffle from
# 29.4 s to 46.9 s at 3M messages (more, smaller sort tasks) for no less memory. Hence 32 MiB.
BLOCK_BYTES = 32 << 20


def run_convert(cfg: JobConfig, force: bool = False) -> dict:
    """Convert every source of ``cfg`` into ``cfg.run_dir``. Returns the manifest."""
    planned = [plan_source(s) for s in cfg.convert.sources]  # every check before any work
    stage = Stage(
        "convert", cfg.run_dir, outputs=tuple(OUTPUTS),
        config={"seed": cfg.seed, "convert": cfg.convert.model_dump(mode="json")},
        inputs=[f for _, files, s in planned for f in (files or [s.path if isinstance(s.path, str) else s.path[0]])],
    )

    def work(tmp: Path) -> dict:
        require_ray("convert")
        sink = SplitParquetSink(str(tmp))
        # input records are counted (in a thread) while Ray converts
        with block_size(BLOCK_BYTES), ThreadPoolExecutor(1) as pool:
            counting = {s.name: pool.submit(count_input, adapter, files, s) for adapter, files, s in planned}
            scratch = tmp / "shuffle"  # the on-disk shuffles' map files: never part of the output
            try:
                duplicates = find_duplicates(planned, cfg.convert.batch_size, str(scratch),
                                             cfg.convert.shuffle_partitions)
                tasks, rest = by_file(planned, cfg.convert)
                typed, rest = on_disk(rest, cfg.convert)
                for folder in OUTPUTS:
                    (tmp / folder).mkdir(parents=True, exist_ok=True)
                refs = run_file_tasks(str(tmp), tasks, cfg.convert.batch_size, duplicates)
                refs += run_disk_shuffles(str(tmp), str(scratch), typed, cfg.convert.batch_size,
                                          cfg.convert.shuffle_partitions)
                if rest:
                    ds = build_dataset(rest, cfg.convert.batch_size, cfg.convert.shuffle_partitions, duplicates)
                    if cfg.convert.num_output_files:
                        ds = ds.repartition(cfg.convert.num_output_files)
                    ds.write_datasink(sink)
                _merge(sink.counts, wait_file_tasks(refs))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            inputs = {name: f.result() for name, f in counting.items()}
        for folder, schema in OUTPUTS.items():  # readers (datasets too) always find a schema, even for 0 rows
            if not any((tmp / folder).glob("*.parquet")):
                write_empty(tmp / folder / "train-empty.parquet", schema)
        counts = {}
        for _, _, s in planned:
            c = counts[s.name] = sink.counts.get(s.name, _empty_counts())
            c["input"], c["files"] = sum(inputs[s.name].values()), inputs[s.name]
        check_counts(planned, counts)
        check_input_counts(planned, counts)
        totals = {k: sum(c[k] for c in counts.values()) for k in ("pairs", "sft", "used", "rejected")}
        write_convert_cards(tmp, cfg, counts, OUTPUTS)
        return {"counts": counts, "totals": totals}

    return run_stage(stage, work, force=force)
