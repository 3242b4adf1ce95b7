"""OpenAssistant OASST1 -> preference pairs (paper appendix A.2).

**Input shapes** (setting ``shape``):

* ``trees``: one tree a line, ``{message_tree_id, tree_state, prompt: <node>}`` (raw export);
* ``nested``: one root ``<node>`` a line;
* ``messages``: one message a record (jsonl line, or parquet/csv row) with ``parent_id`` (null
  for the root) and ``message_tree_id``: the raw messages export or the hub table;
* ``auto``: decided per record: a ``prompt`` object -> trees, a ``replies`` key -> nested,
  else messages. ``resolve`` fixes it from the first record so the stage can skip the shuffle.

A node / message has ``message_id``, ``text``, ``role`` (``prompter`` | ``assistant``), ``lang``,
``review_result``, ``deleted``, ``synthetic``, ``rank`` (0 = best sibling), ``labels``, ``detoxify`` and,
in the nested shapes, ``replies`` (a list of nodes; the parent is the enclosing node).
``labels`` (human labels) is ``{name: {value, count}}`` (raw export), ``{name: [...], value:
[...], count: [...]}`` (hub) or null; ``label_value`` reads both. ``detoxify`` (Detoxify model
scores, e.g. ``{"toxicity": 0.00038, "insult": ...}``) is an object of numbers or null in both
the export and the hub table; ``detoxify_value`` reads it.

**Unit of accounting: the message.** ``parse`` emits one item per message (a tree line is
flattened), grouped by tree (``message_tree_id``, else the root's ``message_id``). ``combine``
sees a whole tree; every message ends in exactly one pair's provenance
``[prompter_id, chosen_id, rejected_id]`` or in exactly one reject.

**Pairs.** Every prompter message (root or follow-up) is a prompt candidate. Its eligible
replies are scored by ``label``: ``rank`` reads the ``rank`` field, ``detoxify.KEY`` (KEY one of
``DETOXIFY_KEYS``) the message's Detoxify score, any other name the value of that human label.
``direction`` says which is better (``auto``: lower for ``LOWER_IS_BETTER`` and every Detoxify
score, else higher). The best reply is chosen, the worst rejected (equal scores: smallest ``message_id``
wins); ``quality = |best - worst|``, ``chosen_score`` / ``rejected_score`` are the raw values.
The prompt is the prompter's text; with ``thread_context`` the whole thread from the root down
to that prompter message, HH-RLHF style, without leading whitespace::

    Human: {root text}\\n\\nAssistant: {reply text}\\n\\nHuman: {prompter text}

**Rejects** (``reason``), per message, first that applies:

* record problems (in ``parse``): ``malformed_json``, ``invalid_utf8``, ``missing_field``,
  ``wrong_type``, ``empty_field`` (detail names the field), ``bad_value`` (unknown role);
  a bad node inside a tree is rejected alone (its id, else ``file:line#path``);
* ``duplicate_id``: a second message with the same id in a tree;
* filters: ``deleted``, ``review_failed`` (``review_result`` false), ``synthetic``,
  ``filtered_lang`` (``lang`` not in the ``lang`` setting);
* ``parent_missing``: an assistant reply whose parent is not in the tree (or, with
  ``thread_context``, a prompter with a missing ancestor); ``parent_not_prompter``: an
  assistant reply to an assistant message; ``parent_skipped``: a reply whose prompter message
  was rejected (or, with ``thread_context``, a prompter with a filtered ancestor);
* ``missing_score``: an assistant reply without the human label (or rank);
  ``missing_detoxify``: the same for a ``detoxify.KEY`` label (``detoxify`` null, or no KEY);
* ``fewer_than_two_responses``: a prompter with fewer than two scored eligible replies (also
  a prompter with none), and that lone reply;
* ``tie``: best and worst score equal: the prompter and all its replies;
* ``middle_rank``: replies that are neither chosen nor rejected.

An assistant message that is the parent of a follow-up prompter is counted once, as a reply to
its own parent.

**A label nobody has is an error.** Each parsed message's item carries ``label_names`` (the human
labels and ``detoxify.KEY`` scores it has); the stage tallies them per source during its one pass
(``hetray.unify.convert``), and ``check_counts`` fails the stage when the configured label
(not ``rank``) occurs on no message of the source: a misspelt label gives an error naming the
labels that are there, not zero pairs.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Literal

from pydantic import Field, field_validator

from hetray.schema import item, pair, record_id, reject
from hetray.unify.sources.base import LABEL_NAMES, SourceSettings, decode_json, require_str
from hetray.unify.sources.readers import InputError, is_csv

# Labels where a lower value is better; every other OASST label is higher-is-better.
LOWER_IS_BETTER = {
    "rank", "spam", "fails_task", "lang_mismatch", "pii", "not_appropriate", "hate_speech",
    "sexual_content", "toxicity", "violence",
}
# The scores of the Detoxify "unbiased" model that the OASST1 export carries in `detoxify`;
# all are harms, so lower is better.
DETOXIFY = "detoxify."
DETOXIFY_KEYS = (
    "toxicity", "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit",
)
ROLES = ("prompter", "assistant")
SPEAKER = {"prompter": "Human", "assistant": "Assistant"}


class Settings(SourceSettings):
    format: Literal["oasst"] = "oasst"
    shape: Literal["auto", "trees", "nested", "messages"] = Field(
        default="auto",
        description="trees: one {message_tree_id, prompt: node} a line; nested: one root node "
        "a line; messages: flat records with parent_id (raw export or hub table); auto: detect",
    )
    label: str = Field(
        default="rank",
        description="score used to rank replies: `rank`, a human label name (toxicity, quality, ...) "
        "or a Detoxify score `detoxify.KEY` (toxicity, severe_toxicity, obscene, identity_attack, "
        "insult, threat, sexual_explicit); a label that no message has fails the stage",
    )
    direction: Literal["auto", "lower", "higher"] = Field(
        default="auto", description="which score is better; auto: lower for rank/toxicity/detoxify.*/..."
    )
    lang: list[str] | None = Field(default=None, description="keep only these languages (None: all)")
    thread_context: bool = Field(default=False, description="prompt = whole thread up to the prompter message")
    skip_deleted: bool = True
    skip_review_failed: bool = True
    skip_synthetic: bool = True

    @field_validator("label")
    @classmethod
    def _known_detoxify_key(cls, label: str) -> str:
        if label.startswith(DETOXIFY) and label[len(DETOXIFY):] not in DETOXIFY_KEYS:
            keys = ", ".join(DETOXIFY + k for k in DETOXIFY_KEYS)
            raise ValueError(f"label {label!r} is not a Detoxify score; one of: {keys}")
        return label


# ---------------------------------------------------------------------------- shapes and labels


def detect_shape(obj: dict) -> str:
    if isinstance(obj.get("prompt"), dict):
        return "trees"
    if "replies" in obj:
        return "nested"
    return "messages"


def resolve(s: Settings, first_record_text: str) -> Settings:
    """``s`` with shape ``auto`` replaced by the shape of the first record (if it parses)."""
    if s.shape != "auto":
        return s
    try:
        obj = json.loads(first_record_text)
    except (json.JSONDecodeError, TypeError):
        return s  # parse detects per record and rejects the bad one
    return s.model_copy(update={"shape": detect_shape(obj)}) if isinstance(obj, dict) else s


def _number(value, what: str) -> float | None:
    """A finite number, None for null/NaN/inf; ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} should be a number, got {type(value).__name__}: {value!r}")
    return float(value) if math.isfinite(value) else None


