"""Typed settings of the evaluation stage (the ``eval:`` section of a job YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.settings import Strict
from hetray.tracking import Trackers

# Every suite, in report order; each is declared once in its own module (hetray.eval.suites).
SUITE_NAMES = ("winobias", "winogender", "winogrande", "reward", "chat")

DEFAULT_CHAT_PROMPTS = [
    "Give me a list of top vacation destinations.",
    "What can I do in Miami, FL in November?",
    "How do I make a cup of green tea?",
    "Write a short thank-you note to a colleague who helped me move.",
    "Explain what a nurse and a doctor each do in a hospital.",
]


class WinoBiasSettings(Strict):
    path: str = Field(
        default="sample:winobias",
        description="folder with {pro,anti}_stereotyped_type{1,2}.txt.{dev,test}; 'sample:winobias' "
        "is the bundled excerpt; 'hub' fetches the files from uclanlp/corefBias (network)",
    )
    splits: list[Literal["dev", "test"]] = Field(default_factory=lambda: ["dev"], min_length=1)
    types: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2], min_length=1)
    limit: int | None = Field(default=None, ge=1, description="pairs per file (None: all)")
    bias_token: Literal["noun", "first"] = Field(
        default="noun",
        description="token that Bias compares: 'noun' = the referent's noun after its article "
        "(' developer'), 'first' = the referent phrase's first token (the article ' the')",
    )


class WinoGenderSettings(Strict):
    path: str | None = Field(default=None, description="all_sentences.tsv (None: suite unavailable)")
    limit: int | None = Field(default=None, ge=1, description="male/female pairs (None: all)")
    bias_token: Literal["noun", "first"] = Field(
        default="noun", description="as winobias.bias_token ('someone' has no article: both are its first token)"
    )


class WinoGrandeSettings(Strict):
    path: str = Field(default="sample:winogrande.jsonl", description="WinoGrande jsonl with answers")
    limit: int | None = Field(default=None, ge=1)
    holdout: float | None = Field(
        default=None, gt=0, lt=1,
        description="score only the rows whose qID hetray.pairs.holdout keeps out of training at this share "
        "(the same value as the training source's holdout); None: every row",
    )


class RewardEvalSettings(Strict):
    pairs: str | None = Field(
        default=None, description="Parquet folder of held-out pairs (None: the reward stage's held-out split)"
    )
    limit: int | None = Field(default=None, ge=1)


class ChatSettings(Strict):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_CHAT_PROMPTS), min_length=1)
    max_new_tokens: int = Field(default=96, ge=1)


class EvalConfig(Strict):
    suites: list[Literal[SUITE_NAMES]] = Field(
        default_factory=lambda: ["winobias", "chat"], min_length=1, description="what to measure"
    )
    batch_size: int = Field(default=16, ge=1, description="prompts per forward pass")
    max_new_tokens: int = Field(default=10, ge=1, description="WinoBias accuracy: longest generation (paper: 10)")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when available")
    num_workers: int = Field(
        default=1, ge=1, description="data-parallel Ray actors (1: in this process, the laptop default)"
    )
    num_gpus_per_worker: float = Field(default=0, ge=0, description="GPUs per eval actor when num_workers > 1")
    accuracy: Literal["strict", "lenient"] = Field(
        default="strict",
        description="WinoBias/WinoGender reading called 'accuracy' (and behind 'similarity'): 'strict' = the "
        "answer starts with the referent, 'lenient' = the referent's noun anywhere in the answer; both are "
        "always reported as accuracy_strict / accuracy_lenient",
    )
    bootstrap: int = Field(
        default=1000, ge=0,
        description="bootstrap resamples of the items for every CI (0: no CIs; paired differences without CIs)",
    )
    confidence: float = Field(default=0.95, gt=0, lt=1, description="level of every confidence interval")
    baseline: str | None = Field(
        default=None, description="model the others are compared with, pair by pair (None: 'base' if "
        "evaluated, else the first model)",
    )
    report_to: Trackers | None = Field(
        default=None, description="trackers the metrics are logged to besides metrics.json: tensorboard (a writer "
        "per model under eval/tensorboard/), mlflow, wandb (a run per model), none; None: as train.report_to",
    )
    winobias: WinoBiasSettings = Field(default_factory=WinoBiasSettings)
    winogender: WinoGenderSettings = Field(default_factory=WinoGenderSettings)
    winogrande: WinoGrandeSettings = Field(default_factory=WinoGrandeSettings)
    reward: RewardEvalSettings = Field(default_factory=RewardEvalSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
