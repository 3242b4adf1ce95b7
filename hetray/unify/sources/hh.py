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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hetray.schema import PAIR, pair, reject
from hetray.unify.sources import vector
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


_FIELDS = pa.schema([("chosen", pa.string()), ("rejected", pa.string())])


def parse_table(raw: pa.Table, s: Settings) -> pa.Table:
    """``parse`` of a whole RAW batch (OUTPUT_SCHEMA rows in input order): Arrow splits the
    transcripts and checks them; rows that are not plain pairs go through ``parse``."""
    obj, rows = vector.read_json_rows(raw, _FIELDS)
    ok = np.ones(len(rows), dtype=bool)
    split = {}
    for field in ("chosen", "rejected"):
        has_turn = pc.match_substring(obj[field], ASSISTANT)
        ok &= vector.nonempty(obj[field]) & vector.as_numpy(has_turn)
        # split after the last turn (a row without one is split as a dummy and not kept)
        parts = pc.split_pattern(pc.if_else(has_turn, obj[field], ASSISTANT), ASSISTANT, max_splits=1, reverse=True)
        split[field] = (pc.list_element(parts, 0), vector.strip(pc.list_element(parts, 1)))
    (prefix, chosen), (other, rejected) = split["chosen"], split["rejected"]
    ok &= vector.as_numpy(pc.equal(prefix, other)) & vector.nonempty(chosen) & vector.nonempty(rejected)
    ok &= ~vector.as_numpy(pc.equal(chosen, rejected))
    keep = pa.array(ok)
    fast_rows = rows[ok]
    rid = vector.record_ids(raw["file"].take(fast_rows), raw["line"].take(fast_rows))
    fast = vector.output_table(len(fast_rows), {
        "kind": PAIR, "source": s.name,
        "pair_id": pa.array(vector.make_ids(s.name, rid), pa.string()),
        "prompt": pc.binary_join_element_wise(prefix.filter(keep), ASSISTANT, ""),
        "chosen": chosen.filter(keep), "rejected": rejected.filter(keep),
        "provenance": vector.single_lists(rid),
    })
    return vector.with_slow_rows(raw, fast, fast_rows, lambda row: parse(row, s))


def combine(items: list[dict], s: Settings) -> list[dict]:  # pragma: no cover - never grouped
    raise AssertionError("hh rows are converted one by one")


def needs_shuffle(s: Settings) -> bool:
    return False
