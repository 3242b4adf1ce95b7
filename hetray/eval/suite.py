"""What a suite declares: its data, how a model scores it, its metrics and its place in the report.

Each suite module ends with one ``SUITE = Suite(...)``; ``hetray.eval.suites`` lists them. The
runner and the report read nothing else about a suite, so a new suite is its module, a line in
that list and its name in ``hetray.eval.config.SUITE_NAMES``.

A suite is three steps: ``load(cfg, model)`` gives its items (checked: a bad row fails before
any model loads; ``model`` is the reward model for a reward suite, None for a policy suite),
``score(model, items, cfg)`` gives one record per item, and ``aggregate(records)`` the overall
metrics from the records alone. So the runner may split the items across Ray actors and
concatenate their records: the metrics are the same as in one process; and
``hetray.eval.stats`` may recompute them on bootstrap resamples of the records (confidence
intervals, paired differences between models), the same way for every suite.

``files(cfg)`` names the data files a suite reads with a config (absolute local paths), so a job
can refuse to evaluate on files it trains on before any stage runs
(``hetray.orchestrate.preflight``). ``item_id`` says which item a record is, so two models'
records are compared item by item; ``answers`` names the record fields that hold a generated
answer (per side), whose changes against the baseline model are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

# (key in the suite's overall metrics, column title, which way is better: "lower" = nearest 0,
# "higher", or None for a count or a name)
Column = tuple[str, str, Literal["lower", "higher"] | None]


@dataclass(frozen=True)
class Suite:
    name: str
    kind: Literal["policy", "reward"]  # scored by the evaluated model itself, or by its reward model
    title: str  # the heading of its table in the report
    columns: tuple[Column, ...]  # its table in the report, best value of a directed column bold
    load: Callable[..., list]  # (cfg: EvalConfig, model: str | None) -> items
    score: Callable[..., list[dict]]  # (Scorer or RewardModel, items, cfg) -> one record per item
    aggregate: Callable[[list[dict]], dict]  # records -> overall metrics
    by_group: Callable[[list[dict]], dict] | None = None  # records -> {group: metrics} (metrics.json)
    plot_metrics: tuple[tuple[str, str], ...] = ()  # (key, title) drawn against the selection fraction
    bias_plot: bool = False  # a bias-against-accuracy scatter plot in the report
    note: str = ""  # a paragraph under its table
    write: Callable[[dict, object], dict] | None = None  # ({model: records}, out dir) -> {name: file}
    link: tuple[str, str] | None = None  # (text, file in the eval folder) under its table
    files: Callable[..., list[str]] = lambda cfg: []  # (cfg: EvalConfig) -> absolute paths of the data files read
    item_id: Callable[[dict], str] | None = None  # record -> its item's id (None: items align by order alone)
    answers: tuple[tuple[str, str], ...] = ()  # (side, record field of a generated answer): changed vs baseline
