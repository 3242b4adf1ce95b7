"""The selection report: markdown + PNG plots of what ``select`` kept, in ``selected_report/``
beside ``selected/`` (so the data folder holds only data, its card and its manifest).

Cluster sizes (stacked by source, before and after), each source's share before and after,
quality distributions before and after, and example prompts (nearest each centroid). The counts
are exact; the quality distributions come from a seeded sample of each source's pairs (``select``
passes at most ``sample_size`` per source, and "after" is the part of that sample that was kept),
so that the report costs the same at any size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hetray.plots import figure, save


def _cluster_plot(table: pd.DataFrame, path: Path) -> None:
    sizes = table.pivot_table(index="cluster", columns="source", values=["n", "kept"], aggfunc="sum", fill_value=0)
    clusters = sizes.index.to_numpy()
    fig, axes = figure(size=(max(6, 0.5 * len(clusters) + 3), 4))
    ax = axes[0, 0]
    width = 0.4
    for offset, col, alpha in ((-width / 2, "n", 0.45), (width / 2, "kept", 1.0)):
        bottom = np.zeros(len(clusters))
        for i, src in enumerate(sizes[col].columns):
            vals = sizes[col][src].to_numpy()
            ax.bar(clusters + offset, vals, width, bottom=bottom, color=f"C{i}", alpha=alpha,
                   label=f"{src} ({'before' if col == 'n' else 'after'})")
            bottom += vals
    ax.set_xticks(clusters)
    ax.set_xlabel("cluster")
    ax.set_ylabel("pairs")
    ax.set_title("cluster sizes: before (light) and after selection")
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def _share_plot(shares: pd.DataFrame, path: Path) -> None:
    fig, axes = figure(size=(max(5, 1.2 * len(shares) + 2), 3.5))
    ax = axes[0, 0]
    x = np.arange(len(shares))
    ax.bar(x - 0.2, shares["share_before"], 0.4, label="before", alpha=0.5)
    ax.bar(x + 0.2, shares["share_after"], 0.4, label="after")
    ax.set_xticks(x, shares.index, rotation=20)
    ax.set_ylabel("share of pairs")
    ax.set_title("each source's share before and after")
    ax.legend()
    save(fig, path)


def _quality_plot(sample: pd.DataFrame, path: Path) -> bool:
    scored = sample.dropna(subset=["quality"])
    sources = sorted(scored["source"].unique())
    if not sources:
        return False
    fig, axes = figure(1, len(sources), size=(4 * len(sources), 3.2))
    for ax, src in zip(axes[0], sources):
        part = scored[scored["source"] == src]
        bins = np.histogram_bin_edges(part["quality"], bins=20)
        for label, alpha in (("before", 0.45), ("after", 0.9)):
            vals = part.loc[part["set"] == label, "quality"]
            ax.hist(vals, bins=bins, alpha=alpha, label=f"{label} ({len(vals)})", density=True)
        ax.set_title(f"{src}: quality")
        ax.legend(fontsize=7)
    save(fig, path)
    return True


def write_report(folder: Path, cfg, table: pd.DataFrame, sample: pd.DataFrame, examples: dict,
                 sample_size: int | None = None) -> dict:
    """Write ``report.md`` and plots into ``folder`` (``selected_report/`` of the run). Returns
    their paths relative to the run directory (``selected_report/report.md``, ...)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    by_source = table.groupby("source")[["n", "kept"]].sum()
    shares = pd.DataFrame(
        {
            "pairs_before": by_source["n"],
            "pairs_after": by_source["kept"],
            "share_before": by_source["n"] / max(1, by_source["n"].sum()),
            "share_after": by_source["kept"] / max(1, by_source["kept"].sum()),
        }
    )
    _cluster_plot(table, out / "cluster_sizes.png")
    _share_plot(shares, out / "source_shares.png")
    has_quality = _quality_plot(sample, out / "quality.png")
    s = cfg.select
    lines = [
        f"# Selection report: {cfg.name}",
        "",
        f"fraction {s.fraction}, {cfg.cluster.n_clusters} clusters, stratified {s.stratify}, "
        f"quality normalisation {s.quality_normalization}, near-duplicate threshold {s.dedup_threshold}, "
        f"seed {cfg.seed}",
        "",
        f"kept {int(by_source['kept'].sum())} of {int(by_source['n'].sum())} pairs",
        "",
        "## Sources",
        "",
        "| source | pairs before | pairs after | share before | share after |",
        "|---|---|---|---|---|",
    ]
    for src, r in shares.iterrows():
        lines.append(f"| {src} | {int(r.pairs_before)} | {int(r.pairs_after)} | {r.share_before:.3f} | {r.share_after:.3f} |")
    lines += ["", "![source shares](source_shares.png)", "", "## Clusters", "", "| cluster | pairs before | pairs after |", "|---|---|---|"]
    for c, r in table.groupby("cluster")[["n", "kept"]].sum().iterrows():
        lines.append(f"| {c} | {int(r.n)} | {int(r.kept)} |")
    lines += ["", "![cluster sizes](cluster_sizes.png)", ""]
    if has_quality:
        lines += ["## Quality", ""]
        if sample_size is not None:
            lines += [f"From a seeded sample of at most {sample_size:,} pairs per source (every pair of a "
                      "smaller source); after: the pairs of that sample that were kept.", ""]
        for src, part in sample.dropna(subset=["quality"]).groupby("source"):
            b = part.loc[part["set"] == "before", "quality"]
            a = part.loc[part["set"] == "after", "quality"]
            lines.append(f"- {src}: mean {b.mean():.3g} -> {a.mean():.3g}, median {b.median():.3g} -> {a.median():.3g}")
        lines += ["", "![quality](quality.png)", ""]
    if examples:
        lines += ["## Example prompts (nearest each centroid)", ""]
        for c in sorted(examples):
            lines.append(f"**cluster {c}**")
            lines += [f"- {p[:200].replace(chr(10), ' ')}" for p in examples[c]]
            lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"folder": out.name, "markdown": f"{out.name}/report.md",
            "plots": sorted(f"{out.name}/{p.name}" for p in out.glob("*.png"))}
