from hetray.unify.sources import winogrande
from hetray.unify.sources.base import account, convert_rows
from hetray.unify.sources.readers import iter_records

from conftest import FIXTURES

S = winogrande.Settings(name="wg", path="x")


def test_pairs_and_rejects_on_fixture():
    out = convert_rows(winogrande, S, iter_records(FIXTURES / "winogrande" / "dev.jsonl"))
    pairs = [o for o in out if o["kind"] == "pair"]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Anna", "Bella"), ("ice", "snow"), ("Carl", "Dave"), ("pot", "pan")
    ]
    assert pairs[0]["prompt"] == "Anna helped Bella move because _ had a truck."
    assert all(p["quality"] is None and p["source"] == "wg" for p in pairs)
    assert pairs[0]["provenance"] == ["fx-1"]
    reasons = {o["record_id"]: o["reason"] for o in out if o["kind"] == "reject"}
    assert reasons["fx-test"] == "no_answer"
    assert reasons["fx-bad-answer"] == "bad_answer"
    assert reasons["fx-no-blank"] == "no_blank"
    assert reasons["fx-empty"] == "empty_field"
    assert reasons["fx-type"] == "wrong_type"
    by_reason = account(out)["reasons"]
    assert by_reason["malformed_json"] == 2  # the truncated line and the JSON array
    assert by_reason["invalid_utf8"] == 1


def test_every_record_accounted():
    records = list(iter_records(FIXTURES / "winogrande" / "dev.jsonl"))
    c = account(convert_rows(winogrande, S, records))
    assert len(records) == 12  # non-blank lines of the fixture
    assert c["used"] + c["rejected"] == len(records)
    assert c["pairs"] == 4


def test_reject_details_name_the_field():
    out = convert_rows(winogrande, S, iter_records(FIXTURES / "winogrande" / "dev.jsonl"))
    details = {o["record_id"]: o["detail"] for o in out if o["kind"] == "reject"}
    assert "option1" in details["fx-type"]
    assert "sentence" in details["fx-empty"]
