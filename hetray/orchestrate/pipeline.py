"""``hetray run``: every stage of a job, in order, in one Ray job.

    convert -> embed -> cluster -> select -> sft -> reward -> ppo | rloo | dpo -> eval -> report

The conductor: it starts (or joins) Ray once, holds the run directory's lock for the whole job,
and calls each stage in turn; a stage whose manifest matches is skipped by the stage runner, so
re-running a job after a failure resumes at the stage that failed, and ``--force`` re-runs every
stage. Before the first stage, ``preflight`` checks every input of every stage the job will run
(sources, models, LoRA targets, eval data, DeepSpeed file, cluster resources) and refuses the job
with the list of every problem, in seconds (``hetray run JOB --check`` runs only that).

A job without ``pipeline.runs`` is one run in ``run_dir``. A job with runs is a grid (the
paper's Table 1): the shared stages (convert, embed, and the clusters for every k of the grid)
run once in ``run_dir``; each distinct selection (sources, k, fraction) gets one folder
``run_dir/runs/<selection>/`` (``workspace.derive``) where it is selected and trained; runs
that differ only in how far they train (``uni-0.4-S``: SFT, ``uni-0.4-R``: SFT + reward + PPO)
share that folder and so share the SFT model. Every run's final model (the last policy stage it
trains, or the base model when it trains none) is evaluated together in ``run_dir/eval/``, and
``run_dir/report.md`` ties it together (``run_report``).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from hetray.config import JobConfig
from hetray.orchestrate.preflight import check_no_contamination, preflight
from hetray.orchestrate.ray_init import init_ray
from hetray.orchestrate.run_report import Step, format_steps, run_row, write_run_report
from hetray.orchestrate.sync import sync
from hetray.orchestrate.workspace import derive, run_folder, selection_name, shared_clusters
from hetray.stage import Stage, locked, read_manifest, run_stage
from hetray.train import RLHF_STAGES
from hetray.train import STAGES as TRAIN_STAGES
from hetray.train.driver import STAGE_MODEL_DIR, resolve_base

log = logging.getLogger(__name__)

FINAL_STAGES = (*RLHF_STAGES, "sft")  # which trained model a run ends with, by preference


@dataclass
class Run:
    name: str
    train: list[str]  # training stages, in order
    sources: list[str] | None = None
    fraction: float | None = None
    n_clusters: int | None = None
    folder: str | None = None  # the selection folder (None: no selection, the base model)
    seed: int | None = None  # None: the job's

    @property
    def final_stage(self) -> str | None:
        return next((s for s in FINAL_STAGES if s in self.train), None)

    @property
    def rlhf(self) -> str | None:
        return next((s for s in RLHF_STAGES if s in self.train), None)


@dataclass
class Pipeline:
    cfg: JobConfig
    steps: list[Step] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return Path(self.cfg.run_dir).resolve()

    def wants(self, stage: str) -> bool:
        return stage in self.cfg.pipeline.stages

    def step(self, stage: str, where: Path, out: Path, fn, *args, **kwargs):
        """Run one stage; record whether it ran or was skipped (its manifest unchanged)."""
        old = read_manifest(out) or {}
        before = old.get("created"), old.get("key")
        label = where.relative_to(self.root).as_posix() if where != self.root else "."
        log.debug("[hetray run] %s (%s)", stage, label)  # the stage runner logs its start and end
        started = time.time()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            self.steps.append(Step(stage, label, "failed", round(time.time() - started, 1)))
            print(format_steps(self.steps))
            raise
        m = read_manifest(out) or {}
        skipped = (m.get("created"), m.get("key")) == before and before[1] is not None
        self.steps.append(Step(stage, label, "skipped" if skipped else "ran", round(time.time() - started, 1)))
        sync(self.root, self.cfg.pipeline.sync_to)
        return result


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
            folder = f"runs/{selection_name(spec.sources, k, fraction)}" + (f"-s{spec.seed}" if spec.seed is not None else "")
        runs.append(Run(spec.name, train, spec.sources, fraction, k, folder, spec.seed))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"pipeline.runs: run names must be unique ({', '.join(dup)} repeated)")
    return runs


def run_pipeline(cfg: JobConfig, force: bool = False) -> dict:
    """Run the job's stages; returns the summary (also in ``run_dir/summary.json``)."""
    runs = plan_runs(cfg)
    check_no_contamination(cfg, runs)  # before any work: a job never evaluates on what it trained on
    init_ray(cfg.ray)
    with locked(cfg.run_dir):  # a second `hetray run` on this run_dir fails here, at once
        # every input of every stage, in seconds: a job fails now, not after hours of training
        preflight(cfg, runs, contamination=False)
        return _run(cfg, runs, force)


