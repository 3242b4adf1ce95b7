"""WinoBias and WinoGender as training pairs (anti-stereotype chosen). (being written)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.sources.base import SourceSettings


class Settings(SourceSettings):
    format: Literal["winobias"] = "winobias"

