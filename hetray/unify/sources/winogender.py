"""WinoGender (rudinger/winogender-schemas) as training pairs: the anti-stereotype sentence is chosen.

Input: ``all_sentences.tsv`` (columns ``sentid``, ``sentence``), read as a table, and the
occupation statistics ``occupations-stats.tsv`` (``s.occupation_stats``; columns
``occupation``, ``bls_pct_female``, ...), which ``check_columns`` loads before any work. ``sentid`` is
``occupation.participant.answer.gender.txt`` (answer 0 = occupation, 1 = participant; gender
male / female / neutral).

Stereotype rule, from the BLS share of women: female when ``bls_pct_female > 50 + margin``,
male when ``< 50 - margin`` (``s.neutral_margin``, default 5). An occupation within the margin
(45..55% female by default, bounds included) has no stereotype to contradict, so both of its
sentences are rejected ``no_stereotype``.

Pairing: the male and female sentences of one ``occupation.participant.answer`` group (the
group key; ``needs_shuffle`` is True). chosen = the anti-stereotype one, rejected = the
pro-stereotype one, split into prompt / chosen / rejected by the longest common word prefix
exactly as WinoBias does (``winobias.split_common_prefix``). ``quality`` and ``label`` are
null. Record ids are ``file:line`` (a sentid need not be unique); provenance = [anti, pro].

Rejects: ``bad_sentid``, ``neutral_pronoun``, ``unknown_occupation``, ``no_stereotype``,
``unpaired``, ``identical_sentences``, ``duplicate_sentid`` (a group holds two sentences of the
same gender: all of them), and the shared JSON/field reasons.

On the full dataset (rudinger/winogender-schemas ``data/``: 720 sentences = 120 templates x
{participant, "someone"} x {male, female, neutral}) with the default margin: 224 pairs (448
sentences), 240 ``neutral_pronoun`` and 32 ``no_stereotype`` (administrator, appraiser,
investigator, salesperson: 8 gendered sentences each). The pro/anti side is the pronoun's gender
against the occupation's, whichever referent (``answer``) the sentence has.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from typing import Literal

from pydantic import Field

from hetray.schema import item, pair, reject
from hetray.unify.sources.base import SourceSettings, decode_json, require_str
from hetray.unify.sources.readers import InputError, is_table, table_columns
from hetray.unify.sources.winobias import split_common_prefix

SENTID = re.compile(r"^([^.\s]+)\.([^.\s]+)\.([01])\.(male|female|neutral)\.txt$")


class Settings(SourceSettings):
    format: Literal["winogender"] = "winogender"
    occupation_stats: str = Field(description="occupations-stats.tsv with occupation, bls_pct_female")
    neutral_margin: float = Field(
        default=5.0, ge=0, le=50,
        description="occupations within this many points of 50% female have no stereotype: rejected",
    )


def load_occupation_stats(path: str) -> dict[str, float]:
    """``occupations-stats.tsv`` -> ``{occupation: bls_pct_female}``. Raises InputError."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is no part of the header
            reader = csv.DictReader(f, delimiter="\t")
            header, rows = reader.fieldnames or [], list(reader)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the occupation statistics: {e}") from e
    for column in ("occupation", "bls_pct_female"):
        if column not in header:
            raise InputError(f"{path}: no '{column}' column (columns: {header})")
    stats = {}
    for line, r in enumerate(rows, start=2):
        occupation, value = (r["occupation"] or "").strip(), (r["bls_pct_female"] or "").strip()
        try:
            pct = float(value)
        except ValueError:
            pct = math.nan
        if not occupation or not 0 <= pct <= 100:
            raise InputError(
                f"{path}:{line}: bad row: occupation {occupation!r}, "
                f"column 'bls_pct_female' {value!r} (expected a percentage)"
            )
        stats[occupation] = pct
    return stats


@functools.lru_cache(maxsize=8)
def _stats(path: str) -> dict[str, float]:
    return load_occupation_stats(path)


