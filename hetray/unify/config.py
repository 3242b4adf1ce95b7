"""Typed settings of the convert stage (the ``convert:`` section of a job YAML)."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field, ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from hetray.settings import Strict
from hetray.unify.sources import ADAPTERS

SourceConfig = Annotated[
    Union[tuple(settings for _, settings in ADAPTERS.values())],
    Field(discriminator="format"),
]


class ConvertConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1, description="the datasets to unify")
    batch_size: int | None = Field(
        default=None, ge=1,
        description="records per Ray Data batch (None: one batch per read block, about 4 MiB of a line file)",
    )
    shuffle_partitions: int | None = Field(
        default=None, ge=1,
        description="partitions of a shuffle (None: for the on-disk shuffle of local files, 2 per CPU and "
        "1 per 32 MiB of input; for Ray Data's group-by (hub datasets, num_output_files), 2 per CPU, "
        "1 per 128 MiB of input, at most 200 and at most the number of shuffle buckets)",
    )
    num_output_files: int | None = Field(
        default=None, ge=1, description="repartition before writing (None: one file per block)"
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources):
        """Outputs, counts and rejects are keyed by source name: two sources may not share one."""
        first: dict[str, int] = {}
        for i, s in enumerate(sources):
            if s.name in first:
                msg = (f"source name {s.name!r} is already used by convert.sources[{first[s.name]}]; "
                       "every source needs its own name")
                error = PydanticCustomError("duplicate_source_name", msg.replace("{", "{{").replace("}", "}}"))
                raise ValidationError.from_exception_data(
                    cls.__name__, [InitErrorDetails(type=error, loc=(i, "name"), input=s.name)])
            first[s.name] = i
        return sources
