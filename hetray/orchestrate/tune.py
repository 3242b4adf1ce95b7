"""``hetray tune``: search the selection settings (k, fraction, and optionally the quality label
of one source) with Ray Tune, against a short training run's objective.

``run_tune(cfg)`` is the conductor; it reads top to bottom:

1. ``plan_tune`` checks everything that can be checked before any work (metric, label search,
   resources, held-out split) and raises ``ConfigError`` naming the key;
2. ``prepare`` runs, once, in this process and under the job's run-dir lock, what trials share:
   for every quality-label variant its own conversion (``<run_dir>/tune/labels/<label>-<direction>/``;
   the job's own label is the job's ``run_dir``), its embeddings, the clusters for every k of the
   search space (``workspace.shared_clusters``) and the common held-out sample of pairs;
3. ``search``: a ``ray.tune.Tuner`` runs the trials, ``trial`` below, each in
   ``<run_dir>/tune/<trial>/`` (a ``workspace.derive`` run dir: links to the shared data and
   clusters, its own selection and models; its stages take that run dir's lock);
4. ``tune_report.write_outputs``: ``trials.csv`` / ``trials.json`` (settings, objective, status,
   wall time), ``best.json`` and ``objective.png``.

A trial: select -> SFT (``tune.sft_steps``; skipped when nothing needs it: a reward objective
with ``train.reward.init: base``) -> the reward model at ``tune.rounds`` growing budgets
(``train_steps * r / rounds`` steps, each trained from the SFT model) -> after each round one
``tune.report``. The budgets are what ASHA cuts: a trial whose reward model is poor after the
first budget is stopped before the larger ones. Each round retrains from scratch (the stages
take no "continue" option), so a full trial costs (rounds + 1) / 2 times the last budget.

The objective, ``reward_accuracy``: the pairwise accuracy of the trial's reward model on one
fixed sample of held-out pairs, the same for every trial (``tune.eval_pairs`` pairs of the
prompts that the reward stage's seeded hash, ``hetray.pairs.held_out``, holds out, drawn from all
of ``preferences/``; TRL drops those longer than ``train.reward.max_length``, the same in every
trial). Scored on its own selection's held-out pairs instead, a small fraction would be judged on
fewer, easier pairs (the top quality gaps) than a large one. Trials never train on held-out
prompts: SFT trains on the selection minus them, the reward stage splits them off by the same hash.
Any evaluation metric (``<suite>.<metric>``, ``hetray.eval.run.run_eval``) may be the
objective instead: policy suites score the trial's SFT model (once; it does not change between
rounds), the ``reward`` suite scores each round's reward model.

The held-out sample and a trial's training pairs are two small stages of their own
(``heldout_sample``, ``write_pairs``), run by ``hetray.stage.run_stage`` like every other.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hetray.config import ConfigError, JobConfig
from hetray.orchestrate import console
from hetray.orchestrate.tune_report import format_table, write_outputs
from hetray.pairs import held_out
from hetray.schema import PREFERENCE_SCHEMA, parquet_files
from hetray.stage import RunDirBusy, Stage, locked, read_manifest, run_stage
from hetray.tracking import tune_callbacks

log = logging.getLogger(__name__)

DEFAULT_METRIC = "reward_accuracy"


# ---------------------------------------------------------------------------- the conductor


def run_tune(cfg: JobConfig) -> dict:
    """Search, write the trial table, best.json and the plot. Returns best.json's content."""
    from hetray.orchestrate.ray_init import init_ray

    started = time.time()
    init_ray(cfg.ray)
    plan = plan_tune(cfg)
    # The trials read the root's data and clusters: no other hetray process may rewrite them
    # meanwhile. The trials' own stages lock their own run dirs, never this one.
    with locked(cfg.run_dir):
        from hetray.orchestrate.storage import check_shared_storage

        check_shared_storage(cfg.run_dir)  # nothing on one node; on several, every node must see run_dir
        prepare(cfg, plan)
        results = search(cfg, plan)
        return write_outputs(cfg, plan, results, started)


# ---------------------------------------------------------------------------- checks


