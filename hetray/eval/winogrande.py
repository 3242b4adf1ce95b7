"""WinoGrande accuracy by partial scoring, as lm-evaluation-harness does (Trinh & Le, 2018).

The blank ``_`` of a sentence is filled with each option, and everything after the blank is
cut off: two contexts. The text after the blank (the continuation) is the same for both, so the
model's total log-probability of that continuation under each context is a fair comparison:
the option whose context makes the rest of the sentence more likely is the prediction.

    "The trophy would not fit into the suitcase because the _ was too large."
    contexts:     "... because the trophy" | "... because the suitcase"
    continuation: " was too large."

``load_items`` -> ``score_items`` -> ``aggregate`` is the whole suite (``SUITE``).

Held-out split. With ``eval.winogrande.holdout: h`` only the rows whose ``qID`` is held out by
``hetray.pairs.holdout(qID, h)`` are scored: exactly the rows a WinoGrande training source with
``holdout: h`` drops, so a job may train on the rest of the same file. A row without a ``qID`` is
then skipped (its stand-in id, file and line, depends on how the path is spelled, so training
might not have dropped it). ``limit`` counts the rows kept. ``Suite.files``: the jsonl file.
Confidence intervals resample rows.

Data: a jsonl file, ``sample:winogrande.jsonl``, or a hub split in convert's form
(``hf:allenai/winogrande:validation:winogrande_xl``, loaded by ``hetray.eval.hub``; the hub's
rows have no ``qID``, so a ``holdout`` keeps none of them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson

from hetray.eval.hub import HubDataError, hub_rows, is_hub
from hetray.formats import BOM
from hetray.eval.suite import Suite
from hetray.models import resolve_sample
from hetray.pairs import holdout as held_out

log = logging.getLogger(__name__)


class WinoGrandeError(ValueError):
    """Bad WinoGrande input; the message names the file and line."""


def partial_context(sentence: str, option: str) -> str:
    """The sentence up to the blank, with ``option`` in it."""
    return sentence[: sentence.index("_")] + option


def partial_target(sentence: str) -> str:
    """Everything after the blank, with the harness's one-space delimiter."""
    return " " + sentence[sentence.index("_") + 1:].strip()


def read_rows(path: str):
    """``(file:line, parsed JSON)`` of every non-blank line of a jsonl file; for an ``hf:`` path
    (``hetray.eval.hub``) ``(spec#row, row)`` of every row of the hub split."""
    if is_hub(path):
        try:
            rows = hub_rows(path, "eval.winogrande.path")
        except HubDataError as e:
            raise WinoGrandeError(str(e)) from None
        yield from ((f"{path}#{i}", row) for i, row in enumerate(rows))
        return
    file = Path(resolve_sample(path))
    if not file.is_file():
        raise WinoGrandeError(f"WinoGrande file {path!r} does not exist")
    with open(file, "rb") as f:
        for line, raw in enumerate(f, 1):
            if line == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue
            try:
                yield f"{file}:{line}", orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise WinoGrandeError(f"{file}:{line}: not valid JSON: {e}") from None


def load_items(path: str, limit: int | None = None, holdout: float | None = None) -> list[dict]:
    """The rows of a WinoGrande jsonl (``qID``, ``sentence``, ``option1``, ``option2``,
    ``answer``); with ``holdout``, only the held-out qIDs (module docstring). Rows without an
    answer (the test split) are skipped with a warning; any other row that cannot be scored is a
    ``WinoGrandeError`` naming the file and line."""
    items, unanswered, no_id = [], 0, 0
    for where, obj in read_rows(path):
        if holdout is not None and isinstance(obj, dict):
            if not obj.get("qID"):
                no_id += 1
                continue
            if not held_out(str(obj["qID"]), holdout):
                continue
        if isinstance(obj, dict) and obj.get("answer") in (None, ""):  # a test-split row: nothing to check
            unanswered += 1
            continue
        items.append(_item(obj, where))
        if limit is not None and len(items) >= limit:
            break
    if unanswered:
        log.warning("winogrande: %d row(s) of %s have no answer (test split?) and are skipped", unanswered, path)
    if no_id:
        log.warning("winogrande: %d row(s) of %s have no qID and are skipped (holdout %g splits by qID)",
                    no_id, path, holdout)
    if not items:
        held = f" among the qIDs held out at holdout {holdout:g}" if holdout is not None else ""
        raise WinoGrandeError(f"WinoGrande file {path!r} holds no rows with an answer{held}")
    return items


def _item(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise WinoGrandeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in ("sentence", "option1", "option2"):
        if not isinstance(obj.get(field), str) or not obj[field].strip():
            raise WinoGrandeError(f"{where}: field {field!r} is missing or not a non-empty string")
    sentence = obj["sentence"]
    answer = str(obj["answer"]).strip()
    if answer not in ("1", "2"):
        raise WinoGrandeError(f"{where}: field 'answer' is {obj['answer']!r}, expected '1' or '2'")
    if sentence.count("_") != 1:
        raise WinoGrandeError(f"{where}: field 'sentence' must have exactly one '_' blank, has {sentence.count('_')}")
    if not sentence[sentence.index("_") + 1:].strip():
        raise WinoGrandeError(f"{where}: nothing follows the blank in 'sentence', so there is nothing to score")
    return {"id": str(obj.get("qID") or where), "sentence": sentence, "option1": obj["option1"],
            "option2": obj["option2"], "answer": int(answer)}


def score_items(scorer, items: list[dict]) -> list[dict]:
    """One record per item: the continuation's log-probability under each option, the pick."""
    contexts, targets = [], []
    for it in items:
        target = partial_target(it["sentence"])
        for option in (it["option1"], it["option2"]):
            contexts.append(partial_context(it["sentence"], option))
            targets.append(target)
    totals = [float(sum(lp)) for lp in scorer.continuation_logprobs(contexts, targets)]
    records = []
    for i, it in enumerate(items):
        lp1, lp2 = totals[2 * i], totals[2 * i + 1]
        pred = 1 if lp1 >= lp2 else 2  # a tie goes to option1, as argmax does in the harness
        records.append({**it, "logprob1": lp1, "logprob2": lp2, "pred": pred, "correct": pred == it["answer"]})
    return records


def aggregate(records: list[dict]) -> dict:
    n = len(records)
    return {"accuracy": sum(r["correct"] for r in records) / n if n else float("nan"), "items": n}


SUITE = Suite(
    name="winogrande", kind="policy", title="WinoGrande accuracy (partial scoring)",
    columns=(("accuracy", "Accuracy", "higher"), ("items", "items", None)),
    load=lambda cfg, model=None: load_items(cfg.winogrande.path, cfg.winogrande.limit, cfg.winogrande.holdout),
    score=lambda scorer, items, cfg: score_items(scorer, items),
    aggregate=aggregate,
    plot_metrics=(("accuracy", "WinoGrande accuracy"),),
    files=lambda cfg: ([] if is_hub(cfg.winogrande.path)
                       else [str(Path(resolve_sample(cfg.winogrande.path)).resolve())]),
    item_id=lambda r: r["id"],
)
