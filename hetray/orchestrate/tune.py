"""``hetray tune``: search the selection settings (k, fraction, and optionally the quality label
of one source) with Ray Tune, against a short training run's objective.

``run_tune(cfg)`` reads top to bottom:

1. ``plan_tune`` checks everything that can be checked before any work (metric, label search,
   resources, held-out split) and raises ``ConfigError`` naming the key;
2. ``prepare`` runs, once, on the driver, what trials share: for every quality-label variant its
   own conversion (``<run_dir>/tune/labels/<label>-<direction>/``; the job's own label is the
   job's ``run_dir``), its embeddings, the clusters for every k of the search space
   (``workspace.shared_clusters``) and the common held-out sample of pairs;
3. a ``ray.tune.Tuner`` runs the trials, ``trial`` below, each in ``<run_dir>/tune/<trial>/``
   (a ``workspace.derive`` run dir: links to the shared data, its own selection and models);
4. ``write_outputs``: ``trials.csv`` / ``trials.json`` (settings, objective, status, wall time),
   ``best.json`` and ``objective.png``.

A trial: select -> SFT (``tune.sft_steps``; skipped when nothing needs it: a reward objective
with ``train.reward.init: base``) -> the reward model at ``tune.rounds`` growing budgets
(``train_steps * r / rounds`` steps, each trained from the SFT model) -> after each round one
``tune.report``. The budgets are what ASHA cuts: a trial whose reward model is poor after the
first budget is stopped before the larger ones. Each round retrains from scratch (the stages
take no "continue" option), so a full trial costs (rounds + 1) / 2 times the last budget.

The objective, ``reward_accuracy``: the pairwise accuracy of the trial's reward model on one
fixed sample of held-out pairs, the same for every trial (``tune.eval_pairs`` pairs of the
prompts that the reward stage's seeded hash holds out, drawn from all of ``preferences/``;
TRL drops those longer than ``train.reward.max_length``, the same in every trial). Scored on its
own selection's held-out pairs instead, a small fraction would be judged on fewer, easier pairs
(the top quality gaps) than a large one. Trials never train on held-out prompts: SFT trains on
the selection minus them, the reward stage splits them off by the same hash.
Any evaluation metric (``<suite>.<metric>``, ``hetray.eval.run.run_eval``) may be the
objective instead: policy suites score the trial's SFT model (once; it does not change between
rounds), the ``reward`` suite scores each round's reward model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hetray import stage as mf
from hetray.config import ConfigError, JobConfig
from hetray.schema import PREFERENCE_SCHEMA, prompt_id
from hetray.schema import parquet_files

log = logging.getLogger(__name__)

DEFAULT_METRIC = "reward_accuracy"
TABLE_COLUMNS = ["trial", "n_clusters", "fraction", "label", "direction", "repeat", "seed", "objective",
                 "reward_accuracy", "status", "rounds_done", "reward_steps", "pairs_selected", "train_pairs",
                 "eval_pairs", "wall_time_s", "error"]


# ---------------------------------------------------------------------------- the entry point


def run_tune(cfg: JobConfig) -> dict:
    """Search, write the trial table, best.json and the plot. Returns best.json's content."""
    from hetray.orchestrate.ray_init import init_ray

    started = time.time()
    init_ray(cfg.ray)
    plan = plan_tune(cfg)
    prepare(cfg, plan)
    results = _fit(cfg, plan)
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
    from hetray.eval.config import SUITES

    suite, _, name = metric.partition(".")
    if suite not in SUITES or not name:
        raise ConfigError(
            f"tune.metric {metric!r} is not known: use {DEFAULT_METRIC!r} or '<suite>.<metric>' with a suite "
            f"of {', '.join(SUITES)} (e.g. winobias.bias)")
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
    from hetray.unify.convert import run_convert
    from hetray.selection.embed import run_embed
    from hetray.orchestrate.workspace import shared_clusters

    for name, root in plan["variants"].items():
        prefs = Path(root.run_dir) / "preferences"
        if root is not cfg or mf.read_manifest(prefs) is None:  # the job's own data is used as it is
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
        n = heldout_sample(root, Path(plan["out"]) / "heldout" / (name or "job"), cfg.tune.eval_pairs,
                           cfg.train.reward.eval_fraction, plan["reward_seed"])
        if n == 0:
            raise ConfigError(f"tune: no held-out pairs in {prefs} (train.reward.eval_fraction "
                              f"{cfg.train.reward.eval_fraction}): raise it, or add data")
        log.info("tune: %s ready (%s prompts embedded, k in %s, %d held-out pairs)", root.run_dir,
                 em.get("distinct_prompts", prompts), cfg.tune.n_clusters, n)


