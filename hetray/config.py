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
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo

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
    include_dashboard: Literal["auto"] | bool = Field(
        default="auto", description="a local Ray's dashboard on 127.0.0.1 (auto: when its packages are "
        "installed and the machine has 8 GB of memory); Ray Train's controller polls its State API"
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


# ---------------------------------------------------------------------------- `hetray config schema`


def schema_rows(model: type[BaseModel] = JobConfig, prefix: str = "",
                defaults: BaseModel | None = None) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` for every setting of ``model``, its sections walked; a
    list of sources once per format (``convert.sources[format=oasst].label``). ``defaults``: the
    section's default instance (``train.reward.lora.r`` is 8, not LoraSettings' 16)."""
    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        default = _default(field, defaults, name)
        models = _models_in(field.annotation)
        if models and not _scalar_part(field.annotation):
            origin = get_origin(field.annotation)
            rows.append((key, _type_name(field.annotation), default, field.description or ""))
            suffix = "[]" if origin is list else ".<name>" if origin is dict else ""
            for m in models:
                tag = m.model_fields.get("format")
                label = f"[format={tag.default}]" if len(models) > 1 and tag is not None else suffix
                inner = _instance(field, defaults, name) if origin not in (list, dict) else None
                rows += schema_rows(m, f"{key}{label}.", inner if isinstance(inner, m) else None)
            continue
        rows.append((key, _type_name(field.annotation) + _constraints(field), default, field.description or ""))
    return rows


def format_schema() -> str:
    """What `hetray config schema` prints: every key with its type, default and help."""
    rows = schema_rows()
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    w[1], w[2] = min(w[1], 34), min(w[2], 24)
    lines = [f"{'key':<{w[0]}}  {'type':<{w[1]}}  {'default':<{w[2]}}  help"]
    lines += [f"{k:<{w[0]}}  {t:<{w[1]}}  {d:<{w[2]}}  {h}".rstrip() for k, t, d, h in rows]
    return "\n".join(lines)


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def _scalar_part(annotation) -> bool:
    """Whether a union holds a non-model, non-None member too (``Literal['auto'] | Model``)."""
    if get_origin(annotation) not in (Union, UnionType):
        return False
    return any(a is not type(None) and not _models_in(a) for a in get_args(annotation))


def _type_name(a) -> str:
    origin, args = get_origin(a), get_args(a)
    if a is type(None):
        return "null"
    if a is Any:
        return "any"
    if origin is Annotated:
        return _type_name(args[0]) + "".join(_bound(m) for m in args[1:])
    if origin is Literal:
        return "|".join(str(v) for v in args)
    if origin in (Union, UnionType):
        return " | ".join(dict.fromkeys(_type_name(x) for x in args))
    if origin in (list, tuple, set):
        return f"list[{', '.join(_type_name(x) for x in args if x is not Ellipsis)}]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(x) for x in args)}]"
    if isinstance(a, type) and issubclass(a, BaseModel):
        return "section"
    return getattr(a, "__name__", str(a))


def _bound(meta) -> str:
    if isinstance(meta, FieldInfo):
        return "".join(_bound(m) for m in meta.metadata)
    out = []
    for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >=")):
        if getattr(meta, attr, None) is not None:
            out.append(f" {sign} {getattr(meta, attr)}")
    return "".join(out)


def _constraints(field: FieldInfo) -> str:
    return "".join(_bound(m) for m in field.metadata)


def _instance(field: FieldInfo, defaults: BaseModel | None, name: str):
    if defaults is not None:
        return getattr(defaults, name)
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _default(field: FieldInfo, defaults: BaseModel | None, name: str) -> str:
    if defaults is None and field.is_required():
        return "required"
    value = _instance(field, defaults, name)
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