def label_value(labels, name: str) -> float | None:
    """The value of label ``name`` in either labels form; None when absent.

    Raw export: ``{name: {"value": v, "count": c}}``; hub: ``{"name": [...], "value": [...],
    "count": [...]}``. Raises ValueError when ``labels`` has neither form.
    """
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise ValueError(f"field 'labels' should be an object, got {type(labels).__name__}")
    if isinstance(labels.get("name"), list):  # hub form: parallel lists
        names, values = labels["name"], labels.get("value")
        if not isinstance(values, list) or len(values) != len(names):
            raise ValueError("field 'labels' has lists 'name' and 'value' of different lengths")
        return _number(values[names.index(name)], f"label '{name}'") if name in names else None
    entry = labels.get(name)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"label '{name}' should be {{value, count}}, got {entry!r}")
    return _number(entry.get("value"), f"label '{name}'")


def detoxify_value(detoxify, key: str) -> float | None:
    """The Detoxify score ``key`` of a message's ``detoxify`` object; None when it is null or
    lacks ``key``. Raises ValueError when ``detoxify`` is not an object or the score not a number."""
    if detoxify is None:
        return None
    if not isinstance(detoxify, dict):
        raise ValueError(f"field 'detoxify' should be an object, got {type(detoxify).__name__}")
    return _number(detoxify.get(key), f"detoxify score '{key}'")


