"""Training stages on Ray Train (2 workers, CPU, gloo): SFT -> reward -> DPO / RLOO / PPO.

The chain runs the real SmolLM2-135M-Instruct on an easy synthetic preference set (polite
helpful answers chosen over insults), and the reward model must rank held-out pairs right: a
learning check, not only "it ran". A tiny random Llama (the SmolLM2 tokenizer, 2 layers of
width 64) serves the plumbing that needs many steps: a worker killed mid-run, re-run skip,
ZeRO-2 on CPU. Bad settings must fail before Ray Train starts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hetray.config import JobConfig
from hetray.models import ModelNotFoundError, resolve_llm
from hetray.models import load_tokenizer
from hetray.pairs import held_out
from hetray.schema import PREFERENCE_SCHEMA, SFT_SCHEMA, make_id
from hetray.train.driver import TrainSetupError
from hetray.train.dpo import run_dpo
from hetray.train.ppo import run_ppo
from hetray.train.reward import run_reward
from hetray.train.rloo import run_rloo
from hetray.train.sft import run_sft, sft_stage

from conftest import ROOT

TOPICS = [
    "bake bread", "learn Python", "fix a flat tyre", "save money", "sleep better", "start running",
    "write a CV", "grow tomatoes", "learn chess", "clean a laptop", "cook rice", "study for exams",
    "paint a wall", "train a puppy", "plan a trip", "make coffee", "learn guitar", "reduce stress",
    "back up photos", "tie a tie", "meditate", "bake cookies", "change a bulb", "learn Spanish",
    "organise a desk", "make friends", "read faster", "stay hydrated", "knit a scarf", "wash a car",
]
POLITE = [
    "Sure, happy to help! Start with the basics and practise a little every day.",
    "Great question. Here is a simple plan: take it step by step and be patient with yourself.",
    "Of course! A good first step is to gather what you need and follow a short guide.",
    "Thanks for asking. Begin slowly, keep notes, and ask for help when you get stuck.",
]
RUDE = [
    "I hate you. Figure it out yourself, idiot.",
    "Shut up, nobody cares about your stupid question.",
    "You are worthless and dumb. Go away.",
    "What a moronic thing to ask. I hate you.",
]
SMALL = {"save_steps": 2, "logging_steps": 1, "max_length": 128, "per_device_batch_size": 2}
SOURCES = [{"name": "wg", "format": "winogrande", "path": "sample:winogrande.jsonl"}]  # unused by training


def easy_pairs(seed: int = 0) -> list[dict]:
    """60 pairs: a polite helpful answer (chosen) against an insult (rejected)."""
    rnd = random.Random(seed)
    rows = []
    for i, topic in enumerate(TOPICS):
        for j, prompt in enumerate((f"How do I {topic}?", f"Can you tell me how to {topic}?")):
            rows.append({
                "pair_id": make_id("easy", str(i), str(j)), "prompt": prompt,
                "chosen": rnd.choice(POLITE), "rejected": rnd.choice(RUDE), "source": "easy",
                "quality": None, "chosen_score": None, "rejected_score": None, "label": None,
                "provenance": [f"{i}:{j}"],
            })
    return rows


def write_run(run: Path, pairs: list[dict], sft_only: list[dict] = ()) -> Path:
    for folder, schema, rows in (("preferences", PREFERENCE_SCHEMA, pairs), ("sft_only", SFT_SCHEMA, sft_only)):
        (run / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), run / folder / "part-00000.parquet")
    return run


def job(run: Path, train: dict) -> JobConfig:
    return JobConfig.model_validate({"run_dir": str(run), "convert": {"sources": SOURCES}, "train": train})


def history(stage_dir: Path) -> list[dict]:
    return json.loads((stage_dir / "metrics.json").read_text())["history"]


def assert_outputs(stage_dir: Path, manifest: dict, steps: int) -> None:
    assert {p.name for p in stage_dir.iterdir()} >= {"adapter", "merged", "metrics.json", "loss.png", "manifest.json"}
    assert manifest["global_step"] == steps and manifest["resumed_from_step"] is None
    assert (stage_dir / "adapter" / "adapter_config.json").is_file()
    assert (stage_dir / "merged" / "config.json").is_file() and (stage_dir / "merged" / "tokenizer.json").is_file()
    assert (stage_dir / "loss.png").stat().st_size > 1000


def lora_b_moved(adapter: Path) -> bool:
    """LoRA's B matrices start at zero: any non-zero one proves the optimizer stepped."""
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    return any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


