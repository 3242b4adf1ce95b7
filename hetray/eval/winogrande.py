"""WinoGrande accuracy by partial scoring, as lm-evaluation-harness does (Trinh & Le, 2018).

The blank ``_`` of a sentence is filled with each option, and everything after the blank is
cut off: two contexts. The text after the blank (the continuation) is the same for both, so the
model's total log-probability of that continuation under each context is a fair comparison:
the option whose context makes the rest of the sentence more likely is the prediction.

    "The trophy would not fit into the suitcase because the _ was too large."
    contexts:     "... because the trophy" | "... because the suitcase"
    continuation: " was too large."

``load_items`` -> ``score_items`` -> ``aggregate`` is the whole suite; the runner splits the
items across Ray actors and aggregates the concatenated records, so ``aggregate`` is a pure
function of the records.
"""

from __future__ import annotations

import logging

import orjson

from hetray.unify.sources.readers import InputError, iter_records

log = logging.getLogger(__name__)

SAMPLES_PREFIX = "sample:"


def resolve_path(path: str) -> str:
    """``sample:NAME`` -> the bundled sample; anything else as is."""
    if path.startswith(SAMPLES_PREFIX):
        from hetray.unify.convert import SAMPLES

        return str(SAMPLES / path[len(SAMPLES_PREFIX):])
    return path


def partial_context(sentence: str, option: str) -> str:
    """The sentence up to the blank, with ``option`` in it."""
    return sentence[: sentence.index("_")] + option


def partial_target(sentence: str) -> str:
    """Everything after the blank, with the harness's one-space delimiter."""
    return " " + sentence[sentence.index("_") + 1:].strip()


def load_items(path: str, limit: int | None = None) -> list[dict]:
    """The rows of a WinoGrande jsonl (``qID``, ``sentence``, ``option1``, ``option2``,
    ``answer``). Rows without an answer (the test split) are skipped with a warning; any other
    row that cannot be scored is an ``InputError`` naming the file and line."""
    items, unanswered = [], 0
    for row in iter_records(resolve_path(path)):
        where = f"{row['file']}:{row['line']}"
        if row["error"]:
            raise InputError(f"{where}: {row['error']}")
        try:
            obj = orjson.loads(row["text"])
        except orjson.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON: {e}") from None
        if isinstance(obj, dict) and obj.get("answer") in (None, ""):  # a test-split row: nothing to check
            unanswered += 1
            continue
        items.append(_item(obj, where))
        if limit is not None and len(items) >= limit:
            break
    if unanswered:
        log.warning("winogrande: %d row(s) of %s have no answer (test split?) and are skipped", unanswered, path)
    if not items:
        raise InputError(f"WinoGrande file {path!r} holds no rows with an answer")
    return items


def _item(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for field in ("sentence", "option1", "option2"):
        if not isinstance(obj.get(field), str) or not obj[field].strip():
            raise InputError(f"{where}: field {field!r} is missing or not a non-empty string")
    sentence = obj["sentence"]
    answer = str(obj["answer"]).strip()
    if answer not in ("1", "2"):
        raise InputError(f"{where}: field 'answer' is {obj['answer']!r}, expected '1' or '2'")
    if sentence.count("_") != 1:
        raise InputError(f"{where}: field 'sentence' must have exactly one '_' blank, has {sentence.count('_')}")
    if not sentence[sentence.index("_") + 1:].strip():
        raise InputError(f"{where}: nothing follows the blank in 'sentence', so there is nothing to score")
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


def evaluate_winogrande(scorer, settings) -> dict:
    """``settings``: ``EvalConfig.winogrande``. Returns ``{"overall", "records"}``."""
    records = score_items(scorer, load_items(settings.path, settings.limit))
    return {"overall": aggregate(records), "records": records}
