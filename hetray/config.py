"""Typed job configs: YAML in ``jobs/`` plus dotted command-line overrides.

A job file is one ``JobConfig``. Every model forbids unknown keys, so a typo fails loudly with
the key and the file named, instead of silently running with a default::

    jobs/quickstart.yaml: unknown key 'convert.sources[1].lable' (allowed: label, lang, ...)

Overrides are ``key.sub=value`` (``convert.batch_size=512``, ``convert.sources.0.limit=10``);
the value is parsed as YAML, so ``true``, ``3``, ``[en, de]`` and ``null`` work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from hetray.eval.config import EvalConfig
from hetray.unify.sources import ADAPTERS
from hetray.settings import Strict
from hetray.train.config import TrainConfig

SourceConfig = Annotated[
    Union[tuple(settings for _, settings in ADAPTERS.values())],
    Field(discriminator="format"),
]


class ConfigError(ValueError):
    """A job config that cannot be used; the message names the file and the key."""


class RayConfig(Strict):
    address: str | None = Field(
        default=None, description="Ray cluster address; None: join RAY_ADDRESS or start local Ray"
    )
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs for a local Ray (None: all)")
    object_store_memory: int | None = Field(
        default=None, ge=1 << 27, description="bytes for a local Ray's object store (None: Ray's default)"
    )


class ConvertConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1, description="the datasets to unify")
    batch_size: int = Field(default=2048, ge=1, description="records per Ray Data batch")
    shuffle_partitions: int | None = Field(
        default=None, ge=1,
        description="partitions of the group-by shuffle (None: 2 per CPU, 1 per 128 MiB of input, at most 200)",
    )
    num_output_files: int | None = Field(
        default=None, ge=1, description="repartition before writing (None: one file per block)"
    )


class EmbedConfig(Strict):
    model: str = Field(default="all-minilm-l6-v2", description="sentence-transformers name or path")
    batch_size: int = Field(default=256, ge=1, description="prompts per forward pass (an actor call sorts up to 16 batches by length)")
    num_actors: int = Field(default=1, ge=1, description="embedding actors (each loads the model once)")
    num_gpus_per_actor: float | Literal["auto"] = Field(
        default="auto", description="auto: 1 when the cluster has GPUs, else run on CPU"
    )
    num_cpus_per_actor: float = Field(default=1, gt=0)


class ClusterConfig(Strict):
    n_clusters: int = Field(default=10, ge=1, description="k (paper: 10)")
    n_init: int = Field(default=10, ge=1, description="restarts; the lowest inertia wins (paper: 10)")
    max_iter: int = Field(default=100, ge=1)
    tol: float = Field(default=1e-4, ge=0, description="stop when centroids move less than this (relative)")
    init: Literal["k-means++", "k-means||"] = "k-means++"
    sample_size: int = Field(default=100_000, ge=1, description="points drawn for initialisation")
    batch_size: int = Field(default=65_536, ge=1, description="vectors per partial-sum batch")


class SelectConfig(Strict):
    fraction: float = Field(default=1.0, gt=0, le=1, description="kept share of each cluster (paper: 0.2/0.4/0.6/1.0)")
    stratify: bool = Field(default=True, description="every source keeps its share (paper A.3)")
    quality_normalization: Literal["none", "percentile"] = Field(
        default="none", description="percentile: rank quality within each source before comparing"
    )
    dedup_threshold: float | None = Field(
        default=None, gt=0, le=1, description="drop near-duplicate prompts in a cluster above this cosine"
    )
    examples_per_cluster: int = Field(default=3, ge=0, description="example prompts in the report")
    sources: list[str] | None = Field(
        default=None, min_length=1, description="keep pairs of these sources only (None: all)"
    )


STAGES = ("convert", "embed", "cluster", "select", "sft", "reward", "ppo", "rloo", "dpo", "eval", "report")
TRAIN_STAGES = ("sft", "reward", "ppo", "rloo", "dpo")
Stage = Literal["convert", "embed", "cluster", "select", "sft", "reward", "ppo", "rloo", "dpo", "eval", "report"]
TrainStage = Literal["sft", "reward", "ppo", "rloo", "dpo"]


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


class PipelineConfig(Strict):
    stages: list[Stage] = Field(
        default_factory=lambda: ["convert", "embed", "cluster", "select", "sft", "reward", "ppo", "eval", "report"],
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


class JobConfig(Strict):
    name: str = Field(default="hetray", description="a name for the run, used in reports")
    run_dir: str = Field(default="runs/default", description="where every stage writes (local path)")
    seed: int = Field(default=0, description="seed for every random choice")
    ray: RayConfig = Field(default_factory=RayConfig)
    convert: ConvertConfig
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i]) or 'list'} has no item {key}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def _loc(loc: tuple) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ADAPTERS and i > 0 and isinstance(loc[i - 1], int):
            continue  # the discriminator tag pydantic puts after a source's list index
        else:
            out += ("." if out else "") + str(part)
    return out


def _explain(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        where = _loc(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{where}'")
        elif e["type"] == "missing":
            lines.append(f"{origin}: missing required key '{where}'")
        elif e["type"] == "union_tag_invalid":
            lines.append(
                f"{origin}: '{where}.format' must be one of {', '.join(sorted(ADAPTERS))}"
            )
        else:
            lines.append(f"{origin}: '{where}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> JobConfig:
    """Load, override and validate a job YAML. Raises ConfigError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        origin = f"{path}" + (" (with overrides)" if overrides else "")
        raise ConfigError(_explain(e, origin)) from None
