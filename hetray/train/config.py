"""Typed settings of the training stages (the ``train:`` section of a job YAML).

Defaults are the paper's hyperparameters (Aponte et al. 2024, A.3; DESIGN.md, "Train"):
a job that says nothing trains like the paper. The quickstart overrides them with a few tiny
steps. Field names follow TRL's config classes where one exists, so a reader of the TRL docs
knows what each one does.

Beyond hetray's own settings, ``train.<stage>.trl_args`` passes any other field of the stage's
TRL config class (``trl.SFTConfig``, ``trl.RewardConfig``, ``trl.experimental.ppo.PPOConfig``,
``trl.RLOOConfig``, ``trl.DPOConfig``): checked against that class's fields, types and choices
when the config loads; a field hetray sets from one of its settings (``OWNED``, ``TRL_OWNED``)
is refused, naming the setting, so no knob has two places and no precedence rule is needed.
``report_to`` (job-wide, a stage may override it), ``keep_checkpoints`` and ``push_to_hub``
decide what a stage leaves besides its model; they are not in the stage's key.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from hetray.models import DEFAULT_LLM
from hetray.settings import Strict
from hetray.tracking import Trackers

# TRL / TrainingArguments fields that hetray sets itself (None) or from one of its settings
# (train.<stage>.<name>, or the dotted path): trl_args may not set them, so every knob has one
# place. Each stage adds its own (TRL_OWNED on the settings class).
OWNED = {
    "output_dir": None, "run_name": None, "max_steps": "max_steps", "num_train_epochs": "num_train_epochs",
    "per_device_train_batch_size": "per_device_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler", "warmup_steps": "warmup_ratio", "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay", "logging_steps": "logging_steps", "save_steps": "save_steps",
    "save_total_limit": "keep_checkpoints", "seed": "seed", "data_seed": "seed", "report_to": "report_to",
    "use_cpu": "train.resources.use_gpu", "bf16": "precision",
    "fp16": "precision", "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing", "deepspeed": "train.resources.deepspeed",
    "push_to_hub": "push_to_hub", "hub_model_id": "push_to_hub",
}


def trl_config_class(dotted: str):
    """``"trl.SFTConfig"`` -> the class (TRL imported only when trl_args are given)."""
    module, name = dotted.rsplit(".", 1)
    if module == "trl.experimental.ppo":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return getattr(importlib.import_module(module), name)


def check_trl_args(args: dict, dotted: str, owned: dict, stage: str) -> dict:
    """Every key must be a field of TRL's config class ``dotted`` and not one hetray sets from
    its own settings; every value must fit the field's type (and its choices)."""
    import dataclasses
    import typing

    from pydantic import TypeAdapter, ValidationError

    if not args:
        return args
    cls = trl_config_class(dotted)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, value in args.items():
        if key in owned:
            setting = owned[key]
            if setting is None:
                raise ValueError(f"{key!r} is set by hetray itself and cannot be changed in trl_args")
            where = setting if "." in setting else f"train.{stage}.{setting}"
            raise ValueError(f"{key!r} is set by hetray from {where}: set that instead of trl_args.{key}")
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
            raise ValueError(f"unknown key {key!r} for {dotted}{hint}")
        try:
            TypeAdapter(hints[key]).validate_python(value)
        except ValidationError as e:
            raise ValueError(f"{key}={value!r} does not fit {dotted}.{key} ({hints[key]}): "
                             f"{e.errors()[0]['msg']}") from None
        allowed = list(fields[key].metadata.get("choices") or [])
        allowed += [m.value for a in typing.get_args(hints[key]) if isinstance(a, type) and issubclass(a, Enum)
                    for m in a]
        if allowed and isinstance(value, str) and value not in allowed:
            near = difflib.get_close_matches(value, list(map(str, allowed)), n=3)
            listed = ", ".join(map(str, allowed)) if len(allowed) <= 12 else f"{len(allowed)} names"
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise ValueError(f"{key}={value!r} is not one of {dotted}.{key}'s values ({listed}){hint}")
    return args


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
    keep_checkpoints: int = Field(
        default=2, ge=0,
        description="last N checkpoints kept in <stage>/checkpoints/ (resumable HF checkpoints; 0: none); "
                    "also how many a running stage keeps (at least 1)",
    )
    report_to: Trackers | None = Field(
        default=None, description="trackers for this stage (tensorboard, mlflow, wandb, none); None: train.report_to"
    )
    trl_args: dict[str, Any] = Field(
        default_factory=dict,
        description="extra keywords for the stage's TRL config class (e.g. optim: adamw_torch), checked against "
                    "its fields when the config loads; keys hetray sets from its own settings are refused",
    )
    push_to_hub: str | None = Field(
        default=None, description="ORG/NAME: upload the stage's model to this hub repo after it trains (needs a token)"
    )
    push_folder: Literal["auto", "adapter", "merged"] = Field(
        default="auto",
        description="what push_to_hub uploads: the LoRA adapter or the merged model; auto: the adapter when its "
                    "base is a hub model, else the merged model",
    )

    STAGE: ClassVar[str] = ""
    TRL_CONFIG: ClassVar[str] = "transformers.TrainingArguments"  # each stage names its TRL config class
    TRL_OWNED: ClassVar[dict] = {}

    @field_validator("trl_args")
    @classmethod
    def _trl_fields(cls, v: dict) -> dict:
        return check_trl_args(v, cls.TRL_CONFIG, {**OWNED, **cls.TRL_OWNED}, cls.STAGE)

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, v):
        if v is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(v)
            except HFValidationError as e:
                raise ValueError(f"push_to_hub {v!r} is not a hub repo id (ORG/NAME): {e}") from None
        return v

    @model_validator(mode="after")
    def _a_budget(self):
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError("set max_steps or num_train_epochs (or both: the smaller budget wins)")
        return self


