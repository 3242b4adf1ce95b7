"""OASST1 adapter: the three input shapes, ranking, filters, accounting and bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetray.unify.sources import oasst
from hetray.unify.sources.base import account, convert_rows
from hetray.unify.sources.readers import InputError, iter_records

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "oasst"
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ALL_FIXTURES = ["trees.jsonl", "nested.jsonl", "messages_raw.jsonl", "messages_hub_a.jsonl",
                "messages_hub_b.jsonl", "malformed.jsonl", "messages_detoxify.jsonl",
                "messages_detoxify_hub.jsonl"]


def settings(**kw) -> oasst.Settings:
    return oasst.Settings(name="oasst", path="unused", **kw)


def run(files, **kw) -> list[dict]:
    """Convert like the stage does: shape resolved from the first record, then parse/combine."""
    files = [str(f) for f in (files if isinstance(files, list) else [files])]
    records = list(iter_records(files))
    s = oasst.resolve(settings(**kw), records[0]["text"])
    return convert_rows(oasst, s, records)


def pairs_by_prompter(out) -> dict[str, dict]:
    return {o["provenance"][0]: o for o in out if o["kind"] == "pair"}


def reasons(out) -> dict[str, str]:
    """record_id -> reason of every reject."""
    return {o["record_id"]: o["reason"] for o in out if o["kind"] == "reject"}


def count_messages(path: Path) -> int:
    """Messages in a file, counted independently of the adapter: every node of a tree, every
    flat record; a line that is not a JSON object counts as one (it is one reject)."""

    def nodes(n) -> int:
        if not isinstance(n, dict):
            return 1
        replies = n.get("replies")
        return 1 + (sum(nodes(r) for r in replies) if isinstance(replies, list) else 0)

    total = 0
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            total += 1
            continue
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), dict):
            total += nodes(obj["prompt"])
        elif isinstance(obj, dict) and "replies" in obj:
            total += nodes(obj)
        else:
            total += 1
    return total


# ---------------------------------------------------------------------------- shapes


def test_detect_and_resolve_shape():
    first = {name: next(iter_records(str(FIX / name)))["text"]
             for name in ("trees.jsonl", "nested.jsonl", "messages_raw.jsonl")}
    assert oasst.resolve(settings(), first["trees.jsonl"]).shape == "trees"
    assert oasst.resolve(settings(), first["nested.jsonl"]).shape == "nested"
    assert oasst.resolve(settings(), first["messages_raw.jsonl"]).shape == "messages"
    assert oasst.resolve(settings(), "{not json").shape == "auto"  # parse rejects it later
    assert oasst.resolve(settings(shape="nested"), first["trees.jsonl"]).shape == "nested"
    assert not oasst.needs_shuffle(settings(shape="trees"))
    assert not oasst.needs_shuffle(settings(shape="nested"))
    assert oasst.needs_shuffle(settings(shape="messages"))
    assert oasst.needs_shuffle(settings())


def test_trees_rank_pairs():
    out = run(FIX / "trees.jsonl")
    pairs = pairs_by_prompter(out)
    assert set(pairs) == {"t1-p1", "t1-p2", "t3-p1"}
    p = pairs["t1-p1"]
    assert (p["prompt"], p["chosen"], p["rejected"]) == ("What is the capital of France?", "Paris.", "Why do you care?")
    assert p["provenance"] == ["t1-p1", "t1-a1", "t1-a3"]
    assert (p["quality"], p["chosen_score"], p["rejected_score"], p["label"]) == (2.0, 0.0, 2.0, "rank")
    p = pairs["t1-p2"]  # a follow-up prompter under an assistant reply is a prompt of its own
    assert (p["prompt"], p["chosen"], p["rejected"], p["quality"]) == ("Please just answer.", "Sorry: it is Paris.", "No.", 1.0)
    p = pairs["t3-p1"]  # lang not filtered by default: "Sieben" (rank 5) is the worst
    assert p["provenance"] == ["t3-p1", "t3-a1", "t3-a6"] and p["quality"] == 5.0
    assert reasons(out) == {
        "t1-a2": "middle_rank",
        "t2-p1": "tie", "t2-a1": "tie", "t2-a2": "tie",
        "t2-p2": "fewer_than_two_responses", "t2-a3": "fewer_than_two_responses",
        "t3-p2": "deleted", "t3-a8": "parent_skipped", "t3-a9": "parent_skipped",
        "t3-a2": "middle_rank", "t3-a3": "deleted", "t3-a4": "review_failed",
        "t3-a5": "synthetic", "t3-a7": "missing_score",
    }


def test_nested_pairs_and_tie_break_by_message_id():
    out = run(FIX / "nested.jsonl")
    (p,) = [o for o in out if o["kind"] == "pair"]
    assert p["prompt"] == "How do I boil an egg?"
    assert p["chosen"].startswith("Place the egg")
    # n1-a1 and n1-a3 share the worst rank: the smaller message id is rejected
    assert p["provenance"] == ["n1-p1", "n1-a2", "n1-a1"] and p["quality"] == 1.0
    assert reasons(out) == {"n1-a3": "middle_rank", "n2-p1": "fewer_than_two_responses"}


def test_nested_and_trees_agree_on_a_tree():
    # The same tree written both ways gives the same pairs.
    tree_line = next(iter_records(str(FIX / "trees.jsonl")))
    node = json.loads(tree_line["text"])["prompt"]
    nested_row = dict(tree_line, text=json.dumps(node))
    a = convert_rows(oasst, settings(), [tree_line])
    b = convert_rows(oasst, settings(), [nested_row])
    assert [o["provenance"] for o in a if o["kind"] == "pair"] == [o["provenance"] for o in b if o["kind"] == "pair"]
    assert reasons(a) == reasons(b)


def test_flat_raw_export_labels():
    out = run(FIX / "messages_raw.jsonl")  # children come before parents in this file
    pairs = pairs_by_prompter(out)
    assert pairs["r1-p1"]["provenance"] == ["r1-p1", "r1-a1", "r1-a2"]
    assert pairs["r1-p1"]["rejected"] == "Rain is stupid." and pairs["r1-p1"]["quality"] == 2.0
    assert pairs["r1-p2"]["provenance"] == ["r1-p2", "r1-a5", "r1-a4"]
    assert reasons(out) == {"r1-a3": "middle_rank", "r1-a6": "parent_missing", "r1-a7": "parent_not_prompter"}

    out = run(FIX / "messages_raw.jsonl", label="toxicity")
    pairs = pairs_by_prompter(out)
    p = pairs["r1-p1"]
    assert p["provenance"] == ["r1-p1", "r1-a1", "r1-a2"] and p["label"] == "toxicity"
    assert (p["chosen_score"], p["rejected_score"]) == (0.05, 0.6)
    assert p["quality"] == pytest.approx(0.55)
    p = pairs["r1-p2"]  # a toxicity of 0.0 is a score, not a missing one
    assert (p["chosen_score"], p["rejected_score"], p["quality"]) == (0.0, 0.3, 0.3)


def test_flat_hub_labels_split_across_files():
    files = [FIX / "messages_hub_a.jsonl", FIX / "messages_hub_b.jsonl"]
    out = run(files)
    pairs = pairs_by_prompter(out)
    assert pairs["h1-p1"]["provenance"] == ["h1-p1", "h1-a1", "h1-a2"]  # tree h1 spans both files
    assert (pairs["h1-p1"]["chosen"], pairs["h1-p1"]["rejected"]) == ("Miso.", "Cat.")
    assert pairs["h2-p1"]["provenance"] == ["h2-p1", "h2-a1", "h2-a2"]
    assert reasons(out) == {"h1-a3": "missing_score"}

    out = run(files, label="quality")  # higher is better; h2's replies have equal quality
    assert pairs_by_prompter(out)["h1-p1"]["quality"] == pytest.approx(0.5)
    assert reasons(out) == {"h1-a3": "missing_score", "h2-p1": "tie", "h2-a1": "tie", "h2-a2": "tie"}

    # Alone, each file is only part of tree h1.
    r = reasons(run(FIX / "messages_hub_a.jsonl"))
    assert r == {"h1-p1": "fewer_than_two_responses", "h1-a1": "fewer_than_two_responses"}
    r = reasons(run(FIX / "messages_hub_b.jsonl"))
    assert r == {"h1-a2": "parent_missing", "h1-a3": "parent_missing"}


def test_flat_hub_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for name in ("messages_hub_a.jsonl", "messages_hub_b.jsonl")
            for line in (FIX / name).read_text().splitlines()]
    for r in rows:
        r.pop("emojis"), r.pop("detoxify")
    rows[3]["rank"] = float("nan")  # h1-a3: the hub table stores a missing rank as NaN
    path = tmp_path / "oasst_train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = run(path)
    pairs = pairs_by_prompter(out)
    assert pairs["h1-p1"]["provenance"] == ["h1-p1", "h1-a1", "h1-a2"]
    assert (pairs["h1-p1"]["chosen_score"], pairs["h1-p1"]["rejected_score"]) == (0.0, 1.0)
    assert pairs["h2-p1"]["provenance"] == ["h2-p1", "h2-a1", "h2-a2"]
    assert reasons(out) == {"h1-a3": "missing_score"}
    out = run(path, label="quality")
    assert pairs_by_prompter(out)["h1-p1"]["quality"] == pytest.approx(0.5)
    assert account(out)["used"] + account(out)["rejected"] == len(rows)


# ---------------------------------------------------------------------------- ranking


def test_direction_toxicity_lower_is_better():
    out = run(FIX / "trees.jsonl", label="toxicity")
    p = pairs_by_prompter(out)["t1-p1"]
    assert (p["chosen"], p["rejected"]) == ("Lyon, I think.", "Why do you care?")  # 0.1 vs 0.8
    assert (p["chosen_score"], p["rejected_score"]) == (0.1, 0.8)
    assert p["quality"] == pytest.approx(0.7)
    r = reasons(out)
    assert r["t1-a1"] == "middle_rank"
    assert r["t1-a4"] == r["t1-a5"] == "missing_score"  # no labels on those replies
    assert r["t1-p2"] == "fewer_than_two_responses"

    p = pairs_by_prompter(run(FIX / "trees.jsonl", label="toxicity", direction="higher"))["t1-p1"]
    assert p["provenance"] == ["t1-p1", "t1-a3", "t1-a2"]
    p = pairs_by_prompter(run(FIX / "trees.jsonl", label="quality"))["t1-p1"]  # higher is better
    assert p["provenance"] == ["t1-p1", "t1-a1", "t1-a3"] and p["quality"] == pytest.approx(0.8)


def test_label_value_both_forms():
    raw = {"toxicity": {"value": 0.25, "count": 3}, "spam": {"value": 0, "count": 2}}
    hub = {"name": ["spam", "toxicity"], "value": [0.0, 0.25], "count": [2, 3]}
    for labels in (raw, hub):
        assert oasst.label_value(labels, "toxicity") == 0.25
        assert oasst.label_value(labels, "spam") == 0.0
        assert oasst.label_value(labels, "humor") is None
    assert oasst.label_value(None, "toxicity") is None
    for bad in (["toxicity"], {"toxicity": 0.3}, {"name": ["a", "b"], "value": [1.0]},
                {"toxicity": {"value": "high"}}):
        with pytest.raises(ValueError):
            oasst.label_value(bad, "toxicity")


# ---------------------------------------------------------------------------- filters, context


def test_filters_each_counted():
    out = run(FIX / "trees.jsonl", lang=["en"])
    r = reasons(out)
    assert r["t3-a6"] == "filtered_lang"
    assert pairs_by_prompter(out)["t3-p1"]["provenance"] == ["t3-p1", "t3-a1", "t3-a2"]  # 7 vs 4
    assert account(out)["reasons"]["filtered_lang"] == 1
    for reason in ("deleted", "review_failed", "synthetic"):
        assert sum(v == reason for v in r.values()) == (2 if reason == "deleted" else 1)

    # Filters off: every reply of t3-p1 is eligible, and the deleted follow-up makes a pair.
    out = run(FIX / "trees.jsonl", skip_deleted=False, skip_review_failed=False, skip_synthetic=False)
    pairs = pairs_by_prompter(out)
    assert pairs["t3-p1"]["provenance"] == ["t3-p1", "t3-a1", "t3-a6"]
    assert pairs["t3-p2"]["provenance"] == ["t3-p2", "t3-a8", "t3-a9"]
    r = reasons(out)
    assert [r[m] for m in ("t3-a2", "t3-a3", "t3-a4", "t3-a5")] == ["middle_rank"] * 4

    # A message's own filter comes before its parent's: these replies are not German either.
    out = run(FIX / "nested.jsonl", lang=["de"])
    assert set(reasons(out).values()) == {"filtered_lang"} and len(reasons(out)) == 5


def test_thread_context():
    out = run(FIX / "trees.jsonl", thread_context=True)
    pairs = pairs_by_prompter(out)
    assert pairs["t1-p1"]["prompt"] == "Human: What is the capital of France?"
    assert pairs["t1-p2"]["prompt"] == (
        "Human: What is the capital of France?\n\nAssistant: Why do you care?\n\nHuman: Please just answer."
    )
    # Flat records in any order build the same thread.
    pairs = pairs_by_prompter(run(FIX / "messages_raw.jsonl", thread_context=True))
    assert pairs["r1-p2"]["prompt"].startswith("Human: Write a haiku about rain.\n\nAssistant: Soft rain")
    assert pairs["r1-p2"]["prompt"].endswith("\n\nHuman: Another one, please.")
    # A follow-up whose ancestor is filtered has no thread; without context it is still a prompt.
    row = next(iter_records(str(FIX / "trees.jsonl")))
    tree = json.loads(row["text"])
    tree["prompt"]["replies"][2]["deleted"] = True  # t1-a3, the parent of t1-p2
    row = dict(row, text=json.dumps(tree))
    r = reasons(convert_rows(oasst, settings(thread_context=True), [row]))
    assert (r["t1-a3"], r["t1-p2"], r["t1-a4"], r["t1-a5"]) == ("deleted", "parent_skipped", "parent_skipped", "parent_skipped")
    assert "t1-p2" in pairs_by_prompter(convert_rows(oasst, settings(), [row]))
    out = run(FIX / "messages_hub_b.jsonl", thread_context=True)
    assert reasons(out) == {"h1-a2": "parent_missing", "h1-a3": "parent_missing"}


def test_thread_context_broken_thread():
    rows = list(iter_records(str(FIX / "malformed.jsonl")))
    assert reasons(convert_rows(oasst, settings(), rows))["mt-p2"] == "fewer_than_two_responses"
    # mt-p2's parent mt-a2 was a bad record: with thread context its thread is incomplete.
    assert reasons(convert_rows(oasst, settings(thread_context=True), rows))["mt-p2"] == "parent_missing"


# ---------------------------------------------------------------------------- accounting, bad data


@pytest.mark.parametrize("name", ALL_FIXTURES)
@pytest.mark.parametrize("kw", [{}, {"label": "toxicity"}, {"label": "detoxify.toxicity"},
                                {"thread_context": True, "lang": ["en"]},
                                {"skip_deleted": False, "skip_synthetic": False}])
def test_every_message_accounted_once(name, kw):
    out = run(FIX / name, **kw)
    counts = account(out)
    assert counts["used"] + counts["rejected"] == count_messages(FIX / name)
    ids = [i for o in out if o["kind"] == "pair" for i in o["provenance"]]
    ids += [o["record_id"] for o in out if o["kind"] == "reject"]
    assert len(ids) == len(set(ids))  # no message both used and rejected, or used twice


def test_split_files_accounting():
    files = [FIX / "messages_hub_a.jsonl", FIX / "messages_hub_b.jsonl"]
    counts = account(run(files))
    assert counts["used"] + counts["rejected"] == sum(count_messages(f) for f in files)
    assert counts["pairs"] == 2


def test_malformed_records_are_rejects():
    out = run(FIX / "malformed.jsonl")
    assert not [o for o in out if o["kind"] == "pair"]
    rej = {(o["line"], o["record_id"]): o for o in out if o["kind"] == "reject"}
    f = str(FIX / "malformed.jsonl")

    def at(line, rid=None):
        return rej[(line, rid or f"{f}:{line}")]

    assert at(1)["reason"] == "malformed_json"  # truncated
    assert at(2)["reason"] == "malformed_json" and "list" in at(2)["detail"]  # not an object
    assert at(3, "m-a1")["reason"] == "missing_field" and "'text'" in at(3, "m-a1")["detail"]
    assert at(4, "m-a2")["reason"] == "wrong_type" and "'text'" in at(4, "m-a2")["detail"]
    assert at(5)["reason"] == "invalid_utf8"
    assert at(6, "m-a4")["reason"] == "bad_value" and "'role'" in at(6, "m-a4")["detail"]
    assert at(7, "m-a5")["reason"] == "wrong_type" and "'deleted'" in at(7, "m-a5")["detail"]
    assert at(8, "m-a6")["reason"] == "empty_field" and "'text'" in at(8, "m-a6")["detail"]
    assert at(9)["reason"] == "missing_field" and "'message_id'" in at(9)["detail"]
    # One tree line with bad nodes: each node is rejected alone, the rest is still converted.
    assert at(10, f"{f}:10#0.1")["reason"] == "wrong_type"  # "oops" is not a message
    assert at(10, "mt-a2")["reason"] == "missing_field" and "'role'" in at(10, "mt-a2")["detail"]
    assert at(10, "mt-a3")["reason"] == "wrong_type" and "'rank'" in at(10, "mt-a3")["detail"]
    assert at(10, "mt-p1")["reason"] == at(10, "mt-a1")["reason"] == "fewer_than_two_responses"
    assert at(11, "m-a9")["reason"] == "parent_missing"  # its parent was the truncated line 1
    # With a label score, the broken labels of m-a9 are the problem.
    bad = [o for o in run(FIX / "malformed.jsonl", label="toxicity") if o["record_id"] == "m-a9"]
    assert bad[0]["reason"] == "wrong_type" and "labels" in bad[0]["detail"]


def test_explicit_shape_mismatch_is_a_reject():
    rows = list(iter_records(str(FIX / "messages_raw.jsonl"), limit=1))
    (o,) = convert_rows(oasst, settings(shape="trees"), rows)
    assert o["kind"] == "reject" and o["reason"] == "missing_field" and "'prompt'" in o["detail"]


def test_duplicate_message_ids():
    rows = list(iter_records([str(FIX / "messages_raw.jsonl")] * 2))
    out = convert_rows(oasst, settings(), rows)
    counts = account(out)
    assert counts["reasons"]["duplicate_id"] == 9
    assert counts["used"] + counts["rejected"] == 18


def test_combine_ignores_item_order():
    rows = list(iter_records([str(FIX / "messages_hub_a.jsonl"), str(FIX / "messages_hub_b.jsonl")]))
    s = settings(shape="messages")
    items = [i for row in rows for i in oasst.parse(row, s) if i["kind"] == "item" and i["group"] == "h1"]
    assert oasst.combine(items, s) == oasst.combine(items[::-1], s)


# ---------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_trees_rank():
    path = SHARED_DATA / "oasst" / "en_100_tree.jsonl"
    if not path.is_file():
        pytest.skip(f"real OASST sample not found at {path} (a fresh clone has no ../shared/data)")
    out = run(path)
    counts = account(out)
    assert count_messages(path) == 1167
    assert counts["used"] + counts["rejected"] == 1167
    # 207 prompter messages have >= 2 ranked, non-synthetic replies with distinct ranks.
    assert counts["pairs"] == 207
    assert counts["reasons"] == {"fewer_than_two_responses": 268, "middle_rank": 210,
                                 "missing_score": 46, "synthetic": 22}
    nested = account(run(SHARED_DATA / "oasst" / "en_100_message.jsonl"))
    assert nested == counts


# ---------------------------------------------------------------------------- detoxify scores

DETOX = FIX / "messages_detoxify.jsonl"  # raw export: labels {name: {value, count}} + detoxify
DETOX_HUB = FIX / "messages_detoxify_hub.jsonl"  # hub table: labels as parallel lists


def test_detoxify_label_raw_export():
    out = run(DETOX, label="detoxify.toxicity")
    (p,) = [o for o in out if o["kind"] == "pair"]
    # auto: lower is better; the paper's example score 0.00038284 is the least toxic reply
    assert p["provenance"] == ["d1-p1", "d1-a1", "d1-a2"] and p["label"] == "detoxify.toxicity"
    assert (p["chosen_score"], p["rejected_score"]) == (0.00038284, 0.91)
    assert p["quality"] == pytest.approx(0.91 - 0.00038284)
    assert p["chosen"].startswith("Thank the organiser") and p["prompt"] == "How do I politely decline a meeting invitation?"
    assert reasons(out) == {"d1-a3": "middle_rank", "d1-a4": "missing_detoxify"}  # d1-a4: detoxify null
    missing = next(o for o in out if o.get("record_id") == "d1-a4")
    assert missing["detail"] == "no Detoxify score 'toxicity'"
    # the human label of the same name is another score, with its own missing reason
    out = run(DETOX, label="toxicity")
    assert pairs_by_prompter(out)["d1-p1"]["rejected_score"] == 0.6
    assert reasons(out) == {"d1-a3": "middle_rank", "d1-a4": "missing_score"}
    p = pairs_by_prompter(run(DETOX, label="detoxify.insult", direction="higher"))["d1-p1"]
    assert p["provenance"] == ["d1-p1", "d1-a2", "d1-a1"] and (p["chosen_score"], p["rejected_score"]) == (0.87, 0.00021)


def test_detoxify_label_hub_form_jsonl_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    out = run(DETOX_HUB, label="detoxify.toxicity")
    p = pairs_by_prompter(out)["d2-p1"]
    assert p["provenance"] == ["d2-p1", "d2-a1", "d2-a2"] and (p["chosen_score"], p["rejected_score"]) == (0.0009, 0.05)
    assert reasons(out) == {"d2-a3": "missing_detoxify"}
    # the hub table as Parquet: detoxify a struct column, null for two messages
    rows = [json.loads(line) for line in DETOX_HUB.read_text().splitlines()]
    path = tmp_path / "oasst_validation.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = run(path, label="detoxify.toxicity")
    p = pairs_by_prompter(out)["d2-p1"]
    assert p["provenance"] == ["d2-p1", "d2-a1", "d2-a2"] and p["quality"] == pytest.approx(0.0491)
    assert reasons(out) == {"d2-a3": "missing_detoxify"}
    assert account(out)["used"] + account(out)["rejected"] == 4


def test_detoxify_value_and_label_names():
    scores = {"toxicity": 0.00038284, "insult": None}
    assert oasst.detoxify_value(scores, "toxicity") == 0.00038284
    assert oasst.detoxify_value(scores, "insult") is None
    assert oasst.detoxify_value(scores, "threat") is None
    assert oasst.detoxify_value(None, "toxicity") is None
    for bad in ([0.1], {"toxicity": "low"}):
        with pytest.raises(ValueError):
            oasst.detoxify_value(bad, "toxicity")
    raw = {"labels": {"spam": {"value": 0.0, "count": 3}, "quality": {"value": 0.9, "count": 3}},
           "detoxify": scores}
    assert oasst.label_names(raw) == ["spam", "quality", "detoxify.toxicity"]
    hub = {"labels": {"name": ["quality", "toxicity"], "value": [0.8, 0.0], "count": [3, 3]}, "detoxify": None}
    assert oasst.label_names(hub) == ["quality", "toxicity"]
    assert oasst.label_names({"labels": None, "detoxify": None}) == []


def test_bad_detoxify_value_is_a_reject():
    row = json.loads(DETOX.read_text().splitlines()[1])  # d1-a1
    row["detoxify"] = ["not", "an", "object"]
    out = convert_rows(oasst, settings(label="detoxify.toxicity"), [{"file": "x.jsonl", "line": 1, "text": json.dumps(row), "error": None}])
    assert [(o["record_id"], o["reason"], o["detail"]) for o in out] == [
        ("d1-a1", "wrong_type", "field 'detoxify' should be an object, got list")]


def test_unknown_detoxify_key_refused_by_settings():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="label 'detoxify.toxicty' is not a Detoxify score; one of: detoxify.toxicity,"):
        settings(label="detoxify.toxicty")
    assert settings(label="detoxify.sexual_explicit").label == "detoxify.sexual_explicit"


def test_check_counts_names_the_labels_present():
    s = settings(label="toxicty")
    counts = {"used": 3, "rejected": 1164, "labels": {"toxicity": 900, "helpfulness": 800, "detoxify.insult": 10}}
    with pytest.raises(InputError) as e:
        oasst.check_counts(s, counts)
    assert str(e.value) == (
        "source 'oasst': label 'toxicty' occurs in none of the 1,167 messages of unused; "
        "labels present: detoxify.insult, helpfulness, toxicity"
    )
    oasst.check_counts(settings(label="toxicity"), counts)  # present: no error
    oasst.check_counts(settings(label="rank"), {"used": 0, "rejected": 5, "labels": {}})  # rank: never checked
    oasst.check_counts(s, {"used": 0, "rejected": 0, "labels": {}})  # no messages: nothing to check
    with pytest.raises(InputError, match="labels present: none"):
        oasst.check_counts(settings(label="detoxify.toxicity"), {"used": 0, "rejected": 2, "labels": {}})


def test_real_export_excerpt_detoxify(shared_data):
    """The 2 real records of the 2023-04-12 messages export: a root prompt and its rank-0 reply."""
    path = shared_data / "oasst" / "oasst1_messages_excerpt_2records.jsonl"
    records = list(iter_records(str(path)))
    s = oasst.resolve(settings(label="detoxify.toxicity"), records[0]["text"])
    assert s.shape == "messages"
    items = {i["record_id"]: i["data"] for r in records for i in oasst.parse(r, s)}
    reply, root = items["c8e83833-ecbc-44fe-b6db-735228c25a1c"], items["6ab24d72-0181-4594-a9cd-deaf170242fb"]
    assert reply["score"] == 0.00026396565954200923 and root["score"] == 0.00044308538781479
    assert "detoxify.toxicity" in reply["label_names"] and "helpfulness" in reply["label_names"]
    assert len([n for n in reply["label_names"] if n.startswith("detoxify.")]) == 7
    # one scored reply is not a pair: both messages are rejects, accounted once each
    out = convert_rows(oasst, s, records)
    assert reasons(out) == {"6ab24d72-0181-4594-a9cd-deaf170242fb": "fewer_than_two_responses",
                            "c8e83833-ecbc-44fe-b6db-735228c25a1c": "fewer_than_two_responses"}
    human = [i["data"] for r in records for i in oasst.parse(r, settings(label="toxicity", shape="messages"))]
    assert [d["score"] for d in human] == [0.16666666666666666, 0.375]
