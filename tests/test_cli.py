"""The command line: every form runs through ``hetray.cli.main`` with its real output and exit
code; the heavy work (a pipeline, a search) is replaced where only the plumbing is tested."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from hetray.cli import main
from hetray.config import JobConfig, load_config
from hetray.schema import PREFERENCE_SCHEMA, REJECT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"


# ---------------------------------------------------------------------------- --version, usage


def test_version_comes_from_the_package_metadata(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hetray {metadata.version('hetray')} (Ray {metadata.version('ray')}")


def test_a_usage_error_is_exit_2_on_stderr(capsys):
    assert main(["no-such-command"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "invalid choice: 'no-such-command'" in err


# ---------------------------------------------------------------------------- run


@pytest.fixture
def fake_pipeline(monkeypatch):
    """``run_pipeline`` replaced: records the config it was given, returns an empty summary."""
    from hetray.orchestrate import pipeline

    calls = []

    def run(cfg, force=False):
        calls.append((cfg, force))
        return {"job": cfg.name, "run_dir": cfg.run_dir, "wall_time_s": 0.1, "runs": [], "steps": [],
                "metrics": None, "eval_report": None}

    monkeypatch.setattr(pipeline, "run_pipeline", run)
    return calls


@pytest.mark.parametrize("form", [
    ["run", str(QUICKSTART)],
    ["run", "--config", str(QUICKSTART)],
    ["run", str(QUICKSTART), "--force"],
])
def test_run_takes_the_job_as_argument_or_config(form, tmp_path, fake_pipeline, capsys):
    argv = form + [f"run_dir={tmp_path}", "select.fraction=0.4"]
    assert main(argv) == 0
    (cfg, force), = fake_pipeline
    assert cfg.name == "quickstart" and cfg.run_dir == str(tmp_path) and cfg.select.fraction == 0.4
    assert force == ("--force" in form)
    assert "# quickstart: done in 0.1 s" in capsys.readouterr().out
    assert (tmp_path / "logs" / "hetray.log").is_file()  # the run's log file


def test_run_without_a_job_is_an_error(fake_pipeline, capsys):
    assert main(["run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "hetray: error: hetray run: give the job YAML" in err
    assert not fake_pipeline


def test_a_crash_is_one_line_on_stderr_and_a_traceback_in_the_log(tmp_path, monkeypatch, capsys):
    from hetray.orchestrate import pipeline

    def crash(cfg, force=False):
        raise KeyError("no such column: 'quality'")

    monkeypatch.setattr(pipeline, "run_pipeline", crash)
    assert main(["run", str(QUICKSTART), f"run_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    log = tmp_path / "logs" / "hetray.log"
    assert out == ""
    assert err.strip() == f"hetray: error: KeyError: \"no such column: 'quality'\" (traceback in {log})"
    assert "Traceback (most recent call last)" in log.read_text() and "in crash" in log.read_text()


# ---------------------------------------------------------------------------- config show / schema


def test_config_show_prints_the_resolved_job(capsys):
    assert main(["config", "show", str(QUICKSTART), "select.fraction=0.4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {QUICKSTART} select.fraction=0.4: resolved")
    shown = yaml.safe_load(out)
    assert shown == load_config(QUICKSTART, ["select.fraction=0.4"]).model_dump(mode="json")
    assert shown["select"]["fraction"] == 0.4
    assert shown["cluster"]["max_iter"] == 100  # not in the file: a default, filled in
    assert shown["ray"]["include_dashboard"] == "auto"
    assert JobConfig.model_validate(shown)  # what it prints is a job that loads as it is


def test_config_show_refuses_an_unknown_key(capsys):
    assert main(["config", "show", str(QUICKSTART), "select.fractoin=0.4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown key 'select.fractoin'" in err


def _leaf_keys(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        a = field.annotation
        if isinstance(a, type) and issubclass(a, BaseModel):
            yield from _leaf_keys(a, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_config_schema_lists_every_key_with_type_default_and_help(capsys):
    assert main(["config", "schema"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "help"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(_leaf_keys(JobConfig)) <= set(rows)  # every section walked
    assert rows["select.fraction"].split()[1:6] == ["float", ">", "0", "<=", "1"]
    assert "1.0" in rows["select.fraction"] and "kept share of each cluster" in rows["select.fraction"]
    assert rows["train.reward.lora.r"].split()[1:5] == ["int", ">=", "1", "8"]  # the reward's own default
    assert rows["ray.include_dashboard"].split()[1:4] == ["auto", "|", "bool"]
    assert "required" in rows["convert.sources[format=oasst].path"]
    assert "toxicity" in rows["convert.sources[format=oasst].label"]  # help of a source's setting
    assert rows["pipeline.runs[].name"].split()[1:3] == ["str", "required"]


# ---------------------------------------------------------------------------- inspect


def _manifest(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"key": "k" + folder.name, "created": "2026-01-01T00:00:00+0000", "wall_time_s": 1.5}
    (folder / "manifest.json").write_text(json.dumps({**base, **fields}))


def _pairs(folder: Path, sources: dict[str, int]) -> None:
    rows = [{"pair_id": f"{s}{i}", "prompt": f"p{i}", "chosen": "c", "rejected": "r", "source": s,
             "quality": 0.5 if s == "oasst" else None, "chosen_score": None, "rejected_score": None,
             "label": None, "provenance": [str(i)]} for s, n in sources.items() for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), folder / "part-00000.parquet")


def _trained(folder: Path, stage: str, steps: int, history: list[dict], final: dict | None = None) -> None:
    _manifest(folder, stage=f"train-{stage}", global_step=steps, max_steps=steps, rows=6, data="selected",
              model_in="base-model", final=final or {}, budget={"rows_per_step": 2, "epochs_seen": 0.5})
    (folder / "metrics.json").write_text(json.dumps({"history": history, "final": final or {}}))
    for d in ("adapter", "merged"):
        (folder / d).mkdir()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with every stage folder, written by hand (manifests as the stages write them)."""
    run = tmp_path_factory.mktemp("inspect") / "run"
    _pairs(run / "preferences", {"oasst": 4, "winogrande": 2})
    _manifest(run / "preferences", stage="convert", counts={"oasst": {"pairs": 4}, "winogrande": {"pairs": 2}},
              totals={"pairs": 6, "rejected": 1})
    (run / "rejects").mkdir()
    pq.write_table(pa.Table.from_pylist([{"source": "oasst", "file": "a.jsonl", "line": 3, "record_id": "m1",
                                          "reason": "tie", "detail": None}], schema=REJECT_SCHEMA),
                   run / "rejects" / "part-00000.parquet")
    _manifest(run / "embeddings", stage="embed", settings={"model": "all-minilm-l6-v2"}, device="cpu", dim=384,
              prompts=6, distinct_prompts=5)
    _manifest(run / "clusters", stage="cluster", rows=5, dim=384, inertia=1.25, n_iter=3, sizes=[3, 2])
    _pairs(run / "selected", {"oasst": 2, "winogrande": 1})
    _manifest(run / "selected", stage="select", pairs_in=6, pairs_selected=3, n_clusters=2,
              config={"select": {"fraction": 0.5}}, report={"markdown": "selected_report/report.md"},
              cells=[{"cluster": 0, "source": "oasst", "n": 4, "kept": 2},
                     {"cluster": 1, "source": "winogrande", "n": 2, "kept": 1}])
    (run / "selected_report").mkdir()
    (run / "selected_report" / "report.md").write_text("# Selection\n")
    (run / "selected_report" / "quality.png").write_bytes(b"png")
    _trained(run / "sft", "sft", 4, [{"loss": 3.0, "step": 1}, {"loss": 2.5, "step": 4}, {"train_loss": 2.7}])
    _trained(run / "reward", "reward", 4, [{"loss": 0.69, "step": 1}, {"loss": 0.6, "step": 4}],
             final={"eval_accuracy": 0.625})
    _trained(run / "ppo", "ppo", 2, [{"objective/rlhf_reward": 0.9, "step": 1},
                                     {"objective/rlhf_reward": 1.1, "step": 2}])
    _manifest(run / "eval", stage="eval", models={"base": "base-model", "quickstart": "ppo/merged"})
    (run / "eval" / "metrics.json").write_text(json.dumps({
        "base": {"winobias": {"bias": 0.33, "bias_ci": [0.2, 0.4], "accuracy": 0.29, "similarity": 0.83},
                 "chat": {"non_empty_rate": 1.0}},
        "quickstart": {"winobias": {"bias": 0.31, "accuracy": 0.3, "similarity": 0.88},
                       "chat": {"non_empty_rate": 1.0}},
        "_meta": {"config": {}}}))
    (run / "eval" / "report.md").write_text("# Evaluation report\n")
    (run / "summary.json").write_text(json.dumps({"job": "quickstart", "wall_time_s": 42.0}))
    # a grid run: its own selection and SFT model
    _manifest(run / "runs" / "uni-k2-f0.5" / "selected", stage="select", pairs_in=6, pairs_selected=3, n_clusters=2)
    _trained(run / "runs" / "uni-k2-f0.5" / "sft", "sft", 1, [{"loss": 2.0, "step": 1}])
    return run