def _run(cfg: JobConfig, runs: list[Run], force: bool) -> dict:
    from hetray.selection.embed import run_embed
    from hetray.selection.select import run_select
    from hetray.unify.convert import run_convert

    started = time.time()
    p = Pipeline(cfg)
    root = p.root
    selecting = any(r.folder for r in runs) and p.wants("select")

    if p.wants("convert"):
        p.step("convert", root, root / "preferences", run_convert, cfg, force=force)
    if p.wants("embed") or selecting:
        p.step("embed", root, root / "embeddings", run_embed, cfg, force=force)
    ks = dict.fromkeys([cfg.cluster.n_clusters] if p.wants("cluster") else [])
    ks.update(dict.fromkeys(r.n_clusters for r in runs if r.folder and selecting))
    clusters = {}
    for k in ks:  # the job's k in clusters/, any other in shared/k<K>/
        where = root if k == cfg.cluster.n_clusters else root / "shared" / f"k{k}"
        clusters[k] = p.step("cluster", where, where / "clusters", shared_clusters, cfg, k, force=force)

    folders: dict[str, tuple[JobConfig, list[Run]]] = {}
    for run in runs:
        if run.folder is None:
            continue
        if run.folder not in folders:
            sub = cfg if run.folder == "." else derive(
                cfg, run_folder(root, run.folder), clusters[run.n_clusters], fraction=run.fraction, sources=run.sources,
                changes={"seed": run.seed} if run.seed is not None else None)
            folders[run.folder] = (sub, [])
        folders[run.folder][1].append(run)

    for folder, (sub, members) in folders.items():
        where = Path(sub.run_dir).resolve()
        with locked(where):
            if p.wants("select"):
                p.step("select", where, where / "selected", run_select, sub, force=force)
            wanted = {s for r in members for s in r.train}
            for stage in TRAIN_STAGES:
                if stage in wanted:
                    module = importlib.import_module(f"hetray.train.{stage}")
                    p.step(stage, where, where / stage, getattr(module, f"run_{stage}"), sub, force=force)

    metrics = None
    # resolving the bundled LLM converts it once (~1 min): only when something will load it
    models, info = final_models(cfg, runs, resolve=p.wants("eval"))
    if p.wants("eval") and models:
        p.step("eval", root, root / "eval", run_evaluation, cfg, models, info, force=force)
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
    summary = {
        "job": cfg.name,
        "run_dir": str(root),
        "wall_time_s": round(time.time() - started, 1),
        "runs": [run_row(root, r, models.get(r.name)) for r in runs],
        "steps": [s.__dict__ for s in p.steps],
        "metrics": metrics,
        "eval_report": str(root / "eval" / "report.md") if metrics else None,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    if p.wants("report"):
        write_run_report(root, summary)
    sync(root, cfg.pipeline.sync_to)
    return summary


def final_models(cfg: JobConfig, runs: list[Run], resolve: bool = True) -> tuple[dict[str, str], dict[str, dict]]:
    """{run name: model path or id} to evaluate, and what the report needs to know of each."""
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
            "seed": r.seed,
        }
    return models, info


def run_evaluation(cfg: JobConfig, models: dict, info: dict, force: bool = False) -> dict:
    """The eval stage: every run's final model, skipped when models and settings are unchanged.
    A trained model is fingerprinted by its stage's key, the base model by its name."""
    from hetray.eval.run import run_eval

    names = sorted(models)
    inputs = [Path(models[n]).parent if Path(models[n]).name == STAGE_MODEL_DIR else cfg.train.model for n in names]
    stage = Stage("eval", cfg.run_dir, outputs=("eval",), inputs=inputs,
                  config={"eval": cfg.eval.model_dump(mode="json"), "seed": cfg.seed, "info": info, "models": names})

    def work(tmp: Path) -> dict:
        run_eval(models, cfg.eval, tmp / "eval", seed=cfg.seed, extra=info, report_to=cfg.train.report_to,
                 run_name=f"{cfg.name}/{Path(cfg.run_dir).name}/eval")
        return {"models": {n: _relative(models[n], stage.root) for n in names}}

    return run_stage(stage, work, force=force)


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path
