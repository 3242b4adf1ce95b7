"""WinoBias (uclanlp/corefBias) as training pairs: the anti-stereotype sentence is chosen.

Input: files named ``{pro|anti}_stereotyped_type{T}.txt.{split}`` (e.g.
``pro_stereotyped_type1.txt.dev``); role, type and split come from the file name, which
``check_files`` verifies before any work. Each line is ``<n> <sentence>``; ``[...]`` marks the
coreference cluster (first bracket: the referent noun phrase, later ones: pronouns). A line
without a leading number uses its physical line number as ``n``.

Pairing: line ``n`` of the anti file pairs with line ``n`` of the pro file of the same type and
split (group ``type{T}/{split}/{n}``, so ``needs_shuffle`` is True). Paper section 3.1: anti is
chosen, pro rejected. Brackets are removed and whitespace collapsed; tokens stay as they are
(``the librarian 's room``). prompt = the longest common word prefix of the two sentences,
chosen / rejected = the remaining words of anti / pro, joined with single spaces. When one
sentence is a word prefix of the other, the prefix is shortened by one word so that neither
remainder is empty. The prompt is empty when the sentences differ at the first word.
``quality`` and ``label`` are null; provenance = [anti ``file:line``, pro ``file:line``].

Rejects: ``bad_file_name`` (only when ``check_files`` was skipped), ``no_cluster`` (no
brackets), ``unbalanced_brackets``, ``unpaired`` (no partner line), ``identical_sentences``
(both lines), ``duplicate_number`` (a group holds two lines of the same role: all its lines),
and ``invalid_utf8``.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from hetray.formats import parse_winobias_line
from hetray.schema import item, pair, reject
from hetray.unify.sources.base import SourceSettings
from hetray.unify.sources.readers import InputError

FILE_NAME = re.compile(r"^(pro|anti)_stereotyped_type(\d+)\.txt\.(\w+)$")


class Settings(SourceSettings):
    format: Literal["winobias"] = "winobias"


def file_info(file: str) -> tuple[str, str, str] | None:
    """``(role, type, split)`` from a WinoBias file name, or None when it does not match."""
    m = FILE_NAME.match(os.path.basename(file))
    return (m.group(1), m.group(2), m.group(3)) if m else None


def check_files(files: list[str]) -> None:
    """Raise InputError naming the first file whose name is not a WinoBias file name."""
    for f in files:
        if file_info(f) is None:
            raise InputError(
                f"{f}: not a WinoBias file name; expected "
                "'{pro|anti}_stereotyped_type<N>.txt.<split>', e.g. 'pro_stereotyped_type1.txt.dev'"
            )


def split_common_prefix(a: str, b: str) -> tuple[str, str, str]:
    """``(prompt, rest_of_a, rest_of_b)`` by the longest common word prefix.

    The prefix never swallows a whole sentence when the two differ: it is shortened so that
    both remainders keep at least one word.
    """
    wa, wb = a.split(), b.split()
    k = 0
    while k < min(len(wa), len(wb)) and wa[k] == wb[k]:
        k += 1
    if wa != wb:
        k = max(0, min(k, len(wa) - 1, len(wb) - 1))
    return " ".join(wa[:k]), " ".join(wa[k:]), " ".join(wb[k:])


def parse(row: dict, s: Settings) -> list[dict]:
    file, line = row["file"], row["line"]
    rid = f"{file}:{line}"

    def no(reason: str, detail: str | None) -> list[dict]:
        return [reject(s.name, file, line, rid, reason, detail)]

    if row.get("error"):
        return no(row["error"], row.get("text"))
    info = file_info(file)
    if info is None:
        return no("bad_file_name", f"file name {os.path.basename(file)!r} is not a WinoBias file name")
    role, typ, split = info
    try:
        n, sentence, clusters = parse_winobias_line(row.get("text") or "")
    except ValueError as e:
        return no("unbalanced_brackets", str(e))
    if not clusters:
        return no("no_cluster", f"no [...] coreference cluster in {row.get('text')!r}")
    n = line if n is None else n
    data = {"role": role, "n": n, "sentence": sentence}
    return [item(f"type{typ}/{split}/{n}", file, line, rid, data)]


def combine(items: list[dict], s: Settings) -> list[dict]:
    items = sorted(items, key=lambda it: (it["file"], it["line"]))
    by_role = {"anti": [], "pro": []}
    for it in items:
        by_role[it["data"]["role"]].append(it)

    def no(it: dict, reason: str, detail: str) -> dict:
        return reject(s.name, it["file"], it["line"], it["record_id"], reason, detail)

    group = items[0]["group"]
    if len(by_role["anti"]) > 1 or len(by_role["pro"]) > 1:
        return [no(it, "duplicate_number", f"{group}: more than one line of the same role") for it in items]
    if not by_role["anti"] or not by_role["pro"]:
        (it,) = items
        other = "pro" if it["data"]["role"] == "anti" else "anti"
        return [no(it, "unpaired", f"no {other}_stereotyped line for {group}")]
    anti, pro = by_role["anti"][0], by_role["pro"][0]
    if anti["data"]["sentence"] == pro["data"]["sentence"]:
        detail = f"{group}: pro and anti sentences are the same: {anti['data']['sentence']!r}"
        return [no(anti, "identical_sentences", detail), no(pro, "identical_sentences", detail)]
    prompt, chosen, rejected = split_common_prefix(anti["data"]["sentence"], pro["data"]["sentence"])
    return [pair(s.name, prompt, chosen, rejected, [anti["record_id"], pro["record_id"]])]


def needs_shuffle(s: Settings) -> bool:
    return True
