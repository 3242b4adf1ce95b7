"""Stage 5a, SFT: LoRA fine-tuning of the base LLM on prompt + chosen (paper 2.6, A.3).

``run_sft(cfg)`` trains on every pair's prompt and chosen answer, plus the ``sft_only/`` rows
(prompts with a single reference answer), as prompt-completion examples: the loss covers the
completion only. Rows become chat turns when the tokenizer has a chat template. Outputs in
``<run_dir>/sft/``: ``adapter/``, ``merged/`` (the model the reward, PPO, RLOO and DPO stages
start from), ``metrics.json``, ``loss.png``, ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path

from hetray.unify.summary import parquet_files
from hetray.train import common


def run_sft(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the SFT stage. Returns its manifest."""
    return common.run_stage(cfg, *plan(cfg), build_trainer=build_trainer, force=force)


def plan(cfg) -> tuple:
    """(job, key, config, inputs): what run_sft would run, and the key it is skipped by."""
    s = cfg.train.sft
    sft_only = Path(cfg.run_dir).resolve() / "sft_only"
    use_sft_only = s.include_sft_only and bool(parquet_files(sft_only))
    return common.plan_stage(
        cfg, "sft", s, model=common.resolve_base(cfg.train.model), head=common.CAUSAL,
        extra={"sft_only": str(sft_only) if use_sft_only else None},
        extra_inputs=[sft_only] if use_sft_only else [],
    )


def build_trainer(job: common.StageJob):
    """In each Ray Train worker: the TRL SFTTrainer with a LoRA config."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = job.settings
    tokenizer = common.load_tokenizer(job.model)
    rows = common.sft_rows(job.data_dir, job.extra["sft_only"], common.uses_chat(tokenizer, s.chat_template))
    args = SFTConfig(**common.training_args(job), max_length=s.max_length, completion_only_loss=True)
    return SFTTrainer(
        model=common.load_model(job.model, common.CAUSAL),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=common.lora_config(s.lora, common.CAUSAL),
    )
