"""The ``hetray`` command line.

    hetray run jobs/quickstart.yaml [key.sub=value ...]     # every stage of the job, in order
    hetray run --config jobs/quickstart.yaml [...]          # the same
    hetray run jobs/paper.yaml --check                      # only the preflight: every input, in seconds
    hetray convert --config jobs/quickstart.yaml [key.sub=value ...] [--force]
    hetray embed|cluster --config jobs/quickstart.yaml [overrides]
    hetray select --config jobs/quickstart.yaml [--fraction F] [--n-clusters K] [overrides]
    hetray train sft|reward|ppo|rloo|dpo --config jobs/quickstart.yaml [overrides] [--force]
    hetray eval --models base=smollm2-135m-instruct,sft=runs/x/sft/merged --suites winobias,chat
    hetray tune --config jobs/quickstart.yaml [overrides]  # Ray Tune over n_clusters / fraction
    hetray inspect PATH                                     # a run directory, a stage folder, a Parquet file
    hetray config show JOB [overrides]                      # the resolved job, every default filled in
    hetray config schema                                    # every key: type, default, help
    hetray --version

The terminal shows hetray's own lines (each stage's start and end with its wall time, results,
where the outputs are); Ray's output goes to ``<run_dir>/logs/hetray.log`` (``console``), and
``-v`` brings it back. An error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from hetray import __version__
from hetray.config import ConfigError, load_config
from hetray.orchestrate import console
from hetray.orchestrate.ray_init import init_ray
from hetray.stage import RunDirBusy
from hetray.train import STAGES as TRAIN_STAGES
from hetray.unify.sources.readers import InputError


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hetray", description="Fine-tune LLMs from heterogeneous feedback.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Ray's output on the terminal too (workers, Ray Data, Train, Tune) and hetray's debug lines")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="sources -> preferences/ (+ sft_only/, rejects/, manifest)")
    c.add_argument("--config", required=True, help="job YAML, e.g. jobs/quickstart.yaml")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. convert.batch_size=512")
    c.add_argument("--force", action="store_true", help="re-run even if the outputs are up to date")

    for name, help_ in (
        ("embed", "preferences/ -> embeddings/ (distinct prompts, sentence-transformer vectors)"),
        ("cluster", "embeddings/ -> clusters/ (distributed k-means)"),
        ("select", "preferences/ + clusters/ -> selected/ (D_train) + selected_report/"),
    ):
        e = sub.add_parser(name, help=help_)
        e.add_argument("--config", required=True, help="job YAML")
        e.add_argument("overrides", nargs="*", help="dotted overrides")
        e.add_argument("--force", action="store_true", help="re-run even if up to date")
        if name in ("cluster", "select"):
            e.add_argument("--n-clusters", type=int, help="k (same as cluster.n_clusters=K)")
        if name == "select":
            e.add_argument("--fraction", type=float, help="kept share (same as select.fraction=F)")

    t = sub.add_parser("train", help="a training stage on Ray Train: sft -> reward -> ppo | rloo | dpo")
    stages = t.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(TRAIN_STAGES) + "}")
    for stage in TRAIN_STAGES:  # a subparser each, so overrides may follow --config
        st = stages.add_parser(stage, help=f"train the {stage} stage (each needs the ones before it)")
        st.add_argument("--config", required=True, help="job YAML")
        st.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. train.{stage}.max_steps=10")
        st.add_argument("--force", action="store_true", help="re-run even if up to date")

    ev = sub.add_parser("eval", help="evaluate models: WinoBias/WinoGender bias, WinoGrande, reward, chat -> report")
    from hetray.eval.arguments import add_arguments as eval_arguments

    eval_arguments(ev)

    tu = sub.add_parser("tune", help="Ray Tune search over selection settings (n_clusters, fraction, label)")
    tu.add_argument("--config", required=True, help="job YAML; the search is its tune: section")
    tu.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.fraction=[0.2,1.0] tune.scheduler=fifo")

    i = sub.add_parser("inspect", help="summarise any hetray output (run dir, stage folder, parquet file)")
    i.add_argument("path", help="a run directory, a stage folder (preferences/, sft/, eval/, ...) or a Parquet file")

    co = sub.add_parser("config", help="the job settings: `show JOB` (resolved) or `schema` (every key)")
    what = co.add_subparsers(dest="action", required=True, metavar="{show,schema}")
    sh = what.add_parser("show", help="the job as hetray runs it: overrides applied, every default filled in (YAML)")
    sh.add_argument("job", help="job YAML, e.g. jobs/quickstart.yaml")
    sh.add_argument("overrides", nargs="*", help="dotted overrides, e.g. select.fraction=0.4")
    what.add_parser("schema", help="every key of a job YAML with its type, default and help")

    r = sub.add_parser("run", help="every stage of a job (pipeline.stages), in order; done stages are skipped")
    r.add_argument("job", nargs="?", help="job YAML, e.g. jobs/quickstart.yaml (or --config)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. 'pipeline.stages=[convert,select]'")
    r.add_argument("--config", help="job YAML (the same as the positional JOB)")
    r.add_argument("--force", action="store_true", help="re-run every stage even if up to date")
    r.add_argument("--check", action="store_true",
                   help="only the preflight: check every input of every stage (files, hub ids, models, LoRA "
                        "targets, DeepSpeed file, resources), print one line per check; exit 2 on a problem")
    return p


def _convert(cfg, force: bool) -> None:
    from hetray.unify.convert import run_convert
    from hetray.unify.summary import format_convert_summary, summarize_run

    run_convert(cfg, force=force)
    print(format_convert_summary(summarize_run(cfg.run_dir)))


def _stage(name: str, cfg, force: bool) -> None:
    if name == "embed":
        from hetray.selection.embed import run_embed

        m = run_embed(cfg, force=force)
        print(f"embeddings: {m.get('distinct_prompts', m.get('prompts'))} prompts -> {cfg.run_dir}/embeddings")
    elif name == "cluster":
        from hetray.selection.clustering import run_cluster

        m = run_cluster(cfg, force=force)
        print(f"clusters: k={cfg.cluster.n_clusters} inertia {m.get('inertia')} sizes {m.get('sizes')}")
    else:  # the command line sequences what select reads (each skipped when up to date)
        from hetray.selection.clustering import run_cluster
        from hetray.selection.embed import run_embed
        from hetray.selection.select import run_select

        run_embed(cfg)
        run_cluster(cfg)
        from hetray.orchestrate.inspect import selection_report

        m = run_select(cfg, force=force)
        print(
            f"selected: {m['pairs_selected']} of {m['pairs_in']} pairs (fraction {cfg.select.fraction}, "
            f"k={cfg.cluster.n_clusters}) -> {cfg.run_dir}/selected\n"
            f"report: {selection_report(Path(cfg.run_dir) / 'selected', m)}"
        )


def _train(stage: str, cfg, force: bool) -> None:
    import importlib

    module = importlib.import_module(f"hetray.train.{stage}")
    m = getattr(module, f"run_{stage}")(cfg, force=force)
    extra = "".join(f", {k} {v:.3f}" for k, v in m.get("final", {}).items() if isinstance(v, float))
    print(f"train {stage}: {m['global_step']} steps{extra} -> {cfg.run_dir}/{stage} (merged/, adapter/, metrics.json, loss.png)")


def _eval(args) -> None:
    from hetray.config import RayConfig
    from hetray.eval.run import from_args, print_result, run_eval

    models, cfg, seed, reward_model, out = from_args(args)
    if cfg.num_workers > 1:
        init_ray(RayConfig())
    result = run_eval(models, cfg, out, seed=seed, reward_model=reward_model)
    print_result(models, result, out)


def _run(args) -> None:
    from hetray.orchestrate.pipeline import run_pipeline
    from hetray.orchestrate.run_report import format_run_report

    job, overrides = _job_of(args)
    if not job:
        raise ConfigError("hetray run: give the job YAML (hetray run JOB, or --config JOB)")
    cfg = load_config(job, overrides)
    if args.check:
        return _check(cfg)
    summary = run_pipeline(cfg, args.force)
    print("\n" + format_run_report(summary, terminal=True))
    run_report, eval_report = Path(cfg.run_dir) / "report.md", summary["eval_report"]
    print(f"\nreport: {console.shown(run_report if run_report.exists() else cfg.run_dir)}"
          + (f"  evaluation: {console.shown(eval_report)}" if eval_report else ""))


def _check(cfg) -> None:
    """``hetray run JOB --check``: the preflight alone, against the cluster when one is configured."""
    import os

    from hetray.orchestrate.preflight import preflight

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        init_ray(cfg.ray)  # compare the resources with that cluster's
    report = preflight(cfg, raise_on_problems=False)
    print(report.format())
    if report.problems:
        raise report.error()
    print(f"preflight: no problems in {len(report.checks)} checks ({cfg.name})")


def _version() -> str:
    from importlib import metadata

    try:
        ray = metadata.version("ray")
    except metadata.PackageNotFoundError:
        ray = "not installed"
    return f"hetray {__version__} (Ray {ray}, Python {sys.version.split()[0]})"


def _config(args) -> None:
    """``hetray config show JOB`` / ``hetray config schema``."""
    import yaml

    from hetray.config import format_schema

    if args.action == "schema":
        print(format_schema())
        return
    cfg = load_config(args.job, list(args.overrides))
    print(f"# {args.job}{' ' + ' '.join(args.overrides) if args.overrides else ''}: resolved, every default filled in")
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=110).rstrip())


def _job_of(args) -> tuple[str | None, list[str]]:
    """The job YAML and overrides of a command (``run JOB``, ``run --config JOB``, ``--config``)."""
    job, overrides = getattr(args, "config", None), list(getattr(args, "overrides", None) or [])
    if args.command == "run":
        if not job:
            job = args.job
        elif args.job:  # `run --config JOB a=b`: the positional slot caught the first override
            overrides = [args.job] + overrides
    return job, overrides


def _run_dir_of(args) -> str | None:
    """Where this command's log file goes (``<run_dir>/logs/hetray.log``); None: none (commands
    without a job; ``run --check``, which writes nothing)."""
    if args.command in ("inspect", "config") or getattr(args, "check", False):
        return None
    job, overrides = _job_of(args)
    if args.command == "eval" and job:
        overrides = []  # eval's overrides are eval settings, not job keys
    try:
        return load_config(job, overrides).run_dir if job else None
    except ConfigError:
        return None  # the command itself reports it


# what a person can fix: one line, no traceback
USER_ERRORS = (ConfigError, InputError, RunDirBusy, FileNotFoundError, ValueError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # argparse takes no positionals after an option (`run JOB --force a=b`): overrides still
        stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            args.overrides = list(args.overrides) + extra
    except SystemExit as e:  # --help / --version: 0; a usage error (argparse wrote it to stderr): 2
        return e.code if isinstance(e.code, int) else 0
    console.setup(args.verbose)
    try:
        run_dir = _run_dir_of(args)
        if run_dir is not None:
            console.attach_log_file(run_dir)
        code = _dispatch(args)
    except USER_ERRORS as e:
        logging.getLogger("hetray.cli").debug("error", exc_info=True)
        print(f"hetray: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("hetray: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001  (a crash: one line here, the traceback in the log file)
        _crash(e, args.verbose)
        return 2
    return code or 0


def _crash(e: Exception, verbose: bool) -> None:
    """A line naming the error; its traceback in the log file (on the terminal with -v, or when
    the command has no log file)."""
    where = console.log_file()
    if where is None or verbose:
        import traceback

        traceback.print_exc(file=sys.stderr)
    else:
        logging.getLogger("hetray.cli").debug("crash", exc_info=True)
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    # a remote error's text is a traceback whose last line names the error (ValueError: ...)
    msg = last if re.match(r"[\w.]+(Error|Exception)\b", last) else f"{type(e).__name__}: {last}"
    print(f"hetray: error: {msg}" + (f" (traceback in {where})" if where and not verbose else ""),
          file=sys.stderr, flush=True)


def _dispatch(args) -> int | None:
    if args.command == "tune":
        from hetray.orchestrate.tune import cli as tune_cli

        return tune_cli(args)
    elif args.command == "eval":
        _eval(args)
    elif args.command == "inspect":
        from hetray.orchestrate.inspect import inspect

        print(inspect(args.path))
    elif args.command == "config":
        _config(args)
    elif args.command == "run":
        _run(args)
    else:  # one stage
        overrides = list(args.overrides)
        if getattr(args, "n_clusters", None) is not None:
            overrides.append(f"cluster.n_clusters={args.n_clusters}")
        if getattr(args, "fraction", None) is not None:
            overrides.append(f"select.fraction={args.fraction}")
        cfg = load_config(args.config, overrides)
        init_ray(cfg.ray)
        from hetray.orchestrate.storage import check_shared_storage

        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        check_shared_storage(cfg.run_dir)  # nothing on one node; on several, every node must see run_dir
        if args.command == "convert":
            _convert(cfg, args.force)
        elif args.command == "train":
            _train(args.stage, cfg, args.force)
        else:
            _stage(args.command, cfg, args.force)


if __name__ == "__main__":
    sys.exit(main())
