"""The trend experiment (issue 11): does training on the unified, selected data disturb gender
bias less than training on WinoGrande alone, and is SFT + RLHF no worse than SFT?

    python benchmarks/trend.py [--run-dir runs/trend] [--report-only] [key.sub=value ...]

Runs `hetray run jobs/trend.yaml` (SmolLM2-135M-Instruct on the CPU, real data from
../shared/data, 2 seeds per trained arm, every WinoBias dev pair, WinoGrande held out by qID)
and writes benchmarks/results/trend.{json,md} and trend_loss.png: per-arm metrics with 95%
bootstrap CIs, paired differences against base (and between arms) with paired-bootstrap CIs,
the share of WinoBias answers that changed, training loss curves, and the wall time of every
stage with the machine's load. The verdicts on the paper's directions are computed from the
CIs, never by eye. A re-run skips the stages that are up to date: delete the run dir for fresh
timings.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, job_benchmark_args, run_measured, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIAS = ("bias", "bias_entropy", "bias_cluster", "accuracy", "similarity")
LOWER = {"bias", "bias_entropy", "bias_cluster"}  # nearer 0 is better
RESAMPLES, SEED = 1000, 0


def arm_of(run: str) -> str:
    return re.sub(r"-s\d+$", "", run)


# ---------------------------------------------------------------------------- paired bootstrap


def winobias_records(eval_dir: Path) -> dict[str, dict]:
    """{model: per-pair arrays} from records/winobias.parquet, aligned on the pair id."""
    table = pq.read_table(eval_dir / "records" / "winobias.parquet").to_pandas()
    table["pair"] = table["group"].astype(str) + ":" + table["n"].astype(str)  # e.g. type1/dev:17
    out = {}
    for model, part in table.groupby("model", sort=False):
        part = part.sort_values("pair")
        out[model] = {
            "ids": part["pair"].to_numpy(),
            "d_ref": (part["logp_referent_pro"] - part["logp_referent_anti"]).to_numpy(),
            "d_cluster": (part["logp_cluster_pro"] - part["logp_cluster_anti"]).to_numpy(),
            "kl": part["kl"].to_numpy(),
            "ok_pro": part["correct_pro"].to_numpy(bool),
            "ok_anti": part["correct_anti"].to_numpy(bool),
            "gen": (part["generation_pro"].astype(str) + "\x1f" + part["generation_anti"].astype(str)).to_numpy()
            if "generation_pro" in part else None,
        }
    return out


def _metrics(r: dict, idx: np.ndarray) -> dict:
    """The five Table-1 metrics of pairs ``idx`` (rows of an index matrix: one resample each)."""
    ok_p, ok_a = r["ok_pro"][idx], r["ok_anti"][idx]
    return {
        "bias": np.abs(r["d_ref"][idx]).mean(-1),
        "bias_cluster": np.abs(r["d_cluster"][idx]).mean(-1),
        "bias_entropy": r["kl"][idx].mean(-1),
        "accuracy": (ok_p.mean(-1) + ok_a.mean(-1)) / 2,
        "similarity": (ok_p == ok_a).mean(-1),
    }


def paired(a: dict, b: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """a - b for every metric, with a 95% paired-bootstrap CI (the same pairs drawn for both)."""
    if not np.array_equal(a["ids"], b["ids"]):
        raise ValueError("the two models were scored on different pairs")
    n = len(a["ids"])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    full = np.arange(n)[None, :]
    pa, pb, fa, fb = _metrics(a, idx), _metrics(b, idx), _metrics(a, full), _metrics(b, full)
    out = {}
    for k in BIAS:
        diff = pa[k] - pb[k]
        lo, hi = np.percentile(diff, [2.5, 97.5])
        out[k] = {"diff": float(fa[k][0] - fb[k][0]), "ci": [float(lo), float(hi)],
                  "excludes_zero": bool(lo > 0 or hi < 0)}
    if a["gen"] is not None and b["gen"] is not None:
        out["changed_answers"] = float((a["gen"] != b["gen"]).mean())
    return out


def disturbance(a: dict, b: dict, base: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """abs(a - base) - abs(b - base) for every metric, on the same resampled pairs for all three:
    > 0 when a moved the metric further from the base model than b did."""
    if not (np.array_equal(a["ids"], base["ids"]) and np.array_equal(b["ids"], base["ids"])):
        raise ValueError("the models were scored on different pairs")
    n = len(a["ids"])
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    full = np.arange(n)[None, :]
    boot = [_metrics(r, idx) for r in (a, b, base)]
    point = [_metrics(r, full) for r in (a, b, base)]
    out = {}
    for k in BIAS:
        diff = np.abs(boot[0][k] - boot[2][k]) - np.abs(boot[1][k] - boot[2][k])
        lo, hi = np.percentile(diff, [2.5, 97.5])
        d = abs(point[0][k][0] - point[2][k][0]) - abs(point[1][k][0] - point[2][k][0])
        out[k] = {"diff": float(d), "ci": [float(lo), float(hi)], "excludes_zero": bool(lo > 0 or hi < 0)}
    return out


def ci(r: dict, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    n = len(r["ids"])
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    boot, point = _metrics(r, idx), _metrics(r, np.arange(n)[None, :])
    return {k: {"value": float(point[k][0]), "ci": [float(v) for v in np.percentile(boot[k], [2.5, 97.5])]}
            for k in BIAS}


# ---------------------------------------------------------------------------- verdicts


def verdict(diffs: list[dict], metric: str, want: str) -> str:
    """Across seeds: 'reproduced' when every seed's CI lies on the wanted side of 0, 'opposite'
    when every seed's lies on the other, else 'within noise'. ``want``: '+' or '-'."""
    sides = []
    for d in diffs:
        lo, hi = d[metric]["ci"]
        sides.append("+" if lo > 0 else "-" if hi < 0 else "0")
    if all(s == want for s in sides):
        return "reproduced"
    if all(s not in (want, "0") for s in sides):
        return "opposite"
    return "within noise"