def plan_tune(cfg: JobConfig) -> dict:
    """Everything the search needs, checked before any work. Raises ConfigError."""
    import ray

    t = cfg.tune
    if t.metric != DEFAULT_METRIC:
        _check_eval_metric(t.metric)
    if cfg.train.reward.eval_fraction == 0:
        raise ConfigError("train.reward.eval_fraction is 0: the tune objective needs held-out prompts")
    out = Path(cfg.run_dir).resolve() / "tune"
    variants = _label_variants(cfg, out)
    have = ray.cluster_resources()
    r = cfg.train.resources
    use_gpu = have.get("GPU", 0) > 0 if r.use_gpu == "auto" else bool(r.use_gpu)
    need_cpu = r.num_workers * r.cpus_per_worker + t.trial_cpus
    if need_cpu > have.get("CPU", 0):
        raise ConfigError(
            f"tune: one trial needs {need_cpu:g} CPUs (train.resources: {r.num_workers} x {r.cpus_per_worker:g}, "
            f"+ tune.trial_cpus {t.trial_cpus:g}) but the Ray cluster has {have.get('CPU', 0):g}")
    fits = [int(have.get("CPU", 0) // need_cpu)]
    if use_gpu:
        need_gpu = r.num_workers * r.gpus_per_worker
        if need_gpu > have.get("GPU", 0):
            raise ConfigError(f"tune: one trial needs {need_gpu:g} GPUs but the Ray cluster has {have.get('GPU', 0):g}")
        fits.append(int(have["GPU"] // need_gpu))
    concurrent = t.max_concurrent_trials or max(1, min(fits))
    budgets = [max(1, math.ceil(t.train_steps * i / t.rounds)) for i in range(1, t.rounds + 1)]
    if len(set(budgets)) != len(budgets):
        raise ConfigError(f"tune.rounds={t.rounds} > tune.train_steps={t.train_steps}: rounds would repeat a budget")
    reward_seed = cfg.train.reward.seed if cfg.train.reward.seed is not None else cfg.seed
    return {"out": str(out), "variants": variants, "concurrent": concurrent, "use_gpu": use_gpu,
            "budgets": budgets, "reward_seed": reward_seed}


def _check_eval_metric(metric: str) -> None:
    from hetray.eval.config import SUITE_NAMES

    suite, _, name = metric.partition(".")
    if suite not in SUITE_NAMES or not name:
        raise ConfigError(
            f"tune.metric {metric!r} is not known: use {DEFAULT_METRIC!r} or '<suite>.<metric>' with a suite "
            f"of {', '.join(SUITE_NAMES)} (e.g. winobias.bias)")
    try:
        import hetray.eval.run  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"tune.metric {metric!r} needs hetray.eval.run, which cannot be imported: {e}") from None


def _label_variants(cfg: JobConfig, out: Path) -> dict[str, JobConfig]:
    """``{name: root job config}``: one root per (label, direction) searched; the job's own
    label is the job itself (``""`` when no label is searched)."""
    t = cfg.tune
    if not (t.labels or t.directions):
        return {"": cfg}
    names = [s.name for s in cfg.convert.sources]
    if t.label_source not in names:
        raise ConfigError(f"tune.label_source {t.label_source!r} is not a source of convert.sources ({', '.join(names)})")
    i = names.index(t.label_source)
    source = cfg.convert.sources[i]
    if not hasattr(source, "label") or not hasattr(source, "direction"):
        raise ConfigError(f"tune.label_source {t.label_source!r} ({source.format}) has no quality label to search")
    variants = {}
    for label in t.labels or [source.label]:
        for direction in t.directions or [source.direction]:
            name = f"{label}-{direction}"
            if label == source.label and direction == source.direction:
                variants[name] = cfg
                continue
            data = cfg.model_dump(mode="json")
            data["run_dir"] = str(out / "labels" / name)
            data["convert"]["sources"][i].update(label=label, direction=direction)
            try:
                variants[name] = JobConfig.model_validate(data)
            except Exception as e:  # pydantic explains which value the adapter refuses
                raise ConfigError(f"tune.labels / tune.directions: {t.label_source} with label {label!r}, "
                                  f"direction {direction!r} is not a valid source: {e}") from None
    return variants


# ---------------------------------------------------------------------------- shared work, once


def prepare(cfg: JobConfig, plan: dict) -> None:
    """Per label variant: conversion, embeddings, clusters for every k, the held-out sample."""
    from hetray.orchestrate.workspace import shared_clusters
    from hetray.selection.embed import run_embed
    from hetray.unify.convert import run_convert

    for name, root in plan["variants"].items():
        prefs = Path(root.run_dir) / "preferences"
        if root is not cfg or read_manifest(prefs) is None:  # the job's own data is used as it is
            m = run_convert(root)
            if name and m["counts"].get(cfg.tune.label_source, {}).get("pairs", 0) == 0:
                raise ConfigError(f"tune: {cfg.tune.label_source} with {name} gives no pairs "
                                  f"(see {Path(root.run_dir) / 'rejects'})")
        em = run_embed(root)
        prompts = sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(Path(root.run_dir) / "embeddings"))
        too_big = [k for k in cfg.tune.n_clusters if k > prompts]
        if too_big:
            raise ConfigError(f"tune.n_clusters: {too_big} > the {prompts} distinct prompts of {root.run_dir}")
        for k in cfg.tune.n_clusters:
            shared_clusters(root, k)
        n = heldout_sample(root, heldout_folder(plan, name), cfg.tune.eval_pairs,
                           cfg.train.reward.eval_fraction, plan["reward_seed"])
        if n == 0:
            raise ConfigError(f"tune: no held-out pairs in {prefs} (train.reward.eval_fraction "
                              f"{cfg.train.reward.eval_fraction}): raise it, or add data")
        log.info("tune: %s ready (%s prompts embedded, k in %s, %d held-out pairs)", root.run_dir,
                 em.get("distinct_prompts", prompts), cfg.tune.n_clusters, n)


def heldout_folder(plan: dict, variant: str) -> Path:
    """``<run_dir>/tune/heldout/<variant>/``: the held-out sample of one label variant."""
    return Path(plan["out"]) / "heldout" / (variant or "job")


def _pair_batches(folder: Path):
    """The pairs of a folder as PREFERENCE_SCHEMA tables, streamed."""
    for f in parquet_files(folder):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
            yield pa.Table.from_batches([batch]).select(PREFERENCE_SCHEMA.names).cast(PREFERENCE_SCHEMA)


def _held(table: pa.Table, fraction: float, seed: int) -> pa.Array:
    return pa.array([held_out(p, fraction, seed) for p in table["prompt"].to_pylist()], pa.bool_())


def heldout_sample(root: JobConfig, folder: Path, size: int, fraction: float, seed: int) -> int:
    """A stage writing ``folder/heldout.parquet``: at most ``size`` pairs of held-out prompts (of
    ``select.sources`` when set), the ones with the smallest seeded hash: a fixed test set for
    every trial. Streams; holds ``size`` rows. Returns the number of pairs."""
    from hetray.selection.rules import tie_hash

    prefs = Path(root.run_dir) / "preferences"
    folder = Path(folder)
    stage = Stage("tune-heldout", folder.parent, outputs=(folder.name,), inputs=[prefs],
                  config={"size": size, "fraction": fraction, "seed": seed, "sources": root.select.sources},
                  required=("heldout.parquet",))

    def work(tmp: Path) -> dict:
        kept = PREFERENCE_SCHEMA.empty_table().append_column("h", pa.array([], pa.uint64()))
        for t in _pair_batches(prefs):
            mask = _held(t, fraction, seed)
            if root.select.sources is not None:
                mask = pc.and_(mask, pc.is_in(t["source"], pa.array(root.select.sources)))
            t = t.filter(mask)
            t = t.append_column("h", pa.array(tie_hash(t["pair_id"].to_pylist(), seed), pa.uint64()))
            kept = pa.concat_tables([kept, t]).sort_by("h").slice(0, size)
        pq.write_table(kept.drop_columns(["h"]), tmp / folder.name / "heldout.parquet")
        return {"pairs": kept.num_rows}

    return run_stage(stage, work)["pairs"]


def write_pairs(folder: Path, sources: list[Path], heldout: Path | None, job: JobConfig) -> int:
    """A stage writing ``folder/``: the pairs of ``sources`` whose prompt is not held out (by
    ``train.reward.eval_fraction`` / ``seed``), + the held-out sample's ``heldout.parquet`` when
    given, streamed. Returns the number of pairs outside the held-out prompts."""
    fraction, seed = job.train.reward.eval_fraction, job.train.reward.seed
    folder = Path(folder)
    stage = Stage("tune-pairs", folder.parent, outputs=(folder.name,), config={"fraction": fraction, "seed": seed},
                  inputs=[*sources, *([heldout] if heldout is not None else [])], required=("train-00000.parquet",))

    def work(tmp: Path) -> dict:
        out, rows = tmp / folder.name, 0
        with pq.ParquetWriter(out / "train-00000.parquet", PREFERENCE_SCHEMA) as w:
            for source in sources:
                for t in _pair_batches(source):
                    t = t.filter(pc.invert(_held(t, fraction, seed)))
                    w.write_table(t)
                    rows += t.num_rows
        if heldout is not None:
            os.link(Path(heldout) / "heldout.parquet", out / "heldout.parquet")  # read-only from here on
        return {"pairs": rows}

    return run_stage(stage, work)["pairs"]


# ---------------------------------------------------------------------------- the search


def search_space(cfg: JobConfig, plan: dict) -> dict:
    from ray import tune

    t = cfg.tune
    dims = {"n_clusters": t.n_clusters, "fraction": t.fraction, "variant": list(plan["variants"])}
    if t.search == "random":
        return {k: tune.choice(v) for k, v in dims.items()}
    space = {k: tune.grid_search(v) for k, v in dims.items()}
    space["repeat"] = tune.grid_search(list(range(t.num_samples)))
    return space


def search(cfg: JobConfig, plan: dict):
    """Run the trials with Ray Tune (ASHA over the reward budgets, or FIFO). Returns the ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = cfg.tune
    scheduler = FIFOScheduler()
    if t.scheduler == "asha" and t.rounds > 1:  # one report per trial leaves ASHA nothing to cut
        scheduler = ASHAScheduler(max_t=t.rounds, grace_period=1, reduction_factor=2)
    storage = Path(plan["out"]) / "ray"
    shutil.rmtree(storage / "search", ignore_errors=True)  # trial stages resume from their manifests
    log.info("tune: %s search, %s, up to %d trial(s) at once, reward budgets %s", t.search,
             type(scheduler).__name__, plan["concurrent"], plan["budgets"])
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, cfg=cfg, plan=plan), {"CPU": t.trial_cpus}),
        param_space=search_space(cfg, plan),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, scheduler=scheduler, max_concurrent_trials=plan["concurrent"],
            num_samples=t.num_samples if t.search == "random" else 1,
        ),
        # Tune's own trial table: with -v only; a line per trial round instead. Tune's default
        # loggers stay: each trial's results as CSV, JSON and TensorBoard events in storage;
        # MLflow / W&B through Tune's own callbacks when train.report_to names them
        run_config=tune.RunConfig(storage_path=str(storage), name="search", verbose=1 if console.verbose() else 0,
                                  callbacks=[trial_lines(t.metric, len(plan["budgets"])),
                                             *tune_callbacks(cfg.train.report_to, f"{cfg.name}-tune")]),
    )
    with console.printed_to_log("ray.tune.output"):
        results = tuner.fit()
    log.info("tune: trials in TensorBoard: tensorboard --logdir %s", storage / "search")
    return results


def trial_lines(metric: str, rounds: int):
    """A Tune callback: one line per trial round (and per failed trial) on hetray's logger."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            log.info("tune: %s round %s/%d: %s %s", result.get("trial", trial.trial_id), result.get("round"), rounds,
                     metric, f"{value:.4f}" if isinstance(value, float) else value)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("tune: trial %s failed (its error: %s)", trial.trial_id, trial.path)

    return TrialLines()


def trial_name(config: dict, cfg: JobConfig) -> str:
    """``k10-f0.4``, ``k10-f0.4-toxicity-lower``, ``k10-f0.4-r1`` (repeats), ``t003-k10-f0.4`` (random)."""
    name = f"k{config['n_clusters']}-f{config['fraction']:g}"
    if config["variant"]:
        name += f"-{config['variant']}"
    if cfg.tune.search == "random":
        from ray import tune

        name = f"t{int(tune.get_context().get_trial_id().rsplit('_', 1)[-1]):03d}-{name}"
    elif cfg.tune.num_samples > 1:
        name += f"-r{config['repeat']}"
    return name


def trial(config: dict, cfg: JobConfig, plan: dict) -> None:
    """One trial: select -> SFT -> the reward model at each budget, a report after each. Runs in
    a Tune worker process; only stages in its own run dirs (``<run_dir>/tune/<trial>/...``)."""
    from ray import tune

    from hetray.orchestrate.workspace import clusters_folder, derive, with_settings
    from hetray.selection.select import run_select
    from hetray.train.reward import run_reward
    from hetray.train.sft import run_sft

    name = trial_name(config, cfg)
    run = Path(plan["out"]) / name
    variant = config["variant"]
    root = plan["variants"][variant]
    t = cfg.tune
    job = derive(root, run, clusters_folder(root, config["n_clusters"]), fraction=config["fraction"],
                 changes={"seed": cfg.seed + config.get("repeat", 0), "train.data": "selected",
                          "train.sft.max_steps": t.sft_steps, "train.reward.seed": plan["reward_seed"],
                          # a trial's models are measured, then dropped: no resumable checkpoints
                          "train.sft.keep_checkpoints": 0, "train.reward.keep_checkpoints": 0})
    selection = run_select(job, out_name="selection")
    heldout = heldout_folder(plan, variant)
    train_pairs = write_pairs(run / "reward_data", [run / "selection"], heldout, job)
    if train_pairs == 0:
        raise ValueError(f"{name}: all {selection['pairs_selected']} selected pairs have held-out prompts: "
                         "nothing to train on (raise fraction or lower train.reward.eval_fraction)")
    if needs_sft(cfg):
        write_pairs(run / "selected", [run / "selection"], None, job)
        run_sft(job)
    metrics = {"trial": name, "pairs_selected": selection["pairs_selected"], "train_pairs": train_pairs,
               "heldout_pairs": read_manifest(heldout)["pairs"]}
    sft_value = None
    for r, steps in enumerate(plan["budgets"], 1):
        rdir = run / f"reward_r{r}"
        rdir.mkdir(exist_ok=True)
        for link, target in (("selected", run / "reward_data"), ("sft", run / "sft")):
            if target.exists() and not (rdir / link).is_symlink():
                (rdir / link).symlink_to(target, target_is_directory=True)
        m = run_reward(with_settings(job, run_dir=str(rdir), **{"train.reward.max_steps": steps}))
        final = m.get("final", {})
        if not final.get("eval_pairs"):  # TRL drops pairs longer than max_length, the same ones every trial
            raise ValueError(f"{name}: none of the {metrics['heldout_pairs']} held-out pairs of {heldout} fits "
                             f"train.reward.max_length={job.train.reward.max_length}")
        metrics.update(round=r, reward_steps=steps, reward_accuracy=final["eval_accuracy"],
                       eval_pairs=final["eval_pairs"])
        if t.metric != DEFAULT_METRIC:
            suite = t.metric.split(".")[0]
            if suite == "reward":
                metrics[t.metric] = eval_metric(job, t.metric, rdir / "reward" / "merged", rdir / "reward", rdir / "eval")
            else:  # the SFT model's metric: the same every round
                sft_value = sft_value if sft_value is not None else eval_metric(
                    job, t.metric, run / "sft" / "merged", None, run / "eval")
                metrics[t.metric] = sft_value
        tune.report(dict(metrics))


def needs_sft(cfg: JobConfig) -> bool:
    """SFT serves the reward model's start (``train.reward.init: sft``) and the policy suites;
    a reward-model objective from the base model needs none (one Ray Train run less a trial)."""
    reward_only = cfg.tune.metric == DEFAULT_METRIC or cfg.tune.metric.startswith("reward.")
    return cfg.train.reward.init == "sft" or not reward_only


def eval_metric(job: JobConfig, metric: str, model: Path, reward_dir: Path | None, out: Path) -> float:
    """``<suite>.<metric>`` of ``model`` (policy suites: the SFT model) or of the reward model in
    ``reward_dir`` (the reward suite), with the job's ``eval:`` settings."""
    from hetray.eval.run import run_eval

    suite, name = metric.split(".", 1)
    eval_cfg = job.eval.model_copy(update={"suites": [suite]})
    kwargs = {"reward_model": str(reward_dir)} if reward_dir is not None else {}
    result = run_eval({"model": str(model)}, eval_cfg, out, seed=job.seed, **kwargs)
    values = result["model"][suite]
    if name not in values:
        raise KeyError(f"tune.metric {metric!r}: suite {suite} has no metric {name!r} "
                       f"(it reports {', '.join(sorted(values))})")
    return float(values[name])


# ---------------------------------------------------------------------------- command line


def cli(args) -> int:
    """Run ``hetray tune``; print the trial table and the best settings. Errors go to stderr, exit 2."""
    from hetray.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        best = run_tune(cfg)
    except (ConfigError, FileNotFoundError, ValueError, RunDirBusy, RuntimeError) as e:
        print(f"hetray tune: error: {e}", file=sys.stderr, flush=True)
        return 2
    out = Path(cfg.run_dir) / "tune"
    print(format_table(json.loads((out / "trials.json").read_text())))
    print(f"\nbest ({best['metric']}, {best['mode']}): {best['objective']:.4f} with {best['settings']}")
    print(f"  use it: {' '.join(best['overrides'])}")
    print(f"  table: {out / 'trials.csv'}  plot: {out / 'objective.png'}  best: {out / 'best.json'}")
    return 0