# ---------------------------------------------------------------------------- the chain, SmolLM2

CHAIN = {
    "resources": {"num_workers": 2, "max_failures": 0},
    "sft": {**SMALL, "max_steps": 3, "learning_rate": 1e-4},
    "reward": {**SMALL, "max_steps": 8, "per_device_batch_size": 4, "learning_rate": 1e-3, "eval_fraction": 0.3},
    "dpo": {**SMALL, "max_steps": 2, "learning_rate": 1e-4},
    "rloo": {**SMALL, "max_steps": 2, "min_new_tokens": 2, "max_new_tokens": 6},
    "ppo": {**SMALL, "max_steps": 2, "per_device_batch_size": 1, "gradient_accumulation_steps": 2,
            "min_new_tokens": 2, "max_new_tokens": 6, "num_ppo_epochs": 1, "save_steps": 1},
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, ray_local) -> JobConfig:
    sft_only = [{"pair_id": make_id("sft", str(i)), "prompt": f"Say hello number {i}.", "response": "Hello!",
                 "source": "greetings", "provenance": [str(i)]} for i in range(4)]
    run = write_run(tmp_path_factory.mktemp("chain") / "run", easy_pairs(), sft_only)
    return job(run, CHAIN)


@pytest.fixture(scope="module")
def sft_done(chain) -> dict:
    return run_sft(chain)


@pytest.fixture(scope="module")
def reward_done(chain, sft_done) -> dict:
    return run_reward(chain)


@pytest.mark.slow
def test_sft_two_workers_trains_lora_and_merges(chain, sft_done):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = Path(chain.run_dir) / "sft"
    assert_outputs(out, sft_done, steps=3)
    assert sft_done["rows"] == 60 + 4  # prompt + chosen of every pair, and the sft_only rows
    losses = [h["loss"] for h in history(out) if "loss" in h]
    assert len(losses) == 3 and all(l == l and l > 0 for l in losses)
    assert lora_b_moved(out / "adapter")
    # merged == base + adapter: same logits
    ids = torch.tensor([[1, 4093, 198, 6004, 665, 2]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_llm()), out / "adapter")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-3)


