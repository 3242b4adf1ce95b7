"""OpenAssistant OASST1 -> preference pairs. (being written)"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.sources.base import SourceSettings

# Labels where a lower value is better; every other OASST label is higher-is-better.
LOWER_IS_BETTER = {
    "rank", "spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech",
    "sexual_content", "toxicity", "violence",
}


class Settings(SourceSettings):
    format: Literal["oasst"] = "oasst"
    shape: Literal["auto", "trees", "nested", "messages"] = Field(
        default="auto",
        description="trees: one {message_tree_id, prompt: node} a line; nested: one root node "
        "a line; messages: flat records with parent_id (raw export or hub table); auto: detect",
    )
    label: str = Field(default="rank", description="score used to rank replies: `rank` or a label name")
    direction: Literal["auto", "lower", "higher"] = Field(
        default="auto", description="which score is better; auto: lower for rank/toxicity/..."
    )
    lang: list[str] | None = Field(default=None, description="keep only these languages (None: all)")
    thread_context: bool = Field(default=False, description="prompt = whole thread up to the prompter message")
    skip_deleted: bool = True
    skip_review_failed: bool = True
    skip_synthetic: bool = True
