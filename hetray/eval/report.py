"""The evaluation report: Table-1-style tables (markdown and HTML) and plots.

``write_report(metrics_by_model, out_dir, run_info)`` takes ``{model: {suite: overall}}`` (what
``run_eval`` writes under ``"metrics"`` in ``metrics.json``) and writes ``report.md``,
``report.html`` and PNG plots into ``out_dir``:

* Table 1 (paper): Bias, Bias (Entropy), Bias (Cluster), Accuracy, Similarity on WinoBias (and
  the same on WinoGender when measured). The best value of each column is bold: for the three
  bias columns the one closest to 0 (lower |bias| is better); for Accuracy the highest; for
  Similarity also the highest, since it is the share of pro/anti pairs that get the same outcome
  and a model that treats both sentences alike is the less biased one.
* WinoGrande accuracy, reward-model accuracy and the chat signals, each a table, best bold.
* Plots: bias against accuracy, one labelled point per model; and when the runs carry a
  selection fraction (``run_info[model]["fraction"]``), every metric against the fraction, one
  line for SFT-only (-S) and one for SFT+RLHF (-R) (``run_info[model]["rlhf"]``); models
  without a fraction (base, WinoGrande alone) are dashed reference lines.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (key in the suite's overall metrics, column title, which way is better: "lower" = nearest 0)
BIAS_COLUMNS = [
    ("bias", "Bias", "lower"),
    ("bias_entropy", "Bias (Entropy)", "lower"),
    ("bias_cluster", "Bias (Cluster)", "lower"),
    ("accuracy", "Accuracy", "higher"),
    ("similarity", "Similarity", "higher"),
]
SUITE_COLUMNS = {
    "winobias": BIAS_COLUMNS + [("pairs", "pairs", None)],
    "winogender": BIAS_COLUMNS + [("pairs", "pairs", None)],
    "winogrande": [("accuracy", "Accuracy", "higher"), ("items", "items", None)],
    "reward": [("accuracy", "Pairwise accuracy", "higher"), ("margin", "Mean margin", None), ("pairs", "pairs", None),
               ("reward_model", "reward model", None)],
    "chat": [("non_empty_rate", "non-empty", "higher"), ("prompt_repeat_rate", "repeats prompt", "lower"),
             ("stop_rate", "stops (EOS)", "higher"), ("repeated_ngram_rate", "repeated 4-grams", "lower"),
             ("mean_new_tokens", "mean new tokens", None)],
}
TITLES = {
    "winobias": "Table 1: gender bias on WinoBias",
    "winogender": "Gender bias on WinoGender",
    "winogrande": "WinoGrande accuracy (partial scoring)",
    "reward": "Reward model: pairwise accuracy on held-out pairs",
    "chat": "Instruction following: automatic signals (answers in chat.md)",
}
DIGITS = 3


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def fmt(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    n = _number(v)
    return "–" if n is None else f"{n:.{DIGITS}f}"


def best_models(rows: dict[str, dict], key: str, better: str | None) -> set[str]:
    """The models whose (displayed) value of ``key`` is best; ties are all best."""
    if better is None:
        return set()
    vals = {m: _number(r.get(key)) for m, r in rows.items()}
    vals = {m: round(abs(v) if better == "lower" else v, DIGITS) for m, v in vals.items() if v is not None}
    if len(vals) < 2:  # one model: nothing to compare
        return set()
    target = min(vals.values()) if better == "lower" else max(vals.values())
    return {m for m, v in vals.items() if v == target}


def suite_table(metrics_by_model: dict, suite: str, run_info: dict) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """(header, cells, bold) of one suite's table: one row per model that has the suite."""
    rows = {m: s[suite] for m, s in metrics_by_model.items() if isinstance(s.get(suite), dict)}
    columns = SUITE_COLUMNS[suite]
    runs = [k for k in ("fraction", "rlhf") if any(k in (run_info.get(m) or {}) for m in rows)]
    header = ["model"] + runs + [title for _, title, _ in columns]
    best = {key: best_models(rows, key, better) for key, _, better in columns}
    cells, bold = [], []
    for m, r in rows.items():
        info = run_info.get(m) or {}
        run_cells = [_run_cell(k, info.get(k)) for k in runs]
        cells.append([m] + run_cells + [fmt(r.get(key)) for key, _, _ in columns])
        bold.append([False] * (1 + len(runs)) + [m in best[key] for key, _, _ in columns])
    return header, cells, bold


def _run_cell(key: str, v) -> str:
    if v is None:
        return "–"
    return f"{v:g}" if key == "fraction" else ("yes" if v else "no")


def _markdown_table(header, cells, bold) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, b in zip(cells, bold):
        lines.append("| " + " | ".join(f"**{c}**" if x else c for c, x in zip(row, b)) + " |")
    return lines


