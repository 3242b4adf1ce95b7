"""The evaluation report: Table 1 with the best cells bold, other suites' tables, plots."""

from __future__ import annotations

import re

from hetray.eval.report import best_models, suite_table, write_report


def wb(bias, entropy, cluster, acc, sim, pairs=10):
    return {"bias": bias, "bias_signed": bias / 2, "bias_entropy": entropy, "bias_cluster": cluster,
            "accuracy": acc, "similarity": sim, "pairs": pairs}


# A paper-style grid: base, WinoGrande alone (-S / -R), the unified data at two fractions.
METRICS = {
    "base": {"winobias": wb(0.412, 0.031, 2.222, 0.501, 0.611), "winogrande": {"accuracy": 0.520, "items": 24}},
    "wg-S": {"winobias": wb(0.398, 0.029, 2.101, 0.555, 0.640), "winogrande": {"accuracy": 0.583, "items": 24}},
    "wg-R": {"winobias": wb(0.377, 0.027, 2.150, 0.548, 0.702), "winogrande": {"accuracy": 0.625, "items": 24}},
    "uni-0.2-S": {"winobias": wb(0.301, 0.025, 1.950, 0.577, 0.690), "winogrande": {"accuracy": 0.542, "items": 24}},
    "uni-0.2-R": {"winobias": wb(0.287, 0.026, 1.987, 0.602, 0.655), "winogrande": {"accuracy": 0.542, "items": 24}},
    "uni-0.4-S": {"winobias": wb(0.333, 0.019, 2.005, 0.590, 0.671), "winogrande": {"accuracy": 0.500, "items": 24}},
    "uni-0.4-R": {"winobias": wb(0.310, 0.022, 1.899, 0.566, 0.688),
                  "reward": {"accuracy": 0.75, "margin": 0.4, "pairs": 8, "reward_model": "runs/u4/reward"}},
}
RUNS = {
    "base": {"fraction": None, "rlhf": None}, "wg-S": {"fraction": None, "rlhf": False},
    "wg-R": {"fraction": None, "rlhf": True}, "uni-0.2-S": {"fraction": 0.2, "rlhf": False},
    "uni-0.2-R": {"fraction": 0.2, "rlhf": True}, "uni-0.4-S": {"fraction": 0.4, "rlhf": False},
    "uni-0.4-R": {"fraction": 0.4, "rlhf": True},
}
# best per column: bias min -> uni-0.2-R 0.287; entropy min -> uni-0.4-S 0.019; cluster min ->
# uni-0.4-R 1.899; accuracy max -> uni-0.2-R 0.602; similarity max -> wg-R 0.702
EXPECTED_BOLD = {"Bias": "uni-0.2-R", "Bias (Entropy)": "uni-0.4-S", "Bias (Cluster)": "uni-0.4-R",
                 "Accuracy": "uni-0.2-R", "Similarity": "wg-R"}


