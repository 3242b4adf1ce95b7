"""Typed settings of the training stages (the ``train:`` section of a job YAML).

Defaults are the paper's hyperparameters (Aponte et al. 2024, A.3; DESIGN.md, "Train"):
a job that says nothing trains like the paper. The quickstart overrides them with a few tiny
steps. Field names follow TRL's config classes where one exists, so a reader of the TRL docs
knows what each one does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hetray.models import DEFAULT_LLM
from hetray.settings import Strict


class LoraSettings(Strict):
    r: int = Field(default=16, ge=1, description="LoRA rank")
    alpha: int = Field(default=32, ge=1, description="LoRA scaling (alpha / r multiplies the update)")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="names of the Linear layers that get an adapter (checked against the model)",
    )


class ResourceSettings(Strict):
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (one process each)")
    use_gpu: bool | Literal["auto"] = Field(default="auto", description="auto: GPUs when the cluster has them")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs reserved per worker")
    gpus_per_worker: float = Field(default=1, gt=0, description="GPUs per worker when use_gpu")
    deepspeed: str | None = Field(
        default=None, description="DeepSpeed JSON (e.g. jobs/deepspeed/zero2.json); None: plain DDP"
    )
    max_failures: int = Field(
        default=1, ge=-1, description="worker-group restarts from the last checkpoint (-1: forever)"
    )


class _Optimisation(Strict):
    """Fields every stage has; each stage below sets its own (paper) defaults."""

    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(default=1e-5, gt=0, description="peak learning rate (AdamW)")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="learning-rate schedule"
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="share of steps warming up")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    per_device_batch_size: int = Field(default=4, ge=1, description="examples per worker per micro-step")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="micro-steps per optimizer step")
    max_length: int = Field(default=512, ge=8, description="tokens per sequence (prompt + answer)")
    max_steps: int | None = Field(
        default=5000, ge=1, description="optimizer steps (paper: at most 5000); None: num_train_epochs decides"
    )
    num_train_epochs: float | None = Field(
        default=None, gt=0,
        description="passes over the training rows (fractions allowed); with max_steps too, the smaller budget wins",
    )
    save_steps: int = Field(default=500, ge=1, description="checkpoint (and report to Ray) every N steps")
    logging_steps: int = Field(default=10, ge=1, description="log (and report to Ray) every N steps")
    gradient_checkpointing: bool = Field(default=False, description="recompute activations: less memory, ~20% slower")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on GPUs that support it, else fp32"
    )
    seed: int | None = Field(default=None, description="None: the job's seed")

    @model_validator(mode="after")
    def _a_budget(self):
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError("set max_steps or num_train_epochs (or both: the smaller budget wins)")
        return self


class SftSettings(_Optimisation):
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.05))
    learning_rate: float = Field(default=1e-5, gt=0, description="paper: 1e-5")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="paper: cosine"
    )
    weight_decay: float = Field(default=0.05, ge=0, description="paper: 0.05")
    per_device_batch_size: int = Field(default=4, ge=1, description="paper: 4")
    max_length: int = Field(default=512, ge=8, description="paper: 512")
    include_sft_only: bool = Field(default=True, description="also train on the sft_only/ rows")
    loss: Literal["completion", "full"] = Field(
        default="completion", description="completion: loss on the answer only; full: on prompt + answer too"
    )
    packing: bool = Field(
        default=False,
        description="pack rows into max_length sequences (TRL's packing; padding-free, best with flash attention)",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_chat_template(cls, data):
        if isinstance(data, dict) and "chat_template" in data:
            raise ValueError("chat_template was replaced by train.text_format (chat | raw), which every stage uses")
        return data


class RewardSettings(_Optimisation):
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=8, alpha=32, dropout=0.1))
    learning_rate: float = Field(default=2e-5, gt=0, description="paper: 2e-5")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="paper: linear"
    )
    weight_decay: float = Field(default=0.001, ge=0, description="paper: 0.001")
    eval_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="pairs held out to measure pairwise accuracy"
    )
    init: Literal["sft", "base"] = Field(default="sft", description="start from the SFT merged model or the base")


class PpoSettings(_Optimisation):
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.05))
    learning_rate: float = Field(default=1.41e-5, gt=0, description="paper: 1.41e-5")
    per_device_batch_size: int = Field(default=1, ge=1, description="micro-batch (paper: mini-batch 1)")
    gradient_accumulation_steps: int = Field(
        default=4, ge=1,
        description="paper: 4; TRL's rollout per update = per_device_batch_size x this x workers (paper: 32)",
    )
    max_length: int = Field(default=512, ge=8, description="prompt tokens kept (left-truncated)")
    num_ppo_epochs: int = Field(default=4, ge=1, description="optimisation passes over each rollout")
    num_mini_batches: int = Field(default=1, ge=1, description="mini-batches per rollout")
    min_new_tokens: int = Field(default=32, ge=0, description="shortest generation (paper: 32)")
    max_new_tokens: int = Field(default=128, ge=1, description="longest generation (paper: 128)")
    kl_coef: float = Field(
        default=0.05, ge=0, description="KL penalty against the SFT model (the initial one when kl_target is set)"
    )
    kl_target: float | None = Field(
        default=None, gt=0,
        description="adaptive KL (Ziegler et al. 2019): steer the rollout KL to this; None: fixed kl_coef "
                    "(StackLLaMA: kl_coef 0.2, kl_target 6)",
    )
    kl_horizon: float = Field(
        default=10000, gt=0, description="adaptive KL: episodes over which it closes the gap (old TRL: 10000)"
    )
    temperature: float = Field(default=0.7, gt=0, description="sampling temperature of rollouts")


class RlooSettings(_Optimisation):
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.05))
    learning_rate: float = Field(default=1.41e-5, gt=0, description="as PPO")
    per_device_batch_size: int = Field(default=4, ge=1, description="completions per worker per micro-step")
    max_length: int = Field(default=512, ge=8, description="prompt tokens kept")
    num_generations: int = Field(default=2, ge=2, description="completions per prompt (the leave-one-out group)")
    min_new_tokens: int = Field(default=32, ge=0, description="shortest generation (as PPO)")
    max_new_tokens: int = Field(default=128, ge=1, description="longest generation (as PPO)")
    beta: float = Field(default=0.05, ge=0, description="KL coefficient against the SFT model")
    temperature: float = Field(default=0.7, gt=0, description="sampling temperature")


class DpoSettings(_Optimisation):
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings(r=16, alpha=32, dropout=0.05))
    learning_rate: float = Field(default=1e-5, gt=0, description="as SFT")
    beta: float = Field(default=0.1, gt=0, description="DPO temperature: strength of the implicit KL")
    init: Literal["sft", "base"] = Field(default="sft", description="start from the SFT merged model or the base")


class TrainConfig(Strict):
    model: str = Field(default=DEFAULT_LLM, description="base LLM: bundled alias, local path or hub id")
    data: Literal["selected", "preferences"] = Field(
        default="selected", description="folder of pairs to train on; selected/ falls back to preferences/"
    )
    text_format: Literal["chat", "raw"] = Field(
        default="chat",
        description="chat: the model's chat template when it has one (else raw); raw: plain text (every stage)",
    )
    raw_template: str = Field(
        default="{prompt}",
        description="raw text: the prompt as the model reads it ({prompt} is replaced); the answer follows after "
                    "one space (e.g. 'Question: {prompt}\\nAnswer:')",
    )
    resources: ResourceSettings = Field(default_factory=ResourceSettings)
    sft: SftSettings = Field(default_factory=SftSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    ppo: PpoSettings = Field(default_factory=PpoSettings)
    rloo: RlooSettings = Field(default_factory=RlooSettings)
    dpo: DpoSettings = Field(default_factory=DpoSettings)

    @field_validator("raw_template")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError(f"raw_template {v!r} has no {{prompt}}: where does the prompt go?")
        return v
