"""Generic jsonl / parquet / csv with a column mapping. (being written)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.sources.base import SourceSettings, Strict


class Columns(Strict):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    margin: str | None = None
    response: str = "response"
    scores: list[str] = Field(default_factory=list, description="score columns (scored shape)")


class Settings(SourceSettings):
    format: Literal["generic"] = "generic"
    shape: Literal["pairwise", "scored", "sft"]
    columns: Columns = Field(default_factory=Columns)
    label: str | None = Field(default=None, description="scored shape: which of `scores` ranks responses")
    direction: Literal["lower", "higher"] = "higher"
