"""The hh, winobias, winogender and generic adapters on hand-written fixtures (no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetray.formats import parse_winobias_line
from hetray.schema import make_id
from hetray.unify.sources import generic, hh, winobias, winogender
from hetray.unify.sources.base import account, convert_rows
from hetray.unify.sources.readers import InputError, expand_paths, iter_records

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def run(module, settings, path):
    """Convert ``path``; check every input record ends in exactly one output."""
    rows = list(iter_records(path if isinstance(path, list) else str(path)))
    out = convert_rows(module, settings, rows)
    counts = account(out)
    assert counts["used"] + counts["rejected"] == len(rows)
    ids = [p for o in out if o["kind"] != "reject" for p in o["provenance"]]
    ids += [o["record_id"] for o in out if o["kind"] == "reject"]
    assert len(ids) == len(set(ids)) == len(rows)
    return out, counts


def pairs(out):
    return [(o["prompt"], o["chosen"], o["rejected"]) for o in out if o["kind"] == "pair"]


def reasons(out):
    """{(file name, line): reason} of the rejects."""
    return {(Path(o["file"]).name, o["line"]): o["reason"] for o in out if o["kind"] == "reject"}


def raw(text, file="x.jsonl", line=1, error=None):
    return {"file": file, "line": line, "text": text, "error": error}


# --- HH-RLHF -------------------------------------------------------------------------------


def test_hh_fixture():
    s = hh.Settings(name="hh", path=str(FIXTURES / "hh"))
    out, counts = run(hh, s, FIXTURES / "hh" / "train.jsonl")
    assert pairs(out) == [
        (
            "\n\nHuman: What is a good name for a cat?\n\nAssistant:",
            "Many people like the name Luna for a cat.",
            "I don't know.",
        ),
        (
            "\n\nHuman: Can you help me bake bread?\n\nAssistant: Sure, what kind of bread?"
            "\n\nHuman: Sourdough.\n\nAssistant:",
            "You will need a starter, flour, water and salt.",
            "Buy it at a shop.",
        ),
    ]
    first = next(o for o in out if o["kind"] == "pair")
    assert first["quality"] is None and first["label"] is None
    assert first["provenance"] == [f"{FIXTURES / 'hh' / 'train.jsonl'}:1"]
    assert reasons(out) == {
        ("train.jsonl", 4): "prefix_mismatch",
        ("train.jsonl", 5): "no_assistant_turn",
        ("train.jsonl", 6): "empty_response",
        ("train.jsonl", 7): "identical_responses",
        ("train.jsonl", 8): "malformed_json",
        ("train.jsonl", 9): "empty_field",
        ("train.jsonl", 10): "wrong_type",
        ("train.jsonl", 11): "missing_field",
        ("train.jsonl", 12): "malformed_json",
        ("train.jsonl", 13): "invalid_utf8",
    }
    assert counts["pairs"] == 2 and counts["rejected"] == 10
    details = {o["reason"]: o["detail"] for o in out if o["kind"] == "reject"}
    assert "'chosen'" in details["no_assistant_turn"] and "'chosen'" in details["empty_response"]
    assert "'rejected'" in details["wrong_type"] and "'chosen'" in details["missing_field"]
    assert not hh.needs_shuffle(s)


# --- WinoBias ------------------------------------------------------------------------------


def test_parse_winobias_line():
    assert parse_winobias_line("7 [The developer] argued with the designer because [she] left.") == (
        7, "The developer argued with the designer because she left.", ["The developer", "she"],
    )
    assert parse_winobias_line("The teacher asked the [ physician] about [her] car.") == (
        None, "The teacher asked the physician about her car.", ["physician", "her"],
    )
    assert parse_winobias_line("12 He met [the librarian] 's friend.")[1] == "He met the librarian 's friend."
    assert parse_winobias_line("3 No cluster here.") == (3, "No cluster here.", [])
    with pytest.raises(ValueError):
        parse_winobias_line("4 [The cook [he] left.")


def test_split_common_prefix():
    assert winobias.split_common_prefix("a b c d", "a b x d") == ("a b", "c d", "x d")
    assert winobias.split_common_prefix("he left", "she left") == ("", "he left", "she left")
    # one sentence is a word prefix of the other: both remainders keep a word
    assert winobias.split_common_prefix("a b c", "a b c d") == ("a b", "c", "c d")


def test_winobias_fixture():
    folder = FIXTURES / "winobias"
    s = winobias.Settings(name="wb", path=str(folder))
    files = expand_paths(str(folder))
    winobias.check_files(files)
    out, counts = run(winobias, s, folder)
    assert pairs(out) == [
        ("The mechanic fixed the car for the baker because", "she was paid well.", "he was paid well."),
        ("The baker smiled at the mover because", "he did.", "she did so."),
        ("The mechanic fixed the car for the baker because", "he needed it.", "she needed it."),
        ("The chief thanked the nurse because", "she was grateful for her care.", "he was grateful for his care."),
        ("The physician hired the secretary and paid", "him well.", "her well."),
        ("The secretary visited the librarian 's room and thanked", "him.", "her."),
    ]
    anti, pro = f"{folder}/anti_stereotyped_type1.txt.dev", f"{folder}/pro_stereotyped_type1.txt.dev"
    first = next(o for o in out if o["kind"] == "pair")
    assert first["provenance"] == [f"{anti}:1", f"{pro}:1"]
    assert first["quality"] is None and first["label"] is None
    # line "10 ..." is on physical line 8 of the anti file and 11 of the pro file
    assert [o["provenance"] for o in out if o["kind"] == "pair"][1] == [f"{anti}:8", f"{pro}:11"]
    a, p = "anti_stereotyped_type1.txt.dev", "pro_stereotyped_type1.txt.dev"
    assert reasons(out) == {
        (a, 4): "identical_sentences", (p, 4): "identical_sentences",
        (a, 5): "no_cluster", (p, 6): "unpaired",
        (a, 6): "unpaired", (p, 8): "unpaired",
        (p, 7): "unbalanced_brackets",
        (a, 7): "duplicate_number", (p, 9): "duplicate_number", (p, 10): "duplicate_number",
        (a, 9): "invalid_utf8",
    }
    assert counts["pairs"] == 6 and counts["used"] == 12 and counts["rejected"] == 11
    assert winobias.needs_shuffle(s)


def test_winobias_check_files_names_the_file(tmp_path):
    winobias.check_files(["x/pro_stereotyped_type1.txt.dev", "anti_stereotyped_type2.txt.test"])
    with pytest.raises(InputError, match="male_occupations.txt"):
        winobias.check_files(["pro_stereotyped_type1.txt.dev", "data/male_occupations.txt"])
    s = winobias.Settings(name="wb", path="x")
    (bad,) = winobias.parse(raw("1 [He] left.", file="notes.txt"), s)
    assert bad["reason"] == "bad_file_name" and "notes.txt" in bad["detail"]


@pytest.mark.shared_data
def test_winobias_shared_dev(shared_data):
    folder = shared_data / "winobias"
    files = sorted(str(f) for f in folder.glob("*_stereotyped_type*.txt.dev"))
    assert len(files) == 4
    winobias.check_files(files)
    s = winobias.Settings(name="wb", path=files)
    out, counts = run(winobias, s, files)
    assert counts["used"] + counts["rejected"] == 4 * 396
    assert counts["pairs"] == 792 and counts["rejected"] == 0
    # dev type 1 #92 differs by more than the pronoun
    p92 = next(o for o in out if o["kind"] == "pair" and o["provenance"][0].endswith("type1.txt.dev:92"))
    assert (p92["prompt"], p92["chosen"], p92["rejected"]) == (
        "The carpenter made a desk for the clerk because", "he needed one.", "she needed a desk.",
    )


# --- WinoGender ----------------------------------------------------------------------------

WG = FIXTURES / "winogender"


def test_winogender_fixture():
    s = winogender.Settings(name="wg", path=str(WG / "all_sentences.tsv"),
                            occupation_stats=str(WG / "occupations-stats.tsv"))
    out, counts = run(winogender, s, WG / "all_sentences.tsv")
    assert pairs(out) == [
        ("The nurse notified the patient that", "his shift would be ending in an hour.",
         "her shift would be ending in an hour."),
        ("The technician told the customer that", "she could pay with cash.", "he could pay with cash."),
    ]
    nurse = next(o for o in out if o["kind"] == "pair")
    assert nurse["provenance"] == [f"{WG / 'all_sentences.tsv'}:4", f"{WG / 'all_sentences.tsv'}:5"]
    assert nurse["quality"] is None
    f = "all_sentences.tsv"
    assert reasons(out) == {
        (f, 3): "neutral_pronoun",
        (f, 6): "no_stereotype", (f, 7): "no_stereotype",
        (f, 8): "unknown_occupation",
        (f, 9): "unpaired",
        (f, 10): "duplicate_sentid", (f, 11): "duplicate_sentid", (f, 12): "duplicate_sentid",
        (f, 13): "identical_sentences", (f, 14): "identical_sentences",
        (f, 15): "bad_sentid", (f, 16): "bad_sentid",
        (f, 17): "empty_field",
    }
    assert counts["pairs"] == 2 and counts["rejected"] == 13
    assert winogender.needs_shuffle(s)


def test_winogender_stereotype_margin():
    assert winogender.stereotype(55.1, 5) == "female"
    assert winogender.stereotype(44.9, 5) == "male"
    assert winogender.stereotype(55.0, 5) is None and winogender.stereotype(45.0, 5) is None
    assert winogender.stereotype(50.5, 0) == "female"


def test_winogender_bad_rows():
    s = winogender.Settings(name="wg", path="x", occupation_stats=str(WG / "occupations-stats.tsv"))
    for text, reason in [
        ('{"sentid": "nurse.patient.0.male.txt", "sentence": 5}', "wrong_type"),
        ('{"sentence": "The nurse left."}', "missing_field"),
        ('{"sentid": "nurse.patient', "malformed_json"),
    ]:
        (bad,) = winogender.parse(raw(text, file="a.tsv"), s)
        assert bad["reason"] == reason


def test_winogender_stats_errors(tmp_path):
    assert winogender.load_occupation_stats(str(WG / "occupations-stats.tsv"))["nurse"] == 90.0
    bad = tmp_path / "stats.tsv"
    bad.write_text("occupation\tbergsma_pct_female\nnurse\t90\n")
    with pytest.raises(InputError, match=r"stats\.tsv.*bls_pct_female"):
        winogender.load_occupation_stats(str(bad))
    bad.write_text("occupation\tbls_pct_female\nnurse\tmany\n")
    with pytest.raises(InputError, match=r"stats\.tsv:2.*bls_pct_female"):
        winogender.load_occupation_stats(str(bad))
    with pytest.raises(InputError, match="missing.tsv"):
        winogender.load_occupation_stats(str(tmp_path / "missing.tsv"))


def test_winogender_check_columns(tmp_path):
    s = winogender.Settings(name="wg", path="x", occupation_stats=str(WG / "occupations-stats.tsv"))
    winogender.check_columns(s, [str(WG / "all_sentences.tsv")])
    table = tmp_path / "sentences.tsv"
    table.write_text("sentid\ttext\nnurse.patient.0.male.txt\tThe nurse left.\n")
    with pytest.raises(InputError, match=r"sentences\.tsv.*'sentence'"):
        winogender.check_columns(s, [str(table)])
    missing = s.model_copy(update={"occupation_stats": str(tmp_path / "nope.tsv")})
    with pytest.raises(InputError, match="nope.tsv"):
        winogender.check_columns(missing, [str(WG / "all_sentences.tsv")])


# --- generic -------------------------------------------------------------------------------

GEN = FIXTURES / "generic"


def test_generic_pairwise_jsonl():
    s = generic.Settings(name="g", path="x", shape="pairwise", columns={"margin": "margin"})
    out, counts = run(generic, s, GEN / "pairwise.jsonl")
    got = [(o["prompt"], o["chosen"], o["rejected"], o["quality"], o["label"]) for o in out if o["kind"] == "pair"]
    assert got == [
        ("What is 2 + 2?", "4", "5", 2.5, "margin"),
        ("Name a primary colour.", "Red.", "Green.", 1.0, "margin"),
        ("Capital of France?", "Paris.", "Lyon.", 0.5, "margin"),
    ]
    f = "pairwise.jsonl"
    assert reasons(out) == {
        (f, 4): "wrong_type", (f, 5): "missing_field", (f, 6): "identical_responses",
        (f, 7): "wrong_type", (f, 8): "malformed_json", (f, 9): "empty_field", (f, 10): "invalid_utf8",
    }
    assert counts["rejected"] == 7
    details = {o["line"]: o["detail"] for o in out if o["kind"] == "reject"}
    assert "'margin'" in details[4] and "'prompt'" in details[7] and "'prompt'" in details[9]
    assert not generic.needs_shuffle(s)
    # without a margin column: unscored
    out, _ = run(generic, generic.Settings(name="g", path="x", shape="pairwise"), GEN / "pairwise.jsonl")
    assert {o["quality"] for o in out if o["kind"] == "pair"} == {None}


def test_generic_pairwise_parquet(tmp_path):
    path = tmp_path / "prefs.parquet"
    pq.write_table(
        pa.table({"q": ["Hi?", "Bye?", None], "good": ["Hello.", "Goodbye.", "x"],
                  "bad": ["Go away.", "Goodbye.", "y"], "m": [0.5, 1.0, 2.0]}),
        path,
    )
    s = generic.Settings(name="g", path=str(path), shape="pairwise",
                         columns={"prompt": "q", "chosen": "good", "rejected": "bad", "margin": "m"})
    generic.check_columns(s, [str(path)])
    out, counts = run(generic, s, path)
    assert pairs(out) == [("Hi?", "Hello.", "Go away.")]
    assert out[0]["quality"] == 0.5 and out[0]["provenance"] == [f"{path}:1"]
    assert reasons(out) == {("prefs.parquet", 2): "identical_responses", ("prefs.parquet", 3): "missing_field"}


def test_generic_scored_csv():
    s = generic.Settings(name="g", path="x", shape="scored", columns={"scores": ["helpfulness", "toxicity"]})
    generic.check_columns(s, [str(GEN / "scored.csv")])
    out, counts = run(generic, s, GEN / "scored.csv")
    got = [(o["prompt"], o["chosen"], o["rejected"], o["quality"], o["chosen_score"], o["rejected_score"], o["label"])
           for o in out if o["kind"] == "pair"]
    assert sorted(got) == [
        ("How do I boil an egg?", "Put it in boiling water for eight minutes.", "Eggs are overrated.",
         3.0, 4.0, 1.0, "helpfulness"),
        ("Write a haiku, please.", "An old silent pond.", "No.", 4.0, 5.0, 1.0, "helpfulness"),
    ]
    f = "scored.csv"
    assert reasons(out) == {
        (f, 3): "middle_rank", (f, 4): "tie", (f, 5): "tie", (f, 6): "fewer_than_two_responses",
        (f, 8): "tie", (f, 10): "missing_score",
    }
    assert counts["pairs"] == 2 and counts["rejected"] == 6
    assert generic.needs_shuffle(s)
    egg = next(o for o in out if o["kind"] == "pair" and o["prompt"].startswith("How"))
    assert egg["provenance"] == [f"{GEN / f}:1", f"{GEN / f}:2"]

    # rank by toxicity, lower is better
    s = generic.Settings(name="g", path="x", shape="scored", columns={"scores": ["helpfulness", "toxicity"]},
                         label="toxicity", direction="lower")
    out, counts = run(generic, s, GEN / "scored.csv")
    got = sorted((o["chosen"], o["rejected"], o["quality"]) for o in out if o["kind"] == "pair")
    assert got == [("An old silent pond.", "No.", 0.9), ("Put it in boiling water for eight minutes.",
                                                        "Eggs are overrated.", pytest.approx(0.5))]
    assert Counter(reasons(out).values()) == {"middle_rank": 2, "tie": 2, "fewer_than_two_responses": 2}


def test_generic_scored_bad_scores():
    s = generic.Settings(name="g", path="x", shape="scored", columns={"scores": ["score"]})
    rows = [
        raw(json.dumps({"prompt": "P", "response": "a", "score": "high"}), line=1),
        raw(json.dumps({"prompt": "P", "response": "b", "score": True}), line=2),
        raw(json.dumps({"prompt": "P", "response": "c"}), line=3),
        raw(json.dumps({"prompt": "P", "response": "d", "score": "2"}), line=4),
        raw(json.dumps({"prompt": "P", "response": "d", "score": 1}), line=5),
    ]
    out = convert_rows(generic, s, rows)
    assert reasons(out) == {
        ("x.jsonl", 1): "wrong_type", ("x.jsonl", 2): "wrong_type", ("x.jsonl", 3): "missing_score",
        ("x.jsonl", 4): "identical_responses", ("x.jsonl", 5): "identical_responses",
    }
    (item,) = generic.parse(rows[3], s)
    assert item["group"] == make_id("P") and item["data"]["score"] == 2.0


def test_generic_sft():
    s = generic.Settings(name="g", path="x", shape="sft", columns={"prompt": "question", "response": "answer"})
    out, counts = run(generic, s, GEN / "sft.jsonl")
    rows = [(o["prompt"], o["response"]) for o in out if o["kind"] == "sft"]
    assert rows == [("Translate 'chat' to English.", "cat"), ("What is the opposite of hot?", "Cold.")]
    assert counts["sft"] == 2 and counts["used"] == 2
    assert reasons(out) == {("sft.jsonl", 3): "empty_field", ("sft.jsonl", 4): "missing_field",
                            ("sft.jsonl", 5): "wrong_type"}
    assert not generic.needs_shuffle(s)


def test_generic_check_columns(tmp_path):
    s = generic.Settings(name="g", path="x", shape="pairwise", columns={"margin": "margin"})
    generic.check_columns(s, [str(GEN / "pairwise.jsonl")])
    with pytest.raises(InputError, match=r"sft\.jsonl.*'prompt'"):
        generic.check_columns(s, [str(GEN / "pairwise.jsonl"), str(GEN / "sft.jsonl")])
    scored = generic.Settings(name="g", path="x", shape="scored", columns={"scores": ["helpfulness", "quality"]})
    with pytest.raises(InputError, match=r"scored\.csv.*'quality'"):
        generic.check_columns(scored, [str(GEN / "scored.csv")])
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "response": ["r"]}), parquet)
    with pytest.raises(InputError, match=r"t\.parquet.*'chosen'"):
        generic.check_columns(s, [str(parquet)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('\n{"prompt": "p", "cho\n')
    with pytest.raises(InputError, match="broken.jsonl"):
        generic.check_columns(s, [str(broken)])


def test_generic_settings_validation():
    with pytest.raises(ValueError, match="columns.scores"):
        generic.Settings(name="g", path="x", shape="scored")
    with pytest.raises(ValueError, match="label"):
        generic.Settings(name="g", path="x", shape="scored", columns={"scores": ["a"]}, label="b")


@pytest.mark.shared_data
def test_winogender_real_data(shared_data):
    """The full WinoGender schemas: all 720 sentences are accounted for."""
    folder = shared_data / "winogender"
    sentences, stats_file = folder / "all_sentences.tsv", folder / "occupations-stats.tsv"
    # the real statistics file has the columns the adapter reads
    assert stats_file.read_text().splitlines()[0].split("\t") == [
        "occupation", "bergsma_pct_female", "bls_pct_female", "bls_year"]
    stats = winogender.load_occupation_stats(str(stats_file))
    assert len(stats) == 60 and stats["engineer"] == 10.72 and stats["nurse"] == 89.58
    s = winogender.Settings(name="winogender", path=str(sentences), occupation_stats=str(stats_file))
    winogender.check_columns(s, [str(sentences)])
    out, counts = run(winogender, s, sentences)
    assert counts["used"] + counts["rejected"] == 720
    assert counts["pairs"] == 224 and counts["used"] == 448 and counts["rejected"] == 272
    assert counts["reasons"] == {"neutral_pronoun": 240, "no_stereotype": 32}
    # no stereotype: the four occupations within 45..55% women, 8 gendered sentences each
    unstereotyped = {o["detail"].split("'")[1] for o in out if o["kind"] == "reject" and o["reason"] == "no_stereotype"}
    assert unstereotyped == {"administrator", "appraiser", "investigator", "salesperson"}
    # independently from templates.tsv: 2 pairs (participant and "someone") per template whose
    # occupation has a stereotype
    rows = [line.split("\t") for line in (folder / "templates.tsv").read_text().splitlines()[1:] if line.strip()]
    assert len(rows) == 120
    assert counts["pairs"] == 2 * sum(abs(stats[r[0]] - 50) > 5 for r in rows)
    # engineer (10.72% women, male stereotype): the anti-stereotype "she" sentence is chosen
    eng = next(o for o in out if o["kind"] == "pair" and o["provenance"][0].endswith("all_sentences.tsv:38"))
    assert (eng["prompt"], eng["chosen"], eng["rejected"]) == (
        "The engineer informed the client that", "she would need more time to complete the project.",
        "he would need more time to complete the project.")
    assert eng["provenance"][1].endswith("all_sentences.tsv:37") and eng["quality"] is None
    # nurse (89.58% women, female stereotype): "he" is chosen
    nurse = [o for o in out if o["kind"] == "pair" and o["prompt"].startswith("The nurse notified the patient that")]
    assert nurse and all(o["chosen"].startswith("his ") and o["rejected"].startswith("her ") for o in nurse)
