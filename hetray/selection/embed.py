"""Stage 2, embed: every distinct prompt of ``preferences/`` -> one sentence-transformer vector.

``run_embed(cfg)`` reads the ``prompt`` column of ``<run_dir>/preferences/`` and writes::

    embeddings/   one row per distinct prompt (``embedding_schema(dim)``: prompt_id, prompt,
                  L2-normalised float32 vector), + manifest.json: model, dim, counts, wall time
                  and the stage's phases (``timings``)

The pipeline is ``read_parquet -> prompt_id (map_batches) -> groupby(prompt_id) -> embed
(actor pool) -> write_parquet``. Identical prompts (a prompt with several reply pairs) meet in
Ray's hash shuffle and are embedded once; the driver never holds the prompts. The model is
loaded once per actor (``Embedder.__init__``); each actor asks for a GPU when the cluster has
them (``num_gpus_per_actor: auto``) and otherwise runs torch with one thread per reserved CPU.

Speed and reproducibility:

* **One actor call embeds one dedupe partition** (``plan_partitions``: at least two per actor,
  each small enough that Ray's shuffle hands it over as one block). The actor puts the partition
  in prompt-id order (whatever order Ray delivered it in), then cuts encode batches from it
  longest first **by token count** (``token_order``). ``SentenceTransformer.encode`` sorts by
  characters, which on 10-40-word prompts still pads batches to 1.18x the real tokens; token
  order within a 10,000-prompt partition pads 1.02x. And since a partition is the same set of
  prompts on every run, the vectors are the same bytes on every run and every Ray layout (for
  the same model, batch size, actor count, device and torch threads).
* **Timings**: each actor appends its model load and its calls (prompts, seconds, seconds inside
  ``encode``) to a file in the stage's temporary folder; ``phases`` turns them into the
  manifest's ``timings``: actor start-up, model load, waiting for the dedupe, embedding (and the
  steady-state prompts/s), the write at the end. ``benchmarks/bench_embed.py`` sets them
  against a plain ``encode``.
* **Ray's restart notice**: Ray Core 2.60 prints "Actor ... has constructor arguments in the
  object store and max_restarts > 0 ..." (ray-project/ray#53727) from C++ straight to the
  driver's stderr for every Ray Data actor pool: Ray Data passes each pool actor two object refs
  of its own (the operator's ``MapTransformer`` and ``DataContext``, put in the object store by
  the operator), whatever ``fn_constructor_kwargs`` hold, so no argument size avoids it. Here it
  is a false alarm: the operator holds both refs until the dataset is done, and a killed actor
  is restarted and its call retried (``tests/selection/test_embed_restart.py``). Turning restarts
  off (``max_restarts=0``) silences it but makes one lost actor fail the whole stage, so the
  stage keeps Ray Data's restarts and, while its dataset runs, keeps that one line off the
  terminal instead (``ray_notice_to_log``): Ray's session log (``python-core-driver-*.log``)
  still has it, and hetray's log file says it was held back.

The stage runner (``hetray.stage``) skips it when the model and the prompts are unchanged: the
stored vectors are re-used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hetray.config import JobConfig
from hetray.schema import embedding_schema, prompt_id
from hetray.stage import Stage, require_ray, run_stage

log = logging.getLogger(__name__)

ROWS_PER_FILE = 100_000  # ~150 MB of 384-d vectors per output file
PROMPTS_PER_PARTITION = 1_000_000  # dedupe shuffle: at least one partition per this many prompts
CALLS_PER_ACTOR = 2  # at least this many partitions (actor calls) per actor: every actor has work
# and the first starts before the last partition is reduced; fewer, larger partitions pad less
# (token order within 5,000 random prompts of 10-40 words pads 1.04x, within 10,000 1.02x)
BATCHES_PER_YIELD = 16  # an actor call hands its vectors on every this many encode batches
TOKENIZE_CHUNK = 10_000  # prompts tokenised at once to count tokens (bounds the id lists' memory)
RAY_NOTICE = b"has constructor arguments in the object store"  # ray-project/ray#53727


# ---------------------------------------------------------------------------- pure batch logic


def add_prompt_id(batch: pa.Table) -> pa.Table:
    """A batch with a ``prompt`` column -> ``prompt_id, prompt``."""
    column = batch.column("prompt")
    ids = pa.array([prompt_id(p) for p in column.to_pylist()], pa.string())
    return pa.table({"prompt_id": ids, "prompt": column.cast(pa.string())})  # the texts as they came


def to_embedding_table(ids: pa.ChunkedArray, prompts: pa.ChunkedArray, vectors: np.ndarray) -> pa.Table:
    """prompt ids, prompts and an (n, dim) array -> an ``embedding_schema(dim)`` table."""
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.Table.from_arrays(
        [ids.combine_chunks().cast(pa.string()), prompts.combine_chunks().cast(pa.string()),
         pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=embedding_schema(dim),
    )


def token_order(tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """Positions of ``prompts``, most tokens first (as the model sees them: special tokens,
    truncated to ``max_length``); equal counts keep their order."""
    counts = [
        tokenizer(prompts[i:i + TOKENIZE_CHUNK], truncation=True, max_length=max_length,
                  return_length=True, return_attention_mask=False, return_token_type_ids=False)["length"]
        for i in range(0, len(prompts), TOKENIZE_CHUNK)
    ]
    lengths = np.concatenate([np.asarray(c, np.int64) for c in counts]) if counts else np.zeros(0, np.int64)
    return np.argsort(-lengths, kind="stable")


class Embedder:
    """The ``map_batches`` model: loads the sentence transformer once per actor; each call
    embeds one dedupe partition, in batches of ``batch_size`` prompts of equal token counts."""

    def __init__(self, model: str, device: str, threads: int, batch_size: int, timings: str | None = None):
        started = time.time()
        import torch

        from hetray.models import load_embedder

        if device == "cpu":  # one torch thread per reserved CPU: actors must not oversubscribe
            torch.set_num_threads(threads)
        self.model = load_embedder(model, device=device)
        self.batch_size = batch_size
        self.timings = None
        if timings:  # one file per actor (and per restart): no two writers share one
            self.timings = Path(timings) / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self._record({"load": [started, time.time()]})

    def __call__(self, batch: pa.Table):
        started, encoding = time.time(), 0.0
        batch = batch.sort_by("prompt_id")  # the same partition, the same batches: the same bytes
        prompts = batch.column("prompt").to_pylist()
        order = token_order(self.model.tokenizer, prompts, self.model.max_seq_length)
        step = self.batch_size * BATCHES_PER_YIELD
        for lo in range(0, len(order), step):
            rows = order[lo:lo + step]
            t = time.perf_counter()
            vectors = np.concatenate([
                self.model.encode([prompts[i] for i in rows[k:k + self.batch_size]], batch_size=self.batch_size,
                                  normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
                for k in range(0, len(rows), self.batch_size)
            ])
            encoding += time.perf_counter() - t
            yield to_embedding_table(batch.column("prompt_id").take(rows), batch.column("prompt").take(rows), vectors)
        self._record({"call": [started, time.time()], "prompts": len(prompts), "encode_s": encoding})

    def _record(self, entry: dict) -> None:
        if self.timings is None:
            return
        try:
            with open(self.timings, "a") as f:
                f.write(json.dumps({"actor": self.timings.stem, **entry}) + "\n")
        except OSError as e:  # timings are a report: never fail the stage for them
            log.warning("embed: cannot record timings in %s (%s); the manifest will lack them", self.timings, e)
            self.timings = None


def phases(folder: Path, started: float, ended: float, actors: int) -> dict:
    """The actors' timing files -> the stage's phases, in seconds, for a dataset whose execution
    ran from ``started`` to ``ended`` on ``actors`` actors.

    ``actor_start_s``: until the first actor runs the model's constructor (Ray lease, worker
    process, Ray Data set-up); ``model_load_s``: the slowest actor's imports + model load;
    ``wait_for_dedupe_s``: the first loaded actor idle until its first partition arrived (0 when
    the model load hid the dedupe shuffle); ``calls_s``: seconds in calls per actor, of which
    ``encode_s`` inside ``encode`` (the rest: token counts, Arrow in and out);
    ``steady_prompts_per_s``: the prompts all actors embed per second of their calls;
    ``write_tail_s``: after the last call, until the last file is written."""
    loads, calls = [], []
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            entry = json.loads(line)
            (loads if "load" in entry else calls).append(entry)
    if not loads or not calls:
        return {"wall_s": round(ended - started, 2)}
    busy = sum(c["call"][1] - c["call"][0] for c in calls)
    return {
        "wall_s": round(ended - started, 2),
        "actor_start_s": round(min(e["load"][0] for e in loads) - started, 2),
        "model_load_s": round(max(e["load"][1] - e["load"][0] for e in loads), 2),
        "wait_for_dedupe_s": round(max(0.0, min(c["call"][0] for c in calls) - min(e["load"][1] for e in loads)), 2),
        "calls_s": round(busy / actors, 2),
        "encode_s": round(sum(c["encode_s"] for c in calls) / actors, 2),
        "steady_prompts_per_s": round(sum(c["prompts"] for c in calls) / max(busy, 1e-9) * actors, 1),
        "write_tail_s": round(ended - max(c["call"][1] for c in calls), 2),
        "calls": len(calls),
        "actor_starts": len(loads),  # a restarted actor counts again
    }


@contextlib.contextmanager
def ray_notice_to_log():
    """Meanwhile, the lines written to the process's stderr (file descriptor 2, where Ray's C++
    logs go) that carry Ray's restart notice go to the log instead; everything else passes on
    as it comes. A no-op where stderr has no file descriptor."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward():
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for chunk in iter(lambda: pipe.read(1 << 16), b""):
                lines = chunk.splitlines(keepends=True)
                kept = b"".join(line for line in lines if RAY_NOTICE not in line)
                if len(kept) < len(chunk):  # not the line itself: with -v this goes to stderr too
                    log.debug("ray: its actor-restart notice (ray-project/ray#53727) is a false alarm for "
                              "Ray Data's actor pools: see hetray.selection.embed; it is in Ray's session log")
                with contextlib.suppress(OSError):
                    if kept:
                        os.write(saved, kept)

    thread = threading.Thread(target=forward, name="hetray-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread reads to the end, stops
        thread.join(timeout=5)
        if not thread.is_alive():  # else a child holds the pipe open: leave it the descriptor
            os.close(saved)


# ---------------------------------------------------------------------------- planning


def preference_files(run_dir: Path) -> tuple[list[str], int, int]:
    """The Parquet files of ``preferences/``, their rows and the bytes of their ``prompt``
    column uncompressed (from the footers; duplicates counted)."""
    folder = run_dir / "preferences"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: run `hetray convert` first")
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    n_rows = text_bytes = 0
    for f in files:
        meta = pq.read_metadata(f)
        n_rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            text_bytes += sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                              if group.column(c).path_in_schema == "prompt")
    if n_rows == 0:
        raise ValueError(f"no prompts to embed: {folder} holds no preference pairs")
    return files, n_rows, text_bytes