def check_columns(s: Settings, files: list[str]) -> None:
    """Before any work: load ``s.occupation_stats`` and check the tables' columns. Raises InputError."""
    _stats(s.occupation_stats)
    for file in files:
        if is_table(file):
            have = [c.strip() for c in table_columns(file)]
            for column in ("sentid", "sentence"):
                if column not in have:
                    raise InputError(f"{file}: no column {column!r} (columns: {have})")


def stereotype(pct_female: float, margin: float) -> str | None:
    """"female", "male", or None when the share is within ``margin`` points of 50%."""
    if pct_female > 50 + margin:
        return "female"
    if pct_female < 50 - margin:
        return "male"
    return None


def parse(row: dict, s: Settings) -> list[dict]:
    obj, bad = decode_json(row, s.name)
    if bad:
        return [bad]
    file, line = row["file"], row["line"]
    rid = f"{file}:{line}"
    sentid, bad = require_str(obj, "sentid", row, s.name, rid)
    if bad:
        return [bad]
    sentence, bad = require_str(obj, "sentence", row, s.name, rid)
    if bad:
        return [bad]
    m = SENTID.match(sentid.strip())
    if not m:
        return [reject(s.name, file, line, rid, "bad_sentid",
                       f"field 'sentid' {sentid!r} is not occupation.participant.answer.gender.txt")]
    occupation, participant, answer, gender = m.groups()
    sentid = sentid.strip()

    def no(reason: str, detail: str) -> list[dict]:
        return [reject(s.name, file, line, rid, reason, detail)]

    if gender == "neutral":
        return no("neutral_pronoun", f"sentid {sentid!r} has a neutral pronoun")
    pct = _stats(s.occupation_stats).get(occupation)
    if pct is None:
        return no("unknown_occupation", f"occupation {occupation!r} is not in {s.occupation_stats}")
    stereo = stereotype(pct, s.neutral_margin)
    if stereo is None:
        detail = f"occupation {occupation!r} is {pct}% female, within {s.neutral_margin} points of 50"
        return no("no_stereotype", detail)
    data = {"sentid": sentid, "gender": gender, "stereotype": stereo, "sentence": " ".join(sentence.split())}
    return [item(f"{occupation}.{participant}.{answer}", file, line, rid, data)]


def combine(items: list[dict], s: Settings) -> list[dict]:
    items = sorted(items, key=lambda it: (it["file"], it["line"]))
    group = items[0]["group"]
    by_gender = {"male": [], "female": []}
    for it in items:
        by_gender[it["data"]["gender"]].append(it)

    def no(it: dict, reason: str, detail: str) -> dict:
        return reject(s.name, it["file"], it["line"], it["record_id"], reason, detail)

    if len(by_gender["male"]) > 1 or len(by_gender["female"]) > 1:
        detail = f"{group}: more than one sentence of the same gender"
        return [no(it, "duplicate_sentid", f"{detail} ({it['data']['sentid']})") for it in items]
    if not by_gender["male"] or not by_gender["female"]:
        (it,) = items
        other = "female" if it["data"]["gender"] == "male" else "male"
        return [no(it, "unpaired", f"no {other} sentence for {group}")]
    pro = by_gender[items[0]["data"]["stereotype"]][0]
    anti = by_gender["male" if pro["data"]["gender"] == "female" else "female"][0]
    if anti["data"]["sentence"] == pro["data"]["sentence"]:
        detail = f"{group}: male and female sentences are the same: {anti['data']['sentence']!r}"
        return [no(anti, "identical_sentences", detail), no(pro, "identical_sentences", detail)]
    prompt, chosen, rejected = split_common_prefix(anti["data"]["sentence"], pro["data"]["sentence"])
    return [pair(s.name, prompt, chosen, rejected, [anti["record_id"], pro["record_id"]])]


def needs_shuffle(s: Settings) -> bool:
    return True