class SftSettings(_Optimisation):
    STAGE: ClassVar[str] = "sft"
    TRL_CONFIG: ClassVar[str] = "trl.SFTConfig"
    TRL_OWNED: ClassVar[dict] = {"max_length": "max_length", "completion_only_loss": "loss", "packing": "packing"}

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
    STAGE: ClassVar[str] = "reward"
    TRL_CONFIG: ClassVar[str] = "trl.RewardConfig"
    TRL_OWNED: ClassVar[dict] = {"max_length": "max_length"}

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
    STAGE: ClassVar[str] = "ppo"
    TRL_CONFIG: ClassVar[str] = "trl.experimental.ppo.PPOConfig"
    TRL_OWNED: ClassVar[dict] = {
        "total_episodes": "max_steps", "response_length": "max_new_tokens", "num_ppo_epochs": "num_ppo_epochs",
        "num_mini_batches": "num_mini_batches", "kl_coef": "kl_coef", "temperature": "temperature"}

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
    STAGE: ClassVar[str] = "rloo"
    TRL_CONFIG: ClassVar[str] = "trl.RLOOConfig"
    TRL_OWNED: ClassVar[dict] = {
        "num_generations": "num_generations", "max_completion_length": "max_new_tokens",
        "generation_kwargs": "min_new_tokens", "temperature": "temperature", "beta": "beta"}

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
    STAGE: ClassVar[str] = "dpo"
    TRL_CONFIG: ClassVar[str] = "trl.DPOConfig"
    TRL_OWNED: ClassVar[dict] = {"max_length": "max_length", "beta": "beta"}

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
    report_to: Trackers = Field(
        default_factory=lambda: ["tensorboard"],
        description="trackers every stage logs to through transformers' own callbacks (rank 0 only): tensorboard "
                    "(events in <stage>/tensorboard/), mlflow, wandb (each needs its package), or none; "
                    "a stage's report_to overrides it",
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