def label_names(obj: dict) -> list[str]:
    """The labels a message carries: human label names and ``detoxify.KEY`` for each non-null
    Detoxify score. Never raises (a malformed ``labels`` just has no names)."""
    names: list[str] = []
    labels = obj.get("labels")
    if isinstance(labels, dict):
        if isinstance(labels.get("name"), list):  # hub form
            names = [n for n in labels["name"] if isinstance(n, str)]
        else:
            names = [n for n, entry in labels.items() if entry is not None]
    detoxify = obj.get("detoxify")
    if isinstance(detoxify, dict):
        names += [DETOXIFY + k for k, v in detoxify.items() if v is not None]
    return names


def score_of(obj: dict, label: str) -> float | None:
    """The score ``label`` gives a message (rank, Detoxify score or human label); None: missing."""
    if label == "rank":
        return _number(obj.get("rank"), "field 'rank'")
    if label.startswith(DETOXIFY):
        return detoxify_value(obj.get("detoxify"), label[len(DETOXIFY):])
    return label_value(obj.get("labels"), label)


# ---------------------------------------------------------------------------- parse


def _message(obj: dict, row: dict, s: Settings, fallback_id: str):
    """The item payload of one message, or ``(None, reject)``."""
    mid = obj.get("message_id")
    rid = mid if isinstance(mid, str) and mid.strip() else fallback_id

    def no(reason: str, detail: str):
        return None, reject(s.name, row["file"], row["line"], rid, reason, detail)

    data = {}
    for field in ("message_id", "role", "text"):
        data[field], bad = require_str(obj, field, row, s.name, rid)
        if bad:
            return None, bad
    if data["role"] not in ROLES:
        return no("bad_value", f"field 'role' is {data['role']!r}, expected 'prompter' or 'assistant'")
    for field in ("deleted", "review_result", "synthetic"):
        value = obj.get(field)  # null: unknown, treated as not deleted / not failed
        if value is not None and not isinstance(value, bool):
            return no("wrong_type", f"field '{field}' should be a boolean, got {value!r}")
        data[field] = value
    data["lang"] = obj.get("lang")
    if data["lang"] is not None and not isinstance(data["lang"], str):
        return no("wrong_type", f"field 'lang' should be a string, got {data['lang']!r}")
    try:  # only the configured score is read: other labels may be anything
        data["score"] = score_of(obj, s.label)
    except ValueError as e:
        return no("wrong_type", str(e))
    if s.label != "rank":  # tallied by the stage: a label that no message has is an error
        data[LABEL_NAMES] = label_names(obj)
    data["id"] = data.pop("message_id")
    return data, None


