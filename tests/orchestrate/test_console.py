"""The console: hetray's own lines on the terminal, Ray's chatter in ``<run_dir>/logs/hetray.log``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hetray.orchestrate import console

from conftest import DATA_STAGES

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


@pytest.fixture
def routed(tmp_path):
    """The routing of a ``hetray`` command, with a log file; undone afterwards."""
    console.adopt_ray_loggers()
    console.setup(verbose=False)
    path = console.attach_log_file(tmp_path)
    yield path
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_hetray", False)]:
        root.removeHandler(h)
        h.close()
    logging.captureWarnings(False)


def test_hetray_lines_on_the_terminal_ray_lines_in_the_file(routed, capsys):
    logging.getLogger("hetray.stage").info("[convert] done in 1.0 s")
    logging.getLogger("hetray.selection.kmeans").debug("k-means pass 3: inertia [1.0]")
    logging.getLogger("ray.data._internal.progress.logging_progress").info("======= Running Dataset: ds_0 =======")
    logging.getLogger("ray.train.v2").warning("State API may be temporarily unavailable.")
    logging.getLogger("some.library").error("disk full")
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == ["[convert] done in 1.0 s", "ERROR some.library: disk full"]
    log = routed.read_text()
    for text in ("INFO hetray.stage: [convert] done in 1.0 s", "DEBUG hetray.selection.kmeans: k-means pass 3",
                 "Running Dataset: ds_0", "WARNING ray.train.v2: State API may be", "ERROR some.library: disk full"):
        assert text in log


def test_verbose_puts_ray_back_on_the_terminal(routed, capsys):
    console.setup(verbose=True)
    logging.getLogger("ray.data").info("Execution plan of Dataset ds_1")
    logging.getLogger("hetray.selection.kmeans").debug("k-means pass 1")
    err = capsys.readouterr().err
    assert "ray.data: Execution plan of Dataset ds_1" in err and "k-means pass 1" in err


def test_worker_output_goes_to_the_file_marked_lines_to_the_terminal(routed, capsys):
    console._worker_lines({"pid": 4242, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1",
                           "is_err": True, "lines": [
                               "Failed to query Ray Train Controller actor state. State API may be temporarily "
                               "unavailable. Continuing to monitor.",
                               "[hetray] train sft: step 2/4, loss 3.10",
                           ]})
    console._worker_lines({"pid": "autoscaler", "lines": ["======== Autoscaler status: 2026-11-24 ========",
                                                            "Node status", " 1.0/2.0 CPU"]})
    console._worker_lines({"pid": "raylet", "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": [
        "A worker died or was killed while executing a task: the node ran low on memory."]})
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 1)[1] for line in err] == [
        "train sft: step 2/4, loss 3.10",
        "WARNING ray raylet: A worker died or was killed while executing a task: the node ran low on memory."]
    log = routed.read_text()
    assert "INFO ray.workers: (RayTrainWorker pid=4242) Failed to query Ray Train Controller" in log
    assert "Autoscaler status" not in log  # every 5 s; Ray's monitor.log has it


def test_the_dashboard_starts_when_the_machine_can_afford_it(monkeypatch):
    from hetray.orchestrate import ray_init

    assert ray_init.want_dashboard(True) and not ray_init.want_dashboard(False)
    monkeypatch.setattr(ray_init, "DASHBOARD_MIN_MEMORY", 1)
    assert ray_init.want_dashboard("auto")  # ray[default] is installed
    monkeypatch.setattr(ray_init, "DASHBOARD_MIN_MEMORY", 1 << 60)
    assert not ray_init.want_dashboard("auto")


@pytest.mark.slow
def test_a_pipeline_prints_a_page_a_person_reads(quickstart_data):
    """`hetray run` on the bundled samples (data stages), in a subprocess as a person runs it."""
    proc, run_dir = quickstart_data.proc, quickstart_data.run_dir
    assert proc.returncode == 0, proc.stderr
    terminal = (proc.stdout + proc.stderr).splitlines()
    assert len(terminal) < 45, "\n".join(terminal)
    text = "\n".join(terminal)
    for stage in DATA_STAGES:
        assert f"[{stage}] started -> " in text and f"[{stage}] done in " in text
    assert "ray: started a local Ray" in text
    assert "log: run/logs/hetray.log (Ray's own logs: " in text  # relative to the working directory
    from hetray.orchestrate.ray_init import want_dashboard

    assert ("dashboard http://127.0.0.1:" in text) == want_dashboard("auto")
    for noise in ("State API", "Running Dataset", "logging_progress", "Execution plan", "k-means pass",
                  "Autoscaler status", "streaming_executor"):
        assert noise not in text, f"{noise!r} on the terminal:\n{text}"

    log = (run_dir / "logs" / "hetray.log").read_text()
    assert "INFO ray.data." in log and "Execution plan of Dataset" in log  # Ray Data's lines
    assert "INFO ray._private.worker: Started a local Ray instance" in log  # Ray's own start-up line
    assert "DEBUG hetray.selection.kmeans: k-means pass 1" in log
    assert "INFO hetray.stage: [select] done in" in log
