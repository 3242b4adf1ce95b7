"""Stage 5b, reward model: a one-label sequence classifier trained on the pairs (paper 2.6, A.3).

``run_reward(cfg)`` starts from the SFT model (``train.reward.init: sft``; ``base`` for the
bare LLM) with a fresh score head, trains LoRA (and the head) with TRL's RewardTrainer on
``(prompt, chosen, rejected)``: the loss is -log sigmoid(r(chosen) - r(rejected)). A seeded
``eval_fraction`` of the prompts (with all their pairs) is held out; the pairwise accuracy on it (how often the chosen
answer scores higher) is in ``metrics.json`` and the manifest (``final.eval_accuracy``): the
cheap objective Ray Tune searches selection settings against. The pairs are in
``train.text_format``'s text, as SFT and PPO read it. An epoch is a pass over the training
pairs (the paper trained the reward model for one: ``num_train_epochs: 1``).
"""

from __future__ import annotations

from hetray.models import SEQ_CLS, load_model, load_tokenizer
from hetray.pairs import split_pairs, text_format
from hetray.train.driver import StageJob, start_model, train_stage
from hetray.train.worker import lora_config, set_budget, training_args, world_size


def run_reward(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the reward model. Returns its manifest."""
    model, upstream = start_model(cfg, cfg.train.reward.init)
    return train_stage(cfg, "reward", cfg.train.reward, model=model, head=SEQ_CLS, build_trainer=build_trainer,
                       upstream=upstream, finish=evaluate, force=force)


def build_trainer(job: StageJob):
    """In each Ray Train worker: TRL's RewardTrainer with a LoRA config (score head trained too)."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    s = job.settings
    tokenizer = load_tokenizer(job.model)
    train, test = split_pairs(job.data_dir, s.eval_fraction, job.seed,
                              text_format(tokenizer, job.text_format, job.raw_template))
    if not train:
        raise ValueError(f"train.reward.eval_fraction={s.eval_fraction} leaves no pairs to train on")
    set_seed(job.seed)  # the fresh score head is random
    eval_batch = max(1, -(-len(test) // world_size()))  # one eval batch per worker
    args = RewardConfig(**{**training_args(job), "per_device_eval_batch_size": eval_batch},
                        max_length=s.max_length)
    trainer = RewardTrainer(
        model=load_model(job.model, SEQ_CLS),
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(test) if test else None,
        processing_class=tokenizer,
        peft_config=lora_config(s.lora, SEQ_CLS),
    )
    return set_budget(trainer, job, rows=len(trainer.train_dataset))  # after RewardTrainer drops pairs > max_length


def evaluate(trainer, job: StageJob) -> dict:
    """Pairwise accuracy on the held-out pairs (every rank takes part)."""
    if trainer.eval_dataset is None:
        return {}
    metrics = trainer.evaluate()
    return {"eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"],
            "eval_margin": metrics.get("eval_margin"), "eval_pairs": len(trainer.eval_dataset)}
