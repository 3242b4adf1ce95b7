"""Stage 5e, DPO: preference optimisation straight on the pairs, no reward model, no rollouts.

``run_dpo(cfg)`` starts from the SFT model (``train.dpo.init: sft``; ``base`` for the bare
LLM), trains LoRA with TRL's DPOTrainer on ``(prompt, chosen, rejected)``; the reference
model is the same weights with the adapter switched off. A maintained alternative to PPO
(TRL 1.13 dropped PPO). Outputs in ``<run_dir>/dpo/`` as every training stage.
"""

from __future__ import annotations

from pathlib import Path

from hetray.train import common


def run_dpo(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the DPO policy. Returns its manifest."""
    s = cfg.train.dpo
    sft = Path(cfg.run_dir).resolve() / "sft"
    if s.init == "sft":
        model, upstream = str(sft / common.STAGE_MODEL_DIR), [sft]
    else:
        model, upstream = common.resolve_base(cfg.train.model), []
    plan = common.plan_stage(cfg, "dpo", s, model=model, head=common.CAUSAL, upstream=upstream)
    return common.run_stage(cfg, *plan, build_trainer=build_trainer, force=force)


def build_trainer(job: common.StageJob):
    """In each Ray Train worker: TRL's DPOTrainer with a LoRA config (reference = adapter off)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = job.settings
    tokenizer = common.load_tokenizer(job.model)
    rows = common.pair_rows(job.data_dir, common.uses_chat(tokenizer))
    for r in rows:
        del r["prompt_id"]
    args = DPOConfig(**common.training_args(job), max_length=s.max_length, beta=s.beta)
    return DPOTrainer(
        model=common.load_model(job.model, common.CAUSAL),
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=common.lora_config(s.lora, common.CAUSAL),
    )