def _flat(obj: dict, row: dict, s: Settings) -> dict:
    rid = record_id(row["file"], row["line"])
    data, bad = _message(obj, row, s, rid)
    if bad:
        return bad
    parent, tree = obj.get("parent_id") or None, obj.get("message_tree_id")
    for field, value in (("parent_id", parent), ("message_tree_id", tree)):
        if value is not None and not isinstance(value, str):
            return reject(s.name, row["file"], row["line"], data["id"], "wrong_type",
                          f"field '{field}' should be a string, got {value!r}")
    if not tree:
        if parent is not None:  # a reply must say which tree it belongs to
            return reject(s.name, row["file"], row["line"], data["id"], "missing_field",
                          "field 'message_tree_id' is missing")
        tree = data["id"]  # a root message is its own tree
    return item(tree, row["file"], row["line"], data["id"], {**data, "parent": parent, "pos": 0})


def _flatten(root, tree_id, row: dict, s: Settings) -> list[dict]:
    """A nested tree -> one item (or reject) per node, parents taken from the nesting."""
    base = record_id(row["file"], row["line"])
    root_id = root.get("message_id") if isinstance(root, dict) else None
    group = next((g for g in (tree_id, root_id) if isinstance(g, str) and g), base)
    out: list[dict] = []
    stack = [(root, None, "0")]  # (node, parent id, path); depth-first, document order
    while stack:
        node, parent, path = stack.pop()
        fallback = f"{base}#{path}"
        if not isinstance(node, dict):
            out.append(reject(s.name, row["file"], row["line"], fallback, "wrong_type",
                              f"message at {path} should be an object, got {type(node).__name__}"))
            continue
        data, bad = _message(node, row, s, fallback)
        replies = node.get("replies") or []
        if not bad and not isinstance(replies, list):
            data, bad = None, reject(s.name, row["file"], row["line"], data["id"], "wrong_type",
                                     f"field 'replies' should be a list, got {type(replies).__name__}")
        if bad:
            out.append(bad)
        else:
            out.append(item(group, row["file"], row["line"], data["id"],
                            {**data, "parent": parent, "pos": len(out)}))
        # Children of a bad node still count: they point at an id that is not in the tree.
        mid = node.get("message_id")
        child_parent = mid if isinstance(mid, str) and mid else fallback
        if isinstance(replies, list):
            for i in reversed(range(len(replies))):
                stack.append((replies[i], child_parent, f"{path}.{i}"))
    return out


_CSV_FLAGS = {"true": True, "false": False}


def from_csv(obj: dict) -> dict:
    """A csv / tsv row holds only strings (``readers``): an empty cell is null, and ``rank``, the
    flags and ``labels`` / ``detoxify`` (JSON text) get their types back. A value that does not
    parse stays a string, which the field's check then rejects, naming the field."""
    obj = {k: (None if isinstance(v, str) and not v.strip() else v) for k, v in obj.items()}
    rank = obj.get("rank")
    if isinstance(rank, str):
        try:
            obj["rank"] = float(rank)
        except ValueError:
            pass
    for field in ("deleted", "review_result", "synthetic"):
        if isinstance(obj.get(field), str):
            obj[field] = _CSV_FLAGS.get(obj[field].strip().lower(), obj[field])
    for field in ("labels", "detoxify"):
        if isinstance(obj.get(field), str):
            try:
                obj[field] = json.loads(obj[field])
            except json.JSONDecodeError:
                pass
    return obj


def parse(row: dict, s: Settings) -> list[dict]:
    obj, bad = decode_json(row, s.name)
    if bad:
        return [bad]
    if is_csv(row["file"]):
        obj = from_csv(obj)
    shape = detect_shape(obj) if s.shape == "auto" else s.shape
    if shape == "messages":
        return [_flat(obj, row, s)]
    if shape == "nested":
        return _flatten(obj, obj.get("message_tree_id"), row, s)
    root = obj.get("prompt")
    if not isinstance(root, dict):
        reason = "missing_field" if root is None else "wrong_type"
        return [reject(s.name, row["file"], row["line"], record_id(row["file"], row["line"]),
                       reason, "field 'prompt' should be a message object")]
    return _flatten(root, obj.get("message_tree_id"), row, s)


