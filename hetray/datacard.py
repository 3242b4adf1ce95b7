"""What makes a data folder of a run a Hugging Face dataset: its card, and empty splits that load.

``convert`` writes a card into ``preferences/`` and ``sft_only/``, ``select`` one into
``selected/``: a ``README.md`` whose YAML header is the hub's dataset-card metadata and whose
body says where the rows came from. The header's ``configs`` names the data files per split,
so ``datasets.load_dataset("<run>/selected")`` (a local folder, or the folder pushed to the hub)
reads exactly the Parquet files and nothing else of the folder (``manifest.json``); the hub's
viewer does the same. ``datasets``' Parquet builder ignores ``README.md`` by name, so
``load_dataset("parquet", data_files=...)`` is unaffected.

The body: the sources with their counts (input records, pairs, SFT-only rows, rejected), the
rejects by reason, and for ``selected/`` the selection settings (``n_clusters``, ``fraction``,
each source's quality label, seed, ...) and each source's kept share. Every number is the one
the stage's manifest holds (``counts`` of convert, ``cells`` of select), and nothing on the card
lies outside the stage's key (no job name, no date): the same inputs and settings give the same card.

An empty split is a Parquet file with the full schema and no row group (``write_empty``):
``datasets`` reads a file with one empty row group as a batch of size 0 and fails, while a file
without row groups gives the schema. ``datasets`` (5.2) still refuses to *materialise* a split of
0 rows (``load_dataset(...)`` raises "Instruction 'train' corresponds to no data!"; upstream
huggingface/datasets#8401); ``load_dataset(..., streaming=True)`` gives the empty split with its
columns.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

CARD = "README.md"
DATA_FILES = "*.parquet"  # every data file of a stage folder; the manifest and the card are not
TAGS = ["hetray", "preference"]


def write_empty(path: str | Path, schema: pa.Schema) -> None:
    """A Parquet file of ``schema`` with no rows and no row group (``datasets`` reads it)."""
    pq.ParquetWriter(str(path), schema).close()


def size_category(n: int) -> str:
    """The hub's ``size_categories`` value for ``n`` rows."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    return next((label for bound, label in bounds if n < bound), "n>1B")


def metadata(pretty_name: str, rows: int, tags: list[str]) -> dict:
    """The card's YAML header."""
    return {
        "pretty_name": pretty_name,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
        "task_categories": ["text-generation"],
        "tags": tags,
        "size_categories": [size_category(rows)],
    }


def render(meta: dict, body: list[str]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body) + "\n"


def read_metadata(folder: str | Path) -> dict:
    """The YAML header of ``folder``'s card (what the hub and ``load_dataset`` read)."""
    text = (Path(folder) / CARD).read_text()
    if not text.startswith("---\n"):
        raise ValueError(f"{Path(folder) / CARD} has no YAML header")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])


def _load_hint(folder: str) -> list[str]:
    return ["```python", "from datasets import load_dataset", "",
            f'ds = load_dataset("path/to/run/{folder}")  # this card\'s configs: only the Parquet files', "```", ""]


def _table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def _label(s) -> str:
    return getattr(s, "label", None) or "–"


def _columns(schema: pa.Schema) -> list[str]:
    return ["## Columns", ""] + [f"- `{f.name}`: {f.type}" for f in schema] + [""]


# ---------------------------------------------------------------------------- convert


