"""The evaluation stage: every model through every configured suite, then the report.

    hetray eval --models base=smollm2-135m-instruct,sft=runs/x/sft/merged \\
        --suites winobias,winogrande,chat [--config jobs/x.yaml] [--out eval/] [winogrande.limit=50]

``run_eval(models, eval_cfg, out_dir)`` loads each model once and runs the suites on it. A suite
is three steps: its items are loaded once (and checked) before any model loads, scored by the
model, and the overall metrics are computed from the per-item records alone. That is what lets
``eval_cfg.num_workers > 1`` split a suite's items across Ray actors (each loads the model once)
and concatenate their records: the metrics are the same as in one process, up to float rounding.

Outputs in ``out_dir``: ``metrics.json`` (``{model: {suite: overall metrics}}`` plus ``_meta``:
config, seed, versions, models, wall time per suite), ``records/<suite>.parquet`` (every item of
every model, with a ``model`` column; ``.jsonl`` when a suite's records do not fit a table),
``chat.md`` / ``chat.jsonl`` (answers side by side) and the report (``report.md``,
``report.html``, PNG plots).

The reward suite measures a reward model, not the policy: the one in ``extra[model]
["reward_model"]``, else ``reward_model``, else the ``reward/`` stage beside the model's own stage
folder (``<run>/ppo/merged`` -> ``<run>/reward``); each is evaluated once and its result shown
for every model it goes with.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

from hetray.eval import chat, reward, winogrande
from hetray.eval.config import SUITES, EvalConfig

log = logging.getLogger(__name__)

META = "_meta"
POLICY_SUITES = ("winobias", "winogender", "winogrande", "chat")  # scored by the model itself


class EvalError(ValueError):
    """A model, suite or setting that cannot be evaluated; the message names it."""


def run_eval(models: dict[str, str], eval_cfg: EvalConfig, out_dir, seed: int = 0,
             reward_model: str | None = None, extra: dict[str, dict] | None = None) -> dict:
    """Evaluate ``{name: model}`` on ``eval_cfg.suites``; write metrics, records and the report.
    Returns what ``metrics.json`` holds."""
    started = time.time()
    out = Path(out_dir)
    extra = extra or {}
    suites = [s for s in SUITES if s in eval_cfg.suites]
    _check_models(models)
    rewards = _reward_models(models, suites, reward_model, extra)
    items = {s: load_suite(s, eval_cfg) for s in suites if s in POLICY_SUITES}  # bad data fails first
    metrics = {name: {} for name in models}
    records = {s: [] for s in suites}
    wall = {name: {} for name in models}
    groups = {name: {} for name in models}
    for name, path in models.items():
        if items:
            _run_policy(name, path, items, eval_cfg, seed, metrics, records, wall, groups)
    if "reward" in suites:
        _run_reward(rewards, eval_cfg, seed, metrics, records, wall)
    return _write(out, models, eval_cfg, seed, extra, rewards, metrics, records, wall, groups, started)


def _run_policy(name: str, path: str, items: dict, cfg: EvalConfig, seed: int, metrics, records, wall, groups) -> None:
    """Load one model once (per worker) and run every policy suite on it."""
    with _Pool("policy", name, path, cfg, seed) as pool:
        for suite, suite_items in items.items():
            t = time.time()
            recs = pool.score(suite, suite_items)
            metrics[name][suite] = aggregate_suite(suite, recs)
            if suite in BIAS_SIDES:
                groups[name][suite] = by_group(suite, recs)
            records[suite] += [{"model": name, **r} for r in recs]
            wall[name][suite] = round(time.time() - t, 3)
            log.info("eval %s %s: %s (%.1f s)", name, suite, _headline(metrics[name][suite]), wall[name][suite])


# ---------------------------------------------------------------------------- suites


BIAS_SIDES = {"winobias": ("pro", "anti"), "winogender": ("male", "female")}  # the two sentences of a pair


def load_suite(suite: str, cfg: EvalConfig) -> list:
    """The items of a policy suite (checked: a bad row fails here, before any model loads)."""
    if suite == "winogrande":
        return winogrande.load_items(cfg.winogrande.path, cfg.winogrande.limit)
    if suite == "chat":
        return list(cfg.chat.prompts)
    if suite == "winogender":
        if not cfg.winogender.path:
            raise EvalError("suite winogender: eval.winogender.path is not set (WinoGender's all_sentences.tsv)")
        from hetray.eval.winogender import read_pairs

        return read_pairs(Path(cfg.winogender.path), cfg.winogender.limit)
    from hetray.eval.winobias import load_pairs

    return load_pairs(cfg.winobias)


def score_suite(suite: str, scorer, items: list, cfg: EvalConfig) -> list[dict]:
    """Per-item records of a policy suite on ``items`` (all, or one worker's share)."""
    if suite == "winogrande":
        return winogrande.score_items(scorer, items)
    if suite == "chat":
        return chat.score_items(scorer, items, cfg.chat.max_new_tokens)
    from hetray.eval.winobias import score_pairs  # WinoGender pairs are scored the same way

    return score_pairs(scorer, items, BIAS_SIDES[suite], cfg.max_new_tokens, getattr(cfg, suite).bias_token)


def aggregate_suite(suite: str, records: list[dict]) -> dict:
    """Overall metrics of a suite: a pure function of its records."""
    if suite == "winogrande":
        return winogrande.aggregate(records)
    if suite == "chat":
        return chat.aggregate(records)
    if suite == "reward":
        return reward.aggregate(records)
    from hetray.eval import metrics

    return metrics.summarise(records, *BIAS_SIDES[suite])


def by_group(suite: str, records: list[dict]) -> dict | None:
    """A bias suite's metrics per group (WinoBias type/split), else None."""
    if suite not in BIAS_SIDES or not records:
        return None
    from hetray.eval import metrics

    return metrics.summarise_groups(records, *BIAS_SIDES[suite])["by_group"]


def _headline(overall: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in list(overall.items())[:5])


# ---------------------------------------------------------------------------- models and workers


def _check_models(models: dict[str, str]) -> None:
    """Fail before any work when a model name is unusable or a model cannot be found."""
    from hetray.models import check_model

    if not models:
        raise EvalError("no models to evaluate")
    for name, path in models.items():
        if not name or name.startswith("_"):
            raise EvalError(f"model name {name!r}: must be non-empty and not start with '_'")
        try:
            check_model(path)
        except ValueError as e:
            raise EvalError(f"model {name!r} ({path}) cannot be loaded: {e}") from e


class _Worker:
    """One model, loaded once: a policy ``Scorer`` or a ``RewardModel``. Runs in this process
    or as a Ray actor."""

    def __init__(self, kind: str, path: str, cfg_json: dict, seed: int):
        from transformers import set_seed

        set_seed(seed)
        random.seed(seed)
        self.cfg = EvalConfig.model_validate(cfg_json)
        if kind == "policy":
            from hetray.eval.scoring import Scorer

            self.model = Scorer.load(path, batch_size=self.cfg.batch_size, device=self.cfg.device)
        else:
            self.model = reward.RewardModel.load(path, batch_size=self.cfg.batch_size, device=self.cfg.device)

    def ready(self) -> bool:
        return True

    def score(self, suite: str, items: list) -> list[dict]:
        if suite == "reward":
            return reward.score_items(self.model, items)
        return score_suite(suite, self.model, items, self.cfg)


class _Pool:
    """``num_workers`` copies of a model (Ray actors), or one in this process when it is 1."""

    def __init__(self, kind: str, name: str, path: str, cfg: EvalConfig, seed: int):
        self.name, self.path, self.actors, self.local = name, path, [], None
        cfg_json = cfg.model_dump(mode="json")
        try:
            if cfg.num_workers == 1:
                self.local = _Worker(kind, path, cfg_json, seed)
                return
            import ray

            from hetray.config import RayConfig
            from hetray.orchestrate.ray_init import init_ray

            init_ray(RayConfig())
            # Ray leaves every GPU visible to an actor that asked for none: pin the device
            if cfg.device == "cuda" and not cfg.num_gpus_per_worker:
                raise EvalError("eval.device=cuda with num_workers > 1 needs eval.num_gpus_per_worker > 0")
            cfg_json["device"] = "cuda" if cfg.num_gpus_per_worker else "cpu"
            have = ray.cluster_resources()
            for res, each in (("CPU", 1), ("GPU", cfg.num_gpus_per_worker)):
                if cfg.num_workers * each > have.get(res, 0):
                    raise EvalError(f"eval.num_workers={cfg.num_workers} actors need {cfg.num_workers * each:g} "
                                    f"{res}s, the Ray cluster has {have.get(res, 0):g}")
            actor = ray.remote(num_cpus=1, num_gpus=cfg.num_gpus_per_worker)(_Worker)
            self.actors = [actor.remote(kind, path, cfg_json, seed) for _ in range(cfg.num_workers)]
            ray.get([a.ready.remote() for a in self.actors])
        except EvalError:
            raise
        except Exception as e:
            self.close()
            raise EvalError(f"model {name!r} ({path}) could not be loaded: {_cause(e)}") from e

    def score(self, suite: str, items: list) -> list[dict]:
        if self.local is not None:
            return self.local.score(suite, items)
        import ray

        chunks = split_evenly(items, len(self.actors))
        parts = ray.get([a.score.remote(suite, c) for a, c in zip(self.actors, chunks) if c])
        return [r for part in parts for r in part]

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
        self.actors, self.local = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cause(e: Exception) -> str:
    """The original error inside a Ray wrapper, in one line."""
    inner = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    return f"{type(inner or e).__name__}: {inner or e}".splitlines()[0][:500]


def split_evenly(items: list, n: int) -> list[list]:
    """``n`` contiguous chunks whose sizes differ by at most one (concatenated: ``items``)."""
    size, rest = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < rest)
        out.append(items[start:end])
        start = end
    return out


