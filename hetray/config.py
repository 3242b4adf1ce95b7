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
from typing import Any

import yaml
from pydantic import Field, ValidationError

from hetray.eval.config import EvalConfig
from hetray.orchestrate.config import PipelineConfig, TuneConfig
from hetray.selection.config import ClusterConfig, EmbedConfig, SelectConfig
from hetray.settings import Strict
from hetray.train.config import TrainConfig
from hetray.unify.config import ConvertConfig
from hetray.unify.sources import ADAPTERS


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


def set_dotted(data: dict, dotted: str, value: Any) -> None:
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
        set_dotted(data, key.strip(), yaml.safe_load(raw))
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