def write_convert_cards(root: Path, cfg, counts: dict, schemas: dict[str, pa.Schema]) -> None:
    """``preferences/README.md`` and ``sft_only/README.md`` under ``root`` (the stage's folder
    of new outputs), from the counts that go into the convert manifest."""
    sources = [(s, counts[s.name]) for s in cfg.convert.sources]
    table = _table(
        ["source", "format", "quality label", "input records", "pairs", "SFT-only rows", "rejected"],
        [[s.name, s.format, _label(s), c["input"], c["pairs"], c["sft"], c["rejected"]] for s, c in sources])
    reasons = [[s.name, reason, n] for s, c in sources for reason, n in sorted(c["reasons"].items(), key=lambda kv: -kv[1])]
    rejects = ["## Rejects by reason", "",
               "Every input record that gave no row is in `rejects/`, with its file, line and reason.", ""]
    rejects += _table(["source", "reason", "records"], reasons) if reasons else ["No record was rejected.", ""]
    pairs, sft = sum(c["pairs"] for _, c in sources), sum(c["sft"] for _, c in sources)

    body = ["# hetray: preference pairs", "",
            f"{pairs} `(prompt, chosen, rejected)` pairs that hetray's `convert` stage made from "
            f"{len(sources)} source(s). `quality` is the gap between the chosen and the rejected answer's "
            "label (empty for sources without ordered scores). Prompts with a single reference answer are "
            "in `sft_only/`.", ""]
    body += _load_hint("preferences") + ["## Sources", ""] + table + rejects + _columns(schemas["preferences"])
    (root / "preferences" / CARD).write_text(render(metadata("hetray: preference pairs", pairs, TAGS), body))

    body = ["# hetray: SFT-only rows", "",
            f"{sft} prompts with a single reference answer (no pair to rank), from hetray's `convert` "
            "stage; SFT trains on them, the reward model does not.", ""]
    body += _load_hint("sft_only") + ["## Sources", ""] + table + _columns(schemas["sft_only"])
    (root / "sft_only" / CARD).write_text(
        render(metadata("hetray: SFT-only rows", sft, ["hetray", "sft"]), body))


# ---------------------------------------------------------------------------- select


def write_selected_card(folder: Path, cfg, cells, kept_whole: list[str], dropped_duplicates: int,
                        schema: pa.Schema) -> None:
    """``selected/README.md``: the selection settings and what each source kept. ``cells``: the
    per (cluster, source) table of the select manifest (``n``, ``kept``)."""
    s = cfg.select
    by_source = cells.groupby("source")[["n", "kept"]].sum()
    total_in, total_kept = int(by_source["n"].sum()), int(by_source["kept"].sum())
    labels = {src.name: _label(src) for src in cfg.convert.sources}
    settings = [["n_clusters", cfg.cluster.n_clusters], ["fraction", s.fraction], ["stratify", s.stratify],
                ["keep_unscored", s.keep_unscored], ["quality_normalization", s.quality_normalization],
                ["dedup_threshold", s.dedup_threshold], ["seed", cfg.seed],
                ["sources", ", ".join(s.sources) if s.sources else "all"]]
    rows = [[src, labels.get(src, "–"), int(r.n), int(r.kept), f"{r.kept / r.n:.3f}" if r.n else "–",
             f"{r.kept / total_kept:.3f}" if total_kept else "–", "yes" if src in kept_whole else "no"]
            for src, r in by_source.iterrows()]
    body = ["# hetray: selected training pairs (D_train)", "",
            f"{total_kept} of {total_in} preference pairs, selected by hetray's `select` stage: prompts "
            f"embedded and clustered into {cfg.cluster.n_clusters} clusters, and the top {s.fraction} of each "
            "cluster kept by quality" + (", sources without quality kept whole." if s.keep_unscored else
                                         " (sources without quality: a seeded random sample), every source "
                                         "keeping its share.")
            + (f" {dropped_duplicates} near-duplicate prompts were dropped first." if dropped_duplicates else ""), ""]
    body += _load_hint(Path(folder).name) + ["## Selection settings", ""] + _table(["setting", "value"], settings)
    body += ["## Sources", ""] + _table(
        ["source", "quality label", "pairs before", "pairs kept", "kept share", "share of D_train", "kept whole"], rows)
    body += [f"Plots and example prompts per cluster: `{Path(folder).name}_report/report.md` beside this folder.", ""]
    body += _columns(schema)
    (Path(folder) / CARD).write_text(render(metadata("hetray: selected training pairs", total_kept, TAGS), body))
