"""Anthropic HH-RLHF -> preference pairs. (being written)"""

from __future__ import annotations

from typing import Literal

from hetray.sources.base import SourceSettings


class Settings(SourceSettings):
    format: Literal["hh"] = "hh"
