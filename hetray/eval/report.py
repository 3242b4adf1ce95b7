"""The evaluation report: Table-1-style tables (markdown and HTML) and plots.

``write_report(metrics_by_model, out_dir, run_info, paired, bootstrap)`` takes ``{model: {suite:
overall}}`` (the model entries of ``metrics.json``), and optionally ``_meta.paired`` and
``_meta.bootstrap`` of the same file, and writes ``report.md``, ``report.html`` and PNG plots
into ``out_dir``: one table per suite, in ``hetray.eval.suites`` order, with the columns, title
and note the suite declares. A value with a confidence interval (``<metric>_ci``) is shown as
``0.302 [0.281, 0.323]``. Under a suite's table, when ``paired`` is given, a second table holds
each model's paired difference from the baseline (model - baseline) with its paired-bootstrap
CI, ``+0.021 [+0.010, +0.033]*``, the ``*`` marking a CI that excludes 0, and the share of
answers that changed (suites that generate answers):

* Table 1 (paper): Bias, Bias (Entropy), Bias (Cluster), Accuracy, Similarity on WinoBias (and
  the same on WinoGender when measured). The best value of each column is bold: for the three
  bias columns the one closest to 0 (lower |bias| is better); for Accuracy the highest; for
  Similarity also the highest, since it is the share of pro/anti pairs that get the same outcome
  and a model that treats both sentences alike is the less biased one.
* WinoGrande accuracy, reward-model accuracy and the chat signals, each a table, best bold.
* Plots (through ``hetray.plots``), every value with its CI as an error bar: bias against
  accuracy for the suites that ask for it, one labelled point per model (x and y error bars);
  and when the runs carry a selection fraction
  (``run_info[model]["fraction"]``), every suite's ``plot_metrics`` against the fraction, one
  line for SFT-only (-S) and one for SFT+RLHF (-R) (``run_info[model]["rlhf"]``); models
  without a fraction (base, WinoGrande alone) are dashed reference lines with their CI as a band.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from hetray import plots
from hetray.eval.suites import SUITES

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


def interval_of(row: dict, key: str) -> tuple[float, float] | None:
    """The ``<key>_ci`` of a metrics row as two numbers, None when absent or not finite."""
    ci = row.get(f"{key}_ci")
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    lo, hi = _number(ci[0]), _number(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def fmt_ci(row: dict, key: str) -> str:
    """``0.302 [0.281, 0.323]``, or the bare value when it has no interval."""
    ci = interval_of(row, key)
    text = fmt(row.get(key))
    return text if ci is None or _number(row.get(key)) is None else f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_diff(d: dict) -> str:
    """A paired difference: ``+0.021 [+0.010, +0.033]*`` (``*``: its CI excludes 0)."""
    diff = _number(d.get("diff"))
    if diff is None:
        return "–"
    ci = d.get("ci")
    lo, hi = (_number(ci[0]), _number(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else (None, None)
    text = f"{diff:+.{DIGITS}f}"
    if lo is not None and hi is not None:
        text += f" [{lo:+.{DIGITS}f}, {hi:+.{DIGITS}f}]"
    return text + ("*" if d.get("excludes_zero") else "")


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
    columns = SUITES[suite].columns
    runs = [k for k in ("fraction", "rlhf") if any(k in (run_info.get(m) or {}) for m in rows)]
    header = ["model"] + runs + [title for _, title, _ in columns]
    best = {key: best_models(rows, key, better) for key, _, better in columns}
    cells, bold = [], []
    for m, r in rows.items():
        info = run_info.get(m) or {}
        run_cells = [_run_cell(k, info.get(k)) for k in runs]
        cells.append([m] + run_cells + [fmt_ci(r, key) for key, _, _ in columns])
        bold.append([False] * (1 + len(runs)) + [m in best[key] for key, _, _ in columns])
    return header, cells, bold


def paired_table(paired: dict, suite: str) -> tuple[list[str], list[list[str]], list[list[bool]]] | None:
    """(header, cells, bold) of a suite's paired differences from the baseline: one row per
    compared model, one column per metric of the suite's table that has a difference, then the
    shares of changed answers; None when no model has one."""
    rows = {m: s[suite] for m, s in (paired or {}).items() if isinstance((s or {}).get(suite), dict)}
    rows = {m: e for m, e in rows.items() if isinstance(e.get("metrics"), dict)}
    if not rows:
        return None
    columns = [(key, title) for key, title, _ in SUITES[suite].columns
               if any(key in e["metrics"] for e in rows.values())]
    sides = list(dict.fromkeys(k for e in rows.values() for k in (e.get("changed_answers") or {})))
    header = ["model"] + [title for _, title in columns] + [f"answers changed ({side})" for side in sides]
    cells = []
    for m, e in rows.items():
        changed = e.get("changed_answers") or {}
        cells.append([m] + [fmt_diff(e["metrics"].get(key) or {}) for key, _ in columns]
                     + [fmt(changed.get(side)) for side in sides])
    return header, cells, [[False] * len(header) for _ in cells]


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
    # a wide table scrolls inside its own box; the page never gets wider than the window
    return f"<div class='table'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def error_bar(row: dict, key: str) -> list[list[float]] | None:
    """matplotlib's asymmetric error ``[[below], [above]]`` of a value from its CI (None: no CI)."""
    v, ci = _number(row.get(key)), interval_of(row, key)
    if v is None or ci is None:
        return None
    return [[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]]