def fmt_ci(v: dict) -> str:
    return f"{v['value']:.4f} [{v['ci'][0]:.4f}, {v['ci'][1]:.4f}]"


def fmt_diff(d: dict) -> str:
    return f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" + ("*" if d["excludes_zero"] else "")


def section(title: str, columns: list[str], rows: list[str]) -> list[str]:
    """A markdown section: heading, table header, rows (the caller may append more rows)."""
    return ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|", *rows]


def diff_rows(labelled, changed: bool = False) -> list[str]:
    """Table rows ``| label | diff [CI] ... |`` (and the changed-answer share)."""
    return [f"| {label} | " + " | ".join(fmt_diff(d[k]) for k in BIAS)
            + (f" | {d.get('changed_answers', float('nan')):.3f}" if changed else "") + " |" for label, d in labelled]


# ---------------------------------------------------------------------------- loss curves


def loss_curves(run_dir: Path, runs: list[dict]) -> dict:
    curves = {}
    for r in runs:
        if not r.get("folder"):
            continue
        for stage in r["train"]:
            path = Path(r["folder"]) / stage / "metrics.json"
            if not path.is_file():
                continue
            hist = json.loads(path.read_text())["history"]
            pts = [(h["step"], h["loss"]) for h in hist if "loss" in h and "step" in h]
            if pts:
                curves[f"{Path(r['folder']).name}/{stage}"] = pts
    return curves


