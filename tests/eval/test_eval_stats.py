"""Telling an effect from noise: bootstrap CIs, paired differences, changed answers, strict and
lenient accuracy, the WinoGrande held-out split, the data files a suite reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hetray.eval import metrics, stats, winobias, winogrande
from hetray.eval.config import EvalConfig
from hetray.eval.report import write_report
from hetray.eval.run import EvalError, baseline_of, run_eval
from hetray.eval.suites import SUITES
from hetray.eval.winogrande import WinoGrandeError
from hetray.models import resolve_sample
from hetray.pairs import holdout

from conftest import FIXTURES

WINOBIAS = SUITES["winobias"]
FLOATS = ("bias", "bias_signed", "bias_cluster", "bias_cluster_signed", "bias_entropy", "accuracy",
          "accuracy_pro", "accuracy_anti", "similarity", "accuracy_strict", "accuracy_lenient")


def pair_records(n: int, seed: int = 0) -> list[dict]:
    """n WinoBias-shaped records with random log-probs and outcomes (both readings)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        r = {"group": "type1/dev", "n": i, "irregular": False, "kl": rng.random() * 0.2}
        for side in ("pro", "anti"):
            strict = rng.random() < 0.4
            lenient = strict or rng.random() < 0.3
            r.update({f"logp_referent_{side}": -3 * rng.random(), f"logp_cluster_{side}": -10 * rng.random(),
                      f"correct_strict_{side}": strict, f"correct_lenient_{side}": lenient,
                      f"correct_{side}": strict, f"generation_{side}": "the nurse" if strict else "she"})
        out.append(r)
    return out


# ---------------------------------------------------------------------------- confidence intervals


def test_ci_contains_the_point_and_shrinks_with_more_items():
    few = pair_records(50)
    many = [dict(r, n=k * 50 + r["n"]) for k in range(16) for r in few]  # the same per-pair distribution, n = 800
    small, large = (stats.Resampled(WINOBIAS.aggregate, recs, 1000, 0) for recs in (few, many))
    assert small.point == pytest.approx({**large.point, "pairs": 50, "irregular_pairs": 0})
    ci_small, ci_large = stats.intervals(small, 0.95), stats.intervals(large, 0.95)
    assert set(ci_small) == set(FLOATS)  # counts (pairs, irregular_pairs) get none
    for key in FLOATS:
        (lo, hi), (lo2, hi2) = ci_small[key], ci_large[key]
        assert lo <= small.point[key] <= hi and lo2 <= large.point[key] <= hi2, key
        assert 0 < hi2 - lo2 < (hi - lo) / 2.5, key  # 16x the items: about a quarter of the width
    # an accuracy CI over 800 sentences pairs is a few points wide, not degenerate
    assert 0.02 < ci_large["accuracy"][1] - ci_large["accuracy"][0] < 0.1
    # a 90% interval is narrower than the 95% one, from the same resamples
    lo90, hi90 = stats.interval(large.samples["bias"], 0.90)
    assert ci_large["bias"][0] < lo90 < hi90 < ci_large["bias"][1]


def test_fast_path_equals_recomputing_aggregate_on_each_resample():
    recs = pair_records(30, seed=3)
    res = stats.Resampled(WINOBIAS.aggregate, recs, 200, seed=7)
    rows = next(stats.index_chunks(30, 200, 7))
    for b in (0, 1, 99, 199):
        again = WINOBIAS.aggregate([recs[i] for i in rows[b]])
        for key in FLOATS:
            assert res.samples[key][b] == pytest.approx(again[key], abs=1e-12), (b, key)
    # the same seed draws the same resamples; another seed others
    assert (stats.Resampled(WINOBIAS.aggregate, recs, 200, 7).samples["bias"] == res.samples["bias"]).all()
    assert (stats.Resampled(WINOBIAS.aggregate, recs, 200, 8).samples["bias"] != res.samples["bias"]).any()


