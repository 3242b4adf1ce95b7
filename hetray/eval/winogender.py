"""WinoGender (rudinger/winogender-schemas) gender-bias metrics (``SUITE``).

Data: ``all_sentences.tsv`` with a ``sentid<TAB>sentence`` header; ``sentid`` is
``{occupation}.{participant}.{answer}.{gender}.txt`` (``technician.customer.1.male.txt``).
Per the WinoGender README, ``answer`` 0 means the pronoun refers to the occupation, 1 to the
participant; ``gender`` is male, female or neutral. A pair is the male and the female sentence
of one ``occupation.participant.answer``; neutral sentences are left out. A sentid with the
wrong shape, a pair with a side missing or twice, or sentences without a differing word are
errors naming the file and line.

Per sentence: the pronoun is the word where the male and female sentences first differ
(trailing punctuation dropped, lower-cased). The referent is the occupation (answer 0) or the
participant (answer 1) with the article it has in the sentence ("the technician", "a client"),
or bare when it has none ("someone"); a referent word not in the sentence is an error. The
prompt is WinoBias's, ``'{sentence} "{pronoun}" refers to: '``, and the cluster continuation is
``"{referent} {pronoun}"``.

Metrics: exactly the WinoBias definitions (hetray/eval/winobias.py, the README ("Gender-bias metrics")) with
male in the place of pro and female in the place of anti: bias / bias_signed (male - female),
bias_cluster, bias_entropy = KL(P_male || P_female), accuracy (mean of accuracy_male and
accuracy_female; strict or lenient as ``eval.accuracy`` says, both reported as accuracy_strict /
accuracy_lenient), similarity. CIs resample pairs; ``Suite.files`` is the tsv. WinoGender has no pro/anti labels, so a signed value says which
pronoun makes the model surer of the referent, not which is stereotypical. Groups:
``occupation`` (answer 0) and ``participant`` (answer 1).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from hetray.eval import metrics
from hetray.eval.hub import HubDataError, hub_rows, is_hub
from hetray.eval.suite import Suite
from hetray.eval.winobias import BIAS_COLUMNS, NOTE, PROMPT, READING_COLUMNS, score_pairs

SIDES = ("male", "female")
GENDERS = ("male", "female", "neutral")
_SENTID = re.compile(r"^([^.\s]+)\.([^.\s]+)\.([01])\.(male|female|neutral)\.txt$")


class WinoGenderError(ValueError):
    """Bad WinoGender input, named by file and line."""


def load_pairs(settings) -> list[dict]:
    """``settings``: ``EvalConfig.winogender``."""
    if not settings.path:
        raise WinoGenderError("suite winogender: eval.winogender.path is not set: point it at WinoGender's "
                              "all_sentences.tsv")
    return read_pairs(settings.path if is_hub(settings.path) else Path(settings.path), settings.limit)


def read_rows(path: Path) -> list[tuple[int, str, str]]:
    """``(line, sentid, sentence)`` of every data row; an ``hf:`` path (``hetray.eval.hub``) gives
    the rows of a hub split with ``sentid`` and ``sentence`` columns (``line``: the row number)."""
    if is_hub(path):
        return _hub_rows(path)
    if not path.is_file():
        raise WinoGenderError(f"WinoGender file {str(path)!r} does not exist")
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or [c.strip() for c in rows[0][:2]] != ["sentid", "sentence"]:
        raise WinoGenderError(f"{path}:1: expected the header 'sentid<TAB>sentence', got {rows[0] if rows else 'an empty file'}")
    out = []
    for line, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        if len(row) < 2:
            raise WinoGenderError(f"{path}:{line}: expected 'sentid<TAB>sentence', got {row!r}")
        out.append((line, row[0].strip(), row[1].strip()))
    return out


def _hub_rows(spec: str) -> list[tuple[int, str, str]]:
    try:
        rows = hub_rows(spec, "eval.winogender.path")
    except HubDataError as e:
        raise WinoGenderError(str(e)) from None
    if rows and not {"sentid", "sentence"} <= set(rows[0]):
        raise WinoGenderError(f"{spec}: expected the columns 'sentid' and 'sentence', got {', '.join(rows[0])}")
    return [(i, str(r["sentid"]).strip(), str(r["sentence"]).strip()) for i, r in enumerate(rows, 1)]


def read_pairs(path: Path, limit: int | None = None) -> list[dict]:
    """Male/female pairs in file order (of the male sentence's template), ``limit`` pairs at most."""
    templates: dict[str, dict[str, tuple[int, str]]] = {}
    for line, sentid, sentence in read_rows(path):
        m = _SENTID.match(sentid)
        if not m:
            raise WinoGenderError(
                f"{path}:{line}: sentid {sentid!r} is not 'occupation.participant.<0|1>.<male|female|neutral>.txt'")
        key, gender = ".".join(m.group(1, 2, 3)), m.group(4)
        sides = templates.setdefault(key, {})
        if gender in sides:
            raise WinoGenderError(f"{path}:{line}: a second {gender} sentence for {key} (first at line {sides[gender][0]})")
        sides[gender] = (line, sentence)
    pairs = []
    for key, sides in templates.items():
        if limit is not None and len(pairs) >= limit:
            break
        missing = [g for g in ("male", "female") if g not in sides]
        if missing:
            line = min(v[0] for v in sides.values())
            raise WinoGenderError(f"{path}:{line}: {key} has no {' or '.join(missing)} sentence to pair with")
        pairs.append(make_pair(path, key, sides))
    return pairs


def make_pair(path: Path, key: str, sides: dict[str, tuple[int, str]]) -> dict:
    occupation, participant, answer = key.split(".")
    (ml, male), (fl, female) = sides["male"], sides["female"]
    mw, fw = male.split(), female.split()
    diff = [k for k, (a, b) in enumerate(zip(mw, fw)) if a != b]
    if len(mw) != len(fw) or not diff:
        raise WinoGenderError(f"{path}:{ml}: the male and female sentences of {key} do not differ in one "
                              f"pronoun word: {male!r} / {female!r}")
    word = participant if answer == "1" else occupation
    pair = {"group": "participant" if answer == "1" else "occupation", "n": key,
            "male_line": f"{path}:{ml}", "female_line": f"{path}:{fl}", "irregular": len(diff) > 1}
    for side, line, sentence, words in (("male", ml, male, mw), ("female", fl, female, fw)):
        pronoun = words[diff[0]].strip(".,;:!?\"'").lower()
        referent = find_referent(sentence, word)
        if referent is None:
            raise WinoGenderError(f"{path}:{line}: the referent {word!r} ({key}) is not in {sentence!r}")
        pair.update({
            f"sentence_{side}": sentence, f"pronoun_{side}": pronoun, f"referent_{side}": referent,
            f"prompt_{side}": PROMPT.format(sentence=sentence, pronoun=pronoun),
            f"cluster_{side}": f"{referent} {pronoun}",
        })
    return pair


def find_referent(sentence: str, word: str) -> str | None:
    """``"the technician"`` / ``"a client"`` as in the sentence (article lower-cased), ``word``
    alone when it has no article there, None when the word is absent."""
    m = re.search(rf"\b(?:(the|a|an)\s+)?{re.escape(word)}\b", sentence, flags=re.IGNORECASE)
    if m is None:
        return None
    return f"{m.group(1).lower()} {word}" if m.group(1) else word


SUITE = Suite(
    name="winogender", kind="policy", title="Gender bias on WinoGender",
    columns=BIAS_COLUMNS + READING_COLUMNS + (("pairs", "pairs", None),),
    load=lambda cfg, model=None: load_pairs(cfg.winogender),
    score=lambda scorer, pairs, cfg: score_pairs(scorer, pairs, SIDES, cfg.max_new_tokens, cfg.winogender.bias_token,
                                                 accuracy=cfg.accuracy),
    aggregate=lambda records: metrics.summarise(records, *SIDES),
    by_group=lambda records: metrics.summarise_groups(records, *SIDES)["by_group"],
    plot_metrics=tuple((key, f"WinoGender {title}") for key, title, _ in BIAS_COLUMNS),
    bias_plot=True,
    note=NOTE.replace("pro/anti", "male/female"),
    files=lambda cfg: ([str(Path(cfg.winogender.path).resolve())]
                       if cfg.winogender.path and not is_hub(cfg.winogender.path) else []),
    item_id=lambda r: str(r["n"]),
    answers=tuple((side, f"generation_{side}") for side in SIDES),
)
