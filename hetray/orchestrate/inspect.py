"""``hetray inspect PATH``: a summary of any hetray output, from its manifest.

    a run directory    one line per stage folder it has (grid runs, shared clusters, tune too)
    a stage folder     preferences/ sft_only/ rejects/ embeddings/ clusters/ selected/
                       selected_report/ sft/ reward/ ppo/ rloo/ dpo/ eval/
    a Parquet file     its rows by source (``hetray.unify.summary``)

Reads manifests and Parquet footers; only preferences-like folders are scanned (two columns).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from hetray.schema import parquet_files
from hetray.stage import read_manifest
from hetray.train import STAGES as TRAIN_STAGES
from hetray.unify import summary

# a run directory's folders, in pipeline order
DATA_FOLDERS = ("preferences", "sft_only", "rejects", "embeddings", "clusters", "selected", "selected_report")
FOLDERS = (*DATA_FOLDERS, *TRAIN_STAGES, "eval")
# the numbers a suite is judged by (others: its first few)
HEADLINE = {"winobias": ("bias", "bias_entropy", "bias_cluster", "accuracy", "similarity"),
            "chat": ("non_empty_rate", "stop_rate", "repeated_ngram_rate", "mean_new_tokens")}


def inspect(path) -> str:
    """A person-readable summary of ``path``. Raises FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and is_run_dir(path):
        return run_summary(path)
    kind = folder_kind(path) if path.is_dir() else None
    if kind in DETAIL:
        return DETAIL[kind](path)
    if path.is_dir() and read_manifest(path) and not parquet_files(path):
        return _generic(path)
    return summary.inspect(path)  # Parquet: pairs, rejects, or rows by source


def is_run_dir(path: Path) -> bool:
    return (path / "summary.json").is_file() or any(
        read_manifest(path / f) is not None for f in FOLDERS) or (path / "preferences").is_dir()


def folder_kind(path: Path) -> str | None:
    """Which stage wrote ``path``: its manifest says, else its name."""
    stage = (read_manifest(path) or {}).get("stage", "")
    if stage.startswith("train-"):
        return "train"
    if stage in ("convert", "embed", "cluster", "select", "eval"):
        return {"convert": "preferences", "embed": "embeddings", "cluster": "clusters", "select": "selected"}.get(
            stage, stage)
    if path.name in ("selected_report", "report") and (path / "report.md").is_file():
        return "selected_report"
    return path.name if path.name in DATA_FOLDERS else None


# ---------------------------------------------------------------------------- a run directory


def run_summary(root: Path, indent: str = "") -> str:
    """One line per stage folder; then grid runs, shared clusters and the tune search."""
    lines = [f"{indent}run: {root}" + _job(root)]
    for name in FOLDERS:
        if (root / name).is_dir():
            lines.append(f"{indent}  {name + '/':<17} {line_for(root / name)}")
    for extra in ("report.md", "summary.json", "logs/hetray.log"):
        if (root / extra).exists():
            lines.append(f"{indent}  {extra}")
    for k in sorted((root / "shared").glob("k*/clusters")) if (root / "shared").is_dir() else []:
        lines.append(f"{indent}  {k.relative_to(root).as_posix() + '/':<17} {line_for(k)}")
    best = root / "tune" / "best.json"
    if best.is_file():
        b = json.loads(best.read_text())
        lines.append(f"{indent}  tune/            {b.get('trials')} trials; best {b.get('metric')} "
                     f"{_num(b.get('objective'))} with {b.get('settings')} ({' '.join(b.get('overrides', []))})")
    runs = sorted(p for p in (root / "runs").iterdir() if p.is_dir()) if (root / "runs").is_dir() else []
    for run in runs:
        lines += ["", run_summary(run, indent + "  ")]
    return "\n".join(lines)


def _job(root: Path) -> str:
    s = root / "summary.json"
    if not s.is_file():
        return ""
    try:
        d = json.loads(s.read_text())
    except json.JSONDecodeError:
        return ""
    return f"  (job {d.get('job')}, last `hetray run` {d.get('wall_time_s')} s)"