def is_held_out(prompts: list[str], fraction: float, seed: int) -> list[bool]:
    """The reward stage's split (``train.common.held_out`` of the prompt id), per prompt."""
    from hetray.train.common import held_out

    return [held_out(prompt_id(p), fraction, seed) for p in prompts]


def heldout_sample(root: JobConfig, folder: Path, size: int, fraction: float, seed: int) -> int:
    """At most ``size`` pairs of held-out prompts (of ``select.sources`` when set), the ones with
    the smallest seeded hash: a fixed test set for every trial. Streams; holds ``size`` rows."""
    from hetray.selection.rules import tie_hash

    prefs = Path(root.run_dir) / "preferences"
    config = {"size": size, "fraction": fraction, "seed": seed, "sources": root.select.sources}
    key = mf.stage_key("tune-heldout", config, [mf.fingerprint_dir(prefs)])
    if mf.is_up_to_date(folder, key):
        return mf.read_manifest(folder)["pairs"]
    started = time.time()
    kept = PREFERENCE_SCHEMA.empty_table().append_column("h", pa.array([], pa.uint64()))
    for f in parquet_files(prefs):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
            t = pa.Table.from_batches([batch]).select(PREFERENCE_SCHEMA.names).cast(PREFERENCE_SCHEMA)
            mask = is_held_out(t["prompt"].to_pylist(), fraction, seed)
            if root.select.sources is not None:
                mask = pc.and_(pa.array(mask), pc.is_in(t["source"], pa.array(root.select.sources)))
            t = t.filter(mask)
            t = t.append_column("h", pa.array(tie_hash(t["pair_id"].to_pylist(), seed), pa.uint64()))
            kept = pa.concat_tables([kept, t]).sort_by("h").slice(0, size)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pq.write_table(kept.drop_columns(["h"]), folder / "heldout.parquet")
    manifest = mf.new_manifest("tune-heldout", key, config, [mf.fingerprint_dir(prefs)], started)
    manifest["pairs"] = kept.num_rows
    mf.write_manifest(folder, manifest)
    return kept.num_rows


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


def _fit(cfg: JobConfig, plan: dict):
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
        run_config=tune.RunConfig(storage_path=str(storage), name="search", verbose=1),
    )
    return tuner.fit()


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
    """One trial: select -> SFT -> the reward model at each budget, a report after each."""
    from ray import tune

    from hetray.selection.select import run_select
    from hetray.train.reward import run_reward
    from hetray.train.sft import run_sft
    from hetray.orchestrate.workspace import _with, derive

    name = trial_name(config, cfg)
    run = Path(plan["out"]) / name
    variant = config["variant"]
    repeat = config.get("repeat", 0)
    t = cfg.tune
    job = derive(plan["variants"][variant], run, n_clusters=config["n_clusters"], fraction=config["fraction"],
                 changes={"seed": cfg.seed + repeat, "train.data": "selected", "train.sft.max_steps": t.sft_steps,
                          "train.reward.seed": plan["reward_seed"]})
    selection = run_select(job, out_name="selection")
    heldout = Path(plan["out"]) / "heldout" / (variant or "job")
    train_pairs = _write_pairs(run / "reward_data", [run / "selection"], heldout, job, "minus-heldout+sample")
    if train_pairs == 0:
        raise ValueError(f"{name}: all {selection['pairs_selected']} selected pairs have held-out prompts: "
                         "nothing to train on (raise fraction or lower train.reward.eval_fraction)")
    if needs_sft(cfg):
        _write_pairs(run / "selected", [run / "selection"], None, job, "minus-heldout")
        run_sft(job)
    metrics = {"trial": name, "pairs_selected": selection["pairs_selected"], "train_pairs": train_pairs,
               "heldout_pairs": mf.read_manifest(heldout)["pairs"]}
    sft_value = None
    for r, steps in enumerate(plan["budgets"], 1):
        rdir = run / f"reward_r{r}"
        rdir.mkdir(exist_ok=True)
        for link, target in (("selected", run / "reward_data"), ("sft", run / "sft")):
            if target.exists() and not (rdir / link).is_symlink():
                (rdir / link).symlink_to(target, target_is_directory=True)
        m = run_reward(_with(job, run_dir=str(rdir), **{"train.reward.max_steps": steps}))
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


