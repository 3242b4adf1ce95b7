"""The experiment trackers (``train.report_to``): which there are, and how each stage reaches them.

hetray writes no tracker format by hand; every tracker is driven by its own library:

* **training**: transformers' callbacks (``TrainingArguments.report_to``, rank 0 only;
  ``hetray.train.worker``);
* **evaluation**: ``log_eval`` below: TensorBoard through ``torch.utils.tensorboard``
  (``hetray.eval.export.write_tensorboard``), MLflow through ``mlflow.start_run`` /
  ``log_metrics``, W&B through ``wandb.init`` / ``run.log``; one tracker run per evaluated model,
  named ``<job>/<run folder>/eval/<model>``;
* **Tune**: Ray Tune's own logger callbacks (``tune_callbacks``): its default TensorBoard/CSV/JSON
  loggers always, plus ``MLflowLoggerCallback`` / ``WandbLoggerCallback`` when named.

MLflow and W&B are configured the usual way, by their environment variables
(``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``WANDB_PROJECT``, ``WANDB_MODE``, ...).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator

log = logging.getLogger(__name__)

Tracker = Literal["tensorboard", "mlflow", "wandb", "none"]
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def check_trackers(value: list[str]) -> list[str]:
    """``none`` alone, or trackers whose package is installed."""
    if "none" in value and len(value) > 1:
        raise ValueError(f"'none' cannot be combined with {[v for v in value if v != 'none']}")
    for name in value:
        packages = PACKAGES.get(name, ())
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise ValueError(f"{name!r} needs the {packages[0]!r} package, which is not installed "
                             f"(pip install {packages[0]}), or report to 'none'")
    return value


def _as_list(value):
    return [value] if isinstance(value, str) else value


# one tracker name or a list of them; checked once, wherever report_to appears
Trackers = Annotated[list[Tracker], BeforeValidator(_as_list), AfterValidator(check_trackers)]


ENV_PREFIXES = ("MLFLOW_", "WANDB_")


def tracker_env() -> dict[str, str]:
    """The driver's MLflow and W&B variables, for the training workers: Ray workers inherit the
    environment of the process that started Ray, not of the driver that submits the stage."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def active(report_to) -> list[str]:
    """The trackers named by ``report_to`` (a name, a list, None or "none"), without "none"."""
    return [t for t in (_as_list(report_to) or []) if t != "none"]


def log_eval(report_to, out: Path, run_name: str, metrics_by_model: dict) -> dict:
    """Log every float metric of every model, as ``<suite>/<metric>``, to each tracker named;
    returns where each went: ``{"tensorboard": {model: folder}, "mlflow": {model: run id},
    "wandb": {model: run id}}`` (only the trackers named)."""
    from hetray.eval.export import write_tensorboard

    trackers = active(report_to)
    written: dict = {}
    if "tensorboard" in trackers:
        written["tensorboard"] = write_tensorboard(out, metrics_by_model)
    scalars = {model: {f"{suite}/{k}": float(v) for suite, overall in suites.items()
                       for k, v in overall.items() if _is_number(v)}
               for model, suites in metrics_by_model.items()}
    if "mlflow" in trackers:
        import mlflow

        written["mlflow"] = {}
        for model, values in scalars.items():
            with mlflow.start_run(run_name=f"{run_name}/{model}",
                                  tags={"hetray.stage": "eval", "hetray.model": model}) as run:
                mlflow.log_metrics(values)
            written["mlflow"][model] = run.info.run_id
    if "wandb" in trackers:
        import wandb

        written["wandb"] = {}
        for model, values in scalars.items():
            run = wandb.init(name=f"{run_name}/{model}", dir=str(out), job_type="eval",
                             config={"hetray.model": model}, reinit="finish_previous")
            run.log(values)
            written["wandb"][model] = run.id
            run.finish()
    return written


def _is_number(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def tune_callbacks(report_to, experiment: str) -> list:
    """Ray Tune's logger callbacks for the trackers besides TensorBoard (Tune writes TensorBoard
    events for every trial by itself): ``MLflowLoggerCallback`` (experiment: ``MLFLOW_EXPERIMENT_NAME``
    or ``experiment``), ``WandbLoggerCallback`` (project: ``WANDB_PROJECT`` or ``experiment``)."""
    callbacks = []
    trackers = active(report_to)
    if "mlflow" in trackers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment), save_artifact=False))
    if "wandb" in trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", experiment)))
    return callbacks