# ---------------------------------------------------------------------------- combine


def _filtered(m: dict, s: Settings) -> str | None:
    """The filter reason for a message on its own, or None."""
    if s.skip_deleted and m["deleted"]:
        return "deleted"
    if s.skip_review_failed and m["review_result"] is False:
        return "review_failed"
    if s.skip_synthetic and m["synthetic"]:
        return "synthetic"
    if s.lang is not None and m["lang"] not in s.lang:
        return "filtered_lang"
    return None


def _thread(m: dict, msgs: dict) -> tuple[list[dict] | None, str | None]:
    """Root-to-``m`` messages, or ``(None, id)`` of the first missing ancestor."""
    thread, seen = [m], {m["id"]}
    while thread[-1]["parent"] is not None:
        pid = thread[-1]["parent"]
        if pid not in msgs or pid in seen:  # a cycle cannot be a thread either
            return None, pid
        seen.add(pid)
        thread.append(msgs[pid])
    return thread[::-1], None


def combine(items: list[dict], s: Settings) -> list[dict]:
    # Deterministic whatever order the shuffle delivers: first occurrence in input order wins.
    items = sorted(items, key=lambda it: (it["file"], it["line"], it["data"].get("pos", 0)))
    out: list[dict] = []
    where: dict[str, dict] = {}  # message id -> its item
    for it in items:
        mid = it["data"]["id"]
        if mid in where:
            first = where[mid]
            out.append(reject(s.name, it["file"], it["line"], mid, "duplicate_id",
                              f"message id also at {first['file']}:{first['line']}"))
        else:
            where[mid] = it
    msgs = {mid: it["data"] for mid, it in where.items()}
    fate: dict[str, tuple[str, str | None]] = {}  # message id -> (reason, detail)

    filtered = {mid: r for mid, m in msgs.items() if (r := _filtered(m, s))}
    fate.update({mid: (r, None) for mid, r in filtered.items()})

    threads: dict[str, list[dict]] = {}
    prompters = sorted(mid for mid, m in msgs.items() if m["role"] == "prompter" and mid not in fate)
    for pid in prompters:
        if not s.thread_context:
            continue
        thread, missing = _thread(msgs[pid], msgs)
        bad = next((a["id"] for a in (thread or [])[:-1] if a["id"] in filtered), None)
        if missing is not None:
            fate[pid] = ("parent_missing", f"ancestor {missing} is not in the tree")
        elif bad is not None:
            fate[pid] = ("parent_skipped", f"ancestor {bad} was rejected: {filtered[bad]}")
        else:
            threads[pid] = thread

    replies: dict[str, list[dict]] = defaultdict(list)
    for mid, m in msgs.items():
        if m["role"] != "assistant" or mid in fate:
            continue
        parent = msgs.get(m["parent"]) if m["parent"] is not None else None
        if parent is None:
            fate[mid] = ("parent_missing", f"parent {m['parent']} is not in the tree")
        elif parent["role"] != "prompter":
            fate[mid] = ("parent_not_prompter", f"parent {parent['id']} is an assistant message")
        elif parent["id"] in fate:
            fate[mid] = ("parent_skipped", f"parent {parent['id']} was rejected: {fate[parent['id']][0]}")
        elif m["score"] is None and s.label.startswith(DETOXIFY):
            fate[mid] = ("missing_detoxify", f"no Detoxify score '{s.label[len(DETOXIFY):]}'")
        elif m["score"] is None:
            fate[mid] = ("missing_score", f"no value for '{s.label}'")
        else:
            replies[parent["id"]].append(m)

    lower = s.direction == "lower" or (
        s.direction == "auto" and (s.label in LOWER_IS_BETTER or s.label.startswith(DETOXIFY))
    )
    sign = 1.0 if lower else -1.0  # after the sign, smaller is better
    pairs = []
    for pid in prompters:
        if pid in fate:
            continue
        rs = replies.get(pid, [])
        if len(rs) < 2:
            detail = f"{len(rs)} scored eligible replies"
            for mid in [pid] + [r["id"] for r in rs]:
                fate[mid] = ("fewer_than_two_responses", detail)
            continue
        best = min(rs, key=lambda r: (sign * r["score"], r["id"]))
        worst = min(rs, key=lambda r: (-sign * r["score"], r["id"]))
        if best["score"] == worst["score"]:
            for mid in [pid] + [r["id"] for r in rs]:
                fate[mid] = ("tie", f"all {len(rs)} replies score {best['score']:g} on '{s.label}'")
            continue
        for r in rs:
            if r is not best and r is not worst:
                fate[r["id"]] = ("middle_rank", f"score {r['score']:g}, best {best['score']:g}, worst {worst['score']:g}")
        p = msgs[pid]
        prompt = (
            "\n\n".join(f"{SPEAKER[m['role']]}: {m['text']}" for m in threads[pid]).lstrip()
            if s.thread_context else p["text"]
        )
        pairs.append(pair(
            s.name, prompt, best["text"], worst["text"], [pid, best["id"], worst["id"]],
            quality=abs(best["score"] - worst["score"]), chosen_score=best["score"],
            rejected_score=worst["score"], label=s.label,
        ))

    for mid, it in where.items():  # in input order
        reason, detail = fate[mid] if mid in fate else (None, None)
        if reason is not None:
            out.append(reject(s.name, it["file"], it["line"], mid, reason, detail))
    return pairs + out


