"""Stage 5e, DPO: preference optimisation straight on the pairs, no reward model, no rollouts.

``run_dpo(cfg)`` starts from the SFT model (``train.dpo.init: sft``; ``base`` for the bare
LLM), trains LoRA with TRL's DPOTrainer on ``(prompt, chosen, rejected)`` in
``train.text_format``'s text; the reference model is the same weights with the adapter
switched off. An epoch is a pass over the pairs. A maintained alternative to PPO
(TRL 1.13 dropped PPO). Outputs in ``<run_dir>/dpo/`` as every training stage.
"""

from __future__ import annotations

from hetray.models import CAUSAL, load_model, load_tokenizer
from hetray.pairs import pair_rows, text_format
from hetray.train.driver import StageJob, start_model, train_stage
from hetray.train.worker import lora_config, set_budget, trl_config


def run_dpo(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the DPO policy. Returns its manifest."""
    model, upstream = start_model(cfg, cfg.train.dpo.init)
    return train_stage(cfg, "dpo", cfg.train.dpo, model=model, head=CAUSAL, build_trainer=build_trainer,
                       upstream=upstream, force=force)


def build_trainer(job: StageJob):
    """In each Ray Train worker: TRL's DPOTrainer with a LoRA config (reference = adapter off)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = job.settings
    tokenizer = load_tokenizer(job.model)
    rows = pair_rows(job.data_dir, text_format(tokenizer, job.text_format, job.raw_template))
    args = trl_config(DPOConfig, job, max_length=s.max_length, beta=s.beta)
    trainer = DPOTrainer(
        model=load_model(job.model, CAUSAL),
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(s.lora, CAUSAL),
    )
    return set_budget(trainer, job, rows=len(trainer.train_dataset))