def actor_resources(e) -> tuple[float, str, int]:
    """-> (GPUs per actor, torch device, torch threads) from the embed config and the cluster."""
    import ray

    cluster = ray.cluster_resources()
    spare = cluster.get("CPU", 0) - e.num_actors * e.num_cpus_per_actor
    if spare < 1:  # the read, shuffle and write tasks would wait for the actors forever
        raise ValueError(
            f"embed: {e.num_actors} actor(s) x {e.num_cpus_per_actor:g} CPU leave {spare:g} of the "
            f"cluster's {cluster.get('CPU', 0):g} CPUs for reading and writing (need 1): lower "
            "embed.num_actors or embed.num_cpus_per_actor"
        )
    gpus = e.num_gpus_per_actor
    if gpus == "auto":
        gpus = 1 if cluster.get("GPU", 0) > 0 else 0
    return float(gpus), "cuda" if gpus > 0 else "cpu", max(1, math.ceil(e.num_cpus_per_actor))


def plan_partitions(n_prompts: int, text_bytes: int, e, block_bytes: int | None) -> int:
    """Dedupe partitions (= actor calls) for ``n_prompts`` prompts of ``text_bytes`` bytes.

    At least ``CALLS_PER_ACTOR`` per actor; at most ``PROMPTS_PER_PARTITION`` prompts each; and
    each at most half of Ray Data's block size (``block_bytes``; prompt ids add ~24 B a row), so
    that the shuffle emits every partition as one block: one call, one fixed set of prompts."""
    by_bytes = math.ceil((text_bytes + 24 * n_prompts) / (block_bytes / 2)) if block_bytes else 1
    return max(CALLS_PER_ACTOR * e.num_actors, math.ceil(n_prompts / PROMPTS_PER_PARTITION), by_bytes)


