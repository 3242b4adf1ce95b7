"""WinoGrande (allenai/winogrande) -> preference pairs (paper appendix A.1).

Input: jsonl, one object a line: ``qID``, ``sentence`` (with one ``_`` blank), ``option1``,
``option2``, ``answer`` ("1" or "2"). Output: prompt = the sentence, chosen = the correct
option, rejected = the other. WinoGrande has no ordered score, so ``quality`` is null.

Rejects: ``no_answer`` (the test split has no ``answer``), ``bad_answer`` (not "1"/"2"),
``no_blank`` (the sentence has no ``_``), ``same_options``, ``held_out`` (``holdout`` is set and
the row's ``qID`` is kept for evaluation: ``hetray.pairs.holdout``, the same rows
``eval.winogrande.holdout`` scores), and the shared JSON/field reasons.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.pairs import holdout
from hetray.schema import pair, reject
from hetray.unify.sources.base import SourceSettings, decode_json, require_str


class Settings(SourceSettings):
    format: Literal["winogrande"] = "winogrande"
    holdout: float | None = Field(
        default=None, gt=0, lt=1,
        description="share of qIDs kept out of training for evaluation (set eval.winogrande.holdout "
        "to the same value to evaluate on exactly those rows); None: train on every row",
    )


def parse(row: dict, s: Settings) -> list[dict]:
    obj, bad = decode_json(row, s.name)
    if bad:
        return [bad]
    rid = str(obj.get("qID") or f"{row['file']}:{row['line']}")
    if s.holdout is not None and holdout(rid, s.holdout):
        return [reject(s.name, row["file"], row["line"], rid, "held_out", f"qID kept for evaluation (holdout {s.holdout:g})")]
    fields = {}
    for name in ("sentence", "option1", "option2"):
        fields[name], bad = require_str(obj, name, row, s.name, rid)
        if bad:
            return [bad]
    answer = obj.get("answer")
    if answer is None or answer == "":
        return [reject(s.name, row["file"], row["line"], rid, "no_answer", "field 'answer' is missing (test split?)")]
    answer = str(answer).strip()
    if answer not in ("1", "2"):
        return [reject(s.name, row["file"], row["line"], rid, "bad_answer", f"field 'answer' is {answer!r}, expected '1' or '2'")]
    if "_" not in fields["sentence"]:
        return [reject(s.name, row["file"], row["line"], rid, "no_blank", "field 'sentence' has no '_' blank")]
    if fields["option1"].strip() == fields["option2"].strip():
        return [reject(s.name, row["file"], row["line"], rid, "same_options", f"both options are {fields['option1']!r}")]
    chosen, rejected = (
        (fields["option1"], fields["option2"]) if answer == "1" else (fields["option2"], fields["option1"])
    )
    return [pair(s.name, fields["sentence"], chosen, rejected, [rid])]


def combine(items: list[dict], s: Settings) -> list[dict]:  # pragma: no cover - never grouped
    raise AssertionError("winogrande rows are converted one by one")


def needs_shuffle(s: Settings) -> bool:
    return False