def test_any_statistic_gets_an_interval_through_its_aggregate():
    """A median is not a mean of one-item values: it is recomputed on every resampled list."""
    values = [float(v) for v in range(1, 42)]

    def median(records):
        xs = sorted(r["x"] for r in records)
        return {"median": xs[len(xs) // 2], "mean": sum(xs) / len(xs), "n": len(xs)}

    res = stats.Resampled(median, [{"x": v} for v in values], 300, 0)
    assert set(res.samples) == {"median", "mean"} and len(res.samples["median"]) == 300
    rows = next(stats.index_chunks(41, 300, 0))
    assert res.samples["median"][5] == median([{"x": values[i]} for i in rows[5]])["median"]
    lo, hi = stats.intervals(res, 0.95)["median"]
    assert lo < 21.0 < hi and hi - lo < 20
    assert all(v in values for v in res.samples["median"])  # a median of draws is a drawn value


def test_no_resamples_no_intervals():
    res = stats.Resampled(WINOBIAS.aggregate, pair_records(10), 0, 0)
    assert stats.intervals(res, 0.95) == {} and res.point["pairs"] == 10
    assert stats.with_intervals({"bias": 0.5, "pairs": 3}, {}) == {"bias": 0.5, "pairs": 3}
    d = stats.paired(res, stats.Resampled(WINOBIAS.aggregate, pair_records(10, 1), 0, 0), 0.95)
    assert d["bias"]["ci"] is None and d["bias"]["excludes_zero"] is False


def test_intervals_sit_right_after_their_metric():
    out = stats.with_intervals({"accuracy": 0.5, "items": 8, "margin": 0.1},
                               {"accuracy": [0.25, 0.75], "margin": [0.0, 0.2]})
    assert list(out) == ["accuracy", "accuracy_ci", "items", "margin", "margin_ci"]
    assert out["accuracy_ci"] == [0.25, 0.75]


# ---------------------------------------------------------------------------- paired differences


def test_a_model_against_itself_differs_by_exactly_zero():
    recs = pair_records(792)
    a = stats.Resampled(WINOBIAS.aggregate, recs, 1000, 0)
    b = stats.Resampled(WINOBIAS.aggregate, [dict(r) for r in recs], 1000, 0)
    for res in (a, b):
        d = stats.paired(a, res, 0.95)
        assert set(d) == set(FLOATS)
        for key, v in d.items():
            assert v == {"diff": 0.0, "ci": [0.0, 0.0], "excludes_zero": False}, key
    assert stats.changed_answers(recs, recs, WINOBIAS.answers) == {"overall": 0.0, "pro": 0.0, "anti": 0.0}


def test_a_real_shift_excludes_zero_and_noise_does_not():
    base = pair_records(200)
    shifted = [dict(r, logp_referent_pro=r["logp_referent_pro"] - 0.5) for r in base]  # pro side surer of nothing
    for r in shifted[:3]:  # three flipped outcomes: a small accuracy change
        r["correct_pro"] = not r["correct_pro"]
    a, b = (stats.Resampled(WINOBIAS.aggregate, recs, 1000, 0) for recs in (shifted, base))
    d = stats.paired(a, b, 0.95)
    assert d["bias_signed"]["diff"] == pytest.approx(-0.5) and d["bias_signed"]["ci"] == pytest.approx([-0.5, -0.5])
    assert d["bias_signed"]["excludes_zero"] is True
    assert d["accuracy"]["diff"] == pytest.approx(a.point["accuracy"] - b.point["accuracy"])
    lo, hi = d["accuracy"]["ci"]
    assert lo <= 0 <= hi and d["accuracy"]["excludes_zero"] is False
    assert d["bias_entropy"] == {"diff": 0.0, "ci": [0.0, 0.0], "excludes_zero": False}  # kl untouched
    # unpaired resamples are refused
    with pytest.raises(ValueError, match="not paired"):
        stats.paired(a, stats.Resampled(WINOBIAS.aggregate, base[:100], 1000, 0), 0.95)


def test_changed_answers_per_side_and_overall():
    base = [{"generation_pro": g, "generation_anti": h} for g, h in
            [("the nurse", "she"), ("the doctor", "the doctor"), ("he", "the nurse"), ("", "x")]]
    new = [{"generation_pro": g, "generation_anti": h} for g, h in
           [("the nurse", "he"), ("the doctor.", "the doctor"), ("he", "The nurse"), ("", "x")]]
    out = stats.changed_answers(new, base, WINOBIAS.answers)
    assert out == {"overall": 3 / 8, "pro": 1 / 4, "anti": 2 / 4}
    assert SUITES["winogender"].answers == (("male", "generation_male"), ("female", "generation_female"))


def test_baseline_is_base_then_the_first_model_or_the_setting():
    assert baseline_of({"sft": "a", "base": "b"}, None) == "base"
    assert baseline_of({"sft": "a", "ppo": "b"}, None) == "sft"
    assert baseline_of({"sft": "a", "base": "b"}, "sft") == "sft"
    with pytest.raises(EvalError, match="eval.baseline 'nope' is not one of the evaluated models"):
        baseline_of({"sft": "a"}, "nope")


# ---------------------------------------------------------------------------- strict and lenient accuracy


@pytest.mark.parametrize("generation, referent, strict, lenient", [
    ("the nurse", "the nurse", True, True),
    ("\n- The Nurse, who", "the nurse", True, True),
    ("It was the nurse.", "the nurse", False, True),
    ("the doctor and the nurse", "the nurse", False, True),  # names both: lenient only
    ("The person is the NURSE", "the nurse", False, True),
    ("the nurse's wife", "the nurse", False, False),  # a possessive names someone else
    ("the doctor's nurse", "the nurse", False, True),
    ("the doctor", "the nurse", False, False),
    ("nurses", "the nurse", False, False),  # whole words only
    ("The doctor. The nurse", "the nurse", False, False),  # the answer ends at the first '.'
    ("a worker", "the construction worker", False, True),  # the head noun is the last word
    ("the construction worker", "the construction worker", True, True),
    ("Someone", "someone", True, True),
    ("", "the nurse", False, False),
])
def test_strict_and_lenient_readings(generation, referent, strict, lenient):
    assert metrics.names_referent(generation, referent) is strict
    assert metrics.mentions_referent(generation, referent) is lenient
    assert lenient >= strict


class AnswerStub:
    """The Scorer calls score_pairs makes, with fixed log-probs and crafted generations."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def score(self, prompts, continuations):
        return [[-1.0, -2.0, -0.5]] * len(prompts), torch.log_softmax(torch.zeros(len(prompts), 4), -1)

    def continuation_token_ids(self, prompt, text):
        return [7]  # the article is one token

    def generate(self, prompts, max_new_tokens, stop_when=None):
        return [self.answers[p] for p in prompts]


@pytest.mark.parametrize("reading", ["strict", "lenient"])
def test_the_accuracy_setting_picks_the_reading_and_both_are_reported(reading):
    cfg = EvalConfig(winobias={"path": "sample:winobias", "types": [1], "limit": 4}, accuracy=reading)
    pairs = WINOBIAS.load(cfg, None)
    strict, lenient_only, possessive, nobody = "the {}", "It was the {}.", "the {}'s idea", "nobody"
    crafted = [(strict, lenient_only), (lenient_only, lenient_only), (possessive, nobody), (nobody, strict)]
    answers = {}
    for p, (pro, anti) in zip(pairs, crafted):
        noun = p["referent_pro"].split(" ", 1)[1]
        answers[p["prompt_pro"].rstrip(" ")] = pro.format(noun)
        answers[p["prompt_anti"].rstrip(" ")] = anti.format(noun)
    records = WINOBIAS.score(AnswerStub(answers), pairs, cfg)
    o = WINOBIAS.aggregate(records)
    # strict: pro T F F F, anti F F F T; lenient: pro T T F F, anti T T F T
    assert (o["accuracy_strict"], o["accuracy_lenient"]) == (2 / 8, 5 / 8)
    assert o["accuracy"] == o[f"accuracy_{reading}"]
    assert o["similarity"] == {"strict": 0.5, "lenient": 0.75}[reading]  # similarity follows the reading
    assert [r["correct_pro"] for r in records] == [r[f"correct_{reading}_pro"] for r in records]
    assert [r["correct_lenient_pro"] for r in records] == [True, True, False, False]
    assert [r["correct_strict_anti"] for r in records] == [False, False, False, True]
    assert all(r[f"correct_lenient_{s}"] >= r[f"correct_strict_{s}"] for r in records for s in ("pro", "anti"))


# ---------------------------------------------------------------------------- the report


def test_report_shows_cis_and_marks_differences_that_exclude_zero(tmp_path):
    base = pair_records(200)
    shifted = [dict(r, logp_referent_pro=r["logp_referent_pro"] - 0.5) for r in base]
    for r in shifted[:3]:
        r["correct_pro"] = not r["correct_pro"]
    shifted[0]["generation_pro"] = "changed"
    res = {m: stats.Resampled(WINOBIAS.aggregate, recs, 1000, 0) for m, recs in (("base", base), ("sft", shifted))}
    metrics_by_model = {m: {"winobias": stats.with_intervals(r.point, stats.intervals(r, 0.95))}
                        for m, r in res.items()}
    diff = stats.paired(res["sft"], res["base"], 0.95)
    paired = {"sft": {"winobias": {"items": 200, "metrics": diff,
                                   "changed_answers": stats.changed_answers(shifted, base, WINOBIAS.answers)}}}
    bootstrap = {"resamples": 1000, "confidence": 0.95, "seed": 0, "baseline": "base"}
    write_report(metrics_by_model, tmp_path, paired=paired, bootstrap=bootstrap)
    md = (tmp_path / "report.md").read_text()
    assert "95% confidence intervals, percentile bootstrap over the items of each suite (1000 resamples" in md

    table = md.split("## Table 1: gender bias on WinoBias", 1)[1].split("\n### ", 1)[0]
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
                              if line.startswith("|"))}
    header = rows["model"]
    lo, hi = metrics_by_model["base"]["winobias"]["accuracy_ci"]
    acc = metrics_by_model["base"]["winobias"]["accuracy"]
    cell = rows["base"][header.index("Accuracy")].strip("*")
    assert cell == f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"
    assert "Accuracy (strict)" in header and "Accuracy (lenient)" in header

    section = md.split("### Table 1: gender bias on WinoBias: difference from base", 1)[1].split("\n## ", 1)[0]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    header, sft = lines[0], lines[2]
    assert sft[0] == "sft" and header[-3:] == ["answers changed (overall)", "answers changed (pro)",
                                              "answers changed (anti)"]
    bias_cell = sft[header.index("Bias")]
    d = diff["bias"]
    assert d["excludes_zero"] and bias_cell == f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]*"
    acc_cell = sft[header.index("Accuracy")]
    a = diff["accuracy"]
    assert not a["excludes_zero"] and acc_cell == f"{a['diff']:+.3f} [{a['ci'][0]:+.3f}, {a['ci'][1]:+.3f}]"
    assert sft[header.index("Bias (Entropy)")] == "+0.000 [+0.000, +0.000]"  # zero-width, no mark
    assert sft[header.index("answers changed (pro)")] == "0.005"  # 1 of 200
    assert "* marks a difference whose CI excludes 0" in section
    page = (tmp_path / "report.html").read_text()
    assert f"<td>{bias_cell}</td>" in page and f"<td>{acc_cell}</td>" in page
    assert (tmp_path / "winobias_bias_accuracy.png").stat().st_size > 5000  # drawn with error bars


def test_fraction_plot_with_error_bars(tmp_path):
    def row(bias, acc):
        return {"bias": bias, "bias_ci": [bias - 0.02, bias + 0.03],
                "accuracy": acc, "accuracy_ci": [acc - 0.05, acc + 0.04]}

    m = {"base": {"winobias": row(0.3, 0.5)}, "u-0.2-S": {"winobias": row(0.25, 0.55)},
         "u-0.4-S": {"winobias": row(0.27, 0.52)}, "u-0.2-R": {"winobias": row(0.2, 0.6)}}
    info = {"base": {"fraction": None}, "u-0.2-S": {"fraction": 0.2, "rlhf": False},
            "u-0.4-S": {"fraction": 0.4, "rlhf": False}, "u-0.2-R": {"fraction": 0.2, "rlhf": True}}
    paths = write_report(m, tmp_path, run_info=info)
    assert paths["plots"] == ["winobias_bias_accuracy.png", "fraction.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths["plots"])
    assert "0.250 [0.230, 0.280]" in (tmp_path / "report.md").read_text()


# ---------------------------------------------------------------------------- end to end


def test_metrics_json_holds_intervals_and_paired_differences(tmp_path, tiny_llama):
    """Two names for one model: every difference is exactly 0, every interval real."""
    cfg = EvalConfig(suites=["winobias", "winogrande", "chat"], device="cpu", batch_size=8, max_new_tokens=3,
                     winobias={"limit": 3, "types": [1]}, winogrande={"limit": 6}, bootstrap=200,
                     chat={"prompts": ["Hi!", "Name a colour."], "max_new_tokens": 3})
    result = run_eval({"sft": tiny_llama, "base": tiny_llama}, cfg, tmp_path / "eval", seed=3)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["sft"] == result["sft"]
    wb = saved["base"]["winobias"]
    for key in FLOATS:
        lo, hi = wb[f"{key}_ci"]
        assert isinstance(lo, float) and lo <= wb[key] <= hi, key
    assert "pairs_ci" not in wb and "irregular_pairs_ci" not in wb
    assert wb["bias_ci"][1] > wb["bias_ci"][0]  # 3 pairs with different log-probs: a real width
    wg = saved["base"]["winogrande"]
    lo, hi = wg["accuracy_ci"]
    assert 0 <= lo <= wg["accuracy"] <= hi <= 1 and "items_ci" not in wg
    assert "responses_ci" not in saved["base"]["chat"] and "stop_rate_ci" in saved["base"]["chat"]
    meta = saved["_meta"]
    assert meta["bootstrap"] == {"resamples": 200, "confidence": 0.95, "seed": 3, "baseline": "base"}
    assert set(meta["paired"]) == {"sft"} and set(meta["paired"]["sft"]) == {"winobias", "winogrande", "chat"}
    entry = meta["paired"]["sft"]["winobias"]
    assert entry["items"] == 3 and set(entry["metrics"]) == set(FLOATS)
    assert all(v == {"diff": 0.0, "ci": [0.0, 0.0], "excludes_zero": False} for v in entry["metrics"].values())
    assert entry["changed_answers"] == {"overall": 0.0, "pro": 0.0, "anti": 0.0}
    assert meta["paired"]["sft"]["winogrande"]["metrics"]["accuracy"]["ci"] == [0.0, 0.0]
    assert "changed_answers" not in meta["paired"]["sft"]["winogrande"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "### Table 1: gender bias on WinoBias: difference from base" in md
    assert "+0.000 [+0.000, +0.000]" in md
    assert f"{wb['bias']:.3f} [{wb['bias_ci'][0]:.3f}, {wb['bias_ci'][1]:.3f}]" in md


def test_an_unknown_baseline_fails_before_any_work(tmp_path, tiny_llama):
    with pytest.raises(EvalError, match="eval.baseline 'ppo'"):
        run_eval({"base": tiny_llama}, EvalConfig(suites=["chat"], baseline="ppo"), tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------------- WinoGrande held out


def test_winogrande_holdout_scores_exactly_the_held_out_qids(tmp_path):
    path = tmp_path / "wg.jsonl"
    rows = [{"qID": f"q{i}", "sentence": f"Ann met Bo {i} times because _ was kind.", "option1": "Ann",
             "option2": "Bo", "answer": "1"} for i in range(60)]
    rows.append({"sentence": "No id: _ was kind.", "option1": "Ann", "option2": "Bo", "answer": "2"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = [f"q{i}" for i in range(60) if holdout(f"q{i}", 0.3)]
    assert 5 < len(expected) < 35  # about 30% of 60
    cfg = EvalConfig(winogrande={"path": str(path), "holdout": 0.3})
    assert [it["id"] for it in SUITES["winogrande"].load(cfg, None)] == expected  # the row without a qID is out
    assert [it["id"] for it in winogrande.load_items(str(path), limit=3, holdout=0.3)] == expected[:3]
    assert len(winogrande.load_items(str(path))) == 61  # no holdout: every row
    wider = [it["id"] for it in winogrande.load_items(str(path), holdout=0.6)]
    assert set(expected) <= set(wider)  # the same hash: a larger share holds out a superset
    with pytest.raises(WinoGrandeError, match="no rows with an answer among the qIDs held out at holdout 0.001"):
        winogrande.load_items(str(path), holdout=0.001)
    with pytest.raises(ValueError, match="holdout"):
        EvalConfig(winogrande={"holdout": 1.0})


# ---------------------------------------------------------------------------- data files


def test_every_suite_names_the_files_it_reads(tmp_path, monkeypatch):
    cfg = EvalConfig(winogender={"path": str(FIXTURES / "eval" / "winogender_all_sentences.tsv")})
    folder = Path(resolve_sample("sample:winobias")).resolve()
    assert SUITES["winobias"].files(cfg) == [str(folder / n) for n in
                                             ("anti_stereotyped_type1.txt.dev", "anti_stereotyped_type2.txt.dev",
                                              "pro_stereotyped_type1.txt.dev", "pro_stereotyped_type2.txt.dev")]
    assert all(Path(f).is_file() for f in SUITES["winobias"].files(cfg))
    test_split = EvalConfig(winobias={"path": str(FIXTURES / "winobias"), "splits": ["test"], "types": [2]})
    assert SUITES["winobias"].files(test_split) == [
        str((FIXTURES / "winobias" / n).resolve())
        for n in ("anti_stereotyped_type2.txt.test", "pro_stereotyped_type2.txt.test")]
    assert SUITES["winogender"].files(cfg) == [str((FIXTURES / "eval" / "winogender_all_sentences.tsv").resolve())]
    assert SUITES["winogender"].files(EvalConfig()) == []
    assert SUITES["winogrande"].files(cfg) == [str(Path(resolve_sample("sample:winogrande.jsonl")).resolve())]
    assert SUITES["reward"].files(cfg) == [] and SUITES["chat"].files(cfg) == []
    # hub: the cached copies that exist, nothing downloaded
    monkeypatch.setenv("HETRAY_CACHE", str(tmp_path))
    hub = EvalConfig(winobias={"path": "hub", "types": [1]})
    assert SUITES["winobias"].files(hub) == []
    (tmp_path / "winobias").mkdir()
    (tmp_path / "winobias" / "pro_stereotyped_type1.txt.dev").write_text("1 [The nurse] met [her] friend.\n")
    assert SUITES["winobias"].files(hub) == [str((tmp_path / "winobias" / "pro_stereotyped_type1.txt.dev").resolve())]
    assert winobias.file_names(["dev"], [1]) == ["pro_stereotyped_type1.txt.dev", "anti_stereotyped_type1.txt.dev"]
