"""The run report: what `hetray run` prints at the end and writes to ``run_dir/report.md``:
stage times, each run with its selection and reward accuracy, headline metrics, where outputs are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hetray.stage import read_manifest


@dataclass
class Step:
    stage: str
    where: str
    status: str  # ran | skipped | failed
    wall_s: float


def run_row(root: Path, run, model: str | None) -> dict:
    """One run (a ``pipeline.Run``) as the report lists it."""
    out = {"name": run.name, "train": run.train, "fraction": run.fraction, "sources": run.sources,
           "folder": str(root / run.folder) if run.folder else None, "model": model}
    if run.folder:
        sel = read_manifest(root / run.folder / "selected") or {}
        out["pairs_selected"] = sel.get("pairs_selected")
        if "reward" in run.train:
            rew = read_manifest(root / run.folder / "reward") or {}
            out["reward_accuracy"] = (rew.get("final") or {}).get("eval_accuracy")
    return out


HEADLINE = ("bias", "bias_entropy", "bias_cluster", "accuracy", "similarity")


def format_steps(steps: list[Step]) -> str:
    lines = ["| stage | where | status | wall s |", "|---|---|---|---|"]
    lines += [f"| {s.stage} | {s.where} | {s.status} | {s.wall_s} |" for s in steps]
    return "\n".join(lines)


def format_run_report(summary: dict, terminal: bool = False) -> str:
    """``report.md``: stage times, each run, headline metrics, where each output is. ``terminal``:
    what `hetray run` prints at the end, without what its stage lines already said (times, paths)."""
    root = Path(summary["run_dir"])
    steps = [Step(**s) for s in summary["steps"]]
    lines = [f"# {summary['job']}: done in {summary['wall_time_s']} s"]
    if terminal:
        ran = sum(s.status == "ran" for s in steps)
        lines[0] += f" ({ran} stage(s) ran, {len(steps) - ran} up to date)"
    else:
        lines += ["", "## Stages", format_steps(steps)]
    lines += ["", "## Runs", "| run | trained | fraction | pairs selected | reward acc. | model |",
              "|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        acc = r.get("reward_accuracy")
        lines.append(
            f"| {r['name']} | {'+'.join(r['train']) or 'base'} | {r['fraction'] if r.get('folder') else '-'} | "
            f"{r.get('pairs_selected', '-')} | {'-' if acc is None else f'{acc:.3f}'} | {_rel(r['model'], root)} |"
        )
    metrics = summary.get("metrics") or {}
    wb = {m: s.get("winobias") for m, s in metrics.items() if isinstance(s, dict) and s.get("winobias")}
    if wb:
        lines += ["", "## WinoBias (overall)", "| model | " + " | ".join(HEADLINE) + " |",
                  "|---" * (len(HEADLINE) + 1) + "|"]
        for m, v in wb.items():
            v = v.get("overall", v)
            lines.append(f"| {m} | " + " | ".join(_num(v.get(k)) for k in HEADLINE) + " |")
    if terminal:
        return "\n".join(lines)
    lines += ["", "## Outputs"]
    for name in ("preferences", "rejects", "embeddings", "clusters", "eval"):
        if (root / name).exists():
            lines.append(f"- {name}/: {root / name}")
    if summary.get("eval_report"):
        lines.append(f"- evaluation report: {summary['eval_report']}")
    return "\n".join(lines)


def write_run_report(root: Path, summary: dict) -> Path:
    path = root / "report.md"
    path.write_text(format_run_report(summary) + "\n")
    return path


def _rel(path: str | None, root: Path) -> str:
    if not path:
        return "-"
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