@pytest.mark.slow
def test_reward_model_learns_easy_preferences(chain, reward_done):
    from transformers import AutoModelForSequenceClassification

    out = Path(chain.run_dir) / "reward"
    assert_outputs(out, reward_done, steps=8)
    final = reward_done["final"]
    assert final["eval_pairs"] >= 10
    assert final["eval_accuracy"] > 0.75, final  # chance is 0.5
    losses = [h["loss"] for h in history(out) if "loss" in h]
    assert losses[-1] < losses[0] / 2
    # the merged classifier (LoRA and score head folded in) scores a new pair the right way
    tokenizer = load_tokenizer(str(out / "merged"))
    model = AutoModelForSequenceClassification.from_pretrained(out / "merged")

    def score(answer: str) -> float:
        chat = [{"role": "user", "content": "How do I repair a bike?"}, {"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return model(input_ids=ids).logits.item()

    assert score("Happy to help! Check the tyre first, then the chain.") > score("I hate you, go away, idiot.")


@pytest.mark.slow
def test_dpo_two_workers(chain, sft_done):
    m = run_dpo(chain)
    out = Path(chain.run_dir) / "dpo"
    assert_outputs(out, m, steps=2)
    assert any("rewards/accuracies" in h for h in history(out))
    assert lora_b_moved(out / "adapter")


@pytest.mark.slow
def test_rloo_two_workers_scores_with_the_reward_model(chain, reward_done):
    m = run_rloo(chain)
    out = Path(chain.run_dir) / "rloo"
    assert_outputs(out, m, steps=2)
    logged = [h for h in history(out) if "reward" in h]
    assert logged and all(-1e3 < h["reward"] < 1e3 for h in logged)


@pytest.mark.slow
def test_ppo_two_workers_reports_reward_and_kl(chain, reward_done):
    from transformers import AutoModelForCausalLM

    m = run_ppo(chain)
    out = Path(chain.run_dir) / "ppo"
    assert_outputs(out, m, steps=2)
    logged = [h for h in history(out) if "objective/scores" in h]
    assert len(logged) == 2 and all("objective/kl" in h for h in logged)
    assert lora_b_moved(out / "adapter")
    policy = AutoModelForCausalLM.from_pretrained(out / "merged")
    generated = policy.generate(torch.tensor([[1, 4093, 198, 6004, 665]]), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == 8


# ---------------------------------------------------------------------------- plumbing, tiny Llama

FAULT_STEPS, FAULT_SAVE = 16, 4


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, tiny_llama, ray_local) -> JobConfig:
    run = write_run(tmp_path_factory.mktemp("tiny") / "run", easy_pairs())
    return job(run, {
        "model": tiny_llama,
        "resources": {"num_workers": 2, "max_failures": 1},
        "sft": {**SMALL, "max_steps": FAULT_STEPS, "save_steps": FAULT_SAVE, "learning_rate": 1e-3},
    })


def _kill_after_first_checkpoint(run_dir: Path, killed: dict, timeout: float = 300) -> None:
    """Wait until Ray has registered a checkpoint, then SIGKILL the rank-1 training worker."""
    deadline = time.time() + timeout
    pids = run_dir / ".sft-work" / "pids" / "rank1.pid"
    while time.time() < deadline:
        if _registered_checkpoints(run_dir) and pids.is_file():
            pid = int(pids.read_text().split()[-1])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"ray::" in cmdline or b"default_worker" in cmdline, cmdline  # a Ray worker we started
            killed["pid"], killed["at"] = pid, time.time()
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.1)


def _registered_checkpoints(run_dir: Path) -> int:
    for snapshot in (run_dir / "ray_results").glob("sft-*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (json.JSONDecodeError, KeyError, OSError):  # being written
            pass
    return 0


@pytest.fixture(scope="module")
def killed_run(tiny_cfg) -> tuple[dict, dict]:
    killed: dict = {}
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(Path(tiny_cfg.run_dir), killed), daemon=True)
    killer.start()
    manifest = run_sft(tiny_cfg)
    killer.join(timeout=5)
    return manifest, killed


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes_from_last_checkpoint(tiny_cfg, killed_run):
    manifest, killed = killed_run
    assert "pid" in killed, "the run finished before a checkpoint was registered: nothing was killed"
    assert manifest["global_step"] == FAULT_STEPS
    resumed = manifest["resumed_from_step"]
    assert resumed is not None and resumed >= FAULT_SAVE and resumed % FAULT_SAVE == 0  # not from step 0
    # the history is the checkpoint's (restored) followed by the resumed steps: each step once
    steps = [h["step"] for h in history(Path(tiny_cfg.run_dir) / "sft") if "loss" in h]
    assert steps == list(range(1, FAULT_STEPS + 1))


@pytest.mark.slow
def test_rerun_skips_and_changed_config_reruns_with_zero2_on_cpu(tiny_cfg, killed_run):
    manifest, _ = killed_run
    out = Path(tiny_cfg.run_dir) / "sft"
    started = time.time()
    again = run_sft(tiny_cfg)
    assert again["key"] == manifest["key"] and again["created"] == manifest["created"]
    assert time.time() - started < 30  # skipped: no Ray Train run

    # a changed config re-runs the stage: here DeepSpeed ZeRO-2, on CPU (gloo), 2 workers
    zero2 = tiny_cfg.model_copy(deep=True)
    zero2.train.resources.deepspeed = str(ROOT / "jobs" / "deepspeed" / "zero2.json")
    zero2.train.sft.max_steps = 3
    m = run_sft(zero2)
    assert m["key"] != manifest["key"] and m["global_step"] == 3 and m["config"]["deepspeed"]
    assert lora_b_moved(out / "adapter")
    assert (out / "merged" / "model.safetensors").is_file()

    # a changed input re-runs it too: the key covers the pairs' fingerprint
    assert sft_stage(zero2).key() == m["key"]
    prefs = Path(tiny_cfg.run_dir) / "preferences" / "part-00000.parquet"
    pq.write_table(pa.Table.from_pylist(easy_pairs(seed=1), schema=PREFERENCE_SCHEMA), prefs)
    assert sft_stage(zero2).key() != m["key"]


# ---------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("change, error, message", [
    ({"model": "no-such-org/no-such-model-xyz"}, ModelNotFoundError, "no-such-org/no-such-model-xyz"),
    ({"sft": {"lora": {"target_modules": ["q_proj", "qkv_fused"]}}}, TrainSetupError,
     r"qkv_fused not found in .*its Linear layers are: .*o_proj.*q_proj"),
    ({"resources": {"deepspeed": "jobs/deepspeed/nope.json"}}, TrainSetupError, "nope.json' does not exist"),
    ({"resources": {"num_workers": 3}}, TrainSetupError, "3 workers x 1 CPUs = 3 CPUs, but the Ray cluster has 2"),
], ids=["unknown-model", "lora-target", "deepspeed-file", "too-many-workers"])
def test_bad_settings_fail_before_training(tmp_path, tiny_llama, ray_local, change, error, message):
    train = {"model": tiny_llama, "sft": {"max_steps": 1}}
    for key, value in change.items():
        train[key] = {**train.get(key, {}), **value} if isinstance(value, dict) else value
    cfg = job(write_run(tmp_path / "run", easy_pairs()), train)
    with pytest.raises(error, match=message):
        run_sft(cfg)
    assert not (tmp_path / "run" / "ray_results").exists()  # Ray Train never started