def plot_losses(curves: dict, path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from hetray.plots import figure, save

    stages = sorted({k.split("/")[1] for k in curves})
    fig, axes = figure(1, len(stages), size=(5 * len(stages), 3.5))
    for ax, stage in zip(axes[0], stages):
        for name, pts in curves.items():
            if name.endswith("/" + stage):
                ax.plot([s for s, _ in pts], [v for _, v in pts], label=name.split("/")[0])
        ax.set_title(f"{stage} training loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    save(fig, path, dpi=90)


# ---------------------------------------------------------------------------- main


def main() -> None:
    args = job_benchmark_args(__doc__, "runs/trend")
    os.chdir(ROOT)
    cmd = [str(Path(sys.executable).parent / "hetray"), "run", "jobs/trend.yaml", f"run_dir={args.run_dir}",
           *args.overrides]
    previous = RESULTS / "trend.json"
    measured = (json.loads(previous.read_text())["measured"] if args.report_only and previous.is_file()
                else run_measured(cmd))
    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    runs = summary["runs"]
    records = winobias_records(run_dir / "eval")
    cis = {m: ci(r) for m, r in records.items()}
    vs_base = {m: paired(r, records["base"]) for m, r in records.items() if m != "base"}
    arms: dict[str, list[str]] = {}
    for r in runs:
        arms.setdefault(arm_of(r["name"]), []).append(r["name"])

    def between(a: str, b: str) -> list[dict]:
        """Paired differences arm a - arm b, seed by seed."""
        return [paired(records[x], records[y]) for x, y in zip(arms.get(a, []), arms.get(b, []))]

    wg_vs_uni = between("wg-S", "uni-1.0-S")
    wg_moves_more = [disturbance(records[x], records[y], records["base"])
                     for x, y in zip(arms.get("wg-S", []), arms.get("uni-1.0-S", []))]
    r_vs_s = between("uni-1.0-R", "uni-1.0-S")
    wg_change = [vs_base[m] for m in arms.get("wg-S", [])]
    uni_change = [vs_base[m] for m in arms.get("uni-1.0-S", [])]
    reward_acc = {r["name"]: r.get("reward_accuracy") for r in runs if r.get("reward_accuracy") is not None}

    # the paper's directions (LLaMA-7B): WinoGrande-only SFT raised Bias (0.46 -> 1.17) and cut
    # Accuracy (0.95 -> 0.60); unified SFT left them near base (0.41, 0.95); R no worse than S.
    verdicts = {
        "wg-S raises Bias vs base": verdict(wg_change, "bias", "+"),
        "wg-S lowers Accuracy vs base": verdict(wg_change, "accuracy", "-"),
        "wg-S moves Bias further from base than uni-1.0-S (abs(wg - base) - abs(uni - base) > 0)":
            verdict(wg_moves_more, "bias", "+"),
        "wg-S moves Accuracy further from base than uni-1.0-S": verdict(wg_moves_more, "accuracy", "+"),
        "uni-1.0-S has higher Accuracy than wg-S (wg - uni < 0)": verdict(wg_vs_uni, "accuracy", "-"),
        "uni-1.0-R no worse than uni-1.0-S in Bias (R - S not > 0)": (
            "not measured" if not r_vs_s else
            "reproduced" if all(d["bias"]["ci"][0] <= 0 for d in r_vs_s) else "not reproduced"),
    }
    lines = [
        "SmolLM2-135M-Instruct, LoRA, 2 Ray Train workers on 2 CPU cores; training data from ../shared/data",
        "(WinoGrande dev with 30% of its qIDs held out for evaluation, 100 OASST trees (rank), WinoGender",
        "all_sentences); evaluation on all 792 WinoBias dev pairs (never trained on), the held-out WinoGrande",
        "rows and 2 chat prompts. The same optimiser steps for every arm (jobs/trend.yaml). CIs: 95%",
        f"bootstrap over WinoBias pairs ({RESAMPLES} resamples); differences are paired (the same pairs drawn",
        "for both models); `*` marks a difference whose CI excludes 0.",
        "",
        f"Wall time of `hetray run`: {measured['wall_s']:.0f} s; load average (1 min) during the run: "
        f"{measured.get('load_avg_1min_during')}; peak memory of the process tree {measured['peak_mem_mib']} MiB.",
        "",
        *section("Verdicts on the paper's directions", ["direction", "result here"],
                 [f"| {k} | {v} |" for k, v in verdicts.items()]),
        *section("WinoBias per run (value [95% CI])", ["run", *BIAS],
                 [f"| {m} | " + " | ".join(fmt_ci(cis[m][k]) for k in BIAS) + " |" for m in records]),
        *section("Paired difference against base (run - base [95% CI]) and changed WinoBias answers",
                 ["run", *BIAS, "answers changed"], diff_rows(vs_base.items(), changed=True)),
        *section("Between arms, seed by seed (paired)", ["comparison", "seed", *BIAS],
                 diff_rows((f"wg-S - uni-1.0-S | {i}", d) for i, d in enumerate(wg_vs_uni))
                 + diff_rows((f"abs(wg-S - base) - abs(uni-1.0-S - base) | {i}", d) for i, d in enumerate(wg_moves_more))
                 + diff_rows((f"uni-1.0-R - uni-1.0-S | {i}", d) for i, d in enumerate(r_vs_s))),
        *section("Other suites (from eval/metrics.json)",
                 ["run", "WinoGrande held-out accuracy", "chat non-empty", "chat stops", "reward held-out accuracy"], []),
    ]
    for r in runs:
        m = metrics.get(r["name"], {})
        wg, chat = m.get("winogrande", {}), m.get("chat", {})
        acc = wg.get("accuracy")
        ci_wg = wg.get("accuracy_ci") or (wg.get("ci") or {}).get("accuracy")
        lines.append(f"| {r['name']} | {acc if acc is None else f'{acc:.3f}'}"
                     + (f" [{ci_wg[0]:.3f}, {ci_wg[1]:.3f}]" if ci_wg else "")
                     + f" | {chat.get('non_empty_rate', '-')} | {chat.get('stop_rate', '-')} | "
                     f"{reward_acc.get(r['name'], '-')} |")
    curves = loss_curves(run_dir, runs)
    if curves:
        plot_losses(curves, RESULTS / "trend_loss.png")
    lines += ["", *section("Training loss (first -> last logged value; curves in trend_loss.png)",
                           ["run folder / stage", "steps", "first loss", "last loss"],
                           [f"| {k} | {pts[-1][0]} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} |" for k, pts in curves.items()]),
              *section("Wall time per stage", ["stage", "where", "status", "wall s"],
                       [f"| {s['stage']} | {s['where']} | {s['status']} | {s['wall_s']} |" for s in summary["steps"]])]
    result = {"measured": measured, "verdicts": verdicts, "winobias_ci": cis, "paired_vs_base": vs_base,
              "wg_minus_uni": wg_vs_uni, "wg_moves_more_than_uni": wg_moves_more, "r_minus_s": r_vs_s, "reward_accuracy": reward_acc,
              "steps": summary["steps"], "loss_curves": curves}
    print(write_results("trend", result, "\n".join(lines)))


if __name__ == "__main__":
    main()