def _bias_accuracy_plot(metrics_by_model: dict, suite: str, path: Path) -> bool:
    rows = {m: s[suite] for m, s in metrics_by_model.items() if isinstance(s.get(suite), dict)}
    pts = {m: (_number(r.get("accuracy")), _number(r.get("bias"))) for m, r in rows.items()}
    pts = {m: p for m, p in pts.items() if None not in p}
    if not pts:
        return False
    fig, axes = plots.figure(size=(5.5, 4))
    ax = axes[0, 0]
    for i, (m, (x, y)) in enumerate(pts.items()):
        ax.errorbar([x], [y], xerr=error_bar(rows[m], "accuracy"), yerr=error_bar(rows[m], "bias"),
                    fmt="o", color=f"C{i % 10}", capsize=3, elinewidth=1)
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("accuracy (higher is better)")
    ax.set_ylabel("bias (lower is better)")
    with_ci = any(interval_of(r, "bias") or interval_of(r, "accuracy") for r in rows.values())
    ax.set_title(f"{suite}: bias against accuracy" + (" (bars: CI)" if with_ci else ""))
    ax.grid(alpha=0.3)
    plots.save(fig, path)
    return True


def _fraction_metrics(metrics_by_model: dict) -> list[tuple[str, str, str]]:
    """(suite, key, title) of every metric some model has, in report order."""
    wanted = [(suite.name, key, title) for suite in SUITES.values() for key, title in suite.plot_metrics]
    return [w for w in wanted if any(_number((s.get(w[0]) or {}).get(w[1])) is not None for s in metrics_by_model.values())]


