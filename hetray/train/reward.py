"""Stage 5b, reward model: a one-label sequence classifier trained on the pairs (paper 2.6, A.3).

``run_reward(cfg)`` starts from the SFT model (``train.reward.init: sft``; ``base`` for the
bare LLM) with a fresh score head, trains LoRA (and the head) with TRL's RewardTrainer on
``(prompt, chosen, rejected)``: the loss is -log sigmoid(r(chosen) - r(rejected)). A seeded
``eval_fraction`` of the prompts (with all their pairs) is held out; the pairwise accuracy on it (how often the chosen
answer scores higher) is in ``metrics.json`` and the manifest (``final.eval_accuracy``): the
cheap objective Ray Tune searches selection settings against. It is measured once training is
done, on the merged checkpoint, by ``hetray.rewards`` (pairs longer than ``max_length`` left
out, as in training): the code and the pairs of ``hetray eval --suites reward``, so both give
the same number. The pairs are in
``train.text_format``'s text, as SFT and PPO read it. An epoch is a pass over the training
pairs (the paper trained the reward model for one: ``num_train_epochs: 1``).
"""

from __future__ import annotations

from hetray import rewards
from hetray.models import SEQ_CLS, load_model, load_tokenizer
from hetray.pairs import split_pairs, text_format
from hetray.train.driver import StageJob, start_model, train_stage
from hetray.train.worker import lora_config, set_budget, trl_config, world_size


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
    args = trl_config(RewardConfig, job, per_device_eval_batch_size=eval_batch, max_length=s.max_length)
    trainer = RewardTrainer(
        model=load_model(job.model, SEQ_CLS),
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(test) if test else None,
        processing_class=tokenizer,
        peft_config=lora_config(s.lora, SEQ_CLS),
    )
    return set_budget(trainer, job, rows=len(trainer.train_dataset))  # after RewardTrainer drops pairs > max_length


def evaluate(trainer, job: StageJob, merged_dir) -> dict:
    """Rank 0, after the merge: pairwise accuracy of the merged model on the held-out pairs,
    as ``hetray eval --suites reward`` measures it (``hetray.rewards``)."""
    held_out = held_out_pairs(job, trainer.processing_class)
    if not held_out:
        return {}
    rm = rewards.RewardModel.load(str(merged_dir))  # eval's default batch of 16: the same sums, the same number
    pairs = rewards.fitting(held_out, rm.tokenizer, job.settings.max_length)
    records = rewards.score_items(rm, pairs)
    overall = rewards.aggregate(records)
    return {"eval_accuracy": overall["accuracy"], "eval_loss": rewards.pairwise_loss(records),
            "eval_margin": overall["margin"], "eval_pairs": overall["pairs"],
            "eval_pairs_too_long": len(held_out) - len(pairs)}


def held_out_pairs(job: StageJob, tokenizer) -> list[dict]:
    """The held-out pairs, in the stage's text format (what ``build_trainer`` held out)."""
    s = job.settings
    return split_pairs(job.data_dir, s.eval_fraction, job.seed,
                       text_format(tokenizer, job.text_format, job.raw_template))[1]
