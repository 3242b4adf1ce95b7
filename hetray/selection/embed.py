"""Stage 2, embed: every distinct prompt of ``preferences/`` -> one sentence-transformer vector.

``run_embed(cfg)`` reads the ``prompt`` column of ``<run_dir>/preferences/`` and writes::

    embeddings/   one row per distinct prompt (``embedding_schema(dim)``: prompt_id, prompt,
                  L2-normalised float32 vector), + manifest.json: model, dim, counts, wall time

The pipeline is ``read_parquet -> prompt_id (map_batches) -> groupby(prompt_id) -> embed
(actor pool) -> write_parquet``. Identical prompts (a prompt with several reply pairs) meet in
Ray's hash shuffle and are embedded once; the driver never holds the prompts. The model is
loaded once per actor (``Embedder.__init__``); each actor asks for a GPU when the cluster has
them (``num_gpus_per_actor: auto``) and otherwise runs torch with one thread per reserved CPU.
An actor call holds up to 16 encode batches, which ``encode`` sorts by length: short prompts
are not padded to the length of long ones (``plan_calls``).

The stage runner (``hetray.stage``) skips it when the model and the prompts are unchanged: the
stored vectors are re-used.
"""

from __future__ import annotations

import logging
import math
import time
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
CALLS_PER_ACTOR = 4  # at least this many blocks (actor calls) per actor: every actor has work
# At most this many encode batches per actor call. encode() sorts a call's prompts by length
# before it cuts them into batches, so a wide call pads less: for prompts of 10-40 words,
# batches of 256 drawn at random hold 1.6x the real tokens, cut from 2500 sorted ones 1.07x.
BATCHES_PER_CALL = 16


# ---------------------------------------------------------------------------- pure batch logic


def add_prompt_id(batch: pa.Table) -> pa.Table:
    """A batch with a ``prompt`` column -> ``prompt_id, prompt``."""
    prompts = batch.column("prompt").to_pylist()
    ids = pa.array([prompt_id(p) for p in prompts], pa.string())
    return pa.table({"prompt_id": ids, "prompt": pa.array(prompts, pa.string())})


def to_embedding_table(ids: pa.ChunkedArray, prompts: pa.ChunkedArray, vectors: np.ndarray) -> pa.Table:
    """prompt ids, prompts and an (n, dim) array -> an ``embedding_schema(dim)`` table."""
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return pa.Table.from_arrays(
        [ids.combine_chunks().cast(pa.string()), prompts.combine_chunks().cast(pa.string()),
         pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=embedding_schema(dim),
    )


class Embedder:
    """The ``map_batches`` model: loads the sentence transformer once per actor."""

    def __init__(self, model: str, device: str, threads: int, batch_size: int):
        import torch

        from hetray.models import load_embedder

        if device == "cpu":  # one torch thread per reserved CPU: actors must not oversubscribe
            torch.set_num_threads(threads)
        self.model = load_embedder(model, device=device)
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.model.encode(
            batch.column("prompt").to_pylist(),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return to_embedding_table(batch.column("prompt_id"), batch.column("prompt"), vectors)


# ---------------------------------------------------------------------------- planning


def preference_files(run_dir: Path) -> tuple[list[str], int]:
    """The Parquet files of ``preferences/`` and their number of rows (from the footers)."""
    folder = run_dir / "preferences"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: run `hetray convert` first")
    files = sorted(str(p) for p in folder.glob("*.parquet"))
    n_rows = sum(pq.read_metadata(f).num_rows for f in files)
    if n_rows == 0:
        raise ValueError(f"no prompts to embed: {folder} holds no preference pairs")
    return files, n_rows


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


def plan_calls(n_prompts: int, e) -> tuple[int, int]:
    """-> (dedupe shuffle partitions, prompts per actor call) for ``n_prompts`` prompts."""
    calls = CALLS_PER_ACTOR * e.num_actors
    partitions = max(math.ceil(n_prompts / PROMPTS_PER_PARTITION), calls)
    per_call = min(e.batch_size * BATCHES_PER_CALL, max(e.batch_size, math.ceil(n_prompts / calls)))
    return partitions, per_call


def build_dataset(files: list[str], n_prompts: int, e, gpus: float, device: str, threads: int):
    import ray
    from ray.data.aggregate import Min

    partitions, per_call = plan_calls(n_prompts, e)
    distinct = (
        ray.data.read_parquet(files).select_columns(["prompt"])
        .map_batches(add_prompt_id, batch_format="pyarrow")
        .groupby("prompt_id", num_partitions=partitions)
        .aggregate(Min("prompt", alias_name="prompt"))  # one id, one text: min is "the first"
    )
    return distinct.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model": e.model, "device": device, "threads": threads, "batch_size": e.batch_size
        },
        batch_size=per_call,
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
    vectors come, not what they are, so Tune trials and re-runs with other resources reuse them.
    """
    from hetray.models import check_model, resolve_embedder

    run_dir = Path(cfg.run_dir)
    files, n_prompts = preference_files(run_dir)  # every check before any work
    stage = embed_stage(cfg)

    def work(tmp: Path) -> dict:
        require_ray("embed")
        check_model(cfg.embed.model)  # a wrong name fails here, not in every actor
        started = time.time()
        gpus, device, threads = actor_resources(cfg.embed)
        out = tmp / "embeddings"
        build_dataset(files, n_prompts, cfg.embed, gpus, device, threads).write_parquet(
            str(out), min_rows_per_file=ROWS_PER_FILE)
        written = sorted(out.glob("*.parquet"))
        n_distinct = sum(pq.read_metadata(f).num_rows for f in written)
        wall = time.time() - started
        log.info("embed: %d distinct of %d prompts in %.1fs (%.1f prompts/s, %s, %d actor(s))",
                 n_distinct, n_prompts, wall, n_distinct / max(wall, 1e-9), device, cfg.embed.num_actors)
        return {"settings": cfg.embed.model_dump(mode="json"), "model_path": resolve_embedder(cfg.embed.model),
                "device": device, "dim": pq.read_schema(written[0]).field("vector").type.list_size,
                "prompts": n_prompts, "distinct_prompts": n_distinct,
                "prompts_per_s": round(n_distinct / max(wall, 1e-9), 1)}

    return run_stage(stage, work, force=force)