# ---------------------------------------------------------------------------- the reward suite


def _reward_models(models: dict[str, str], suites: list[str], default: str | None,
                   extra: dict[str, dict]) -> dict[str, str]:
    """{model name: reward model} for the reward suite (see the module docstring)."""
    if "reward" not in suites:
        return {}
    out = {}
    for name, path in models.items():
        rm = (extra.get(name) or {}).get("reward_model") or default
        if rm is None and Path(path).name == "merged":
            beside = Path(path).parent.parent / "reward"
            rm = str(beside) if reward.stage_dir_of(str(beside)) is not None else None
        if rm is not None:
            if not Path(reward.model_dir_of(rm)).exists():
                raise EvalError(f"reward model for {name!r}: {rm!r} does not exist")
            out[name] = rm
    if not out:
        raise EvalError("suite reward: no reward model: pass --reward-model (a run's reward/ folder or a "
                        "sequence-classification checkpoint), or evaluate models trained in a run that has one")
    return out


def _run_reward(rewards: dict, cfg: EvalConfig, seed: int, metrics, records, wall) -> None:
    done: dict[str, tuple[dict, list, float]] = {}
    for name, rm in rewards.items():
        if rm not in done:
            t = time.time()
            pairs = reward.load_items(rm, cfg.reward)
            with _Pool("reward", f"reward model of {name}", rm, cfg, seed) as pool:
                recs = pool.score("reward", pairs)
            done[rm] = (reward.aggregate(recs), recs, round(time.time() - t, 3))
            log.info("eval reward %s: %s", rm, _headline(done[rm][0]))
        overall, recs, secs = done[rm]
        metrics[name]["reward"] = {**overall, "reward_model": rm}
        records["reward"] += [{"model": name, "reward_model": rm, **r} for r in recs]
        wall[name]["reward"] = secs


