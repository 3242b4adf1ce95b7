"""The evaluation's metrics for other tools: lm-evaluation-harness results files and TensorBoard.

``lm_eval/<model>/results_<date>.json``: one file per model in the results JSON of
lm-evaluation-harness (``simple_evaluate`` + ``EvaluationTracker.save_results_aggregated``), so
its readers and leaderboards take hetray's numbers as they are:

* ``results: {suite: {"alias": suite, "<metric>,none": value, "<metric>_stderr,none": se}}``:
  every float metric of the suite (the values of ``metrics.json``; NaN -> null), each with its
  bootstrap standard error (the standard deviation of the resampled values behind the CI,
  ``hetray.eval.stats.stderrs``; ``"N/A"`` with ``eval.bootstrap: 0``, as lm-eval writes it);
  ``none`` is lm-eval's name for "no filter";
* ``n-samples: {suite: {"original": n, "effective": n}}`` (n: the items scored; a limit is
  applied while loading, so both are the same), ``n-shot`` (0), ``higher_is_better`` (from the
  suite's columns; null for a metric without a direction), ``versions`` (hetray's), ``configs``
  (the suite's settings and data files), ``group_subtasks``;
* ``config`` (model, ``model_args``, batch size, device, bootstrap resamples, seeds), ``model_name``,
  ``model_name_sanitized``, ``model_source`` ("hetray"), ``date``, ``start_time``, ``end_time``,
  ``total_evaluation_time_seconds``, ``git_hash`` (of hetray's source, when it is a checkout),
  ``transformers_version``, ``hetray_version``, ``task_hashes`` ({}).

``tensorboard/<model>/``: the same float metrics as scalars ``<suite>/<metric>`` (step 0), written
by ``torch.utils.tensorboard.SummaryWriter`` when TensorBoard is the tracker (``eval.report_to``,
else ``train.report_to``, tensorboard by default).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from datetime import datetime
from pathlib import Path

from hetray.eval import stats
from hetray.eval.suites import SUITES

LM_EVAL = "lm_eval"
TENSORBOARD = "tensorboard"
NO_FILTER = "none"  # lm-eval's filter name when no filter is applied


def sanitize(name: str) -> str:
    """A model name as a folder name, the way lm-eval sanitises it."""
    return re.sub(r'["<>:/|\\?*\[\]]+', "__", name)


def _value(v):
    return v if isinstance(v, float) and math.isfinite(v) else None


def _float_metrics(point: dict) -> list[str]:
    return [k for k, v in point.items() if isinstance(v, float)]


def _directions(suite: str) -> dict[str, bool | None]:
    return {key: {"higher": True, "lower": False}.get(better) for key, _, better in SUITES[suite].columns}


def lm_eval_results(model: str, path: str, measured, cfg, seed: int, started: float, ended: float) -> dict:
    """One model's results in lm-evaluation-harness's results JSON shape (see the module)."""
    import transformers

    from hetray.stage import hetray_version

    results, n_samples, configs, better = {}, {}, {}, {}
    for suite, by_model in measured.resampled.items():
        if model not in by_model:
            continue
        res, _ = by_model[model]
        overall, se = measured.metrics[model][suite], stats.stderrs(res)
        direction = _directions(suite)
        entry = {"alias": suite}
        for key in _float_metrics(res.point):
            entry[f"{key},{NO_FILTER}"] = _value(overall[key])
            entry[f"{key}_stderr,{NO_FILTER}"] = _value(se[key]) if key in se else "N/A"
        results[suite] = entry
        n_samples[suite] = {"original": res.n, "effective": res.n}
        better[suite] = {key: direction.get(key) for key in _float_metrics(res.point)}
        settings = getattr(cfg, suite, None)
        configs[suite] = {
            "task": suite, "description": SUITES[suite].title, "num_fewshot": 0,
            "output_type": "hetray:" + SUITES[suite].kind,
            "metric_list": [{"metric": k, "aggregation": "mean", "higher_is_better": v} for k, v in better[suite].items()],
            "metadata": {"version": hetray_version(), "data_files": SUITES[suite].files(cfg),
                         "settings": settings.model_dump(mode="json") if settings is not None else {}},
        }
    wall = ended - started
    return {
        "results": results,
        "group_subtasks": {suite: [] for suite in results},
        "configs": configs,
        "versions": {suite: hetray_version() for suite in results},
        "n-shot": {suite: 0 for suite in results},
        "higher_is_better": better,
        "n-samples": n_samples,
        "config": {
            "model": "hetray", "model_args": f"pretrained={path}", "batch_size": cfg.batch_size, "batch_sizes": [],
            "device": cfg.device, "use_cache": None, "limit": None, "bootstrap_iters": cfg.bootstrap,
            "gen_kwargs": {"do_sample": False, "max_new_tokens": cfg.max_new_tokens},
            "random_seed": seed, "numpy_seed": seed, "torch_seed": seed, "fewshot_seed": None,
        },
        "git_hash": git_hash(),
        "date": started,
        "transformers_version": transformers.__version__,
        "hetray_version": hetray_version(),
        "task_hashes": {},
        "model_source": "hetray",
        "model_name": path,
        "model_name_sanitized": sanitize(model),
        "start_time": started,
        "end_time": ended,
        "total_evaluation_time_seconds": str(wall),
    }


def write_lm_eval(out: Path, models: dict[str, str], measured, cfg, seed: int, started: float,
                  ended: float) -> dict[str, str]:
    """``lm_eval/<model>/results_<date>.json`` for every model with a metric (lm-eval's own file
    name, which its tools look for); returns ``{model: path relative to out}``."""
    date_id = datetime.fromtimestamp(started).isoformat().replace(":", "-")
    paths = {}
    for model, path in models.items():
        if not any(model in by_model for by_model in measured.resampled.values()):
            continue
        name = f"{LM_EVAL}/{sanitize(model)}/results_{date_id}.json"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        data = lm_eval_results(model, path, measured, cfg, seed, started, ended)
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        paths[model] = name
    return paths


def git_hash() -> str | None:
    """The commit of hetray's source when it is a git checkout (lm-eval records its own)."""
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------- TensorBoard


def write_tensorboard(out: Path, metrics_by_model: dict) -> dict[str, str]:
    """Every float metric of every model as a scalar ``<suite>/<metric>`` in
    ``tensorboard/<model>/`` (the library's writer); returns ``{model: folder relative to out}``."""
    from torch.utils.tensorboard import SummaryWriter

    paths = {}
    for model, suites in metrics_by_model.items():
        scalars = {f"{suite}/{k}": v for suite, overall in suites.items()
                   for k, v in overall.items() if _value(v) is not None}
        if not scalars:
            continue
        folder = f"{TENSORBOARD}/{sanitize(model)}"
        writer = SummaryWriter(log_dir=str(out / folder))
        try:
            for tag, v in scalars.items():
                writer.add_scalar(tag, v, global_step=0)
        finally:
            writer.close()
        paths[model] = folder
    return paths