def count_records(obj, s: Settings) -> int:
    """Messages in one input record (a line's JSON object, None when it is not JSON), counted
    from the raw record alone, for the stage's check ``input == used + rejected``: a flat
    message is 1, a tree or nested root every node reachable through ``replies`` lists."""
    if not isinstance(obj, dict):
        return 1
    shape = detect_shape(obj) if s.shape == "auto" else s.shape
    root = obj if shape == "nested" else obj.get("prompt") if shape == "trees" else None
    if not isinstance(root, dict):
        return 1
    n, stack = 0, [root]
    while stack:
        node = stack.pop()
        n += 1
        if isinstance(node, dict) and isinstance(node.get("replies"), list):
            stack.extend(node["replies"])
    return n


def needs_shuffle(s: Settings) -> bool:
    # A tree line holds all its messages; flat messages of one tree may sit in different files.
    return s.shape in ("messages", "auto")


def check_counts(s: Settings, counts: dict) -> None:
    """After the stage's pass: fail when the configured label occurs on no message of the source.

    ``counts`` is the source's tally from the stage (``used``, ``rejected``, ``labels``: label
    name -> messages that have it). ``rank`` is not checked (a missing rank is ordinary), nor is a
    source with no records. Raises InputError naming the source, the label and the labels present.
    """
    n = counts.get("used", 0) + counts.get("rejected", 0)
    present = counts.get("labels", {})
    if s.label == "rank" or n == 0 or present.get(s.label, 0) > 0:
        return
    where = s.path if isinstance(s.path, str) else ", ".join(s.path)
    names = ", ".join(sorted(present)) or "none (no message has labels or Detoxify scores)"
    raise InputError(
        f"source {s.name!r}: label {s.label!r} occurs in none of the {n:,} messages of {where}; "
        f"labels present: {names}"
    )


def one_record_per_line(s: Settings) -> bool:
    """Flat messages: a line is one record, so the stage counts lines without parsing them."""
    return s.shape == "messages"


# The Arrow path (``oasst_table``) that the stage takes for sources that need the shuffle.


def flow_table(raw, s: Settings):
    from hetray.unify.sources.oasst_table import flow_table

    return flow_table(raw, s)


def combine_table(rows, settings: dict):
    from hetray.unify.sources.oasst_table import combine_table

    return combine_table(rows, settings)
