"""WinoGender as training pairs (anti-stereotype chosen). (being written)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.sources.base import SourceSettings


class Settings(SourceSettings):
    format: Literal["winogender"] = "winogender"
    occupation_stats: str = Field(description="occupations-stats.tsv with occupation, bls_pct_female")
    neutral_margin: float = Field(
        default=5.0, ge=0, le=50,
        description="occupations within this many points of 50% female have no stereotype: rejected",
    )