def line_for(folder: Path) -> str:
    """The one-line summary of a stage folder in a run directory's listing."""
    kind = folder_kind(folder)
    m = read_manifest(folder) or {}
    try:
        text = ONE_LINE[kind](folder, m) if kind in ONE_LINE else f"{_rows(folder)} rows"
    except (KeyError, TypeError, ValueError) as e:  # an older or partial manifest: say so, go on
        text = f"(unreadable manifest: {e})"
    return text + _when(m)


def _when(m: dict) -> str:
    if not m:
        return ""
    return f"  [{m.get('wall_time_s', 0):.1f} s, {m.get('created', '?')}]"


def _rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(folder))


def _num(v) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------- one line per stage


def _preferences_line(folder: Path, m: dict) -> str:
    counts = m.get("counts") or {}
    by_source = ", ".join(f"{s} {c.get('pairs', 0)}" for s, c in counts.items())
    total = (m.get("totals") or {}).get("pairs", _rows(folder))
    rejected = (m.get("totals") or {}).get("rejected")
    return f"{total} pairs" + (f" ({by_source})" if by_source else "") + (
        f"; {rejected} records rejected" if rejected is not None else "")


def _embeddings_line(folder: Path, m: dict) -> str:
    model = (m.get("settings") or {}).get("model") or (m.get("config") or {}).get("model")
    return (f"{m.get('distinct_prompts', m.get('prompts'))} distinct prompts of {m.get('prompts')}, "
            f"dim {m.get('dim')}, {model} on {m.get('device')}")


def _clusters_line(folder: Path, m: dict) -> str:
    sizes = m.get("sizes") or []
    return (f"k={len(sizes)}, {m.get('rows')} prompts, inertia {_num(m.get('inertia'))} "
            f"after {m.get('n_iter')} iterations; sizes {'/'.join(map(str, sizes))}")


def _selected_line(folder: Path, m: dict) -> str:
    fraction = ((m.get("config") or {}).get("select") or {}).get("fraction")
    report = selection_report(folder, m)
    return (f"{m.get('pairs_selected')} of {m.get('pairs_in')} pairs (fraction {fraction}, k={m.get('n_clusters')})"
            + (f"; report {report.relative_to(folder.parent).as_posix()}" if report else ""))


def selection_report(folder: Path, m: dict) -> Path | None:
    """The selection's report.md: in ``selected_report/`` beside it (the manifest names it from
    the run directory), or inside it (``report/``, older runs)."""
    name = (m.get("report") or {}).get("markdown")
    for path in ((folder.parent / name, folder / name) if name else ()):
        if path.is_file():
            return path
    return None


def _train_line(folder: Path, m: dict) -> str:
    final = {k: v for k, v in (m.get("final") or {}).items() if isinstance(v, float)}
    loss = _loss(folder)
    has = [d for d in ("adapter", "merged") if (folder / d).is_dir()]
    return (f"{m.get('global_step')}/{m.get('max_steps')} steps on {m.get('rows')} {m.get('data')} rows"
            + (f", {loss[0]} {_num(loss[1])} -> {_num(loss[2])}" if loss else "")
            + "".join(f", {k} {v:.3f}" for k, v in final.items())
            + f"; {' + '.join(has) or 'no model'}")


def _eval_line(folder: Path, m: dict) -> str:
    metrics = _eval_metrics(folder)
    models = list(m.get("models") or metrics)
    suites = sorted({s for v in metrics.values() if isinstance(v, dict) for s in v if isinstance(v[s], dict)})
    return f"{len(models)} model(s) ({', '.join(models)}) x {len(suites)} suite(s) ({', '.join(suites)})" + (
        "; report eval/report.md" if (folder / "report.md").is_file() else "")


def _report_line(folder: Path, m: dict) -> str:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "manifest.json")
    return f"{len(files)} file(s): {', '.join(files)}"


ONE_LINE = {"preferences": _preferences_line, "embeddings": _embeddings_line, "clusters": _clusters_line,
            "selected": _selected_line, "train": _train_line, "eval": _eval_line, "selected_report": _report_line}


# ---------------------------------------------------------------------------- one folder in detail


def _head(folder: Path) -> list[str]:
    m = read_manifest(folder)
    if not m:
        return [f"{folder}: no manifest"]
    return [f"{folder}: stage {m.get('stage')}, key {m.get('key')}, created {m.get('created')}, "
            f"{m.get('wall_time_s', 0):.1f} s"]


