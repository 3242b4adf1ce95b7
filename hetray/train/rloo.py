"""Stage 5d, RLOO: online RL from the SFT model against the reward model (REINFORCE
leave-one-out: each completion's baseline is the mean reward of the other completions of
its prompt). A maintained alternative to PPO with no value model.

``run_rloo(cfg)`` samples ``num_generations`` completions per prompt of the pairs
(``min_new_tokens``..``max_new_tokens`` tokens), scores them with the reward stage's merged
model (``reward_funcs`` = its path) and trains LoRA on the policy; the KL reference is the SFT
model (a frozen copy of the adapter). Prompts are in ``train.text_format``'s text, as SFT
and the reward model read it. An epoch is one pass over the prompts, i.e.
``prompts x num_generations`` completions; a step consumes ``per_device_batch_size x
gradient_accumulation_steps x workers`` completions. Outputs in ``<run_dir>/rloo/`` as every
training stage.
"""

from __future__ import annotations

from pathlib import Path

from hetray.models import CAUSAL, load_model, load_tokenizer
from hetray.pairs import prompt_rows, text_format
from hetray.train.driver import STAGE_MODEL_DIR, StageJob, train_stage
from hetray.train.worker import lora_config, set_budget, short_prompts, trl_config


def run_rloo(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the RLOO policy. Returns its manifest."""
    run_dir = Path(cfg.run_dir).resolve()
    return train_stage(
        cfg, "rloo", cfg.train.rloo, model=str(run_dir / "sft" / STAGE_MODEL_DIR), head=CAUSAL,
        build_trainer=build_trainer, upstream=("sft", "reward"),
        extra={"reward_model": str(run_dir / "reward" / STAGE_MODEL_DIR)}, force=force,
    )


def build_trainer(job: StageJob):
    """In each Ray Train worker: TRL's RLOOTrainer, the reward model given by its path."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    s = job.settings
    tokenizer = load_tokenizer(job.model)
    fmt = text_format(tokenizer, job.text_format, job.raw_template)
    rows = short_prompts(prompt_rows(job.data_dir, fmt), tokenizer, s.max_length)
    args = trl_config(
        RLOOConfig, job,
        num_generations=s.num_generations,
        max_completion_length=s.max_new_tokens,
        generation_kwargs={"min_new_tokens": s.min_new_tokens},
        temperature=s.temperature,
        beta=s.beta,
    )
    trainer = RLOOTrainer(
        model=load_model(job.model, CAUSAL),
        reward_funcs=job.extra["reward_model"],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(s.lora, CAUSAL),
    )
    return set_budget(trainer, job, rows=len(rows) * s.num_generations)  # an epoch: every prompt's group
