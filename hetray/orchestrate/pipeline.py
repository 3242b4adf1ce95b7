"""``hetray run``: every stage of a job, in order, in one Ray job.

    convert -> embed -> cluster -> select -> sft -> reward -> ppo | rloo | dpo -> eval -> report

Each stage is its own module and is skipped when its manifest matches (same config, same
inputs), so re-running a job after a failure resumes at the stage that failed.

A job without ``pipeline.runs`` is one run in ``run_dir``. A job with runs is a grid (the
paper's Table 1): the shared stages (convert, embed, and cluster for the job's k) run once in
``run_dir``; each distinct selection (sources, k, fraction) gets one folder
``run_dir/runs/<selection>/`` (``hetray.orchestrate.workspace.derive``) where it is selected and trained;
runs that differ only in how far they train (``uni-0.4-S``: SFT, ``uni-0.4-R``: SFT + reward +
PPO) share that folder and so share the SFT model. Every run's final model (the last policy
stage it trains, or the base model when it trains none) is evaluated together in
``run_dir/eval/``, and ``run_dir/report.md`` ties it together: runs, stage times, headline
metrics, where each output is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from hetray import stage as mf
from hetray.config import TRAIN_STAGES, JobConfig
from hetray.orchestrate.workspace import derive, selection_name

log = logging.getLogger(__name__)

POLICY_STAGES = ("ppo", "rloo", "dpo", "sft")  # which trained model a run ends with, by preference


@dataclass
class Run:
    name: str
    train: list[str]  # training stages, in order
    sources: list[str] | None = None
    fraction: float | None = None
    n_clusters: int | None = None
    folder: str | None = None  # the selection folder (None: no selection, the base model)

    @property
    def final_stage(self) -> str | None:
        return next((s for s in POLICY_STAGES if s in self.train), None)

    @property
    def rlhf(self) -> str | None:
        return next((s for s in ("ppo", "rloo", "dpo") if s in self.train), None)


@dataclass
class Step:
    stage: str
    where: str
    status: str  # ran | skipped | failed
    wall_s: float
    note: str = ""


@dataclass
class Pipeline:
    cfg: JobConfig
    force: bool = False
    steps: list[Step] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return Path(self.cfg.run_dir).resolve()

    def wants(self, stage: str) -> bool:
        return stage in self.cfg.pipeline.stages

    def step(self, stage: str, where: Path, fn, *args, out: Path | None = None) -> dict | None:
        """Run one stage; record whether it ran or was skipped (its manifest unchanged)."""
        out = out or where / stage
        old = mf.read_manifest(out) or {}
        before = old.get("created"), old.get("key")
        label = where.relative_to(self.root).as_posix() if where != self.root else "."
        log.info("[hetray run] %s (%s)", stage, label)
        started = time.time()
        try:
            result = fn(*args)
        except BaseException:
            self.steps.append(Step(stage, label, "failed", round(time.time() - started, 1)))
            self._print_steps()
            raise
        m = mf.read_manifest(out) or {}
        skipped = (m.get("created"), m.get("key")) == before and before[1] is not None
        self.steps.append(Step(stage, label, "skipped" if skipped else "ran", round(time.time() - started, 1)))
        sync(self.root, self.cfg.pipeline.sync_to)
        return result

    def _print_steps(self) -> None:
        print(format_steps(self.steps))


def plan_runs(cfg: JobConfig) -> list[Run]:
    """The runs of a job: its grid, or one run named after the job."""
    allowed = [s for s in cfg.pipeline.stages if s in TRAIN_STAGES]
    if not cfg.pipeline.runs:
        return [Run(cfg.name, allowed, None, cfg.select.fraction, cfg.cluster.n_clusters, folder=".")]
    runs = []
    for spec in cfg.pipeline.runs:
        train = [s for s in (spec.train if spec.train is not None else allowed) if s in cfg.pipeline.stages]
        train = [s for s in TRAIN_STAGES if s in train]  # the chain's order
        k = spec.n_clusters or cfg.cluster.n_clusters
        fraction = spec.fraction if spec.fraction is not None else cfg.select.fraction
        folder = None
        if train or "select" in cfg.pipeline.stages and spec.train is None:
            folder = f"runs/{selection_name(spec.sources, k, fraction)}"
        runs.append(Run(spec.name, train, spec.sources, fraction, k, folder))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"pipeline.runs: run names must be unique ({', '.join(dup)} repeated)")
    return runs


def run_pipeline(cfg: JobConfig, force: bool = False) -> dict:
    """Run the job's stages; returns the summary (also in ``run_dir/summary.json``)."""
    from hetray.orchestrate.ray_init import init_ray

    started = time.time()
    p = Pipeline(cfg, force)
    runs = plan_runs(cfg)
    init_ray(cfg.ray)
    root = p.root
    root.mkdir(parents=True, exist_ok=True)
    selecting = any(r.folder for r in runs) and p.wants("select")

    if p.wants("convert"):
        from hetray.unify.convert import run_convert

        p.step("convert", root, run_convert, cfg, force, out=root / "preferences")
    if p.wants("embed") or selecting:
        from hetray.selection.embed import run_embed

        p.step("embed", root, run_embed, cfg, out=root / "embeddings")
    if p.wants("cluster") or selecting:
        from hetray.selection.clustering import run_cluster

        p.step("cluster", root, run_cluster, cfg, out=root / "clusters")

    folders: dict[str, tuple[JobConfig, list[Run]]] = {}
    for run in runs:
        if run.folder is None:
            continue
        if run.folder not in folders:
            sub = cfg if run.folder == "." else derive(
                cfg, root / run.folder, n_clusters=run.n_clusters, fraction=run.fraction, sources=run.sources
            )
            folders[run.folder] = (sub, [])
        folders[run.folder][1].append(run)

    for folder, (sub, members) in folders.items():
        where = Path(sub.run_dir).resolve()
        if p.wants("select"):
            from hetray.selection.select import run_select

            p.step("select", where, run_select, sub, force, out=where / "selected")
        wanted = {s for r in members for s in r.train}
        for stage in TRAIN_STAGES:
            if stage in wanted:
                import importlib

                module = importlib.import_module(f"hetray.train.{stage}")
                p.step(stage, where, getattr(module, f"run_{stage}"), sub, force)

    # resolving the bundled LLM converts it once (~1 min): only when something will load it
    models, info = final_models(cfg, runs, resolve=p.wants("eval"))
    metrics = None
    if p.wants("eval") and models:
        p.step("eval", root, run_evaluation, cfg, models, info, force, out=root / "eval")
        metrics = _read_json(root / "eval" / "metrics.json")
    summary = {
        "job": cfg.name,
        "run_dir": str(root),
        "wall_time_s": round(time.time() - started, 1),
        "runs": [run_summary(root, r, models.get(r.name)) for r in runs],
        "steps": [s.__dict__ for s in p.steps],
        "metrics": metrics,
        "eval_report": str(root / "eval" / "report.md") if metrics else None,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if p.wants("report"):
        write_summary_report(root, summary)
    sync(root, cfg.pipeline.sync_to)
    return summary


def final_models(cfg: JobConfig, runs: list[Run], resolve: bool = True) -> tuple[dict[str, str], dict[str, dict]]:
    """{run name: model path or id} to evaluate, and what the report needs to know of each."""
    from hetray.train.common import STAGE_MODEL_DIR, resolve_base

    root = Path(cfg.run_dir).resolve()
    base = resolve_base(cfg.train.model) if resolve else cfg.train.model
    models, info = {}, {}
    if not cfg.pipeline.runs and runs[0].final_stage:  # a single run: compare against its base
        models["base"] = base
        info["base"] = {"fraction": None, "rlhf": None, "stage": "base"}
    for r in runs:
        stage = r.final_stage
        models[r.name] = str(root / r.folder / stage / STAGE_MODEL_DIR) if stage else base
        info[r.name] = {
            "fraction": r.fraction if r.folder and stage else None,
            "rlhf": r.rlhf, "stage": stage or "base", "sources": r.sources, "n_clusters": r.n_clusters,
        }
    return models, info


def run_evaluation(cfg: JobConfig, models: dict, info: dict, force: bool = False) -> dict:
    """The eval stage: every run's final model, skipped when models and settings are unchanged."""
    from hetray.eval.run import run_eval

    out = Path(cfg.run_dir).resolve() / "eval"
    fingerprints = [
        {"name": n, "model": mf.fingerprint_dir(Path(m).parent) if Path(m).is_dir() and Path(m).name == "merged" else m}
        for n, m in sorted(models.items())
    ]
    config = {"eval": cfg.eval.model_dump(mode="json"), "seed": cfg.seed, "info": info}
    key = mf.stage_key("eval", config, fingerprints)
    if not force and mf.is_up_to_date(out, key):
        log.info("eval: %s is up to date (key %s), skipping", out, key)
        return mf.read_manifest(out)
    started = time.time()
    result = run_eval(models, cfg.eval, out, seed=cfg.seed, extra=info)
    manifest = mf.new_manifest("eval", key, config, fingerprints, started)
    manifest["models"] = models
    mf.write_manifest(out, manifest)
    return result


def run_summary(root: Path, run: Run, model: str | None) -> dict:
    out = {"name": run.name, "train": run.train, "fraction": run.fraction, "sources": run.sources,
           "folder": str(root / run.folder) if run.folder else None, "model": model}
    if run.folder:
        sel = mf.read_manifest(root / run.folder / "selected") or {}
        out["pairs_selected"] = sel.get("pairs_selected")
        if "reward" in run.train:
            rew = mf.read_manifest(root / run.folder / "reward") or {}
            out["reward_accuracy"] = (rew.get("final") or {}).get("eval_accuracy")
    return out


HEADLINE = ("bias", "bias_entropy", "bias_cluster", "accuracy", "similarity")


def format_steps(steps: list[Step]) -> str:
    lines = ["| stage | where | status | wall s |", "|---|---|---|---|"]
    lines += [f"| {s.stage} | {s.where} | {s.status} | {s.wall_s} |" for s in steps]
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    """What `hetray run` prints at the end: stage times, where each output is, headline metrics."""
    root = Path(summary["run_dir"])
    lines = [f"# {summary['job']}: done in {summary['wall_time_s']} s", "", "## Stages", format_steps(
        [Step(**s) for s in summary["steps"]]), "", "## Runs",
        "| run | trained | fraction | pairs selected | reward acc. | model |", "|---|---|---|---|---|---|"]
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
    lines += ["", "## Outputs"]
    for name in ("preferences", "rejects", "embeddings", "clusters", "eval"):
        if (root / name).exists():
            lines.append(f"- {name}/: {root / name}")
    if summary.get("eval_report"):
        lines.append(f"- evaluation report: {summary['eval_report']}")
    return "\n".join(lines)


def write_summary_report(root: Path, summary: dict) -> Path:
    path = root / "report.md"
    path.write_text(format_summary(summary) + "\n")
    return path


def sync(root: Path, dest: str | None) -> None:
    """Copy the run folder to ``pipeline.sync_to`` (S3/GCS URI or path): new or changed files only."""
    if not dest:
        return
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(dest) if "://" in dest else (pafs.LocalFileSystem(), os.path.abspath(dest))
    index_path = root / ".sync-index.json"
    index = _read_json(index_path) or {}
    local = pafs.LocalFileSystem()
    changed = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == index_path.name or "/." in "/" + path.relative_to(root).as_posix():
            continue  # work folders and temp outputs (dot-names) stay local
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        if index.get(rel) == stamp:
            continue
        target = f"{base.rstrip('/')}/{rel}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(path), target, source_filesystem=local, destination_filesystem=fs)
        index[rel] = stamp
        changed += 1
    index_path.write_text(json.dumps(index))
    if changed:
        log.info("sync: %d file(s) -> %s", changed, dest)


def _rel(path: str | None, root: Path) -> str:
    if not path:
        return "-"
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
