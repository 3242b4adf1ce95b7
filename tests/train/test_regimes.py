"""The paper's training regimes as settings: budgets in epochs, one text format for every stage,
SFT loss on the completion or the full sequence, packing, and PPO's adaptive KL coefficient.

Most tests build a stage's TRL trainer in this process (``build_trainer(job)``, as
benchmarks/bench_train.py does, no Ray) on the tiny random Llama and look at what it will
train on; the Ray runs are marked slow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from hetray.config import JobConfig
from hetray.models import CAUSAL, SEQ_CLS, load_tokenizer
from hetray.pairs import TextFormat, pair_rows, prompt_rows, sft_rows, text_format
from hetray.schema import PREFERENCE_SCHEMA, SFT_SCHEMA, pair
from hetray.train import dpo, ppo, reward, rloo, sft
from hetray.train.driver import StageJob
from hetray.train.ppo import KLCoefficient, adaptive_kl_coef
from hetray.train.sft import run_sft, sft_stage
from hetray.train.worker import plan_budget

SOURCES = [{"name": "wg", "format": "winogrande", "path": "sample:winogrande.jsonl"}]  # unused by training
QA = "Question: {prompt}\nAnswer:"
TINY = {"max_length": 128, "per_device_batch_size": 2, "logging_steps": 1, "save_steps": 1000}


def write_pairs(run: Path, n: int) -> Path:
    rows = [pair("easy", f"How do I do task number {i}?", f"Step one, then step two for task {i}.",
                 "Go away.", [str(i)]) for i in range(n)]
    for folder, schema, data in (("preferences", PREFERENCE_SCHEMA, rows), ("sft_only", SFT_SCHEMA, [])):
        (run / folder).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(data, schema=schema), run / folder / "part-00000.parquet")
    return run


def job_config(run: Path, train: dict) -> JobConfig:
    return JobConfig.model_validate({"run_dir": str(run), "convert": {"sources": SOURCES}, "train": train})


def stage_job(cfg: JobConfig, stage: str, model: str, head: str = CAUSAL, **extra) -> StageJob:
    """What ``train_stage`` hands each worker, for an in-process ``build_trainer``."""
    run = Path(cfg.run_dir)
    return StageJob(stage=stage, settings=getattr(cfg.train, stage), model=model, head=head,
                    data_dir=str(run / "preferences"), work_dir=str(run / f".{stage}-work"),
                    out_dir=str(run / stage), seed=cfg.seed, use_gpu=False, deepspeed=None, extra=extra,
                    text_format=cfg.train.text_format, raw_template=cfg.train.raw_template)


# ---------------------------------------------------------------------------- budgets


def test_budget_smaller_of_steps_and_epochs():
    # 10 rows, batch 2, 1 worker: an epoch is 5 steps
    assert plan_budget(100, 1, rows=10, rows_per_step=2).max_steps == 5
    assert plan_budget(3, 1, rows=10, rows_per_step=2).max_steps == 3  # max_steps smaller: it wins
    assert plan_budget(None, 2, rows=10, rows_per_step=2).max_steps == 10
    assert plan_budget(7, None, rows=10, rows_per_step=2).max_steps == 7
    assert plan_budget(None, 0.5, rows=10, rows_per_step=2).max_steps == 3  # 2.5 steps round up
    assert plan_budget(None, 0.3, rows=100, rows_per_step=10).max_steps == 3  # no float noise (0.3 x 10)
    b = plan_budget(None, 1, rows=9, rows_per_step=4)  # a short last batch still takes a step
    assert (b.steps_per_epoch, b.max_steps) == (3, 3)
    assert b.epochs_seen(3) == pytest.approx(12 / 9)
    assert plan_budget(100, 1, rows=10, rows_per_step=2).epochs_seen(5) == 1.0


def test_a_budget_is_required_and_epochs_validated():
    base = {"convert": {"sources": SOURCES}}
    with pytest.raises(ValidationError, match="set max_steps or num_train_epochs"):
        JobConfig.model_validate({**base, "train": {"reward": {"max_steps": None}}})
    with pytest.raises(ValidationError, match="num_train_epochs"):
        JobConfig.model_validate({**base, "train": {"sft": {"num_train_epochs": 0}}})
    t = JobConfig.model_validate({**base, "train": {"reward": {"max_steps": None, "num_train_epochs": 1}}}).train
    assert (t.reward.max_steps, t.reward.num_train_epochs) == (None, 1.0)
    assert (t.sft.max_steps, t.sft.num_train_epochs) == (5000, None)  # today's default budget


def test_sft_epoch_budget_in_process(tmp_path, tiny_llama):
    cfg = job_config(write_pairs(tmp_path / "run", 10),
                     {"model": tiny_llama, "sft": {**TINY, "max_steps": 100, "num_train_epochs": 1}})
    trainer = sft.build_trainer(stage_job(cfg, "sft", tiny_llama, sft_only=None))
    assert len(trainer.train_dataset) == 10 and trainer.args.max_steps == 5
    trainer.train()
    assert trainer.state.global_step == 5
    assert trainer.budget.epochs_seen(trainer.state.global_step) == 1.0


# ---------------------------------------------------------------------------- text format


def test_text_format_settings():
    base = {"convert": {"sources": SOURCES}}
    t = JobConfig.model_validate(base).train
    assert (t.text_format, t.raw_template) == ("chat", "{prompt}")
    with pytest.raises(ValidationError, match="has no {prompt}"):
        JobConfig.model_validate({**base, "train": {"text_format": "raw", "raw_template": "Question:"}})
    with pytest.raises(ValidationError, match="replaced by train.text_format"):
        JobConfig.model_validate({**base, "train": {"sft": {"chat_template": False}}})
    with pytest.raises(ValidationError, match="text_fromat"):  # unknown keys are still refused
        JobConfig.model_validate({**base, "train": {"text_fromat": "raw"}})


def test_row_builders_follow_the_format(tmp_path, tiny_llama):
    run = write_pairs(tmp_path / "run", 3)
    raw = TextFormat(chat=False, template=QA)
    assert sft_rows(run / "preferences", None, raw)[0] == {
        "prompt": "Question: How do I do task number 0?\nAnswer:", "completion": " Step one, then step two for task 0."}
    assert pair_rows(run / "preferences", raw)[1] == {
        "prompt": "Question: How do I do task number 1?\nAnswer:",
        "chosen": " Step one, then step two for task 1.", "rejected": " Go away."}
    assert prompt_rows(run / "preferences", raw)[2] == {"prompt": "Question: How do I do task number 2?\nAnswer:"}
    # the bool of before: True is chat turns, False raw text with the plain template
    assert pair_rows(run / "preferences", True)[0]["chosen"] == [
        {"role": "assistant", "content": "Step one, then step two for task 0."}]
    assert prompt_rows(run / "preferences", False)[0] == {"prompt": "How do I do task number 0?"}
    # the settings, as the tokenizer allows: chat needs a chat template
    tokenizer = load_tokenizer(tiny_llama)
    assert text_format(tokenizer, "chat", QA) == TextFormat(chat=True, template=QA)
    assert text_format(tokenizer, "raw", QA) == TextFormat(chat=False, template=QA)
    assert text_format(SimpleNamespace(chat_template=None), "chat", QA) == TextFormat(chat=False, template=QA)


@pytest.fixture(scope="module")
def raw_cfg(tmp_path_factory, tiny_llama) -> JobConfig:
    run = write_pairs(tmp_path_factory.mktemp("raw") / "run", 8)
    small = {**TINY, "max_steps": 2}
    return job_config(run, {
        "model": tiny_llama, "text_format": "raw", "raw_template": QA,
        "sft": small, "reward": {**small, "eval_fraction": 0.0}, "dpo": small,
        "ppo": {**small, "per_device_batch_size": 1, "gradient_accumulation_steps": 2,
                "min_new_tokens": 2, "max_new_tokens": 4},
        "rloo": {**small, "min_new_tokens": 2, "max_new_tokens": 4},
    })


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


QUESTION_0 = "Question: How do I do task number 0?\nAnswer: Step one, then step two for task 0."


def test_every_stage_trains_on_the_raw_text(raw_cfg, tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer.chat_template  # it has one: raw text is the setting's doing, not a fallback

    t = sft.build_trainer(stage_job(raw_cfg, "sft", tiny_llama, sft_only=None))
    text = decoded(tokenizer, t.train_dataset[0]["input_ids"])
    assert QUESTION_0 in text and "<|im_start|>" not in text

    t = reward.build_trainer(stage_job(raw_cfg, "reward", tiny_llama, SEQ_CLS))
    chosen = decoded(tokenizer, t.train_dataset[0]["chosen_ids"])
    rejected = decoded(tokenizer, t.train_dataset[0]["rejected_ids"])
    assert QUESTION_0 in chosen and "<|im_start|>" not in chosen
    assert "Question: How do I do task number 0?\nAnswer: Go away." in rejected

    t = dpo.build_trainer(stage_job(raw_cfg, "dpo", tiny_llama))
    row = t.train_dataset[0]
    assert QUESTION_0 in decoded(tokenizer, row["prompt_ids"] + row["chosen_ids"])

    t = ppo.build_trainer(stage_job(raw_cfg, "ppo", tiny_llama, reward_model=tiny_llama))
    assert decoded(tokenizer, t.train_dataset[0]["input_ids"]).endswith("Question: How do I do task number 0?\nAnswer:")

    t = rloo.build_trainer(stage_job(raw_cfg, "rloo", tiny_llama, reward_model=tiny_llama))
    assert t.train_dataset[0]["prompt"] == "Question: How do I do task number 0?\nAnswer:"


def test_chat_format_is_the_default(tmp_path, tiny_llama):
    cfg = job_config(write_pairs(tmp_path / "run", 4), {"model": tiny_llama, "sft": {**TINY, "max_steps": 1}})
    t = sft.build_trainer(stage_job(cfg, "sft", tiny_llama, sft_only=None))
    text = decoded(load_tokenizer(tiny_llama), t.train_dataset[0]["input_ids"])
    assert "<|im_start|>user\nHow do I do task number 0?" in text and "Question:" not in text


# ---------------------------------------------------------------------------- SFT loss and packing


def test_full_sequence_loss_labels_the_prompt_too(tmp_path, tiny_llama):
    run = write_pairs(tmp_path / "run", 4)
    labels = {}
    for loss in ("completion", "full"):
        cfg = job_config(run, {"model": tiny_llama, "sft": {**TINY, "max_steps": 1, "loss": loss}})
        row = sft.build_trainer(stage_job(cfg, "sft", tiny_llama, sft_only=None)).train_dataset[0]
        labels[loss] = (row["input_ids"], row["labels"])
    ids, completion = labels["completion"]
    assert labels["full"] == (ids, ids)  # every token is learned
    masked = [i for i, label in enumerate(completion) if label == -100]
    assert 5 < len(masked) < len(ids)  # the prompt (and the chat header) is not ...
    assert masked == list(range(len(masked)))  # ... and it is the beginning
    assert completion[len(masked):] == ids[len(masked):]


def test_packing_packs_rows_into_max_length(tmp_path, tiny_llama):
    cfg = job_config(write_pairs(tmp_path / "run", 12),
                     {"model": tiny_llama, "sft": {**TINY, "max_steps": None, "num_train_epochs": 1,
                                                   "packing": True, "loss": "full"}})
    t = sft.build_trainer(stage_job(cfg, "sft", tiny_llama, sft_only=None))
    packed = len(t.train_dataset)
    assert 1 <= packed < 12  # ~40 tokens a row, 128 a sequence
    assert all(len(r["input_ids"]) <= 128 for r in t.train_dataset)
    assert t.budget.rows == packed and t.args.max_steps == math.ceil(packed / 2)  # an epoch of packed sequences


# ---------------------------------------------------------------------------- adaptive KL


def test_adaptive_kl_coefficient_arithmetic():
    # Ziegler et al. 2019: error clipped to +-0.2, scaled by episodes / horizon
    grown = adaptive_kl_coef(0.2, kl=12.0, target=6.0, horizon=10000, episodes=32)
    assert grown == pytest.approx(0.2 * (1 + 0.2 * 32 / 10000))  # error 1.0, clipped to 0.2
    assert adaptive_kl_coef(0.2, kl=6.6, target=6.0, horizon=10000, episodes=32) == pytest.approx(0.2 * 1.00032)
    assert adaptive_kl_coef(0.2, kl=0.0, target=6.0, horizon=100, episodes=50) == pytest.approx(0.2 * 0.9)
    assert adaptive_kl_coef(0.2, kl=6.0, target=6.0, horizon=100, episodes=50) == 0.2

    args = SimpleNamespace(kl_coef=0.1, batch_size=10)
    state = SimpleNamespace(log_history=[{"objective/kl": 3.0, "step": 1}])
    logs = {"objective/kl": 3.0}
    KLCoefficient(target=1.0, horizon=100).on_log(args, state, None, logs=logs)
    assert logs["objective/kl_coef"] == 0.1 and state.log_history[-1]["objective/kl_coef"] == 0.1  # the one used
    assert args.kl_coef == pytest.approx(0.1 * 1.02)  # the next update's
    fixed = SimpleNamespace(kl_coef=0.1, batch_size=10)
    KLCoefficient(target=None, horizon=100).on_log(fixed, SimpleNamespace(log_history=[{}]), None,
                                                   logs={"objective/kl": 3.0})
    assert fixed.kl_coef == 0.1
    # resuming: the coefficient after the checkpoint's last update
    resumed = SimpleNamespace(kl_coef=0.1, batch_size=10)
    KLCoefficient(target=1.0, horizon=100).resume(resumed, [{"objective/kl": 0.0, "objective/kl_coef": 0.5, "step": 4}])
    assert resumed.kl_coef == pytest.approx(0.5 * 0.98)


def test_ppo_adapts_the_kl_coefficient_it_uses(tmp_path, tiny_llama):
    """A tiny PPO run in-process: the coefficient each update logs is the one its rewards used
    (non_score_reward = -kl_coef x KL), it follows the controller, and it grows while the KL is
    above the target. Rollouts honour min_new_tokens (EOS masked) and the temperature."""
    target, horizon = 1e-6, 20.0  # far below any KL once the policy moves
    cfg = job_config(write_pairs(tmp_path / "run", 8), {"model": tiny_llama, "ppo": {
        **TINY, "max_steps": 4, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
        "learning_rate": 5e-3, "num_ppo_epochs": 2, "min_new_tokens": 3, "max_new_tokens": 6,
        "temperature": 1.3, "kl_coef": 0.1, "kl_target": target, "kl_horizon": horizon}})
    trainer = ppo.build_trainer(stage_job(cfg, "ppo", tiny_llama, reward_model=tiny_llama))
    tokenizer = trainer.processing_class
    policy = trainer.model.policy
    generate, seen = policy.generate, []

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        seen.append((kwargs["generation_config"].temperature, torch.stack(out.scores, 1)))
        return out

    policy.generate = spy
    trainer.train()

    logged = [h for h in trainer.state.log_history if "objective/kl" in h]
    assert len(logged) == 4 and trainer.budget.max_steps == 4
    coefs = [h["objective/kl_coef"] for h in logged]
    assert coefs[0] == 0.1
    for h, coef, after in zip(logged, coefs, coefs[1:] + [trainer.args.kl_coef]):
        assert h["objective/non_score_reward"] == pytest.approx(-coef * h["objective/kl"], rel=1e-4, abs=1e-7)
        assert after == pytest.approx(adaptive_kl_coef(coef, h["objective/kl"], target, horizon, 4))
    assert sum(h["objective/kl"] > target for h in logged) >= 3  # update 1 may see KL 0: policy == reference
    grew = [b > a for a, b, h in zip(coefs, coefs[1:] + [trainer.args.kl_coef], logged) if h["objective/kl"] > target]
    assert grew and all(grew), (coefs, [h["objective/kl"] for h in logged])

    assert seen
    for temperature, scores in seen:
        assert temperature == pytest.approx(1.3)
        assert torch.isneginf(scores[:, :3, tokenizer.eos_token_id]).all()  # no EOS before min_new_tokens
        assert scores.shape[1] <= 6 and torch.isfinite(scores[:, 3:, tokenizer.eos_token_id]).all()


# ---------------------------------------------------------------------------- on Ray: key and manifest


def test_stage_key_covers_the_text_format(tmp_path, tiny_llama, ray_local):
    run = write_pairs(tmp_path / "run", 4)
    chat = job_config(run, {"model": tiny_llama})
    raw = job_config(run, {"model": tiny_llama, "text_format": "raw"})
    qa = job_config(run, {"model": tiny_llama, "text_format": "raw", "raw_template": QA})
    assert sft_stage(raw).config["text"] == {"format": "raw", "raw_template": "{prompt}"}
    assert len({sft_stage(c).key() for c in (chat, raw, qa)}) == 3


@pytest.mark.slow
def test_manifest_records_the_effective_budget(tmp_path, tiny_llama, ray_local):
    cfg = job_config(write_pairs(tmp_path / "run", 10), {
        "model": tiny_llama, "resources": {"num_workers": 1, "max_failures": 0},
        "sft": {**TINY, "max_steps": 100, "num_train_epochs": 1, "learning_rate": 1e-3}})
    m = run_sft(cfg)
    assert (m["global_step"], m["max_steps"], m["epochs_seen"]) == (5, 5, 1.0)
    assert m["budget"] == {"rows": 10, "rows_per_step": 2, "max_steps": 5, "steps_per_epoch": 5, "epochs_seen": 1.0}
    assert m["config"]["settings"]["num_train_epochs"] == 1.0 and m["config"]["text"]["format"] == "chat"
    metrics = json.loads((Path(cfg.run_dir) / "sft" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"] if "loss" in h] == [1, 2, 3, 4, 5]
