"""Typed settings of the convert stage (the ``convert:`` section of a job YAML)."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from hetray.settings import Strict
from hetray.unify.sources import ADAPTERS

SourceConfig = Annotated[
    Union[tuple(settings for _, settings in ADAPTERS.values())],
    Field(discriminator="format"),
]


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