def distinct_prompts(files: list[str], partitions: int):
    """The distinct prompts of ``files``: a Ray Dataset of ``prompt_id, prompt`` in ``partitions``
    hash partitions (one block each when they fit Ray Data's block size)."""
    import ray
    from ray.data.aggregate import Min

    return (
        ray.data.read_parquet(files).select_columns(["prompt"])
        .map_batches(add_prompt_id, batch_format="pyarrow")
        .groupby("prompt_id", num_partitions=partitions)
        .aggregate(Min("prompt", alias_name="prompt"))  # one id, one text: min is "the first"
    )


def build_dataset(files: list[str], partitions: int, e, gpus: float, device: str, threads: int,
                  timings: Path | None = None):
    import ray

    return distinct_prompts(files, partitions).map_batches(
        Embedder,
        fn_constructor_kwargs={"model": e.model, "device": device, "threads": threads,
                               "batch_size": e.batch_size, "timings": str(timings) if timings else None},
        batch_size=None,  # one call per partition (block)
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=e.num_actors),
        num_cpus=e.num_cpus_per_actor,
        num_gpus=gpus,
    )


# ---------------------------------------------------------------------------- entry point


def embed_stage(cfg: JobConfig) -> Stage:
    """The stage as the runner sees it: only the model and the prompts enter its key."""
    run_dir = Path(cfg.run_dir)
    return Stage("embed", run_dir, outputs=("embeddings",), config={"model": cfg.embed.model},
                 inputs=[run_dir / "preferences"])


