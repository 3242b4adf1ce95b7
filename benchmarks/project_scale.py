"""Projection: time and memory of convert -> cluster -> select at 100M and 1B pairs, from measurements.

    python benchmarks/project_scale.py        # reads benchmarks/results/bench_select.json (+ bench_embed.json)

Nothing is run here: this is arithmetic on the numbers ``bench_select.py`` measured on this
machine (convert, cluster and select at two or more sizes, each stage in its own process; the
cluster stage there runs on 32-d vectors, so at 384-d its cost per pair is higher: see
``bench_kmeans.md`` for 1M x 384). For each stage it fits
wall time = fixed + per_pair x pairs (least squares over the measured sizes) and reports the
per-pair cost in CPU-microseconds (wall x the CPUs the stage had), the peak memory at each size and
its growth per 10x. The projection for the ``cluster.yaml`` cluster divides the CPU time by the
CPUs of its nodes; that assumes the data stages scale linearly with CPUs (Ray Data spreads the
read / map / shuffle / write tasks; not measured here beyond two simulated nodes), so it is a
lower bound on time, and it names the stage with the largest projected time as the bottleneck.
Embedding is excluded from bench_select (synthetic vectors); its CPU rate comes from
``bench_embed.json`` when present, and no GPU rate was measured.
Writes benchmarks/results/project_scale.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

STAGES = ("convert", "cluster", "select")
MACHINE_CPUS = 2  # each stage's local Ray in bench_select has num_cpus=2
# cluster.yaml: head m6i.8xlarge (28 CPUs to Ray) + up to 2 p4de.24xlarge (96 CPUs each)
CLUSTER = {"name": "cluster.yaml (head 28 CPUs + 2 x p4de 96 CPUs)", "cpus": 28 + 2 * 96,
           "node_memory_gib": {"head": 128, "gpu.p4de": 1152}}
TARGETS = (100_000_000, 1_000_000_000)


def fit(xs, ys) -> tuple[float, float]:
    """Least-squares y = a + b x (two points: the line through them)."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def main() -> None:
    sel = json.loads((RESULTS / "bench_select.json").read_text())
    runs = sorted(sel["runs"], key=lambda r: r["pairs"])
    if len(runs) < 2:
        raise SystemExit("bench_select.json holds fewer than two sizes: run benchmarks/bench_select.py first")
    pairs = [r["pairs"] for r in runs]
    out = {"source": {"bench_select": {"command": sel["command"], "date": sel["date"], "sizes": pairs}},
           "cluster": CLUSTER, "stages": {}}
    lines = []
    total = {t: 0.0 for t in TARGETS}
    for stage in STAGES:
        walls = [r[stage]["wall_s"] for r in runs]
        peaks = [r[stage]["peak_mem_mib"] for r in runs]
        a, b = fit(pairs, walls)
        growth = (peaks[-1] / peaks[0]) ** (1 / np.log10(pairs[-1] / pairs[0]))  # per 10x pairs
        proj = {}
        for t in TARGETS:
            cpu_s = max(b, 0) * t * MACHINE_CPUS
            proj[t] = {"here_s": round(a + b * t), "cluster_s": round(cpu_s / CLUSTER["cpus"] + a),
                       "peak_mib_if_growth_holds": round(peaks[-1] * growth ** np.log10(t / pairs[-1]))}
            total[t] += proj[t]["cluster_s"]
        out["stages"][stage] = {"walls_s": walls, "peaks_mib": peaks, "fixed_s": round(a, 2),
                                "per_pair_us": round(b * 1e6, 3), "cpu_us_per_pair": round(b * 1e6 * MACHINE_CPUS, 3),
                                "peak_growth_per_10x": round(float(growth), 3), "projection": proj}
        lines.append(
            f"| {stage} | " + " / ".join(f"{w:g}" for w in walls) + " | " + " / ".join(f"{p:g}" for p in peaks)
            + f" | {a:.1f} | {b * 1e6 * MACHINE_CPUS:.2f} | {growth:.2f} | "
            + " | ".join(f"{proj[t]['here_s'] / 3600:.1f} h / {proj[t]['cluster_s'] / 60:.1f} min" for t in TARGETS)
            + " | " + " / ".join(f"{proj[t]['peak_mib_if_growth_holds'] / 1024:.1f}" for t in TARGETS) + " |")
    bottleneck = max(STAGES, key=lambda s: out["stages"][s]["projection"][TARGETS[-1]]["cluster_s"])
    out["bottleneck_without_embed"] = bottleneck
    embed = None
    if (RESULTS / "bench_embed.json").exists():
        e = json.loads((RESULTS / "bench_embed.json").read_text())
        best = max(e["hetray"], key=lambda r: r["sentences_per_s"])
        embed = {"n": e["n"], "sentences_per_s_cpu": best["sentences_per_s"], "cpus": best["actors"] * best["cpus_per_actor"],
                 "command": e["command"], "date": e["date"]}
        out["embed_cpu"] = embed
    sizes = " / ".join(f"{p:,}" for p in pairs)
    md = [
        f"From `{sel['command']}` ({sel['date']}): each stage at {sizes} pairs, its own process and local Ray "
        f"({MACHINE_CPUS} CPUs). Fit: wall = fixed + per pair x pairs. Projection on {CLUSTER['name']}, "
        f"{CLUSTER['cpus']} CPUs: CPU time / CPUs + fixed, **assuming linear scaling in CPUs** (not measured).",
        "",
        f"| stage | wall s at {sizes} | peak MiB at {sizes} | fixed s | CPU-us per pair | peak growth per 10x pairs "
        "| 100M: here / cluster | 1B: here / cluster | peak GiB per node at 100M / 1B if that growth holds |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
        f"Sum of the three stages on the cluster: 100M pairs ~{total[TARGETS[0]] / 60:.1f} min, "
        f"1B pairs ~{total[TARGETS[1]] / 60:.1f} min (lower bounds; embedding excluded). Bottleneck among them at 1B: "
        f"**{bottleneck}**.",
    ]
    if embed:
        md += ["", f"Embedding (excluded above; one distinct prompt per four pairs in this data): "
               f"{embed['sentences_per_s_cpu']} prompts/s on {embed['cpus']:g} CPU cores here "
               f"({embed['n']:,} prompts, `{embed['command']}`), so 25M distinct prompts (100M pairs) would be "
               f"~{25e6 / embed['sentences_per_s_cpu'] / 3600:.0f} hours on these {embed['cpus']:g} cores "
               f"(~{25e6 / embed['sentences_per_s_cpu'] * embed['cpus'] / CLUSTER['cpus'] / 3600:.1f} h on the cluster's "
               f"{CLUSTER['cpus']} CPUs at the same rate per core); no GPU rate was measured "
               "(no GPU was lent): embedding is the stage to put on the GPUs and the real bottleneck of a "
               "CPU-only run."]
    write_results("project_scale", out, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