# ---------------------------------------------------------------------------- outputs


def _finite(x):
    """NaN / inf -> None, recursively, so metrics.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_records(records: list[dict], folder: Path, suite: str) -> Path:
    """``<suite>.parquet``; ``<suite>.jsonl`` when the records do not make one Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = folder / f"{suite}.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        path = folder / f"{suite}.jsonl"
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str, ensure_ascii=False) + "\n")
        return path


def _write(out: Path, models, cfg: EvalConfig, seed, extra, rewards, metrics, records, wall, groups, started) -> dict:
    from hetray.eval.report import write_report
    from hetray.stage import versions

    out.mkdir(parents=True, exist_ok=True)
    paths = {"records": {s: str(write_records(recs, out / "records", s)) for s, recs in records.items()}}
    if "chat" in records:
        by_model = {name: [r for r in records["chat"] if r["model"] == name] for name in models}
        paths.update(chat.write_side_by_side(
            {m: [{k: v for k, v in r.items() if k != "model"} for r in recs] for m, recs in by_model.items()}, out))
    paths["report"] = write_report(metrics, out, run_info=extra)
    result = {**metrics, META: {
        "models": dict(models), "suites": [s for s in SUITES if s in cfg.suites], "seed": seed,
        "config": cfg.model_dump(mode="json"), "runs": extra, "reward_models": rewards,
        "by_group": {m: g for m, g in groups.items() if g},
        "wall_time_s": {**wall, "total": round(time.time() - started, 3)}, "versions": versions(),
        "outputs": paths,
    }}
    result = _finite(result)
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log.info("eval: %d model(s) x %d suite(s) -> %s", len(models), len(result[META]["suites"]), out)
    return result


