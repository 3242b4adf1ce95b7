"""The evaluation stage: every model through every configured suite, then the report.

    hetray eval --models base=smollm2-135m-instruct,sft=runs/x/sft/merged \\
        --suites winobias,winogrande,chat [--config jobs/x.yaml] [--out eval/] [winogrande.limit=50]

``run_eval(models, eval_cfg, out_dir)`` loads each model once and runs the suites on it
(``hetray.eval.suites``; what a suite is: ``hetray.eval.suite``). Every suite's items are
loaded (and checked) before any model loads. With ``eval_cfg.num_workers > 1`` a suite's items
are split across Ray actors (``hetray.eval.pool``), which needs a running Ray: the evaluation
never starts one.

Outputs in ``out_dir`` (``hetray.eval.outputs``): ``metrics.json`` (``{model: {suite: overall
metrics}}``, each float metric followed by ``<metric>_ci``, plus ``_meta``: config, seed,
versions, models, wall time per suite, ``bootstrap`` and ``paired`` (every model against the
baseline, item by item: ``hetray.eval.stats`` has the exact shape), and the output files
relative to ``out_dir``), ``records/<suite>.parquet`` (every item of every model, with a
``model`` column; ``.jsonl`` when a suite's records do not fit a table), ``chat.md`` /
``chat.jsonl`` (answers side by side), the report (``report.md``, ``report.html``, PNG plots),
``lm_eval/<model>/results_<date>.json`` (lm-evaluation-harness's results shape) and, when
TensorBoard is the tracker, ``tensorboard/<model>/`` (``hetray.eval.export``).

Progress goes to the ``hetray`` logger at INFO: a line when a model loads and when it is loaded,
a line when each suite starts and ends (items, wall time, headline metrics), and for a long suite
a line about every 10% of its items (``hetray.eval.pool``).

A reward suite measures a reward model, not the policy: the one in ``extra[model]
["reward_model"]``, else ``reward_model``, else the ``reward/`` stage beside the model's own stage
folder (``<run>/ppo/merged`` -> ``<run>/reward``); each is evaluated once and its result shown
for every model it goes with.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hetray.eval import reward, stats
from hetray.eval.config import EvalConfig
from hetray.tracking import active
from hetray.eval.outputs import META, write_outputs
from hetray.eval.pool import EvalError, Pool
from hetray.eval.suite import Suite
from hetray.eval.suites import SUITES
from hetray.models import check_model

log = logging.getLogger(__name__)


def run_eval(models: dict[str, str], eval_cfg: EvalConfig, out_dir, seed: int = 0,
             reward_model: str | None = None, extra: dict[str, dict] | None = None, report_to=None,
             run_name: str = "hetray/eval") -> dict:
    """Evaluate ``{name: model}`` on ``eval_cfg.suites``; write metrics, records and the report.
    ``report_to``: the job's ``train.report_to``, used when ``eval_cfg.report_to`` is None
    (None too: tensorboard); ``run_name``: the trackers' run name (each model's run adds
    ``/<model>``). Returns what ``metrics.json`` holds."""
    started = time.time()
    extra = extra or {}
    suites = [s for name, s in SUITES.items() if name in eval_cfg.suites]
    policy = [s for s in suites if s.kind == "policy"]
    scored_by_rm = [s for s in suites if s.kind == "reward"]
    _check_models(models)
    baseline = baseline_of(models, eval_cfg.baseline)
    rewards = _reward_models(models, reward_model, extra) if scored_by_rm else {}
    items = {s.name: s.load(eval_cfg, None) for s in policy}  # bad data fails before any model loads
    measured = Measured(models, suites, eval_cfg, seed)
    for name, path in models.items():
        if policy:
            with _loaded("policy", name, path, eval_cfg, seed) as pool:
                for suite in policy:
                    t = time.time()
                    log.info("eval %s %s: %d items", name, suite.name, len(items[suite.name]))
                    records = pool.score(suite.name, items[suite.name], label=f"eval {name} {suite.name}")
                    measured.add(suite, name, records, round(time.time() - t, 3))
    for suite in scored_by_rm:
        _run_reward(suite, rewards, eval_cfg, seed, measured)
    measured.compare(baseline)
    trackers = eval_cfg.report_to if eval_cfg.report_to is not None else (
        report_to if report_to is not None else ["tensorboard"])
    return write_outputs(Path(out_dir), models, eval_cfg, seed, extra, rewards, measured, started,
                         trackers=active(trackers), run_name=run_name)


def _loaded(kind: str, name: str, path: str, cfg: EvalConfig, seed: int) -> Pool:
    """The model in a Pool, with a log line before and after loading it."""
    t = time.time()
    log.info("eval %s: loading %s", name, path)
    pool = Pool(kind, name, path, cfg, seed)
    log.info("eval %s: loaded in %.1f s", name, time.time() - t)
    return pool


class Measured:
    """What the suites measured: per model its overall metrics (with bootstrap CIs), groups and
    wall time; per suite the records of every model (a ``model`` column first); after
    ``compare``, the paired differences against the baseline."""

    def __init__(self, models: dict[str, str], suites: list[Suite], cfg: EvalConfig, seed: int):
        self.metrics = {name: {} for name in models}
        self.groups = {name: {} for name in models}
        self.wall = {name: {} for name in models}
        self.records = {s.name: [] for s in suites}
        self.cfg, self.seed = cfg, seed
        self.suites = {s.name: s for s in suites}
        self.resampled: dict[str, dict[str, tuple[stats.Resampled, list[dict]]]] = {s.name: {} for s in suites}
        self.bootstrap = {"resamples": cfg.bootstrap, "confidence": cfg.confidence, "seed": seed, "baseline": None}
        self.paired: dict[str, dict] = {}

    def add(self, suite: Suite, model: str, records: list[dict], seconds: float, **tags) -> None:
        """``tags`` (the reward model) go into the overall metrics and every record."""
        res = stats.Resampled(suite.aggregate, records, self.cfg.bootstrap, self.seed)
        self.resampled[suite.name][model] = (res, records)
        overall = stats.with_intervals(res.point, stats.intervals(res, self.cfg.confidence))
        self.metrics[model][suite.name] = {**overall, **tags}
        if suite.by_group is not None and records:
            self.groups[model][suite.name] = suite.by_group(records)
        self.records[suite.name] += [{"model": model, **tags, **r} for r in records]
        self.wall[model][suite.name] = seconds
        log.info("eval %s %s: %d items in %.1f s: %s", model, suite.name, len(records), seconds,
                 headline(self.metrics[model][suite.name]))

    def compare(self, baseline: str) -> None:
        """Every other model against ``baseline``, suite by suite, on the same items."""
        self.bootstrap["baseline"] = baseline
        for name, by_model in self.resampled.items():
            if baseline not in by_model:
                continue
            suite, (base, base_records) = self.suites[name], by_model[baseline]
            for model, (res, records) in by_model.items():
                if model != baseline:
                    self.paired.setdefault(model, {})[name] = paired_entry(suite, res, records, base, base_records,
                                                                           self.cfg.confidence)


def paired_entry(suite: Suite, res: stats.Resampled, records: list[dict], base: stats.Resampled,
                 base_records: list[dict], confidence: float) -> dict:
    """One model against the baseline on one suite (the shape: ``hetray.eval.stats``)."""
    ids = [suite.item_id(r) for r in records] if suite.item_id else None
    base_ids = [suite.item_id(r) for r in base_records] if suite.item_id else None
    if len(records) != len(base_records) or ids != base_ids:
        return {"skipped": f"scored on other items than the baseline ({len(records)} vs {len(base_records)})"}
    entry = {"items": len(records), "metrics": stats.paired(res, base, confidence)}
    if suite.answers:
        entry["changed_answers"] = stats.changed_answers(records, base_records, suite.answers)
    return entry


def baseline_of(models: dict[str, str], wanted: str | None) -> str:
    """``eval.baseline`` when set (it must be evaluated), else ``base`` if evaluated, else the first model."""
    if wanted is not None:
        if wanted not in models:
            raise EvalError(f"eval.baseline {wanted!r} is not one of the evaluated models ({', '.join(models)})")
        return wanted
    return "base" if "base" in models else next(iter(models))


def headline(overall: dict) -> str:
    """The first few metrics, one line (intervals left out)."""
    shown = [(k, v) for k, v in overall.items() if not k.endswith("_ci")][:5]
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown)


def _check_models(models: dict[str, str]) -> None:
    """Fail before any work when a model name is unusable or a model cannot be found."""
    if not models:
        raise EvalError("no models to evaluate")
    for name, path in models.items():
        if not name or name.startswith("_"):
            raise EvalError(f"model name {name!r}: must be non-empty and not start with '_'")
        try:
            check_model(path)
        except ValueError as e:
            raise EvalError(f"model {name!r} ({path}) cannot be loaded: {e}") from e


# ---------------------------------------------------------------------------- reward models


def _reward_models(models: dict[str, str], default: str | None, extra: dict[str, dict]) -> dict[str, str]:
    """{model name: reward model} for the reward suite (see the module docstring)."""
    out = {}
    for name, path in models.items():
        rm = (extra.get(name) or {}).get("reward_model") or default
        if rm is None and Path(path).name == reward.MODEL_DIR:
            beside = Path(path).parent.parent / "reward"
            rm = str(beside) if reward.stage_dir_of(str(beside)) is not None else None
        if rm is not None:
            if not Path(reward.model_dir_of(rm)).exists():
                raise EvalError(f"reward model for {name!r}: {rm!r} does not exist")
            out[name] = rm
    if not out:
        raise EvalError("suite reward: no reward model: pass --reward-model (a run's reward/ folder or a "
                        "sequence-classification checkpoint), or evaluate models trained in a run that has one")
    return out


def _run_reward(suite: Suite, rewards: dict[str, str], cfg: EvalConfig, seed: int, measured: Measured) -> None:
    """Each reward model scored once; its records and metrics shown for every model it goes with."""
    done: dict[str, tuple[list, float]] = {}
    for name, rm in rewards.items():
        if rm not in done:
            t = time.time()
            items = suite.load(cfg, rm)
            log.info("eval %s (reward model of %s) %s: %d items", rm, name, suite.name, len(items))
            with _loaded("reward", f"reward model of {name}", rm, cfg, seed) as pool:
                done[rm] = (pool.score(suite.name, items, label=f"eval {rm} {suite.name}"), round(time.time() - t, 3))
        records, seconds = done[rm]
        measured.add(suite, name, records, seconds, reward_model=rm)


# ---------------------------------------------------------------------------- command line


def parse_models(spec: str) -> dict[str, str]:
    """``a=path,b=alias`` -> {"a": "path", "b": "alias"}; a bare model is its own name."""
    models = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        name, path = (name.strip(), path.strip()) if sep else (part, part)
        if not name or not path:
            raise EvalError(f"--models: {part!r} is not name=model")
        if name in models:
            raise EvalError(f"--models: the name {name!r} is given twice")
        models[name] = path
    if not models:
        raise EvalError("--models: no model given")
    return models


def eval_config(config: str | None, overrides: list[str], suites: str | None) -> tuple[EvalConfig, int | None]:
    """The EvalConfig (a job's eval: section, or the defaults) with overrides; and the job's seed."""
    from pydantic import ValidationError

    from hetray.config import ConfigError, apply_overrides, load_config

    job = load_config(config) if config else None
    data = job.eval.model_dump(mode="json") if job else {}
    if job and data.get("report_to") is None:  # the job's trackers (train.report_to), tensorboard by default
        data["report_to"] = list(job.train.report_to)
    apply_overrides(data, [o[len("eval."):] if o.startswith("eval.") else o for o in overrides])
    if suites:
        data["suites"] = [s.strip() for s in suites.split(",") if s.strip()]
    try:
        return EvalConfig.model_validate(data), (job.seed if job else None)
    except ValidationError as e:
        raise ConfigError("\n".join(_explain(err, config) for err in e.errors())) from None


def _explain(err: dict, config: str | None) -> str:
    """One pydantic error as 'where: unknown key 'eval.x.y'' (hetray.config's own explainer drops
    location parts named like a source format, such as ``winogrande``)."""
    key = "eval." + ".".join(str(p) for p in err["loc"])
    origin = config or "hetray eval"
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'"
    return f"{origin}: '{key}': {err['msg']} (got {err.get('input')!r})"


def from_args(args) -> tuple[dict[str, str], EvalConfig, int, str | None, Path]:
    """``(models, eval config, seed, reward model, output folder)`` from the ``hetray eval``
    options; ConfigError / EvalError name what is wrong."""
    models = parse_models(args.models)
    cfg, job_seed = eval_config(args.config, args.overrides, args.suites)
    seed = args.seed if args.seed is not None else (job_seed or 0)
    return models, cfg, seed, args.reward_model, Path(args.out)


def print_result(models: dict[str, str], result: dict, out) -> None:
    """One line per model and suite, then where the metrics and the report are."""
    for name in models:
        for suite, overall in result[name].items():
            print(f"{name:>16} {suite:<10} {headline(overall)}")
    report = Path(out) / result[META]["outputs"]["report"]["markdown"]
    print(f"metrics: {Path(out) / 'metrics.json'}\nreport:  {report}")
