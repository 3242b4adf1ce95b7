"""Stage 5b, reward model: a one-label sequence classifier trained on the pairs (paper 2.6, A.3).

``run_reward(cfg)`` starts from the SFT model (``train.reward.init: sft``; ``base`` for the
bare LLM) with a fresh score head, trains LoRA (and the head) with TRL's RewardTrainer on
``(prompt, chosen, rejected)``: the loss is -log sigmoid(r(chosen) - r(rejected)). A seeded
``eval_fraction`` of the prompts (with all their pairs) is held out; the pairwise accuracy on it (how often the chosen
answer scores higher) is in ``metrics.json`` and the manifest (``final.eval_accuracy``): the
cheap objective Ray Tune searches selection settings against.
"""

from __future__ import annotations

from pathlib import Path

from hetray.train import common


def run_reward(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the reward model. Returns its manifest."""
    s = cfg.train.reward
    sft = Path(cfg.run_dir).resolve() / "sft"
    if s.init == "sft":
        model, upstream = str(sft / common.STAGE_MODEL_DIR), [sft]
    else:
        model, upstream = common.resolve_base(cfg.train.model), []
    plan = common.plan_stage(cfg, "reward", s, model=model, head=common.SEQ_CLS, upstream=upstream)
    return common.run_stage(cfg, *plan, build_trainer=build_trainer, finish=evaluate, force=force)


def split_pairs(job: common.StageJob) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pair rows, split by a seeded hash of the prompt: every pair of a
    held-out prompt is held out, so the accuracy is measured on prompts never trained on."""
    tokenizer = common.load_tokenizer(job.model)
    rows = common.pair_rows(job.data_dir, common.uses_chat(tokenizer))
    fraction = job.settings.eval_fraction
    held = [common.held_out(r.pop("prompt_id"), fraction, job.seed) for r in rows]
    train = [r for r, h in zip(rows, held) if not h]
    test = [r for r, h in zip(rows, held) if h]
    if not train:
        raise ValueError(f"train.reward.eval_fraction={fraction} leaves no pairs to train on")
    return train, test


def build_trainer(job: common.StageJob):
    """In each Ray Train worker: TRL's RewardTrainer with a LoRA config (score head trained too)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    s = job.settings
    train, test = split_pairs(job)
    set_seed(job.seed)  # the fresh score head is random
    eval_batch = max(1, -(-len(test) // _world_size()))  # one eval batch per worker
    args = RewardConfig(**{**common.training_args(job), "per_device_eval_batch_size": eval_batch},
                        max_length=s.max_length)
    return RewardTrainer(
        model=common.load_model(job.model, common.SEQ_CLS),
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(test) if test else None,
        processing_class=common.load_tokenizer(job.model),
        peft_config=common.lora_config(s.lora, common.SEQ_CLS),
    )


def evaluate(trainer, job: common.StageJob) -> dict:
    """Pairwise accuracy on the held-out pairs (every rank takes part)."""
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {"eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"],
            "eval_margin": metrics.get("eval_margin"), "eval_pairs": len(trainer.eval_dataset)}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1