# ---------------------------------------------------------------------------- command line


def add_arguments(p) -> None:
    """The ``hetray eval`` options (``p``: an argparse parser or subparser)."""
    p.add_argument("--models", required=True,
                   help="name=model,... : a bundled alias, a checkpoint or LoRA adapter folder, or a hub id "
                        "(e.g. base=smollm2-135m-instruct,sft=runs/x/sft/merged)")
    p.add_argument("--suites", help=f"comma-separated, of {','.join(SUITES)} (default: eval.suites of the config)")
    p.add_argument("--config", help="job YAML whose eval: section (and seed) to use (default: the EvalConfig defaults)")
    p.add_argument("--out", default="eval", help="output folder (default: eval/)")
    p.add_argument("--reward-model", help="reward model for the reward suite: a run's reward/ folder or a checkpoint")
    p.add_argument("--seed", type=int, help="default: the job's seed, else 0")
    p.add_argument("overrides", nargs="*", help="eval settings, e.g. batch_size=8 winogrande.limit=20 (eval. prefix optional)")


def parse_models(spec: str) -> dict[str, str]:
    """``a=path,b=alias`` -> {"a": "path", "b": "alias"}; a bare model is its own name."""
    models = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, path = part.partition("=")
        name, path = (name.strip(), path.strip()) if sep else (part, part)
        if not name or not path:
            raise EvalError(f"--models: {part!r} is not name=model")
        if name in models:
            raise EvalError(f"--models: the name {name!r} is given twice")
        models[name] = path
    if not models:
        raise EvalError("--models: no model given")
    return models


def eval_config(config: str | None, overrides: list[str], suites: str | None) -> tuple[EvalConfig, int | None]:
    """The EvalConfig (a job's eval: section, or the defaults) with overrides; and the job's seed."""
    from pydantic import ValidationError

    from hetray.config import ConfigError, apply_overrides, load_config

    job = load_config(config) if config else None
    data = job.eval.model_dump(mode="json") if job else {}
    apply_overrides(data, [o[len("eval."):] if o.startswith("eval.") else o for o in overrides])
    if suites:
        data["suites"] = [s.strip() for s in suites.split(",") if s.strip()]
    try:
        return EvalConfig.model_validate(data), (job.seed if job else None)
    except ValidationError as e:
        raise ConfigError("\n".join(_explain(err, config) for err in e.errors())) from None


def _explain(err: dict, config: str | None) -> str:
    """One pydantic error as 'where: unknown key 'eval.x.y'' (hetray.config's own explainer drops
    location parts named like a source format, such as ``winogrande``)."""
    key = "eval." + ".".join(str(p) for p in err["loc"])
    origin = config or "hetray eval"
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'"
    return f"{origin}: '{key}': {err['msg']} (got {err.get('input')!r})"


def cli(args) -> int:
    """``hetray eval``: run, print where the outputs are. 0 on success, 2 on a usage error."""
    import sys

    from hetray.config import ConfigError
    from hetray.unify.sources.readers import InputError

    try:
        models = parse_models(args.models)
        cfg, job_seed = eval_config(args.config, args.overrides, args.suites)
        seed = args.seed if args.seed is not None else (job_seed or 0)
        result = run_eval(models, cfg, args.out, seed=seed, reward_model=args.reward_model)
    except (ConfigError, InputError, FileNotFoundError, ValueError) as e:
        print(f"hetray eval: error: {e}", file=sys.stderr)
        return 2
    for name in models:
        for suite, overall in result[name].items():
            print(f"{name:>16} {suite:<10} {_headline(overall)}")
    print(f"metrics: {Path(args.out) / 'metrics.json'}\nreport:  {result[META]['outputs']['report']['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone: ``python -m hetray.eval.run --models ...``."""
    import argparse

    p = argparse.ArgumentParser(prog="hetray eval", description="Evaluate models: bias, WinoGrande, reward, chat.")
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
