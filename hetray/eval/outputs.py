"""What an evaluation leaves in its folder: ``metrics.json``, ``records/``, the suites' own files
(``chat.md``), the report, the lm-evaluation-harness results files (``lm_eval/``) and, with
TensorBoard as the tracker, ``tensorboard/`` (``hetray.eval.export``). Every path written into
``metrics.json`` is relative to that folder, so the folder may be moved (the pipeline writes it in
a temporary place, then moves it)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from hetray.eval.config import EvalConfig
from hetray.eval.export import write_lm_eval
from hetray.tracking import log_eval
from hetray.eval.report import write_report
from hetray.eval.suites import SUITES
from hetray.stage import versions

log = logging.getLogger(__name__)

META = "_meta"
RECORDS = "records"


def finite(x):
    """NaN / inf -> None, recursively, so metrics.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_records(records: list[dict], out: Path, suite: str) -> str:
    """``records/<suite>.parquet`` (``.jsonl`` when the records do not make one Arrow table) in
    ``out``; returns its path relative to ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    name = f"{RECORDS}/{suite}.parquet"
    try:
        pq.write_table(pa.Table.from_pylist(records), out / name)
        return name
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        (out / name).unlink(missing_ok=True)
        name = f"{RECORDS}/{suite}.jsonl"
        with open(out / name, "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")
        return name


def write_outputs(out: Path, models: dict[str, str], cfg: EvalConfig, seed: int, extra: dict, rewards: dict,
                  measured, started: float, trackers: list[str] = (), run_name: str = "hetray/eval") -> dict:
    """Write everything; return what ``metrics.json`` holds. ``measured``: the runner's
    per-model metrics (with CIs), groups, wall times, per-suite records, and the paired
    differences against the baseline (``_meta.paired``; shape: ``hetray.eval.stats``)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": {s: write_records(recs, out, s) for s, recs in measured.records.items()}}
    for suite, recs in measured.records.items():
        if SUITES[suite].write is not None:
            by_model = {m: [{k: v for k, v in r.items() if k != "model"} for r in recs if r["model"] == m]
                        for m in models}
            paths.update(SUITES[suite].write(by_model, out))
    paths["report"] = write_report(measured.metrics, out, run_info=extra, paired=finite(measured.paired),
                                   bootstrap=measured.bootstrap)
    paths["lm_eval"] = write_lm_eval(out, models, measured, cfg, seed, started, time.time())
    if trackers:  # through each tracker's own library (hetray.tracking)
        paths.update(log_eval(trackers, out, run_name, measured.metrics))
    result = {**measured.metrics, META: {
        "models": dict(models), "suites": list(measured.records), "seed": seed,
        "config": cfg.model_dump(mode="json"), "runs": extra, "reward_models": rewards,
        "by_group": {m: g for m, g in measured.groups.items() if g},
        "bootstrap": measured.bootstrap, "paired": measured.paired,
        "wall_time_s": {**measured.wall, "total": round(time.time() - started, 3)}, "versions": versions(),
        "outputs": paths,
    }}
    result = finite(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log.info("eval: %d model(s) x %d suite(s) -> %s", len(models), len(result[META]["suites"]), out)
    return result
