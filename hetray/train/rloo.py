"""Stage 5d, RLOO: online RL from the SFT model against the reward model (REINFORCE
leave-one-out: each completion's baseline is the mean reward of the other completions of
its prompt). A maintained alternative to PPO with no value model.

``run_rloo(cfg)`` samples ``num_generations`` completions per prompt of the pairs
(``min_new_tokens``..``max_new_tokens`` tokens), scores them with the reward stage's merged
model (``reward_funcs`` = its path) and trains LoRA on the policy; the KL reference is the SFT
model (a frozen copy of the adapter). Outputs in ``<run_dir>/rloo/`` as every training stage.
"""

from __future__ import annotations

from pathlib import Path

from hetray.train import common


def run_rloo(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the RLOO policy. Returns its manifest."""
    run_dir = Path(cfg.run_dir).resolve()
    sft, reward = run_dir / "sft", run_dir / "reward"
    plan = common.plan_stage(
        cfg, "rloo", cfg.train.rloo, model=str(sft / common.STAGE_MODEL_DIR), head=common.CAUSAL,
        upstream=[sft, reward], extra={"reward_model": str(reward / common.STAGE_MODEL_DIR)},
    )
    return common.run_stage(cfg, *plan, build_trainer=build_trainer, force=force)


def build_trainer(job: common.StageJob):
    """In each Ray Train worker: TRL's RLOOTrainer, the reward model given by its path."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    s = job.settings
    tokenizer = common.load_tokenizer(job.model)
    rows = common.short_prompts(common.prompt_rows(job.data_dir, common.uses_chat(tokenizer)), tokenizer, s.max_length)
    args = RLOOConfig(
        **common.training_args(job),
        num_generations=s.num_generations,
        max_completion_length=s.max_new_tokens,
        generation_kwargs={"min_new_tokens": s.min_new_tokens},
        temperature=s.temperature,
        beta=s.beta,
    )
    return RLOOTrainer(
        model=common.load_model(job.model, common.CAUSAL),
        reward_funcs=job.extra["reward_model"],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=common.lora_config(s.lora, common.CAUSAL),
    )