def _inspect(path, capsys) -> str:
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_inspect_a_run_directory_lists_every_stage(run_dir, capsys):
    out = _inspect(run_dir, capsys)
    assert out.startswith(f"run: {run_dir}  (job quickstart, last `hetray run` 42.0 s)")
    top = out.split("\n\n")[0].splitlines()[1:]  # the grid's runs follow after a blank line
    line = {l.split()[0]: l for l in top}
    assert "6 pairs (oasst 4, winogrande 2); 1 records rejected" in line["preferences/"]
    assert "1 rows" in line["rejects/"]
    assert "5 distinct prompts of 6, dim 384, all-minilm-l6-v2 on cpu" in line["embeddings/"]
    assert "k=2, 5 prompts, inertia 1.25 after 3 iterations; sizes 3/2" in line["clusters/"]
    assert "3 of 6 pairs (fraction 0.5, k=2); report selected_report/report.md" in line["selected/"]
    assert "2 file(s): quality.png, report.md" in line["selected_report/"]
    assert "4/4 steps on 6 selected rows, loss 3 -> 2.5; adapter + merged" in line["sft/"]
    assert "eval_accuracy 0.625" in line["reward/"]
    assert "objective/rlhf_reward 0.9 -> 1.1" in line["ppo/"]
    assert "2 model(s) (base, quickstart) x 2 suite(s) (chat, winobias); report eval/report.md" in line["eval/"]
    assert f"run: {run_dir / 'runs' / 'uni-k2-f0.5'}" in out  # the grid's runs, indented below
    assert "1/1 steps" in out