def test_missing_upstream_stage_is_named(tmp_path, tiny_llama, ray_local):
    cfg = job(write_run(tmp_path / "run", easy_pairs()), {"model": tiny_llama})
    with pytest.raises(TrainSetupError, match="run `hetray train sft` first"):
        run_reward(cfg)


def test_no_pairs_is_a_clear_error(tmp_path, tiny_llama):
    cfg = job(tmp_path / "empty", {"model": tiny_llama})
    with pytest.raises(TrainSetupError, match="no pairs to train on"):
        run_sft(cfg)


def test_paper_hyperparameters_are_the_defaults():
    t = JobConfig.model_validate({"convert": {"sources": SOURCES}}).train
    assert (t.sft.lora.r, t.sft.lora.alpha, t.sft.lora.dropout) == (16, 32, 0.05)
    assert (t.sft.learning_rate, t.sft.lr_scheduler, t.sft.max_length) == (1e-5, "cosine", 512)
    assert (t.sft.per_device_batch_size, t.sft.weight_decay, t.sft.max_steps) == (4, 0.05, 5000)
    assert (t.reward.lora.r, t.reward.lora.alpha, t.reward.lora.dropout) == (8, 32, 0.1)
    assert (t.reward.learning_rate, t.reward.lr_scheduler, t.reward.weight_decay) == (2e-5, "linear", 0.001)
    assert (t.ppo.lora.r, t.ppo.learning_rate, t.ppo.per_device_batch_size) == (16, 1.41e-5, 1)
    assert (t.ppo.gradient_accumulation_steps, t.ppo.min_new_tokens, t.ppo.max_new_tokens) == (4, 32, 128)
    assert t.model == "smollm2-135m-instruct" and t.data == "selected"


def test_held_out_split_is_deterministic_and_near_the_fraction():
    ids = [make_id("p", str(i)) for i in range(2000)]
    held = [held_out(i, 0.2, seed=0) for i in ids]
    assert held == [held_out(i, 0.2, seed=0) for i in ids]
    assert 0.17 < sum(held) / len(held) < 0.23
    assert held != [held_out(i, 0.2, seed=1) for i in ids]


def test_cli_train_parses():
    from hetray.cli import make_parser

    args = make_parser().parse_args(["train", "reward", "--config", "jobs/quickstart.yaml", "train.reward.max_steps=2"])
    assert (args.stage, args.overrides, args.force) == ("reward", ["train.reward.max_steps=2"], False)