def _table(md: str, title: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header and {model: cells} of the markdown table under ``## title``."""
    section = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return header, {r[0]: r for r in body}


def test_best_models_direction_and_ties():
    rows = {"a": {"x": 0.2}, "b": {"x": -0.1}, "c": {"x": 0.1}, "d": {"x": None}}
    assert best_models(rows, "x", "lower") == {"b", "c"}  # nearest 0, a tie at 3 decimals
    assert best_models(rows, "x", "higher") == {"a"}
    assert best_models(rows, "x", None) == set()
    assert best_models({"a": {"x": 1.0}}, "x", "higher") == set()  # nothing to compare


def test_table1_bolds_the_best_cell_of_each_column(tmp_path):
    paths = write_report(METRICS, tmp_path, run_info=RUNS)
    assert (paths["markdown"], paths["html"]) == ("report.md", "report.html")  # relative to the folder
    md = (tmp_path / paths["markdown"]).read_text()
    header, rows = _table(md, "Table 1: gender bias on WinoBias")
    assert header[:3] == ["model", "fraction", "rlhf"] and len(rows) == 7
    for column, model in EXPECTED_BOLD.items():
        i = header.index(column)
        bold = [m for m, cells in rows.items() if cells[i].startswith("**")]
        assert bold == [model], column
        value = METRICS[model]["winobias"][{"Bias": "bias", "Bias (Entropy)": "bias_entropy",
                                           "Bias (Cluster)": "bias_cluster", "Accuracy": "accuracy",
                                           "Similarity": "similarity"}[column]]
        assert rows[model][i] == f"**{value:.3f}**"
    assert rows["uni-0.2-S"][1:3] == ["0.2", "no"] and rows["wg-R"][1:3] == ["–", "yes"]
    assert rows["base"][1:3] == ["–", "–"]
    assert not any(c.startswith("**") for c in rows["base"])  # pairs has no direction
    # the WinoGrande table: 0.625 (wg-R) is the best; uni-0.4-R has no WinoGrande row
    header, rows = _table(md, "WinoGrande accuracy (partial scoring)")
    assert set(rows) == set(METRICS) - {"uni-0.4-R"}
    assert rows["wg-R"][header.index("Accuracy")] == "**0.625**"
    header, rows = _table(md, "Reward model: pairwise accuracy on held-out pairs")
    assert rows["uni-0.4-R"][header.index("Pairwise accuracy")] == "0.750"  # alone: not bold
    assert rows["uni-0.4-R"][header.index("reward model")] == "runs/u4/reward"


def test_html_has_the_numbers_and_the_bold_cells(tmp_path):
    paths = write_report(METRICS, tmp_path, run_info=RUNS)
    page = (tmp_path / paths["html"]).read_text()
    assert page.startswith("<!doctype html>")
    for model, metrics in METRICS.items():
        assert f">{model}<" in page
        assert f"{metrics['winobias']['bias']:.3f}" in page
    table1 = page.split("<h2>Table 1", 1)[1].split("<h2>", 1)[0]
    bold = re.findall(r"<td><b>([^<]+)</b></td>", table1)
    assert sorted(bold) == ["0.019", "0.287", "0.602", "0.702", "1.899"]
    assert "<td><b>0.625</b></td>" in page  # WinoGrande
    for p in paths["plots"]:
        assert f'src="{p}"' in page


def test_plots_are_png_files(tmp_path):
    paths = write_report(METRICS, tmp_path, run_info=RUNS)
    assert paths["plots"] == ["winobias_bias_accuracy.png", "fraction.png"]
    for p in paths["plots"]:
        data = (tmp_path / p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_no_fraction_no_fraction_plot_and_suites_without_data(tmp_path):
    metrics = {"base": {"chat": {"responses": 5, "non_empty_rate": 1.0, "prompt_repeat_rate": 0.2, "stop_rate": 0.4,
                                 "repeated_ngram_rate": 0.05, "mean_new_tokens": 60.0}},
               "sft": {"chat": {"responses": 5, "non_empty_rate": 1.0, "prompt_repeat_rate": 0.0, "stop_rate": 0.8,
                                "repeated_ngram_rate": 0.10, "mean_new_tokens": 41.5}}}
    paths = write_report(metrics, tmp_path)
    assert paths["plots"] == []
    md = (tmp_path / paths["markdown"]).read_text()
    assert "Table 1" not in md and "WinoGrande" not in md
    header, rows = _table(md, "Instruction following: automatic signals (answers in chat.md)")
    assert rows["sft"][header.index("stops (EOS)")] == "**0.800**"
    assert rows["sft"][header.index("repeats prompt")] == "**0.000**"
    assert rows["base"][header.index("repeated 4-grams")] == "**0.050**"
    assert rows["base"][header.index("non-empty")] == "**1.000**" and rows["sft"][header.index("non-empty")] == "**1.000**"
    assert rows["sft"][header.index("mean new tokens")] == "41.500"


def test_suite_table_skips_models_without_the_suite():
    header, cells, bold = suite_table(METRICS, "reward", RUNS)
    assert [c[0] for c in cells] == ["uni-0.4-R"] and not any(any(b) for b in bold)
