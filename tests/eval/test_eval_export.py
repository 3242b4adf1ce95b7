"""The evaluation for other tools and people: lm-evaluation-harness results files, TensorBoard
scalars, progress lines in the log, and an HTML report that fits the window."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from hetray.eval import stats
from hetray.eval.config import EvalConfig
from hetray.eval.export import sanitize
from hetray.eval.run import eval_config, run_eval
from hetray.eval.suites import SUITES

PROMPTS = ["Hi!", "Name a colour.", "Count to three."]


def cfg(**kw) -> EvalConfig:
    return EvalConfig(**{"suites": ["winogrande", "chat"], "device": "cpu", "batch_size": 4, "bootstrap": 200,
                         "winogrande": {"limit": 8}, "chat": {"prompts": PROMPTS, "max_new_tokens": 3}, **kw})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("export") / "eval"
    result = run_eval({"base": tiny_llama, "sft/x": tiny_llama}, cfg(), out, seed=5)
    return out, result


def exported(out, model: str) -> dict:
    saved = json.loads((out / "metrics.json").read_text())
    return json.loads((out / saved["_meta"]["outputs"]["lm_eval"][model]).read_text())


def test_lm_eval_results_have_the_harness_shape_and_the_metrics_json_values(evaluated, tiny_llama):
    out, _ = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    paths = saved["_meta"]["outputs"]["lm_eval"]
    assert set(paths) == {"base", "sft/x"}
    assert re.fullmatch(r"lm_eval/sft__x/results_\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d(\.\d+)?\.json", paths["sft/x"])
    for model in ("base", "sft/x"):
        data = exported(out, model)
        assert {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "git_hash", "date", "transformers_version", "model_name", "model_name_sanitized",
                "total_evaluation_time_seconds"} <= set(data)
        assert data["model_name"] == tiny_llama and data["model_name_sanitized"] == sanitize(model)
        assert data["config"]["model_args"] == f"pretrained={tiny_llama}" and data["config"]["bootstrap_iters"] == 200
        assert isinstance(data["date"], float) and float(data["total_evaluation_time_seconds"]) >= 0
        assert set(data["results"]) == {"winogrande", "chat"} == set(data["n-samples"]) == set(data["configs"])
        for suite, entry in data["results"].items():
            metrics = saved[model][suite]
            floats = [k for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_ci")]
            assert entry["alias"] == suite
            assert {k for k in entry if k != "alias"} == {f"{k}{s},none" for k in floats for s in ("", "_stderr")}
            assert {k: entry[f"{k},none"] for k in floats} == {k: metrics[k] for k in floats}
            # the stderr: the spread of the same bootstrap resamples that gave the CI
            records = [r for r in pq.read_table(out / "records" / f"{suite}.parquet").to_pylist() if r["model"] == model]
            res = stats.Resampled(SUITES[suite].aggregate, records, 200, 5)
            for k in floats:
                assert entry[f"{k}_stderr,none"] == pytest.approx(float(np.std(res.samples[k], ddof=1)), abs=1e-12)
            n = len(records)
            assert data["n-samples"][suite] == {"original": n, "effective": n} and data["n-shot"][suite] == 0
        assert data["n-samples"]["chat"]["effective"] == len(PROMPTS)
        assert data["higher_is_better"]["chat"] == {"non_empty_rate": True, "prompt_repeat_rate": False, "stop_rate": True,
                                                    "repeated_ngram_rate": False, "mean_new_tokens": None}
        assert data["configs"]["winogrande"]["metadata"]["settings"]["limit"] == 8


def test_no_resamples_give_the_harness_na_stderr(tmp_path, tiny_llama):
    run_eval({"base": tiny_llama}, cfg(suites=["chat"], bootstrap=0), tmp_path, seed=0)
    entry = exported(tmp_path, "base")["results"]["chat"]
    assert entry["stop_rate_stderr,none"] == "N/A" and isinstance(entry["stop_rate,none"], float)


def test_tensorboard_holds_every_float_metric_per_model(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = evaluated
    folders = result["_meta"]["outputs"]["tensorboard"]
    assert folders == {"base": "tensorboard/base", "sft/x": "tensorboard/sft__x"}
    for model, folder in folders.items():
        events = EventAccumulator(str(out / folder))
        events.Reload()
        logged = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"]}
        expected = {f"{suite}/{k}": v for suite, m in result[model].items() for k, v in m.items()
                    if isinstance(v, float)}
        assert set(logged) == set(expected) and "chat/stop_rate" in logged
        assert logged == pytest.approx(expected, abs=1e-6)  # float32 in the event file


def test_the_tracker_setting(tmp_path, tiny_llama):
    small = cfg(suites=["chat"], bootstrap=0)
    run_eval({"base": tiny_llama}, small, tmp_path / "off", report_to=["none"])
    assert not (tmp_path / "off" / "tensorboard").exists()
    run_eval({"base": tiny_llama}, small.model_copy(update={"report_to": ["tensorboard"]}), tmp_path / "on",
             report_to=["none"])  # eval.report_to wins over the job's train.report_to
    assert (tmp_path / "on" / "tensorboard" / "base").is_dir()
    job = tmp_path / "job.yaml"
    job.write_text("convert:\n  sources: [{name: wg, format: winogrande, path: x.jsonl}]\n"
                   "train:\n  report_to: [none]\n")
    assert eval_config(str(job), [], None)[0].report_to == ["none"]
    assert eval_config(str(job), ["report_to=tensorboard"], None)[0].report_to == ["tensorboard"]
    assert eval_config(None, [], None)[0].report_to is None  # run_eval: tensorboard


def test_progress_lines_per_model_and_suite(tmp_path, tiny_llama, caplog):
    prompts = [f"Say {i}." for i in range(40)]
    small = cfg(suites=["chat"], bootstrap=0, batch_size=2, chat={"prompts": prompts, "max_new_tokens": 2})
    with caplog.at_level(logging.INFO, logger="hetray"):
        run_eval({"base": tiny_llama}, small, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("hetray.eval")]
    assert "eval base chat: 40 items" in lines
    assert any(re.fullmatch(r"eval base chat: 40 items in [\d.]+ s: .*non_empty_rate.*", x) for x in lines)
    progress = [x for x in lines if re.fullmatch(r"eval base chat: \d+/40 items \(\d+%\), \d+ s", x)]
    assert [p.split()[3] for p in progress] == [f"{4 * k}/40" for k in range(1, 11)]  # every 10%, not per batch
    assert any(x.startswith("eval base: loaded in") for x in lines)


def test_the_html_report_scales_to_the_window(evaluated):
    page = (evaluated[0] / "report.html").read_text()
    assert "img{max-width:100%;height:auto" in page and "name='viewport'" in page
    assert "<div class='table'><table>" in page and ".table{max-width:100%;overflow-x:auto}" in page
