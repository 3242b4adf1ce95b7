"""`hetray run`: the whole chain, a grid of runs sharing stages, resume after a failure, sync."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hetray.cli import main
from hetray.config import ConfigError, JobConfig, load_config
from hetray.orchestrate.preflight import check_no_contamination
from hetray.pairs import holdout
from hetray.orchestrate.pipeline import plan_runs, run_pipeline
from hetray.orchestrate.run_report import format_run_report
from hetray.orchestrate.sync import sync
from hetray.schema import read_table
from hetray.stage import RunDirBusy, read_manifest

from conftest import DATA_STAGES, copy_run

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"

TINY_STEPS = {"max_steps": 1, "per_device_batch_size": 2, "max_length": 64, "save_steps": 1, "logging_steps": 1}


def grid_cfg(run_dir: Path, model: str, stages: list[str], wg: bool = True) -> JobConfig:
    data = yaml.safe_load(QUICKSTART.read_text())
    data["run_dir"] = str(run_dir)
    data["train"] = {
        "model": model,
        "resources": {"num_workers": 1, "max_failures": 0},
        "sft": TINY_STEPS,
        "reward": {**TINY_STEPS, "eval_fraction": 0.3},
        "ppo": {**TINY_STEPS, "per_device_batch_size": 1, "gradient_accumulation_steps": 1,
                "min_new_tokens": 1, "max_new_tokens": 4, "num_ppo_epochs": 1},
    }
    data["eval"] = {"suites": ["winobias", "chat"], "batch_size": 8, "max_new_tokens": 4,
                    "winobias": {"limit": 2, "types": [2]}, "chat": {"prompts": ["Say hi."], "max_new_tokens": 4}}
    data["pipeline"] = {
        "stages": stages,
        "runs": [
            {"name": "base", "train": []},
            *([{"name": "wg-S", "sources": ["winogrande"], "fraction": 1.0, "train": ["sft"]}] if wg else []),
            {"name": "uni-0.6-S", "fraction": 0.6, "train": ["sft"]},
            {"name": "uni-0.6-R", "fraction": 0.6, "train": ["sft", "reward", "ppo"]},
        ],
    }
    return JobConfig.model_validate(data)


def test_plan_runs_share_selection_folders(tmp_path):
    cfg = grid_cfg(tmp_path, "smollm2-135m-instruct", list(JobConfig.model_fields["pipeline"].default_factory().stages))
    runs = {r.name: r for r in plan_runs(cfg)}
    assert runs["base"].folder is None and runs["base"].final_stage is None
    assert runs["wg-S"].folder == "runs/winogrande-k3-f1"
    assert runs["uni-0.6-S"].folder == runs["uni-0.6-R"].folder == "runs/all-k3-f0.6"
    assert runs["uni-0.6-S"].final_stage == "sft" and runs["uni-0.6-R"].final_stage == "ppo"
    assert runs["uni-0.6-R"].rlhf == "ppo" and runs["uni-0.6-S"].rlhf is None


def test_single_run_and_stage_filter(tmp_path):
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", "pipeline.stages=[convert,embed,cluster,select,sft,dpo]"])
    (run,) = plan_runs(cfg)
    assert run.folder == "." and run.train == ["sft", "dpo"] and run.final_stage == "dpo"


def test_duplicate_run_names_are_refused(tmp_path):
    data = grid_cfg(tmp_path, "x", ["convert"]).model_dump(mode="json")
    data["pipeline"]["runs"].append({"name": "base", "train": []})
    with pytest.raises(ValueError, match="base repeated"):
        plan_runs(JobConfig.model_validate(data))


def test_sync_copies_new_and_changed_files_only(tmp_path):
    root, dest = tmp_path / "run", tmp_path / "bucket"
    (root / "preferences").mkdir(parents=True)
    (root / ".sft-work").mkdir()
    (root / "preferences" / "a.parquet").write_bytes(b"1234")
    (root / ".sft-work" / "ckpt").write_bytes(b"x")
    sync(root, str(dest))
    assert (dest / "preferences" / "a.parquet").read_bytes() == b"1234"
    assert not (dest / ".sft-work").exists()  # work folders stay local
    (dest / "preferences" / "a.parquet").write_bytes(b"stale-but-unchanged-source")
    sync(root, f"file://{dest}")
    assert (dest / "preferences" / "a.parquet").read_bytes() == b"stale-but-unchanged-source"
    (root / "preferences" / "a.parquet").write_bytes(b"56789")
    sync(root, str(dest))
    assert (dest / "preferences" / "a.parquet").read_bytes() == b"56789"


@pytest.mark.slow
def test_grid_shares_stages_resumes_after_failure_and_skips_when_done(tmp_path, tiny_llama, ray_local, monkeypatch,
                                                                      quickstart_data):
    stages = ["convert", "embed", "cluster", "select", "sft", "reward", "ppo", "eval", "report"]
    # the shared stages were run once for the session with these settings (test_force_reruns_every_stage
    # checks that they run): a copy of that run, not a fresh one
    copy_run(quickstart_data, tmp_path / "job")
    cfg = grid_cfg(tmp_path / "job", tiny_llama, stages, wg=False)  # select.sources: test_select

    import hetray.train.ppo as ppo

    def broken(*a, **k):
        raise RuntimeError("injected PPO failure")

    monkeypatch.setattr(ppo, "run_ppo", broken)
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(cfg)
    monkeypatch.undo()

    summary = run_pipeline(cfg)
    steps = [(s["stage"], s["where"], s["status"]) for s in summary["steps"]]
    # shared stages once, at the root; every stage before the failure is resumed, not redone
    assert steps[:3] == [("convert", ".", "skipped"), ("embed", ".", "skipped"), ("cluster", ".", "skipped")]
    assert ("sft", "runs/all-k3-f0.6", "skipped") in steps and ("reward", "runs/all-k3-f0.6", "skipped") in steps
    assert ("ppo", "runs/all-k3-f0.6", "ran") in steps
    assert [s for s, _, _ in steps].count("sft") == 1  # one per selection folder, shared by -S and -R
    root = Path(cfg.run_dir)
    assert (root / "runs" / "all-k3-f0.6" / "embeddings").is_symlink()

    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["uni-0.6-R"]["model"].endswith("runs/all-k3-f0.6/ppo/merged")
    assert runs["uni-0.6-S"]["model"].endswith("runs/all-k3-f0.6/sft/merged")
    assert runs["uni-0.6-R"]["pairs_selected"] == 52
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(runs) <= set(metrics)
    assert (root / "report.md").read_text().count("| uni-0.6-") >= 2
    assert "evaluation report" in format_run_report(summary)

    again = run_pipeline(cfg)
    assert {s["status"] for s in again["steps"]} == {"skipped"}

    # moved elsewhere (links between run folders are relative): still up to date, every stage
    moved = tmp_path / "elsewhere" / "job"
    moved.parent.mkdir()
    shutil.move(str(root), str(moved))
    there = run_pipeline(cfg.model_copy(update={"run_dir": str(moved)}))
    assert {s["status"] for s in there["steps"]} == {"skipped"} and len(there["steps"]) == len(again["steps"])
    assert (moved / "runs" / "all-k3-f0.6" / "preferences" / "manifest.json").is_file()


def data_cfg(run_dir: Path) -> JobConfig:
    return load_config(QUICKSTART, [f"run_dir={run_dir}", f"pipeline.stages=[{','.join(DATA_STAGES)}]"])


@pytest.mark.slow
def test_force_reruns_every_stage(tmp_path, ray_local, quickstart_data):
    # `hetray run` of these stages, once for the session (its page: test_console); here a copy of its run_dir
    first = quickstart_data.proc.stdout + quickstart_data.proc.stderr
    assert all(f"[{s}] done in" in first for s in DATA_STAGES) and "4 stage(s) ran, 0 up to date" in first
    run = copy_run(quickstart_data, tmp_path / "run")
    selected = sorted(read_table(run / "selected", ["pair_id"])["pair_id"].to_pylist())
    assert len(selected) == 52
    created = {d: read_manifest(run / d)["created"] for d in ("preferences", "embeddings", "clusters")}

    again = run_pipeline(data_cfg(run))  # a copy elsewhere is up to date
    assert [(s["stage"], s["status"]) for s in again["steps"]] == [(s, "skipped") for s in DATA_STAGES]

    forced = run_pipeline(data_cfg(run), force=True)  # every stage, embed and cluster too
    assert [(s["stage"], s["status"]) for s in forced["steps"]] == [(s, "ran") for s in DATA_STAGES]
    assert all(read_manifest(run / d)["created"] > c for d, c in created.items())
    # the same pairs (convert writes its files in the order its tasks finish, so not the same bytes)
    assert sorted(read_table(run / "selected", ["pair_id"])["pair_id"].to_pylist()) == selected


def test_a_second_run_on_the_same_run_dir_fails_at_once(tmp_path, ray_local, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom hetray.stage import locked\n"
        f"with locked({str(run_dir)!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.time()
        with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
            run_pipeline(data_cfg(run_dir))
        assert main(["run", str(QUICKSTART), f"run_dir={run_dir}"]) == 2
        assert time.time() - started < 10
        err = capsys.readouterr().err
        assert f"is being written by another hetray process (pid {holder.pid}" in err
        assert not (run_dir / "preferences").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_job_that_would_evaluate_on_its_training_data_is_refused(tmp_path):
    quickstart = load_config(QUICKSTART, [f"run_dir={tmp_path}"])
    check_no_contamination(quickstart, plan_runs(quickstart))  # trains on type 1, scores type 2: fine

    both = load_config(QUICKSTART, [f"run_dir={tmp_path}", "eval.winobias.types=[1,2]"])
    with pytest.raises(ConfigError, match=r"eval suite 'winobias' reads .*anti_stereotyped_type1\.txt\.dev, "
                                          r"which source 'winobias' \(convert.sources\[2\]\) trains on"):
        check_no_contamination(both, plan_runs(both))
    with pytest.raises(ConfigError, match="never evaluates on data it trained on"):
        run_pipeline(both)  # before Ray or any stage
    assert not (tmp_path / "preferences").exists()
    data_only = load_config(QUICKSTART, [f"run_dir={tmp_path}", "eval.winobias.types=[1,2]",
                                         "pipeline.stages=[convert,embed,cluster,select,eval]"])
    check_no_contamination(data_only, plan_runs(data_only))  # nothing trained: nothing to leak


def test_winogrande_may_share_a_file_only_through_the_same_qid_holdout(tmp_path):
    wg = tmp_path / "wg.jsonl"
    wg.write_text("".join(json.dumps({"qID": f"q{i}", "sentence": f"Ann met Bo {i} times because _ was kind.",
                                      "option1": "Ann", "option2": "Bo", "answer": "1"}) + "\n" for i in range(20)))
    copy = tmp_path / "copy.jsonl"
    shutil.copy(wg, copy)

    def job(train_holdout, eval_holdout, eval_path=wg):
        source = {"name": "wg", "format": "winogrande", "path": str(wg)}
        if train_holdout is not None:
            source["holdout"] = train_holdout
        return JobConfig.model_validate({
            "run_dir": str(tmp_path / "run"), "convert": {"sources": [source]},
            "eval": {"suites": ["winogrande"], "winogrande": {"path": str(eval_path), "holdout": eval_holdout}},
            "pipeline": {"stages": ["convert", "embed", "cluster", "select", "sft", "eval"]}})

    for ok in (job(0.3, 0.3), job(0.5, 0.5)):
        check_no_contamination(ok, plan_runs(ok))
    for bad in (job(None, None), job(None, 0.3), job(0.3, None), job(0.3, 0.5), job(None, None, copy)):
        with pytest.raises(ConfigError, match="eval suite 'winogrande' reads .*which source 'wg'.*holdout"):
            check_no_contamination(bad, plan_runs(bad))
    held = [json.loads(line)["qID"] for line in wg.read_text().splitlines() if line.strip()]
    assert 0 < sum(holdout(q, 0.5) for q in held) < len(held)  # the split cuts the file in two
