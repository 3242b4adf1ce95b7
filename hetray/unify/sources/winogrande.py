"""WinoGrande (allenai/winogrande) -> preference pairs (paper appendix A.1).

Input: jsonl, one object a line: ``qID``, ``sentence`` (with one ``_`` blank), ``option1``,
``option2``, ``answer`` ("1" or "2"). Output: prompt = the sentence, chosen = the correct
option, rejected = the other. WinoGrande has no ordered score, so ``quality`` is null.

Rejects: ``no_answer`` (the test split has no ``answer``), ``bad_answer`` (not "1"/"2"),
``no_blank`` (the sentence has no ``_``), ``same_options``, ``held_out`` (``holdout`` is set and
the row's ``qID`` is kept for evaluation: ``hetray.pairs.holdout``, the same rows
``eval.winogrande.holdout`` scores), ``duplicate_id`` (a good row whose ``qID`` an earlier good
row has, in file then line order: one pair per qID, so no two pairs share a ``pair_id``), and the
shared JSON/field reasons. Finding duplicates anywhere in the input needs the rows of one qID
together: a good row is an item grouped by its qID (``needs_shuffle`` is True).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.pairs import holdout
from hetray.schema import item, pair, reject
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
    data = {"prompt": fields["sentence"], "chosen": chosen, "rejected": rejected}
    return [item(rid, row["file"], row["line"], rid, data)]


def combine(items: list[dict], s: Settings) -> list[dict]:
    """The rows of one qID: the first (file, line) is the pair, any other a ``duplicate_id``."""
    first, *later = sorted(items, key=lambda it: (it["file"], it["line"]))
    d = first["data"]
    out = [pair(s.name, d["prompt"], d["chosen"], d["rejected"], [first["record_id"]])]
    for it in later:
        detail = f"qID {it['record_id']!r} also at {first['file']}:{first['line']}, which became the pair"
        out.append(reject(s.name, it["file"], it["line"], it["record_id"], "duplicate_id", detail))
    return out


def needs_shuffle(s: Settings) -> bool:
    return True