@pytest.mark.parametrize("folder, expected", [
    ("preferences", ["[oasst] pairs 4; quality (4 scored)", "[winogrande] pairs 2; quality: none", "rows: 6"]),
    ("rejects", ["oasst  tie: 1"]),
    ("embeddings", ["stage embed, key kembeddings", "5 distinct prompts of 6"]),
    ("clusters", ["stage cluster", "sizes 3/2"]),
    ("selected", ["3 of 6 pairs (fraction 0.5, k=2)", "[oasst] kept 2 of 4", "[winogrande] kept 1 of 2"]),
    ("selected_report", ["2 file(s): quality.png, report.md"]),
    ("sft", ["stage train-sft", "4/4 steps on 6 selected rows, loss 3 -> 2.5", "from base-model",
             "budget: 2 rows per step, 0.5 epochs seen", "adapter:", "merged:"]),
    ("reward", ["stage train-reward", "eval_accuracy 0.625"]),
    ("ppo", ["stage train-ppo", "2/2 steps", "objective/rlhf_reward 0.9 -> 1.1"]),
    ("eval", ["2 model(s) (base, quickstart)", "base (base-model)", "quickstart (ppo/merged)",
              "winobias: bias 0.33, accuracy 0.29, similarity 0.83", "chat: non_empty_rate 1", "report.md:"]),
])
def test_inspect_every_stage_folder(run_dir, folder, expected, capsys):
    out = _inspect(run_dir / folder, capsys)
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out}"
    assert "_meta" not in out and "bias_ci" not in out


def test_inspect_a_missing_model_says_so(run_dir, tmp_path, capsys):
    import shutil

    shutil.copytree(run_dir / "sft", tmp_path / "sft")
    shutil.rmtree(tmp_path / "sft" / "merged")
    out = _inspect(tmp_path / "sft", capsys)
    assert "; adapter\n" in out and "merged:       missing" in out


def test_inspect_errors_are_exit_2_on_stderr(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"hetray: error: {tmp_path / 'nothing'} does not exist"
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "holds no Parquet files and no hetray run" in capsys.readouterr().err


# ---------------------------------------------------------------------------- errors of every command


@pytest.mark.parametrize("argv", [
    ["convert", "--config", "missing.yaml"],
    ["embed", "--config", "missing.yaml"],
    ["select", "--config", "missing.yaml", "--fraction", "0.4"],
    ["train", "sft", "--config", "missing.yaml"],
    ["run", "missing.yaml"],
    ["tune", "--config", "missing.yaml"],
    ["config", "show", "missing.yaml"],
])
def test_every_command_reports_errors_on_stderr_with_exit_2(argv, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "error: config file 'missing.yaml' does not exist" in err


def test_tune_failures_go_to_stderr(tmp_path, monkeypatch, capsys):
    from hetray.orchestrate import tune

    def fail(cfg):
        raise RuntimeError("tune: no trial gave an objective; see trials.csv")

    monkeypatch.setattr(tune, "run_tune", fail)
    assert main(["tune", "--config", str(QUICKSTART), f"run_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no trial gave an objective" in err


def test_the_parser_and_the_data_stages_do_not_import_torch():
    """`hetray convert` starts without torch, matplotlib or the eval code (1.8 s of imports, a
    tenth of a 1M-row conversion)."""
    import subprocess
    import sys

    code = ("import sys; import hetray.cli, hetray.unify.convert; hetray.cli.make_parser(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'hetray.eval.run') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
