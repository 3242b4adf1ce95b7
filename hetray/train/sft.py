"""Stage 5a, SFT: LoRA fine-tuning of the base LLM on prompt + chosen (paper 2.6, A.3).

``run_sft(cfg)`` trains on every pair's prompt and chosen answer, plus the ``sft_only/`` rows
(prompts with a single reference answer), as prompt-completion examples. The loss covers the
completion only (``train.sft.loss: completion``) or prompt and completion (``full``, as
StackLLaMA's SFT did); ``train.sft.packing`` packs the rows into ``max_length`` sequences (TRL's
best-fit packing; an epoch is then a pass over the packed sequences). The text is
``train.text_format``'s: chat turns when the tokenizer has a chat template, else raw text
through ``train.raw_template`` (``hetray.pairs``), the same text the later stages read. The
budget is ``max_steps`` and / or ``num_train_epochs`` (the smaller wins). Outputs in
``<run_dir>/sft/``: ``adapter/``, ``merged/`` (the model the reward, PPO, RLOO and DPO stages
start from), ``metrics.json``, ``loss.png``, ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path

from hetray.models import CAUSAL, load_model, load_tokenizer
from hetray.pairs import sft_rows, text_format
from hetray.schema import parquet_files
from hetray.stage import Stage
from hetray.train.driver import StageJob, resolve_base, train_stage, training_stage
from hetray.train.worker import lora_config, set_budget, trl_config


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
    rows = sft_rows(job.data_dir, job.extra["sft_only"], text_format(tokenizer, job.text_format, job.raw_template))
    args = trl_config(SFTConfig, job, max_length=s.max_length, completion_only_loss=s.loss == "completion",
                      packing=s.packing)
    trainer = SFTTrainer(
        model=load_model(job.model, CAUSAL),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(s.lora, CAUSAL),
    )
    return set_budget(trainer, job, rows=len(trainer.train_dataset))  # packed: the packed sequences