def run_embed(cfg: JobConfig, force: bool = False) -> dict:
    """Embed every distinct prompt of ``cfg.run_dir``'s preferences. Returns the manifest.

    Only the model enters the key: batch size, actor count and devices change how fast the
    vectors come, and their last bits, not what they are, so Tune trials and re-runs with other
    resources reuse them.
    """
    from hetray.models import check_model, resolve_embedder

    run_dir = Path(cfg.run_dir)
    files, n_prompts, text_bytes = preference_files(run_dir)  # every check before any work
    stage = embed_stage(cfg)

    def work(tmp: Path) -> dict:
        require_ray("embed")
        check_model(cfg.embed.model)  # a wrong name fails here, not in every actor
        from ray.data import DataContext

        gpus, device, threads = actor_resources(cfg.embed)
        partitions = plan_partitions(n_prompts, text_bytes, cfg.embed, DataContext.get_current().target_max_block_size)
        out, timings = tmp / "embeddings", tmp / "timings"
        timings.mkdir()
        started = time.time()
        with ray_notice_to_log():
            build_dataset(files, partitions, cfg.embed, gpus, device, threads, timings).write_parquet(
                str(out), min_rows_per_file=ROWS_PER_FILE, use_dictionary=False)  # distinct texts, floats
        phase = phases(timings, started, time.time(), cfg.embed.num_actors)
        for f in timings.iterdir():
            f.unlink()
        timings.rmdir()
        written = sorted(out.glob("*.parquet"))
        n_distinct = sum(pq.read_metadata(f).num_rows for f in written)
        wall = phase["wall_s"]
        log.info("embed: %d distinct of %d prompts in %.1fs (%.1f prompts/s, %s, %d actor(s)); model load %s s, "
                 "embedding %s s (%s prompts/s)", n_distinct, n_prompts, wall, n_distinct / max(wall, 1e-9), device,
                 cfg.embed.num_actors, phase.get("model_load_s"), phase.get("calls_s"),
                 phase.get("steady_prompts_per_s"))
        return {"settings": cfg.embed.model_dump(mode="json"), "model_path": resolve_embedder(cfg.embed.model),
                "device": device, "dim": pq.read_schema(written[0]).field("vector").type.list_size,
                "prompts": n_prompts, "distinct_prompts": n_distinct, "partitions": partitions,
                "prompts_per_s": round(n_distinct / max(wall, 1e-9), 1), "timings": phase}

    return run_stage(stage, work, force=force)
