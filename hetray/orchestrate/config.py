"""Typed settings of the conductor: ``pipeline:`` (what `hetray run` runs, grids of runs, sync)
and ``tune:`` (`hetray tune`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from hetray.settings import Strict
from hetray.train import STAGES as TRAIN_STAGES

STAGES = ("convert", "embed", "cluster", "select", *TRAIN_STAGES, "eval", "report")  # `hetray run`'s order
Stage = Literal[STAGES]
TrainStage = Literal[TRAIN_STAGES]


class RunSpec(Strict):
    """One run of a grid: a selection setting and the models trained on it (paper Table 1)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$", description="folder name under run_dir/runs/")
    sources: list[str] | None = Field(
        default=None, min_length=1, description="train on these sources only (None: all), e.g. [winogrande]"
    )
    fraction: float | None = Field(default=None, gt=0, le=1, description="select.fraction for this run")
    n_clusters: int | None = Field(default=None, ge=1, description="cluster.n_clusters for this run")
    train: list[TrainStage] | None = Field(
        default=None, description="training stages, in order (None: the pipeline's; []: the base model)"
    )
    seed: int | None = Field(
        default=None, description="this run's seed (training, selection ties; None: the job's): runs that "
        "differ only in seed are repeats of one arm, each in its own folder (<selection>-s<seed>)"
    )


class PipelineConfig(Strict):
    stages: list[Stage] = Field(
        default_factory=lambda: [s for s in STAGES if s not in ("rloo", "dpo")],
        min_length=1,
        description="what `hetray run` runs, in this order; ppo may be swapped for rloo or dpo",
    )
    runs: list[RunSpec] = Field(
        default_factory=list,
        description="a grid of runs sharing convert/embed (and cluster when k matches); "
        "empty: one run in run_dir",
    )
    sync_to: str | None = Field(
        default=None,
        description="copy run_dir here after every stage (s3://bucket/prefix, gs://..., or a path)",
    )


class TuneConfig(Strict):
    """`hetray tune`: a Ray Tune search over selection settings (README: "Searching selection settings")."""

    n_clusters: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [5, 10, 20], min_length=1, description="k values searched"
    )
    fraction: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.2, 0.4, 0.6, 1.0], min_length=1, description="fractions searched"
    )
    labels: list[str] | None = Field(
        default=None, description="option: quality labels searched for the `label_source` source"
    )
    directions: list[Literal["higher", "lower", "auto"]] | None = Field(
        default=None, description="option: label directions searched"
    )
    label_source: str | None = Field(default=None, description="the source whose label is searched")
    search: Literal["grid", "random"] = Field(default="grid", description="grid: every combination")
    num_samples: int = Field(default=1, ge=1, description="grid: repeats; random: trials")
    metric: str = Field(default="reward_accuracy", description="objective: reward_accuracy or an eval metric")
    mode: Literal["max", "min"] = Field(default="max")
    scheduler: Literal["asha", "fifo"] = Field(default="asha", description="asha: stop poor trials early")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="None: as many as the cluster's resources allow"
    )
    train_steps: int = Field(default=8, ge=1, description="reward-model steps per trial (short)")
    sft_steps: int = Field(default=8, ge=1, description="SFT steps per trial (short)")
    rounds: int = Field(
        default=2, ge=1,
        description="reward budgets per trial: round r trains train_steps*r/rounds steps and reports (an ASHA rung)",
    )
    eval_pairs: int = Field(
        default=256, ge=1, description="the common held-out sample every trial's reward model is scored on"
    )
    trial_cpus: float = Field(
        default=0.05, gt=0, le=1, description="CPUs a trial's own process holds (training workers ask for theirs)"
    )

    @model_validator(mode="after")
    def _label_search_names_its_source(self):
        if (self.labels or self.directions) and not self.label_source:
            raise ValueError("tune.labels / tune.directions need tune.label_source (the source they apply to)")
        for name in ("n_clusters", "fraction", "labels", "directions"):
            values = getattr(self, name) or []
            if len(set(values)) != len(values):
                raise ValueError(f"tune.{name} lists a value twice: {values}")
        return self
