"""Preflight: every input of every stage is checked before the first stage, every problem listed."""

from __future__ import annotations

import json
import sys
import types
import urllib.error
from pathlib import Path

import pytest

from hetray.cli import main
from hetray.config import ConfigError, load_config
from hetray.orchestrate import pipeline
from hetray.orchestrate import preflight as pf

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
PAPER = ROOT / "jobs" / "paper.yaml"
SMALL = {"CPU": 2, "GPU": 0}  # a laptop's Ray
DATA_EVAL = "pipeline.stages=[convert,eval]"  # sources and eval data, no training: no LoRA check


@pytest.fixture(autouse=True)
def offline_empty_caches(tmp_path, monkeypatch):
    """Offline, with empty Hugging Face and hetray caches: what the machine has cached is irrelevant."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(pf.urllib.request, "urlopen", no_network)


def problems(cfg, resources=SMALL) -> dict[str, str]:
    report = pf.preflight(cfg, resources=resources, raise_on_problems=False)
    return {c.what: c.detail for c in report.problems}


def test_paper_job_is_refused_offline_before_any_stage(tmp_path, monkeypatch):
    run_dir = tmp_path / "paper"
    cfg = load_config(PAPER, [f"run_dir={run_dir}"])
    ran = []
    monkeypatch.setattr(pipeline, "init_ray", lambda ray_cfg: ran.append("ray"))
    monkeypatch.setattr("hetray.unify.convert.run_convert", lambda *a, **k: ran.append("convert"))
    monkeypatch.setattr(pf, "_local_resources", lambda cfg: dict(SMALL))
    monkeypatch.setenv("HETRAY_CACHE", str(tmp_path / "hetray-cache"))  # no cached WinoBias files

    with pytest.raises(ConfigError, match="preflight found 9 problem") as e:
        pipeline.run_pipeline(cfg)
    message = str(e.value)
    assert ("eval suite winogrande: cannot reach the Hugging Face hub (offline): "
            "hf:allenai/winogrande:validation:winogrande_xl needed by eval.winogrande.path") in message
    assert ("convert.sources[0] 'winogrande': cannot reach the Hugging Face hub (offline): "
            "hf:allenai/winogrande:train:winogrande_xl needed by convert.sources[0] 'winogrande'") in message
    assert "model 'huggyllama/llama-7b' needed by train.model" in message
    assert ran == ["ray"]  # no stage ran ...
    assert sorted(p.name for p in run_dir.iterdir()) == [".hetray.lock"]  # ... and no stage folder exists

    found = problems(cfg)
    assert sorted(found) == sorted([
        "convert.sources[0] 'winogrande'", "convert.sources[1] 'oasst'", "embed.model", "train.model",
        "eval suite winobias", "eval suite winogrande",
        "resources: embed (4 actors x 1 CPU, +1 CPU for I/O)",
        "resources: train (8 workers x 8 CPU + 1 GPU)",
        "resources: eval (8 workers x 1 CPU + 1 GPU)",
    ])
    assert "cannot download 8 WinoBias file(s)" in found["eval suite winobias"]
    assert found["resources: train (8 workers x 8 CPU + 1 GPU)"] == "needs 64 CPU, 8 GPU; the Ray cluster has 2 CPU, 0 GPU"


def test_check_command_prints_every_check_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pf, "_local_resources", lambda cfg: dict(SMALL))
    assert main(["run", "--config", str(PAPER), f"run_dir={tmp_path / 'paper'}", "--check"]) == 2
    out, err = capsys.readouterr()
    assert "PROBLEM  eval suite winogrande: cannot reach the Hugging Face hub (offline)" in out
    assert "ok       train.resources.deepspeed: jobs/deepspeed/zero2.json is JSON" in out
    assert "skipped  train.sft.lora.target_modules" in out  # the model is unknown offline
    assert "hetray: error: job 'paper': preflight found 9 problem(s)" in err
    assert not (tmp_path / "paper").exists()  # --check creates nothing


def test_quickstart_passes(tmp_path, capsys):
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}"])
    report = pf.preflight(cfg, resources=SMALL)
    assert report.problems == []
    assert [c.what for c in report.checks] == [
        "run_dir", "convert.sources[0] 'winogrande'", "convert.sources[1] 'oasst'", "convert.sources[2] 'winobias'",
        "embed.model", "train.model", "train.sft.lora.target_modules", "train.reward.lora.target_modules",
        "train.ppo.lora.target_modules", "eval suite winobias", "eval suite chat", "contamination",
        "resources: embed (1 actors x 1 CPU, +1 CPU for I/O)", "resources: train (2 workers x 1 CPU)",
    ]
    assert main(["run", str(QUICKSTART), f"run_dir={tmp_path}", "--check"]) == 0
    out = capsys.readouterr().out
    assert "preflight: no problems in 14 checks (quickstart)" in out
    assert "ok       eval suite winobias: 24 items" in out


def test_missing_source_and_eval_files_are_all_listed(tmp_path):
    cfg = load_config(QUICKSTART, [
        f"run_dir={tmp_path}", DATA_EVAL, f"convert.sources.1.path={tmp_path}/gone.jsonl",
        "eval.suites=[winobias,winogrande,chat]", f"eval.winogrande.path={tmp_path}/dev.jsonl",
        f"eval.winobias.path={tmp_path}/winobias"])
    assert problems(cfg) == {
        "convert.sources[1] 'oasst'": f"source 'oasst': input file '{tmp_path}/gone.jsonl' does not exist",
        "eval suite winobias": f"WinoBias folder '{tmp_path}/winobias' does not exist",
        "eval suite winogrande": f"WinoGrande file '{tmp_path}/dev.jsonl' does not exist",
    }
    with pytest.raises(ConfigError, match=r"3 problem\(s\); nothing has run:\n  - convert.sources\[1\] 'oasst'"):
        pf.preflight(cfg, resources=SMALL)


def test_runs_name_known_sources_and_later_stages_find_their_input(tmp_path):
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", "pipeline.stages=[embed,cluster,select]",
                                   "pipeline.runs=[{name: wg, sources: [winogrand]}]"])
    assert problems(cfg) == {
        "preferences": f"{tmp_path}/preferences holds no converted pairs and convert is not in pipeline.stages: "
                       "add it, or run `hetray convert` first",
        "pipeline.runs": "sources that convert.sources does not name (wg: winogrand); "
                         "convert.sources: oasst, winobias, winogrande",
    }


def test_a_glob_that_matches_nothing(tmp_path):
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", DATA_EVAL, "convert.sources.2.path=sample:winobias/*.nope"])
    assert list(problems(cfg)) == ["convert.sources[2] 'winobias'"]


def test_hub_ids_offline_and_the_local_cache(tmp_path):
    spec = "hf:allenai/winogrande:validation:winogrande_xl"
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", DATA_EVAL, "eval.suites=[winogrande]",
                                   f"eval.winogrande.path={spec}", "train.model=org/not-cached"])
    found = problems(cfg)
    assert found == {
        "eval suite winogrande": f"cannot reach the Hugging Face hub (offline): {spec} needed by eval.winogrande.path, "
                                 "and it is not in the local cache: download it where there is network, or give a "
                                 "local path",
        "train.model": "cannot reach the Hugging Face hub (offline): model 'org/not-cached' needed by train.model, "
                       "and it is not in the local cache: download it where there is network, or give a local path",
    }
    prepared = tmp_path / "hf" / "datasets" / "allenai___winogrande" / "winogrande_xl"  # what load_dataset left
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    assert list(problems(cfg)) == ["train.model"]
    report = pf.preflight(cfg.model_copy(update={"train": cfg.train.model_copy(update={"model": "smollm2-135m-instruct"})}),
                          resources=SMALL)
    assert f"{spec}: in the local cache (hub offline)" in report.format()


def test_hub_ids_online(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    card = {"configs": [{"config_name": "winogrande_xl"}, {"config_name": "winogrande_s"}]}
    info = types.SimpleNamespace(card_data=types.SimpleNamespace(to_dict=lambda: card))
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, name, timeout=None: info)
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", DATA_EVAL, "eval.suites=[winogrande]",
                                   "eval.winogrande.path=hf:allenai/winogrande:validation:winogrande_xs",
                                   "convert.sources.0.path=hf:allenai/winogrande:train:winogrande_xl"])
    assert problems(cfg) == {"eval suite winogrande": "hf:allenai/winogrande:validation:winogrande_xs needed by "
                             "eval.winogrande.path: dataset 'allenai/winogrande' has no config 'winogrande_xs' "
                             "(it has winogrande_s, winogrande_xl)"}

    class ConnectError(OSError):  # as the hub client's transport raises it
        pass

    def no_route(self, name, timeout=None):
        raise ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(HfApi, "dataset_info", no_route)
    found = problems(cfg)
    assert list(found) == ["convert.sources[0] 'winogrande'", "eval suite winogrande"]
    assert found["convert.sources[0] 'winogrande'"].startswith(
        "cannot reach the Hugging Face hub (no connection: ConnectError): hf:allenai/winogrande:train:winogrande_xl "
        "needed by convert.sources[0] 'winogrande'")


def test_a_lora_target_the_model_lacks(tmp_path, tiny_llama):
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", "pipeline.stages=[convert,sft,dpo]", f"train.model={tiny_llama}",
                                   "train.dpo.lora.target_modules=[q_proj,qkv_proj,c_attn]"])
    assert problems(cfg) == {
        "train.dpo.lora.target_modules": f"qkv_proj, c_attn not found in {tiny_llama}; its Linear layers are: "
                                         "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    }


def test_a_model_folder_without_a_tokenizer(tmp_path, tiny_llama):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((Path(tiny_llama) / "config.json").read_text())
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", "pipeline.stages=[convert,sft]", f"train.model={bare}"])
    assert problems(cfg) == {"train.model": f"{bare} has no tokenizer (tokenizer.json, tokenizer_config.json, "
                                            "tokenizer.model, vocab.json, spiece.model)"}


def test_deepspeed_file_missing_or_not_json(tmp_path):
    stages = "pipeline.stages=[convert,embed,cluster,select,sft]"
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", stages, f"train.resources.deepspeed={tmp_path}/zero9.json"])
    assert problems(cfg) == {
        "train.resources.deepspeed": f"DeepSpeed config file '{tmp_path}/zero9.json' does not exist (from {Path.cwd()})"}
    (tmp_path / "zero9.json").write_text("{ 'not': json }")
    assert problems(cfg)["train.resources.deepspeed"].startswith(f"{tmp_path}/zero9.json is not valid JSON: ")
    (tmp_path / "zero9.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert problems(cfg) == {}


def test_more_workers_than_the_cluster_has(tmp_path):
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", "pipeline.stages=[convert,embed,cluster,select,sft,eval]",
                                   "train.resources.num_workers=4", "train.resources.cpus_per_worker=2",
                                   "train.resources.use_gpu=true", "embed.num_actors=2",
                                   "eval.num_workers=3", "eval.num_gpus_per_worker=0.5"])
    assert problems(cfg) == {
        "resources: embed (2 actors x 1 CPU, +1 CPU for I/O)": "needs 3 CPU; the Ray cluster has 2 CPU, 0 GPU",
        "resources: train (4 workers x 2 CPU + 1 GPU)": "needs 8 CPU, 4 GPU; the Ray cluster has 2 CPU, 0 GPU",
        "resources: eval (3 workers x 1 CPU + 0.5 GPU)": "needs 3 CPU, 1.5 GPU; the Ray cluster has 2 CPU, 0 GPU",
    }
    assert problems(cfg, resources={"CPU": 16, "GPU": 4}) == {}


def test_eval_reads_hf_winogrande_through_datasets(monkeypatch):
    from hetray.eval import winogrande

    calls = []
    rows = [{"sentence": "The cup fit in the box because _ was small.", "option1": "the cup", "option2": "the box",
             "answer": "1"},
            {"sentence": "Ann thanked Bo because _ had helped.", "option1": "Ann", "option2": "Bo", "answer": "2"},
            {"sentence": "A test row _ here.", "option1": "a", "option2": "b", "answer": ""}]

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    spec = "hf:allenai/winogrande:validation:winogrande_xl"
    items = winogrande.load_items(spec)
    assert calls == [("allenai/winogrande", "winogrande_xl", "validation")]
    assert items == [
        {"id": f"{spec}#0", "sentence": rows[0]["sentence"], "option1": "the cup", "option2": "the box", "answer": 1},
        {"id": f"{spec}#1", "sentence": rows[1]["sentence"], "option1": "Ann", "option2": "Bo", "answer": 2},
    ]
    assert winogrande.SUITE.files(types.SimpleNamespace(winogrande=types.SimpleNamespace(path=spec))) == []

    def offline(name, config=None, split=None):
        raise ConnectionError("Couldn't reach 'allenai/winogrande' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(winogrande.WinoGrandeError, match=r"eval.winogrande.path 'hf:allenai/winogrande:validation:"
                                                         r"winogrande_xl': could not load the Hugging Face dataset"):
        winogrande.load_items(spec)


def test_winobias_refuses_an_hf_path(tmp_path):
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", DATA_EVAL, "eval.winobias.path=hf:uclanlp/wino_bias"])
    assert problems(cfg)["eval suite winobias"].startswith(
        "eval.winobias.path 'hf:uclanlp/wino_bias': WinoBias is read from the corefBias text files")


def test_evaluating_on_the_split_a_hub_source_trains_on_is_refused(tmp_path):
    spec = "hf:allenai/winogrande:train:winogrande_xl"
    cfg = load_config(QUICKSTART, [f"run_dir={tmp_path}", f"convert.sources.0.path={spec}",
                                   "eval.suites=[winogrande]", f"eval.winogrande.path={spec}"])
    with pytest.raises(ConfigError, match="eval suite 'winogrande' reads hf:allenai/winogrande:train:winogrande_xl, "
                                          "the split source 'winogrande'"):
        pf.check_no_contamination(cfg, pipeline.plan_runs(cfg))