def _fraction_plot(metrics_by_model: dict, run_info: dict, path: Path) -> bool:
    with_fraction = {m for m in metrics_by_model if _number((run_info.get(m) or {}).get("fraction")) is not None}
    metrics = _fraction_metrics(metrics_by_model)
    if not with_fraction or not metrics:
        return False
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plots.figure(rows, cols, size=(4.2 * cols, 3.2 * rows))
    for ax, (suite, key, title) in zip(axes.flat, metrics):
        def row(m):
            return metrics_by_model[m].get(suite) or {}

        def value(m):
            return _number(row(m).get(key))

        # S and R side by side at each fraction (dodged by 0.008) so their error bars do not overlap
        for rlhf, label, style, color, dodge in ((False, "SFT (-S)", "o-", "C0", -0.004),
                                                 (True, "SFT+RLHF (-R)", "s-", "C1", 0.004)):
            ms = sorted((m for m in with_fraction if bool(run_info[m].get("rlhf")) == rlhf and value(m) is not None),
                        key=lambda m: run_info[m]["fraction"])
            if ms:
                bars = [error_bar(row(m), key) or [[0.0], [0.0]] for m in ms]
                ax.errorbar([run_info[m]["fraction"] + dodge for m in ms], [value(m) for m in ms],
                            yerr=[[b[0][0] for b in bars], [b[1][0] for b in bars]], fmt=style, color=color,
                            label=label, capsize=3, elinewidth=1)
        ax.set_xticks(sorted({run_info[m]["fraction"] for m in with_fraction}))
        for i, m in enumerate(m for m in metrics_by_model if m not in with_fraction and value(m) is not None):
            color = f"C{(i + 2) % 10}"
            ax.axhline(value(m), linestyle="--", linewidth=1, color=color, label=m)
            ci = interval_of(row(m), key)
            if ci is not None:
                ax.axhspan(ci[0], ci[1], color=color, alpha=0.12, linewidth=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("selection fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    plots.save(fig, path)
    return True


def write_report(metrics_by_model: dict, out_dir, run_info: dict[str, dict] | None = None,
                 paired: dict | None = None, bootstrap: dict | None = None) -> dict:
    """Write ``report.md``, ``report.html`` and the plots into ``out_dir``; return their names
    in ``out_dir``. ``paired`` / ``bootstrap``: ``_meta.paired`` / ``_meta.bootstrap`` of
    ``metrics.json`` (the difference tables and the CI legend)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_info = run_info or {}
    bootstrap = bootstrap or {}
    plot_files = [f"{s.name}_bias_accuracy.png" for s in SUITES.values()
                  if s.bias_plot and _bias_accuracy_plot(metrics_by_model, s.name, out / f"{s.name}_bias_accuracy.png")]
    if _fraction_plot(metrics_by_model, run_info, out / "fraction.png"):
        plot_files.append("fraction.png")

    md = ["# Evaluation report", "", f"models: {', '.join(metrics_by_model)}", ""]
    body = []
    legend = ci_legend(bootstrap, bool(paired))
    if legend:
        md += [legend, ""]
        body.append(f"<p>{html.escape(legend)}</p>")
    for suite in SUITES.values():
        if not any(isinstance(s.get(suite.name), dict) for s in metrics_by_model.values()):
            continue
        table = suite_table(metrics_by_model, suite.name, run_info)
        md += [f"## {suite.title}", ""] + _markdown_table(*table) + [""]
        body.append(f"<h2>{html.escape(suite.title)}</h2>{_html_table(*table)}")
        if suite.note:
            md += [suite.note, ""]
            body.append(f"<p>{html.escape(suite.note)}</p>")
        diffs = paired_table(paired, suite.name)
        if diffs is not None:
            title = f"{suite.title}: difference from {bootstrap.get('baseline') or 'the baseline'}"
            note = ("Model - baseline on the same items, [paired-bootstrap CI of the difference]; * marks a "
                    "difference whose CI excludes 0")
            if any(h.startswith("answers changed") for h in diffs[0]):
                note += "; answers changed: the share of generated answers that differ from the baseline's"
            md += [f"### {title}", ""] + _markdown_table(*diffs) + ["", note + ".", ""]
            body.append(f"<h3>{html.escape(title)}</h3>{_html_table(*diffs)}<p>{html.escape(note)}.</p>")
        if suite.link and (out / suite.link[1]).exists():
            text, file = suite.link
            md += [f"{text}: [{file}]({file})", ""]
            body.append(f'<p>{html.escape(text)}: <a href="{file}">{file}</a></p>')
    if plot_files:
        md += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plot_files] + [""]
        body.append("<h2>Plots</h2>" + "".join(f'<p><img src="{p}" alt="{Path(p).stem}"></p>' for p in plot_files))
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>Evaluation report</title><style>{STYLE}</style>"
        f"</head><body><h1>Evaluation report</h1><p>models: {html.escape(', '.join(metrics_by_model))}</p>"
        + "".join(body) + "</body></html>\n")
    return {"markdown": "report.md", "html": "report.html", "plots": plot_files}


# The page fits the window (a laptop's 1366 px too): images scale down to the text width, a wide
# table scrolls in its own box, long words wrap. Checked by benchmarks/screenshot_report.py.
STYLE = ("*{box-sizing:border-box}"
         "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em;overflow-wrap:anywhere}"
         "img{max-width:100%;height:auto;display:block}"
         ".table{max-width:100%;overflow-x:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right;overflow-wrap:normal}"
         "td:first-child{text-align:left}")


def ci_legend(bootstrap: dict, paired: bool) -> str:
    """One line on what the brackets mean, from ``_meta.bootstrap``; empty without resamples."""
    if not bootstrap.get("resamples"):
        return ""
    level = bootstrap.get("confidence", 0.95)
    text = (f"Numbers in brackets: {level:.0%} confidence intervals, percentile bootstrap over the items of "
            f"each suite ({bootstrap['resamples']} resamples, seed {bootstrap.get('seed', 0)})")
    if paired:
        text += (f"; differences from {bootstrap.get('baseline') or 'the baseline'} are paired (the same "
                 "resampled items for both models), * marks a difference whose CI excludes 0")
    return text + "."
