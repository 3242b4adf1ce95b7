"""Trackers besides TensorBoard: evaluation metrics and Tune trials reach MLflow through its own
API (the training side is in tests/train/test_tracking_cards.py)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from hetray.tracking import active, log_eval, tracker_env, tune_callbacks

needs_mlflow = pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                                  reason="mlflow is not installed (pip install mlflow-skinny)")

METRICS = {
    "base": {"winobias": {"bias": 0.326, "accuracy": 0.29, "n_pairs": 24, "note": "text", "ci": [0.1, 0.2]},
             "chat": {"stop_rate": 0.0, "nan_metric": math.nan}},
    "sft/x": {"winobias": {"bias": 0.301, "accuracy": 0.31, "n_pairs": 24}},
}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = (tmp_path / "mlruns").as_uri()
    for k, v in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "true",
                 "MLFLOW_EXPERIMENT_NAME": "hetray-eval-test"}.items():
        monkeypatch.setenv(k, v)
    return uri


@needs_mlflow
def test_eval_metrics_reach_mlflow_one_run_per_model(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    written = log_eval(["mlflow"], tmp_path, "job/run/eval", METRICS)
    assert set(written) == {"mlflow"} and set(written["mlflow"]) == {"base", "sft/x"}
    assert not (tmp_path / "tensorboard").exists()  # only the trackers named
    client = MlflowClient(tracking_uri=mlflow_store)
    for model, run_id in written["mlflow"].items():
        run = client.get_run(run_id)
        assert run.info.run_name == f"job/run/eval/{model}"
        assert run.data.tags["hetray.model"] == model and run.data.tags["hetray.stage"] == "eval"
        expected = {f"{s}/{k}": float(v) for s, m in METRICS[model].items() for k, v in m.items()
                    if isinstance(v, (int, float)) and math.isfinite(v)}
        assert run.data.metrics == pytest.approx(expected)
    assert "base" in written["mlflow"] and "chat/nan_metric" not in client.get_run(written["mlflow"]["base"]).data.metrics


def test_tensorboard_alone_and_none(tmp_path):
    assert log_eval("none", tmp_path, "x", METRICS) == {}
    written = log_eval(["tensorboard"], tmp_path, "x", METRICS)
    assert written == {"tensorboard": {"base": "tensorboard/base", "sft/x": "tensorboard/sft__x"}}
    assert active(None) == [] and active("none") == [] and active(["tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]


@needs_mlflow
def test_tune_uses_rays_own_logger_callbacks(monkeypatch):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tune_callbacks(["tensorboard"], "job-tune") == []  # Tune writes TensorBoard events by itself
    (cb,) = tune_callbacks(["tensorboard", "mlflow"], "job-tune")
    assert isinstance(cb, MLflowLoggerCallback) and cb.experiment_name == "job-tune" and not cb.should_save_artifact
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    (cb,) = tune_callbacks(["mlflow"], "job-tune")
    assert cb.experiment_name == "mine"


def test_tracker_variables_travel_to_the_workers(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.setenv("UNRELATED_SECRET", "s")
    env = tracker_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["WANDB_PROJECT"] == "p"
    assert "UNRELATED_SECRET" not in env and all(k.startswith(("MLFLOW_", "WANDB_")) for k in env)
