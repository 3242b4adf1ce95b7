"""Stage 5a, SFT: LoRA fine-tuning of the base LLM on prompt + chosen (paper 2.6, A.3).

``run_sft(cfg)`` trains on every pair's prompt and chosen answer, plus the ``sft_only/`` rows
(prompts with a single reference answer), as prompt-completion examples: the loss covers the
completion only. Rows become chat turns when the tokenizer has a chat template. Outputs in
``<run_dir>/sft/``: ``adapter/``, ``merged/`` (the model the reward, PPO, RLOO and DPO stages
start from), ``metrics.json``, ``loss.png``, ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path

from hetray.models import CAUSAL, load_model, load_tokenizer
from hetray.pairs import sft_rows, uses_chat
from hetray.schema import parquet_files
from hetray.stage import Stage
from hetray.train.driver import StageJob, resolve_base, train_stage, training_stage
from hetray.train.worker import lora_config, training_args


def run_sft(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the SFT stage. Returns its manifest."""
    sft_only = _sft_only(cfg)
    return train_stage(
        cfg, "sft", cfg.train.sft, model=resolve_base(cfg.train.model), head=CAUSAL, build_trainer=build_trainer,
        extra={"sft_only": str((Path(cfg.run_dir) / "sft_only").resolve()) if sft_only else None},
        extra_inputs=sft_only, force=force,
    )


def sft_stage(cfg) -> Stage:
    """The SFT stage as the runner sees it (its key), without training."""
    return training_stage(cfg, "sft", cfg.train.sft, extra_inputs=_sft_only(cfg))


def _sft_only(cfg) -> tuple[str, ...]:
    """("sft_only",) when the prompts with a single reference answer are trained on too."""
    use = cfg.train.sft.include_sft_only and bool(parquet_files(Path(cfg.run_dir) / "sft_only"))
    return ("sft_only",) if use else ()


def build_trainer(job: StageJob):
    """In each Ray Train worker: the TRL SFTTrainer with a LoRA config."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = job.settings
    tokenizer = load_tokenizer(job.model)
    rows = sft_rows(job.data_dir, job.extra["sft_only"], uses_chat(tokenizer, s.chat_template))
    args = SFTConfig(**training_args(job), max_length=s.max_length, completion_only_loss=True)
    return SFTTrainer(
        model=load_model(job.model, CAUSAL),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(s.lora, CAUSAL),
    )