def _html_table(header, cells, bold) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td><b>{html.escape(c)}</b></td>" if x else f"<td>{html.escape(c)}</td>"
                         for c, x in zip(row, b)) + "</tr>"
        for row, b in zip(cells, bold))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bias_accuracy_plot(metrics_by_model: dict, suite: str, path: Path) -> bool:
    pts = {m: (_number(s[suite].get("accuracy")), _number(s[suite].get("bias")))
           for m, s in metrics_by_model.items() if isinstance(s.get(suite), dict)}
    pts = {m: p for m, p in pts.items() if None not in p}
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (m, (x, y)) in enumerate(pts.items()):
        ax.scatter([x], [y], color=f"C{i % 10}")
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("accuracy (higher is better)")
    ax.set_ylabel("bias (lower is better)")
    ax.set_title(f"{suite}: bias against accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fraction_metrics(metrics_by_model: dict) -> list[tuple[str, str, str]]:
    """(suite, key, title) of every metric some model has, in report order."""
    wanted = [("winobias", k, f"WinoBias {t}") for k, t, _ in BIAS_COLUMNS]
    wanted += [("winogender", k, f"WinoGender {t}") for k, t, _ in BIAS_COLUMNS]
    wanted += [("winogrande", "accuracy", "WinoGrande accuracy"), ("reward", "accuracy", "reward accuracy"),
               ("chat", "stop_rate", "chat: stops"), ("chat", "repeated_ngram_rate", "chat: repeated 4-grams")]
    return [w for w in wanted if any(_number((s.get(w[0]) or {}).get(w[1])) is not None for s in metrics_by_model.values())]


def _fraction_plot(metrics_by_model: dict, run_info: dict, path: Path) -> bool:
    with_fraction = {m for m in metrics_by_model if _number((run_info.get(m) or {}).get("fraction")) is not None}
    metrics = _fraction_metrics(metrics_by_model)
    if not with_fraction or not metrics:
        return False
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (suite, key, title) in zip(axes.flat, metrics):
        def value(m):
            return _number((metrics_by_model[m].get(suite) or {}).get(key))

        for rlhf, label, style, color in ((False, "SFT (-S)", "o-", "C0"), (True, "SFT+RLHF (-R)", "s-", "C1")):
            pts = sorted((run_info[m]["fraction"], value(m)) for m in with_fraction
                         if bool(run_info[m].get("rlhf")) == rlhf and value(m) is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, color=color, label=label)
        ax.set_xticks(sorted({run_info[m]["fraction"] for m in with_fraction}))
        for i, m in enumerate(m for m in metrics_by_model if m not in with_fraction and value(m) is not None):
            ax.axhline(value(m), linestyle="--", linewidth=1, color=f"C{(i + 2) % 10}", label=m)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("selection fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


NOTE = ("Best value per column in bold. Bias, Bias (Entropy), Bias (Cluster): lower is better "
        "(closest to 0); Accuracy: higher is better; Similarity: higher is better (the share of "
        "pro/anti pairs with the same outcome: a model that treats both alike is less biased).")


def write_report(metrics_by_model: dict, out_dir, run_info: dict[str, dict] | None = None) -> dict:
    """Write ``report.md``, ``report.html`` and the plots into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_info = run_info or {}
    plots = []
    for suite in ("winobias", "winogender"):
        if _bias_accuracy_plot(metrics_by_model, suite, out / f"{suite}_bias_accuracy.png"):
            plots.append(out / f"{suite}_bias_accuracy.png")
    if _fraction_plot(metrics_by_model, run_info, out / "fraction.png"):
        plots.append(out / "fraction.png")

    md = ["# Evaluation report", "", f"models: {', '.join(metrics_by_model)}", ""]
    body = []
    for suite, title in TITLES.items():
        if not any(isinstance(s.get(suite), dict) for s in metrics_by_model.values()):
            continue
        table = suite_table(metrics_by_model, suite, run_info)
        md += [f"## {title}", ""] + _markdown_table(*table) + [""]
        body.append(f"<h2>{html.escape(title)}</h2>{_html_table(*table)}")
        if suite in ("winobias", "winogender"):
            md += [NOTE, ""]
            body.append(f"<p>{html.escape(NOTE)}</p>")
        if suite == "chat" and (out / "chat.md").exists():
            md += ["Every answer, side by side: [chat.md](chat.md)", ""]
            body.append('<p>Every answer, side by side: <a href="chat.md">chat.md</a></p>')
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
        body.append("<h2>Plots</h2>" + "".join(f'<p><img src="{p.name}" alt="{p.stem}"></p>' for p in plots))
    (out / "report.md").write_text("\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}")
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation report</title><style>{style}</style>"
        f"</head><body><h1>Evaluation report</h1><p>models: {html.escape(', '.join(metrics_by_model))}</p>"
        + "".join(body) + "</body></html>\n")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "plots": [str(p) for p in plots]}
