"""The paper's grid at laptop scale on real data: `hetray run jobs/local_real.yaml`, then its
results table (Table-1 metrics per run, the base model as the baseline row) and the wall time
of every stage, into benchmarks/results/local_real.{json,md}.

    python benchmarks/local_real.py [--run-dir runs/local_real] [key.sub=value ...]

Needs ../shared/data (WinoGrande dev, the OASST trees, WinoBias dev). A re-run skips the stages
that are up to date: delete the run dir for fresh timings.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import job_benchmark_args, run_measured, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = {"convert": "preferences", "embed": "embeddings", "cluster": "clusters", "select": "selected"}
COLUMNS = ("bias", "bias_entropy", "bias_cluster", "accuracy", "similarity")


def main() -> None:
    args = job_benchmark_args(__doc__, "runs/local_real")
    hetray = str(Path(sys.executable).parent / "hetray")
    cmd = [hetray, "run", "jobs/local_real.yaml", f"run_dir={args.run_dir}", *args.overrides]
    os.chdir(ROOT)
    if args.report_only:
        measured = json.loads((ROOT / "benchmarks" / "results" / "local_real.json").read_text())["measured"]
    else:
        measured = run_measured(cmd)
    summary = json.loads((Path(args.run_dir) / "summary.json").read_text())
    metrics = summary.get("metrics") or {}
    lines = [
        "The paper's Table 1 grid on real data at small scale: WinoGrande dev (1,267 pairs) + 100 real",
        "OASST trees (rank label), SmolLM2-135M-Instruct, CPU, a few steps per stage (see",
        "jobs/local_real.yaml). `base` is the baseline row. With so few steps the differences are",
        "small; this shows the grid runs end to end, not the paper's effect sizes.",
        "",
        f"This invocation: {summary['wall_time_s']} s (stages already done are skipped; the table below has each"
        f" stage's own time); peak memory of the process tree {measured['peak_mem_mib']} MiB;"
        f" load average after {measured['load_avg_1min_after']}. The stages ran at load averages of 10-30"
        " (other jobs shared the 2 cores), so their times are pessimistic.",
        "",
        "## WinoBias (dev, 10 pairs per file: 40 per model), WinoGrande (50 dev items) and other suites",
        "| run | trained | fraction | pairs | " + " | ".join(COLUMNS) + " | WinoGrande acc. | reward acc. | chat non-empty | chat repeats prompt | chat repeated 4-grams |",
        "|---" * (len(COLUMNS) + 9) + "|",
    ]
    for r in summary["runs"]:
        m = metrics.get(r["name"], {})
        wb = (m.get("winobias") or {})
        wb = wb.get("overall", wb)
        wg = (m.get("winogrande") or {}).get("overall", m.get("winogrande") or {})
        chat = (m.get("chat") or {}).get("overall", m.get("chat") or {})
        acc = r.get("reward_accuracy")
        lines.append(
            f"| {r['name']} | {'+'.join(r['train']) or 'base'} | {r['fraction'] if r.get('folder') else '-'} | "
            f"{r.get('pairs_selected', '-')} | " + " | ".join(_num(wb.get(c)) for c in COLUMNS)
            + f" | {_num(wg.get('accuracy'))} | {_num(acc)} | {_num(chat.get('non_empty_rate'))} | "
            f"{_num(chat.get('prompt_repeat_rate'))} | {_num(chat.get('repeated_ngram_rate'))} |"
        )
    lines += ["", "## Wall time of each stage",
              "Status is this invocation's; `stage wall s` is from the stage's manifest (the run that made it).",
              "", "| stage | where | status | stage wall s |", "|---|---|---|---|"]
    root = Path(args.run_dir)
    total = 0.0
    for s in summary["steps"]:
        folder = OUTPUT.get(s["stage"], s["stage"])
        m = json.loads((root / s["where"] / folder / "manifest.json").read_text()) if (root / s["where"] / folder / "manifest.json").is_file() else {}
        total += float(m.get("wall_time_s", s["wall_s"]))
        lines.append(f"| {s['stage']} | {s['where']} | {s['status']} | {m.get('wall_time_s', s['wall_s'])} |")
    lines.append(f"| **all stages** | | | **{total:.1f}** |")
    write_results("local_real", {"summary": summary, "measured": {k: v for k, v in measured.items() if k != "output_tail"}},
                  "\n".join(lines))
    print("\n".join(lines))


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
