"""The one place that defines hetray's data formats (pyarrow schemas).

Every stage reads and writes these, and nothing else:

* ``PREFERENCE_SCHEMA``: the unified binary-preference format, one row per
  ``(prompt, chosen, rejected)`` pair. ``quality`` is the absolute gap between the chosen and the
  rejected label value (paper A.2); it is null for sources with no ordered score (WinoGrande).
  This is what the reward model, PPO/RLOO and DPO train on, and what SFT trains on (prompt +
  chosen).
* ``SFT_SCHEMA``: a prompt with a single reference answer. It feeds SFT but never the reward
  model, so it is a separate table in a separate folder (``sft_only/``).
* ``REJECT_SCHEMA``: every input record that did not become a pair or an SFT row, with where it
  came from and why. Nothing is dropped silently.

The adapters in ``hetray.unify.sources`` produce plain dicts; ``OUTPUT_SCHEMA`` is the union that
travels through Ray Data before the writer splits it into the three tables by ``kind``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PAIR, SFT, REJECT = "pair", "sft", "reject"

PREFERENCE_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),  # stable hash of provenance
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # the configured source name
        pa.field("quality", pa.float64()),  # |chosen_score - rejected_score|; null: unscored
        pa.field("chosen_score", pa.float64()),
        pa.field("rejected_score", pa.float64()),
        pa.field("label", pa.string()),  # which label gave the scores (toxicity, rank, ...)
        pa.field("provenance", pa.list_(pa.string()), nullable=False),  # ids of input records
    ]
)

SFT_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("provenance", pa.list_(pa.string()), nullable=False),
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("line", pa.int64(), nullable=False),  # 1-based line, or row number in a table
        pa.field("record_id", pa.string(), nullable=False),  # e.g. an OASST message id
        pa.field("reason", pa.string(), nullable=False),  # a short code, e.g. "tie"
        pa.field("detail", pa.string()),  # human-readable: field name, value excerpt, ...
    ]
)

# The union that flows through Ray Data; ``kind`` says which table a row belongs to.
OUTPUT_SCHEMA = pa.schema(
    [pa.field("kind", pa.string(), nullable=False)]
    + [f.with_nullable(True) for f in PREFERENCE_SCHEMA]
    + [pa.field("response", pa.string())]
    + [
        f.with_nullable(True)
        for f in REJECT_SCHEMA
        if f.name not in PREFERENCE_SCHEMA.names
    ]
)

# What readers hand to adapters: one input record each (a line, or a table row as JSON).
RAW_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("line", pa.int64(), nullable=False),
        pa.field("text", pa.string()),  # null when the bytes are not valid UTF-8
        pa.field("error", pa.string()),  # reader-level problem (e.g. "invalid_utf8")
    ]
)

# What flows between the parse and the combine step of a grouped adapter: OUTPUT_SCHEMA plus
# the group key and the adapter's own item payload (pickled: it never leaves the stage).
# ``kind`` is "item" for those rows.
ITEM = "item"
FLOW_SCHEMA = OUTPUT_SCHEMA.append(pa.field("group", pa.string())).append(
    pa.field("data", pa.binary())
)


def make_id(*parts: str) -> str:
    """A short stable id (16 hex chars of sha1) for a tuple of strings."""
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def pair(
    source: str,
    prompt: str,
    chosen: str,
    rejected: str,
    provenance: list[str],
    *,
    quality: float | None = None,
    chosen_score: float | None = None,
    rejected_score: float | None = None,
    label: str | None = None,
) -> dict:
    """One row of the unified preference format (as an OUTPUT_SCHEMA dict)."""
    return {
        "kind": PAIR,
        "pair_id": make_id(source, *provenance),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "quality": quality,
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
        "label": label,
        "provenance": list(provenance),
    }


def sft_row(source: str, prompt: str, response: str, provenance: list[str]) -> dict:
    """One SFT-only row: a prompt with a single reference answer."""
    return {
        "kind": SFT,
        "pair_id": make_id(source, *provenance),
        "prompt": prompt,
        "response": response,
        "source": source,
        "provenance": list(provenance),
    }


def reject(
    source: str, file: str, line: int, record_id: str, reason: str, detail: str | None = None
) -> dict:
    """One reject: an input record that produced nothing, and why."""
    if detail is not None and len(detail) > 500:
        detail = detail[:500] + "..."
    return {
        "kind": REJECT,
        "source": source,
        "file": file,
        "line": int(line),
        "record_id": record_id,
        "reason": reason,
        "detail": detail,
    }


def record_id(file: str, line: int) -> str:
    """The id of an input record that has no id of its own: ``file:line``."""
    return f"{file}:{line}"


def item(group: str, file: str, line: int, record_id: str, data: dict) -> dict:
    """A piece of a group (e.g. one OASST message of a tree) waiting for its siblings.

    ``data`` is the adapter's own payload: plain Python values (it is pickled for the shuffle).
    """
    return {
        "kind": ITEM,
        "group": group,
        "file": file,
        "line": int(line),
        "record_id": record_id,
        "data": data,
    }


def split_output(table: pa.Table) -> tuple[pa.Table, pa.Table, pa.Table]:
    """An OUTPUT_SCHEMA table -> (preferences, sft_only, rejects), each in its own schema."""
    import pyarrow.compute as pc

    out = []
    for kind, schema in ((PAIR, PREFERENCE_SCHEMA), (SFT, SFT_SCHEMA), (REJECT, REJECT_SCHEMA)):
        part = table.filter(pc.equal(table["kind"], kind)).select(schema.names)
        out.append(part.cast(schema))
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------- selection stages

def embedding_schema(dim: int) -> pa.Schema:
    """``embeddings/``: one row per distinct prompt; ``vector`` is L2-normalised float32."""
    return pa.schema(
        [
            pa.field("prompt_id", pa.string(), nullable=False),  # make_id(prompt)
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


# ``clusters/assignments``: the cluster of every prompt and its squared distance to the centroid.
ASSIGNMENT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("distance", pa.float32(), nullable=False),
    ]
)


def prompt_id(prompt: str) -> str:
    """The id of a prompt's text: identical prompts share it (and are embedded once)."""
    return make_id(prompt)


# ---------------------------------------------------------------------------- reading a folder


def parquet_files(path: str | os.PathLike) -> list[str]:
    """The Parquet files of a stage folder (recursively), or the file itself."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    return sorted(str(p) for p in path.rglob("*.parquet"))


def read_table(folder: str | os.PathLike, columns: list[str]) -> pa.Table:
    """Some columns of every Parquet file in ``folder`` (empty string columns when none)."""
    files = parquet_files(folder)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
