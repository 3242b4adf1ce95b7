"""Anthropic HH-RLHF -> preference pairs.

Input: jsonl, one object a line with ``chosen`` and ``rejected``, each a whole transcript
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. On each transcript the prompt is the prefix up to and
including its last ``"\\n\\nAssistant:"``; the two prefixes must be equal and become ``prompt``
(kept exactly, leading newlines included). ``chosen`` / ``rejected`` are the remainders,
stripped. HH has no ordered score: ``quality`` and ``label`` are null. Rows are independent.

Rejects: ``no_assistant_turn`` (a transcript has no ``"\\n\\nAssistant:"``), ``prefix_mismatch``
(the transcripts differ before the last assistant turn), ``empty_response`` (nothing after it),
``identical_responses``, and the shared JSON/field reasons (``malformed_json``,
``invalid_utf8``, ``missing_field``, ``wrong_type``, ``empty_field``).
"""

from __future__ import annotations

from typing import Literal

from hetray.schema import pair, reject
from hetray.unify.sources.base import SourceSettings, decode_json, require_str

ASSISTANT = "\n\nAssistant:"


class Settings(SourceSettings):
    format: Literal["hh"] = "hh"


def split_transcript(text: str) -> tuple[str, str] | None:
    """``(prompt, response)``: split after the last ``"\\n\\nAssistant:"``; None if there is none."""
    at = text.rfind(ASSISTANT)
    if at < 0:
        return None
    cut = at + len(ASSISTANT)
    return text[:cut], text[cut:].strip()


def parse(row: dict, s: Settings) -> list[dict]:
    obj, bad = decode_json(row, s.name)
    if bad:
        return [bad]
    rid = f"{row['file']}:{row['line']}"

    def no(reason: str, detail: str) -> list[dict]:
        return [reject(s.name, row["file"], row["line"], rid, reason, detail)]

    parts = {}
    for field in ("chosen", "rejected"):
        text, bad = require_str(obj, field, row, s.name, rid)
        if bad:
            return [bad]
        parts[field] = split_transcript(text)
        if parts[field] is None:
            return no("no_assistant_turn", f"field '{field}' has no '\\n\\nAssistant:' turn")
    (prompt, chosen), (other_prompt, rejected) = parts["chosen"], parts["rejected"]
    if prompt != other_prompt:
        return no("prefix_mismatch", "fields 'chosen' and 'rejected' differ before the last assistant turn")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text:
            return no("empty_response", f"field '{field}' has an empty last assistant turn")
    if chosen == rejected:
        return no("identical_responses", f"fields 'chosen' and 'rejected' end in the same reply: {chosen!r}")
    return [pair(s.name, prompt, chosen, rejected, [rid])]


def combine(items: list[dict], s: Settings) -> list[dict]:  # pragma: no cover - never grouped
    raise AssertionError("hh rows are converted one by one")


def needs_shuffle(s: Settings) -> bool:
    return False
