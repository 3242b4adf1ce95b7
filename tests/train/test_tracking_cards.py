"""Tracking, TRL pass-through, the training console, checkpoints kept, model cards, portable
adapters, hub uploads, and one reward-accuracy code path (issue 13).

Settings and pure helpers are checked in this process; two tiny Ray Train runs (the random
2-layer Llama) check what a stage leaves behind: TensorBoard events read back with
TensorBoard's own reader, the last checkpoints, cards the hub's parser reads, an adapter that
loads from a copy elsewhere, the upload call, and the reward stage's accuracy equal to
``hetray eval``'s on the same pairs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from hetray.config import ConfigError, JobConfig, load_config
from hetray.models import CAUSAL, SEQ_CLS
from hetray.schema import PREFERENCE_SCHEMA, SFT_SCHEMA, pair

SOURCES = [{"name": "wg", "format": "winogrande", "path": "sample:winogrande.jsonl"}]  # unused by training
TINY = {"max_length": 128, "per_device_batch_size": 2, "logging_steps": 1, "save_steps": 1000}


def write_pairs(run: Path, n: int, long_every: int = 0) -> Path:
    """``n`` pairs; every ``long_every``-th chosen answer is ~300 tokens (longer than max_length)."""
    rows = []
    for i in range(n):
        chosen = f"Step one, then step two for task {i}."
        if long_every and i % long_every == 0:
            chosen = " ".join(["and then another careful step"] * 60)
        rows.append(pair("easy", f"How do I do task number {i}?", chosen, "Go away.", [str(i)]))
    for folder, schema, data in (("preferences", PREFERENCE_SCHEMA, rows), ("sft_only", SFT_SCHEMA, [])):
        (run / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(data, schema=schema), run / folder / "part-00000.parquet")
    return run


def job_config(run: Path, train: dict, **top) -> JobConfig:
    return JobConfig.model_validate({"run_dir": str(run), "convert": {"sources": SOURCES}, "train": train, **top})


def stage_job(cfg: JobConfig, stage: str, model: str, head: str = CAUSAL, **extra):
    from hetray.train.driver import StageJob, report_to, run_name

    run = Path(cfg.run_dir)
    settings = getattr(cfg.train, stage)
    return StageJob(stage=stage, settings=settings, model=model, head=head, data_dir=str(run / "preferences"),
                    work_dir=str(run / f".{stage}-work"), out_dir=str(run / stage), seed=cfg.seed, use_gpu=False,
                    deepspeed=None, extra=extra, report_to=report_to(cfg, settings), run_name=run_name(cfg, stage))


# ---------------------------------------------------------------------------- settings


def test_trl_args_are_checked_against_trls_own_config_class(tmp_path):
    t = job_config(tmp_path, {"sft": {"trl_args": {"optim": "adamw_torch", "max_grad_norm": 0.5}},
                              "ppo": {"trl_args": {"whiten_rewards": True}},
                              "dpo": {"trl_args": {"loss_type": ["sigmoid"]}}}).train
    assert t.sft.trl_args == {"optim": "adamw_torch", "max_grad_norm": 0.5} and t.reward.trl_args == {}
    cases = [
        ("sft", {"foo": 1}, r"unknown key 'foo' for trl\.SFTConfig"),
        ("sft", {"max_grad_nrom": 1.0}, r"unknown key 'max_grad_nrom' for trl\.SFTConfig \(did you mean 'max_grad_norm'"),
        ("reward", {"center_rewards_coef": 0.1}, r"trl\.RewardConfig \(did you mean 'center_rewards_coefficient'"),
        ("ppo", {"lerning_rate": 1e-3}, r"trl\.experimental\.ppo\.PPOConfig \(did you mean 'learning_rate'"),
        ("rloo", {"num_generation": 4}, r"trl\.RLOOConfig \(did you mean 'num_generations'"),
        ("sft", {"optim": "adamw_torchh"}, r"optim='adamw_torchh' is not one of .*did you mean 'adamw_torch'"),
        ("sft", {"max_grad_norm": "big"}, r"max_grad_norm='big' does not fit trl\.SFTConfig\.max_grad_norm"),
        ("sft", {"learning_rate": 1e-3}, r"'learning_rate' is set by hetray from train\.sft\.learning_rate"),
        ("sft", {"packing": True}, r"'packing' is set by hetray from train\.sft\.packing"),
        ("rloo", {"max_completion_length": 9}, r"from train\.rloo\.max_new_tokens"),
        ("dpo", {"deepspeed": "x.json"}, r"from train\.resources\.deepspeed"),
        ("sft", {"save_total_limit": 3}, r"from train\.sft\.keep_checkpoints"),
        ("sft", {"output_dir": "elsewhere"}, r"'output_dir' is set by hetray itself"),
    ]
    for stage, args, message in cases:
        with pytest.raises(ValidationError, match=message):
            job_config(tmp_path, {stage: {"trl_args": args}})
    # through the YAML loader: a ConfigError naming the file and the key
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("convert:\n  sources: [{name: wg, format: winogrande, path: 'sample:winogrande.jsonl'}]\n"
                         "train:\n  sft:\n    trl_args: {foo: 1}\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: 'train\.sft\.trl_args': .*unknown key 'foo' for trl\.SFTConfig"):
        load_config(yaml_file)


def test_report_to_settings(tmp_path, monkeypatch):
    t = job_config(tmp_path, {}).train
    assert t.report_to == ["tensorboard"] and t.sft.report_to is None
    t = job_config(tmp_path, {"report_to": "none", "reward": {"report_to": "tensorboard"}}).train
    assert t.report_to == ["none"] and t.reward.report_to == ["tensorboard"]
    from hetray.train.driver import report_to, run_name

    cfg = job_config(tmp_path / "runs" / "r1", {"report_to": "none", "reward": {"report_to": "tensorboard"}}, name="job")
    assert report_to(cfg, cfg.train.sft) == [] and report_to(cfg, cfg.train.reward) == ["tensorboard"]
    assert run_name(cfg, "sft") == "job/r1/sft"
    with pytest.raises(ValidationError, match="'none' cannot be combined"):
        job_config(tmp_path, {"report_to": ["none", "tensorboard"]})
    with pytest.raises(ValidationError, match="report_to"):
        job_config(tmp_path, {"report_to": "comet"})
    import importlib.util

    for tracker in ("mlflow", "wandb"):
        if importlib.util.find_spec(tracker) is None:
            with pytest.raises(ValidationError, match=f"'{tracker}' needs the '{tracker}' package, which is not installed"):
                job_config(tmp_path, {"dpo": {"report_to": tracker}})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in ("mlflow", "wandb")
                        else real(name, *a))
    assert job_config(tmp_path, {"report_to": ["mlflow", "wandb"]}).train.report_to == ["mlflow", "wandb"]


def test_settings_that_leave_the_model_as_is_are_not_in_the_key(tmp_path, tiny_llama, ray_local):
    from hetray.train.sft import sft_stage

    run = write_pairs(tmp_path / "run", 4)
    plain = sft_stage(job_config(run, {"model": tiny_llama}))
    same = sft_stage(job_config(run, {"model": tiny_llama, "report_to": "none", "sft": {
        "keep_checkpoints": 0, "push_to_hub": "org/name", "push_folder": "merged", "report_to": "tensorboard"}}))
    other = sft_stage(job_config(run, {"model": tiny_llama, "sft": {"trl_args": {"max_grad_norm": 0.5}}}))
    assert plain.key() == same.key() != other.key()
    assert other.config["settings"]["trl_args"] == {"max_grad_norm": 0.5}  # recorded in the manifest
    assert "report_to" not in plain.config["settings"] and "keep_checkpoints" not in plain.config["settings"]


# ---------------------------------------------------------------------------- TRL configs
# Built from the keywords alone (no trainer in this process: the Ray runs below build the real
# ones, and their manifests show what the TRL config held).


def test_trl_args_and_tracking_reach_the_trl_config_keywords(tmp_path):
    from hetray.train.worker import training_args, trl_config, trl_record

    cfg = job_config(tmp_path / "run", {
        "report_to": "tensorboard",
        "sft": {**TINY, "keep_checkpoints": 3, "trl_args": {"optim": "adamw_torch", "max_grad_norm": 0.5}},
        "reward": {**TINY, "report_to": "none", "trl_args": {"center_rewards_coefficient": 0.01}}}, name="job")
    sft_job, reward_job = stage_job(cfg, "sft", "m"), stage_job(cfg, "reward", "m", SEQ_CLS)
    kw = training_args(sft_job)
    assert (kw["report_to"], kw["run_name"], kw["save_total_limit"]) == (["tensorboard"], "job/run/sft", 3)
    assert training_args(reward_job)["report_to"] == "none"
    merged = trl_config(dict, sft_job, max_length=128, packing=False)  # dict: the keywords the class gets
    assert merged["optim"] == "adamw_torch" and merged["max_grad_norm"] == 0.5 and merged["max_length"] == 128
    assert merged["learning_rate"] == cfg.train.sft.learning_rate and merged["disable_tqdm"] is True
    assert trl_config(dict, reward_job, per_device_eval_batch_size=7)["center_rewards_coefficient"] == 0.01
    record = trl_record(type("SFTConfig", (), {"__module__": "trl.trainer.sft_config", "optim": "adamw_torch",
                                               "max_grad_norm": 0.5})(), sft_job)
    assert record == {"class": "trl.SFTConfig", "trl_args": {"optim": "adamw_torch", "max_grad_norm": 0.5}}


# ---------------------------------------------------------------------------- console


def test_progress_line():
    from hetray.train.progress import duration, progress_line

    assert progress_line("sft", {"loss": 2.10449, "learning_rate": 2e-4, "grad_norm": 1.0, "epoch": 0.5, "step": 40,
                                 "max_steps": 80, "s_per_step": 12.3}) == \
        "sft    step 40/80  loss 2.104  lr 2.0e-04  12.3 s/it  ETA 8m12s"
    assert progress_line("reward", {"loss": 0.5, "learning_rate": 1e-5, "accuracy": 0.75, "step": 3,
                                    "max_steps": 3, "s_per_step": 0.456}) == \
        "reward step 3/3  loss 0.500  lr 1.0e-05  acc 0.75  0.456 s/it"
    assert progress_line("ppo", {"loss/policy_avg": -0.01, "objective/scores": 1.5, "objective/kl": 0.2,
                                 "step": 1, "max_steps": 4}) == "ppo    step 1/4  loss -0.010  score 1.5  kl 0.2"
    assert progress_line("sft", {"train_runtime": 3725.0, "train_loss": 1.9, "step": 80, "max_steps": 80}) == \
        "sft    done 80 steps in 1h02m  train loss 1.900"
    assert progress_line("sft", {"step": 40, "checkpoint_step": 40}) is None
    assert (duration(42), duration(492), duration(7260)) == ("42s", "8m12s", "2h01m")


# ---------------------------------------------------------------------------- cards and adapters


def test_model_card_round_trip(tmp_path):
    from huggingface_hub import ModelCard

    from hetray.cards import update_model_card_metrics, write_model_card

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    adapter.mkdir()
    merged.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    hp = {"learning_rate": 1e-5, "lora": {"r": 16, "alpha": 32}, "trl_args": {"optim": "adamw_torch"}}
    write_model_card(adapter, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", stage="sft", datasets=["org/data"],
                     hyperparameters=hp, run_name="job/run/sft", location="org/sft")
    write_model_card(merged, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", stage="reward",
                     hyperparameters=hp, metrics={"held-out pairs": {"accuracy": 0.75, "pairs": 12}})
    a, m = ModelCard.load(adapter / "README.md"), ModelCard.load(merged / "README.md")
    assert a.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and a.data.library_name == "peft"
    assert a.data.tags == ["hetray", "trl", "sft", "lora"] and a.data.hetray["stage"] == "sft"
    assert a.data.datasets == ["org/data"] and a.data.pipeline_tag == "text-generation" and not a.data.eval_results
    assert "| lora.r | 16 |" in a.text and "| trl_args.optim | adamw_torch |" in a.text
    assert "AutoPeftModelForCausalLM.from_pretrained('org/sft')" in a.text
    assert m.data.library_name == "transformers" and m.data.pipeline_tag == "text-classification"
    assert {(r.dataset_name, r.metric_type): r.metric_value for r in m.data.eval_results} == {
        ("held-out pairs", "accuracy"): 0.75, ("held-out pairs", "pairs"): 12}
    update_model_card_metrics(merged, {"winogrande": {"accuracy": 0.52, "accuracy_ci": [0.4, 0.6]},
                                       "held-out pairs/accuracy": 0.8, "reward_model": "runs/x/reward"})
    m = ModelCard.load(merged / "README.md")
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in m.data.eval_results] == [
        ("held-out pairs", "accuracy", 0.8), ("held-out pairs", "pairs", 12), ("winogrande", "accuracy", 0.52)]
    assert "| winogrande/accuracy | 0.52 |" in m.text and "| held-out pairs/accuracy | 0.8 |" in m.text
    assert m.text.count("## Metrics") == 1 and m.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_card_datasets_are_the_hub_sources(tmp_path):
    from hetray.train.publish import hub_datasets

    cfg = JobConfig.model_validate({"convert": {"sources": [
        {"name": "hub", "format": "generic", "shape": "pairwise", "path": "hf://datasets/org/name@main/data/*.parquet"},
        *SOURCES]}})
    assert hub_datasets(cfg) == ["org/name"]  # local files are not hub datasets


def test_portable_base(tmp_path, tiny_llama):
    from hetray import models

    run = tmp_path / "run"
    (run / "sft" / "merged").mkdir(parents=True)
    adapter = run / "dpo" / "adapter"
    bundled = models.resolve_llm()  # the converted copy in the cache
    assert models.portable_base(bundled, adapter, run) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.portable_base(models.DEFAULT_LLM, adapter, run) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.portable_base("org/model", adapter, run) == "org/model"
    assert models.portable_base(str(run / "sft" / "merged"), adapter, run) == "../../sft/merged"
    assert models.portable_base(tiny_llama, adapter, run) == str(Path(tiny_llama).resolve())
    adapter.mkdir(parents=True)
    for written, read in (("../../sft/merged", str((run / "sft" / "merged").resolve())),
                          ("HuggingFaceTB/SmolLM2-135M-Instruct", models.DEFAULT_LLM), ("org/model", "org/model"),
                          (tiny_llama, tiny_llama)):
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": written}))
        assert models.adapter_base(adapter) == read


# ---------------------------------------------------------------------------- on Ray: a tiny SFT run

STEPS = 6


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_llama, ray_local):
    """SFT, 1 worker, 6 steps, a checkpoint every 2 (the last 2 kept), TensorBoard, trl_args,
    push_to_hub with the hub calls recorded instead of made."""
    import huggingface_hub

    calls = []
    mp = pytest.MonkeyPatch()
    mp.setattr(huggingface_hub.HfApi, "create_repo",
               lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    mp.setattr(huggingface_hub.HfApi, "upload_folder",
               lambda self, **kw: calls.append(("upload_folder", kw["repo_id"], kw)))
    root = tmp_path_factory.mktemp("tracking")
    trackers = ["tensorboard"]
    if HAVE_MLFLOW:  # set on the driver only: the stage passes MLFLOW_* on to its Ray Train workers
        trackers.append("mlflow")
        for k, v in mlflow_env(root).items():
            mp.setenv(k, v)
    cfg = job_config(write_pairs(root / "run", 12), {
        "model": tiny_llama, "resources": {"num_workers": 1, "max_failures": 0}, "report_to": trackers,
        "sft": {**TINY, "max_steps": STEPS, "save_steps": 2, "keep_checkpoints": 2, "learning_rate": 1e-3,
                "trl_args": {"optim": "adamw_torch", "max_grad_norm": 0.5}, "push_to_hub": "org/tiny-sft"}},
        name="job")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    progress = logging.getLogger("hetray.train.progress")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    try:
        from hetray.train.sft import run_sft

        manifest = run_sft(cfg)
        again = run_sft(cfg)  # up to date, already pushed: nothing happens
    finally:
        progress.removeHandler(handler)
        mp.undo()
    return cfg, manifest, again, calls, lines


HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None


def mlflow_env(root: Path) -> dict:
    """A local MLflow file store (MLflow 3 refuses one unless MLFLOW_ALLOW_FILE_STORE is set)."""
    return {"MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_EXPERIMENT_NAME": "hetray-test"}


@pytest.mark.slow
def test_tensorboard_events_hold_the_train_loss(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, manifest, _, _, _ = sft_run
    out = Path(cfg.run_dir) / "sft"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    logged = [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"] if "loss" in h]
    assert [e.value for e in loss] == pytest.approx(logged, rel=1e-5)
    assert "train/learning_rate" in events.Tags()["scalars"]
    assert manifest["tracking"] == {"report_to": ["tensorboard", *(["mlflow"] if HAVE_MLFLOW else [])],
                                    "run_name": "job/run/sft"}
    assert manifest["outputs"]["tensorboard"] == "tensorboard"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow is not installed (pip install mlflow-skinny)")
def test_mlflow_run_holds_the_train_loss(sft_run, monkeypatch):
    """transformers' MLflowCallback, in the Ray Train worker, logged to the driver's MLflow store."""
    from mlflow.tracking import MlflowClient

    cfg, _, _, _, _ = sft_run
    env = mlflow_env(Path(cfg.run_dir).parent)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("hetray-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["job/run/sft"]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    logged = [h["loss"] for h in json.loads((Path(cfg.run_dir) / "sft" / "metrics.json").read_text())["history"]
              if "loss" in h]
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(logged, rel=1e-6)


@pytest.mark.slow
def test_console_prints_one_line_per_log(sft_run):
    *_, lines = sft_run
    steps = [line for line in lines if " step " in line]
    assert len(steps) == STEPS, lines
    pattern = re.compile(r"^sft    step (\d)/6  loss \d+\.\d{3}  lr \d\.\de[+-]\d\d  [\d.]+ s/it(  ETA [\dhms]+)?$")
    assert all(pattern.match(line) for line in steps), steps
    assert [int(pattern.match(line).group(1)) for line in steps] == list(range(1, STEPS + 1))
    assert any(line.startswith("sft    done 6 steps in ") for line in lines)
    assert not any("{" in line for line in lines)


@pytest.mark.slow
def test_trl_args_recorded_and_last_checkpoints_kept(sft_run):
    cfg, manifest, _, _, _ = sft_run
    out = Path(cfg.run_dir) / "sft"
    assert manifest["config"]["settings"]["trl_args"] == {"optim": "adamw_torch", "max_grad_norm": 0.5}
    assert manifest["trl_config"] == {"class": "trl.SFTConfig",
                                      "trl_args": {"optim": "adamw_torch", "max_grad_norm": 0.5}}
    assert manifest["checkpoints"] == ["checkpoints/checkpoint-4", "checkpoints/checkpoint-6"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (out / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert not (Path(cfg.run_dir) / "ray_results").exists() or not any((Path(cfg.run_dir) / "ray_results").iterdir())


@pytest.mark.slow
def test_cards_and_a_portable_adapter(sft_run, tiny_llama, tmp_path):
    from huggingface_hub import ModelCard
    from peft import AutoPeftModelForCausalLM, PeftModel

    from hetray.models import load_causal_lm, load_model

    cfg, _, _, _, _ = sft_run
    out = Path(cfg.run_dir) / "sft"
    base = str(Path(tiny_llama).resolve())
    adapter_card, merged_card = ModelCard.load(out / "adapter" / "README.md"), ModelCard.load(out / "merged" / "README.md")
    for card, library in ((adapter_card, "peft"), (merged_card, "transformers")):
        assert card.data.base_model == base and card.data.library_name == library
        assert card.data.hetray["stage"] == "sft" and card.data.tags == ["hetray", "trl", "sft", "lora"]
        assert "| learning_rate | 0.001 |" in card.text
    assert "from_pretrained('org/tiny-sft')" in merged_card.text  # push_folder auto: a local base -> merged
    # the adapter folder alone, copied elsewhere, loads: its base by absolute path, its own tokenizer
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(out / "adapter", copy)
    assert json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert (copy / "tokenizer.json").is_file()
    ids = torch.tensor([[1, 4093, 198, 6004, 665, 2]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_model(tiny_llama), str(out / "adapter")).eval()(ids).logits
        auto = AutoPeftModelForCausalLM.from_pretrained(str(copy)).eval()(ids).logits
        merged, tokenizer = load_causal_lm(str(copy))
        assert torch.allclose(auto, expected, atol=1e-5)
        assert torch.allclose(merged.eval()(ids).logits, expected, atol=1e-4)
    assert tokenizer.chat_template


@pytest.mark.slow
def test_push_to_hub_uploads_once(sft_run):
    cfg, manifest, again, calls, _ = sft_run
    out = Path(cfg.run_dir) / "sft"
    assert [c[:2] for c in calls] == [("create_repo", "org/tiny-sft"), ("upload_folder", "org/tiny-sft")]
    upload = calls[1][2]
    assert Path(upload["folder_path"]) == out / "merged" and upload["repo_type"] == "model"
    assert "hetray sft (merged)" in upload["commit_message"]
    assert manifest["pushed"]["repo"] == "org/tiny-sft" and manifest["pushed"]["folder"] == "merged"
    assert again["pushed"] == manifest["pushed"] and again["key"] == manifest["key"]


# ---------------------------------------------------------------------------- reward accuracy: one path


@pytest.mark.slow
def test_reward_stage_and_eval_give_the_same_accuracy(tmp_path, tiny_llama, ray_local):
    from huggingface_hub import ModelCard

    from hetray.eval import reward as reward_suite
    from hetray.eval.config import EvalConfig
    from hetray.train.reward import run_reward

    cfg = job_config(write_pairs(tmp_path / "run", 30, long_every=4), {
        "model": tiny_llama, "resources": {"num_workers": 1, "max_failures": 0},
        "reward": {**TINY, "max_length": 64, "init": "base", "max_steps": 3, "learning_rate": 1e-3,
                   "eval_fraction": 0.4, "report_to": "none", "keep_checkpoints": 0,
                   "trl_args": {"center_rewards_coefficient": 0.01}}})
    m = run_reward(cfg)
    final = m["final"]
    assert m["trl_config"] == {"class": "trl.RewardConfig", "trl_args": {"center_rewards_coefficient": 0.01}}
    out = Path(cfg.run_dir) / "reward"
    assert final["eval_pairs_too_long"] > 0 and final["eval_pairs"] > 0  # the long answers are left out
    assert not (out / "tensorboard").exists() and "checkpoints" not in m["outputs"] and m["checkpoints"] == []

    pairs = reward_suite.load_items(str(out), EvalConfig().reward)
    rm = reward_suite.RewardModel.load(str(out), device="cpu")
    overall = reward_suite.aggregate(reward_suite.score_items(rm, pairs))
    assert overall["pairs"] == final["eval_pairs"]
    assert overall["accuracy"] == final["eval_accuracy"]  # the same number, not a close one
    assert overall["margin"] == pytest.approx(final["eval_margin"], abs=1e-6)
    card = ModelCard.load(out / "merged" / "README.md")
    assert {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}[
        ("held-out pairs", "accuracy")] == final["eval_accuracy"]
