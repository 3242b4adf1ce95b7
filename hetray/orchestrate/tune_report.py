"""What ``hetray tune`` leaves behind, from Ray Tune's ResultGrid: ``<run_dir>/tune/trials.csv`` and
``trials.json`` (one row per trial: settings, objective, status, wall time), ``best.json`` (the best
completed trial, with the overrides that select it in a job) and ``objective.png``; and the table
the command prints.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

TABLE_COLUMNS = ["trial", "n_clusters", "fraction", "label", "direction", "repeat", "seed", "objective",
                 "reward_accuracy", "status", "rounds_done", "reward_steps", "pairs_selected", "train_pairs",
                 "eval_pairs", "wall_time_s", "error"]


def write_outputs(cfg, plan: dict, results, started: float) -> dict:
    """trials.csv / trials.json, best.json and objective.png in ``plan["out"]``. Returns best.json's
    content; raises RuntimeError when no trial gave an objective."""
    import pandas as pd

    out = Path(plan["out"])
    rows = trial_rows(cfg, plan, results)
    pd.DataFrame(rows, columns=TABLE_COLUMNS).to_csv(out / "trials.csv", index=False)
    (out / "trials.json").write_text(json.dumps(rows, indent=1) + "\n")
    best = best_row(rows, cfg.tune.mode)
    if best is None:
        raise RuntimeError(f"tune: no trial gave an objective; see {out / 'trials.csv'} (errors) and {out / 'ray'}")
    settings = {"n_clusters": best["n_clusters"], "fraction": best["fraction"]}
    overrides = [f"cluster.n_clusters={best['n_clusters']}", f"select.fraction={best['fraction']:g}"]
    if best["label"]:
        settings.update(label=best["label"], direction=best["direction"])
        i = [s.name for s in cfg.convert.sources].index(cfg.tune.label_source)
        overrides += [f"convert.sources.{i}.label={best['label']}", f"convert.sources.{i}.direction={best['direction']}"]
    summary = {
        "metric": cfg.tune.metric, "mode": cfg.tune.mode, "objective": best["objective"], "settings": settings,
        "trial": best["trial"], "trial_dir": str(out / best["trial"]), "overrides": overrides,
        "trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"] == "stopped" for r in rows), "errors": sum(r["status"] == "error" for r in rows),
        "reward_budgets": plan["budgets"], "max_concurrent_trials": plan["concurrent"],
        "wall_time_s": round(time.time() - started, 1),
    }
    (out / "best.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_objective(rows, out / "objective.png", cfg.tune.metric, cfg.tune.mode)
    return summary


def trial_rows(cfg, plan: dict, results) -> list[dict]:
    """One row per trial (of ``TABLE_COLUMNS``), from the Tune ResultGrid, in settings order."""
    rows = []
    for res in results:
        m, c = res.metrics or {}, res.config
        rounds = m.get("round", 0)
        status = "error" if res.error else ("completed" if rounds == len(plan["budgets"]) else "stopped")
        label, _, direction = (c.get("variant") or "").rpartition("-")
        value = m.get(cfg.tune.metric)
        rows.append({
            "trial": m.get("trial") or Path(res.path).name, "n_clusters": c["n_clusters"], "fraction": c["fraction"],
            "label": label or None, "direction": direction or None, "repeat": c.get("repeat", 0),
            "seed": cfg.seed + c.get("repeat", 0),
            "objective": float(value) if value is not None else None,
            "reward_accuracy": m.get("reward_accuracy"), "status": status, "rounds_done": rounds,
            "reward_steps": m.get("reward_steps"), "pairs_selected": m.get("pairs_selected"),
            "train_pairs": m.get("train_pairs"), "eval_pairs": m.get("eval_pairs"),
            "wall_time_s": round(m["time_total_s"], 1) if "time_total_s" in m else None,
            "error": str(res.error).strip().splitlines()[-1][:300] if res.error else None,
        })
    return sorted(rows, key=lambda r: (r["label"] or "", r["direction"] or "", r["n_clusters"], r["fraction"], r["repeat"]))


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The best trial that trained every budget (an ASHA-stopped trial's last value is a smaller
    budget's, not comparable); the best of any finite one when none completed."""
    def finite(r):
        return r["objective"] is not None and math.isfinite(r["objective"])

    pool = [r for r in rows if r["status"] == "completed" and finite(r)] or [r for r in rows if finite(r)]
    if not pool:
        return None
    return (max if mode == "max" else min)(pool, key=lambda r: r["objective"])


def plot_objective(rows: list[dict], path: Path, metric: str, mode: str) -> None:
    """Objective vs fraction, one line per k (mean over repeats), one panel per label variant;
    hollow markers: trials ASHA stopped (their value is a smaller budget's)."""
    import pandas as pd

    from hetray.plots import figure, save

    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    df = df[df["objective"].notna()]
    df["variant"] = [f"{l}-{d}" if l else "" for l, d in zip(df["label"].fillna(""), df["direction"].fillna(""))]
    variants = sorted(df["variant"].unique()) if len(df) else [""]
    fig, axes = figure(1, len(variants), size=(5.5 * len(variants), 3.8))
    for ax, variant in zip(axes[0], variants):
        part = df[df["variant"] == variant]
        for k, g in part.groupby("n_clusters"):
            mean = g.groupby("fraction")["objective"].mean()
            line, = ax.plot(mean.index, mean.values, label=f"k={k}")
            for status, face in (("completed", line.get_color()), ("stopped", "none")):
                pts = g[g["status"] == status]
                ax.scatter(pts["fraction"], pts["objective"], s=45, facecolors=face, edgecolors=line.get_color(), zorder=3)
        ax.set_xticks(sorted(part["fraction"].unique()))
        ax.set_xlabel("fraction")
        ax.set_ylabel(f"{metric} ({mode})")
        ax.set_title(variant or "selection settings", fontsize=10)
        ax.grid(alpha=0.3)
        if len(part):
            ax.legend(fontsize=8)
    save(fig, path, dpi=90, title=f"{metric} by fraction and k (hollow: stopped early)")


def format_table(rows: list[dict]) -> str:
    """The trial table as the command prints it: the main columns, aligned."""
    cols = ["trial", "objective", "reward_accuracy", "status", "rounds_done", "pairs_selected", "wall_time_s"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    cells = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