def _detail(folder: Path) -> str:
    kind = folder_kind(folder)
    return "\n".join(_head(folder) + ["  " + ONE_LINE[kind](folder, read_manifest(folder) or {})])


def _pairs_detail(folder: Path) -> str:
    if not parquet_files(folder):
        return f"{folder}: no rows"
    return summary.inspect(folder) + f"\n  rows: {_rows(folder)}"


def _selected_detail(folder: Path) -> str:
    m = read_manifest(folder) or {}
    lines = _head(folder) + ["  " + _selected_line(folder, m)]
    kept: dict = {}
    for cell in m.get("cells") or []:
        kept.setdefault(cell.get("source"), [0, 0])
        kept[cell.get("source")][0] += cell.get("kept", 0)
        kept[cell.get("source")][1] += cell.get("n", 0)
    lines += [f"  [{s}] kept {k} of {n}" for s, (k, n) in sorted(kept.items())]
    if m.get("dropped_near_duplicates"):
        lines.append(f"  near-duplicates dropped: {m['dropped_near_duplicates']}")
    return "\n".join(lines)


def _train_detail(folder: Path) -> str:
    m = read_manifest(folder) or {}
    lines = _head(folder) + ["  " + _train_line(folder, m), f"  from {m.get('model_in')}"]
    if m.get("resumed_from_step"):
        lines.append(f"  resumed from the checkpoint at step {m['resumed_from_step']}")
    budget = m.get("budget") or {}
    if budget:
        lines.append(f"  budget: {budget.get('rows_per_step')} rows per step, "
                     f"{_num(budget.get('epochs_seen'))} epochs seen")
    for name in ("adapter", "merged", "metrics.json", "loss.png"):
        lines.append(f"  {name + ':':<14}{folder / name if (folder / name).exists() else 'missing'}")
    return "\n".join(lines)


def _eval_detail(folder: Path) -> str:
    m = read_manifest(folder) or {}
    lines = _head(folder) + ["  " + _eval_line(folder, m)]
    for model, suites in _eval_metrics(folder).items():
        where = (m.get("models") or {}).get(model)
        lines.append(f"  {model}" + (f" ({where})" if where else ""))
        for suite, values in (suites or {}).items():
            if isinstance(values, dict):
                lines.append(f"    {suite}: " + ", ".join(f"{k} {_num(values[k])}" for k in _headline(suite, values)))
    for name in ("report.md", "report.html"):
        if (folder / name).is_file():
            lines.append(f"  {name}: {folder / name}")
    return "\n".join(lines)


def _generic(folder: Path) -> str:
    m = read_manifest(folder) or {}
    scalars = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and k not in
               ("stage", "key", "created", "wall_time_s")}
    return "\n".join(_head(folder) + [f"  {k}: {v}" for k, v in scalars.items()])


DETAIL = {"preferences": _pairs_detail, "sft_only": _pairs_detail, "rejects": _pairs_detail,
          "embeddings": _detail, "clusters": _detail, "selected": _selected_detail, "train": _train_detail,
          "eval": _eval_detail, "selected_report": lambda f: f"{f}: " + _report_line(f, {})}


# ---------------------------------------------------------------------------- helpers


def _loss(folder: Path) -> tuple[str, float, float] | None:
    """The training curve's first and last value: the loss, or for PPO / RLOO the reward."""
    try:
        history = json.loads((folder / "metrics.json").read_text()).get("history") or []
    except (OSError, json.JSONDecodeError):
        return None
    for key in ("loss", "objective/rlhf_reward", "reward"):
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        if values:
            return key, float(values[0]), float(values[-1])
    return None


def _eval_metrics(folder: Path) -> dict:
    """{model: {suite: {metric: value}}} (without the file's ``_meta``)."""
    try:
        data = json.loads((folder / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if not k.startswith("_") and isinstance(v, dict)}


def _headline(suite: str, values: dict) -> list[str]:
    keys = [k for k in HEADLINE.get(suite, ()) if k in values]
    return keys or [k for k, v in values.items() if isinstance(v, (int, float)) and not k.endswith("_ci")][:5]