def _write_pairs(folder: Path, sources: list[Path], heldout: Path | None, job: JobConfig, what: str) -> int:
    """``folder/`` = the pairs of ``sources`` whose prompt is not held out (+ the held-out sample
    when given), streamed, with a manifest: re-runs skip it and the stages keyed on it. Returns
    the number of pairs outside the held-out prompts."""
    fraction, seed = job.train.reward.eval_fraction, job.train.reward.seed
    inputs = [mf.fingerprint_dir(s) for s in sources] + ([mf.fingerprint_dir(heldout)] if heldout else [])
    key = mf.stage_key(f"tune-{what}", {"fraction": fraction, "seed": seed}, inputs)
    if mf.is_up_to_date(folder, key):
        return mf.read_manifest(folder)["pairs"]
    started = time.time()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rows = 0
    with pq.ParquetWriter(folder / "part-00000.parquet", PREFERENCE_SCHEMA) as w:
        for f in [f for s in sources for f in parquet_files(s)]:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
                t = pa.Table.from_batches([batch]).select(PREFERENCE_SCHEMA.names).cast(PREFERENCE_SCHEMA)
                keep = [not h for h in is_held_out(t["prompt"].to_pylist(), fraction, seed)]
                t = t.filter(pa.array(keep, pa.bool_()))
                w.write_table(t)
                rows += t.num_rows
    if heldout is not None:
        os.link(heldout / "heldout.parquet", folder / "heldout.parquet")  # read-only from here on
    manifest = mf.new_manifest(f"tune-{what}", key, {"fraction": fraction, "seed": seed}, inputs, started)
    manifest["pairs"] = rows
    mf.write_manifest(folder, manifest)
    return rows


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


# ---------------------------------------------------------------------------- outputs


def trial_rows(cfg: JobConfig, plan: dict, results) -> list[dict]:
    """One row per trial, from the Tune ResultGrid."""
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


def write_outputs(cfg: JobConfig, plan: dict, results, started: float) -> dict:
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


def plot_objective(rows: list[dict], path: Path, metric: str, mode: str) -> None:
    """Objective vs fraction, one line per k (mean over repeats), one panel per label variant;
    hollow markers: trials ASHA stopped (their value is a smaller budget's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[df["objective"].notna()]
    df["variant"] = [f"{l}-{d}" if l else "" for l, d in zip(df["label"].fillna(""), df["direction"].fillna(""))] if len(df) else []
    variants = sorted(df["variant"].unique()) if len(df) else [""]
    fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 3.8), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        part = df[df["variant"] == variant] if len(df) else df
        for k, g in part.groupby("n_clusters"):
            mean = g.groupby("fraction")["objective"].mean()
            line, = ax.plot(mean.index, mean.values, label=f"k={k}")
            for status, face in (("completed", line.get_color()), ("stopped", "none")):
                pts = g[g["status"] == status]
                ax.scatter(pts["fraction"], pts["objective"], s=45, facecolors=face, edgecolors=line.get_color(), zorder=3)
        ax.set_xticks(sorted(part["fraction"].unique()) if len(part) else [])
        ax.set_xlabel("fraction")
        ax.set_ylabel(f"{metric} ({mode})")
        ax.set_title(variant or "selection settings", fontsize=10)
        ax.grid(alpha=0.3)
        if len(part):
            ax.legend(fontsize=8)
    fig.suptitle(f"{metric} by fraction and k (hollow: stopped early)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    """``hetray tune --config jobs/x.yaml [key.sub=value ...]``"""
    p.add_argument("--config", required=True, help="job YAML; the search is its tune: section")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.fraction=[0.2,1.0] tune.scheduler=fifo")


def format_table(rows: list[dict]) -> str:
    cols = ["trial", "objective", "reward_accuracy", "status", "rounds_done", "pairs_selected", "wall_time_s"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    cells = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)


def cli(args) -> int:
    from hetray.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        best = run_tune(cfg)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"hetray tune: error: {e}", flush=True)
        return 2
    out = Path(cfg.run_dir) / "tune"
    print(format_table(json.loads((out / "trials.json").read_text())))
    print(f"\nbest ({best['metric']}, {best['mode']}): {best['objective']:.4f} with {best['settings']}")
    print(f"  use it: {' '.join(best['overrides'])}")
    print(f"  table: {out / 'trials.csv'}  plot: {out / 'objective.png'}  best: {out / 'best.json'}")
    return 0
