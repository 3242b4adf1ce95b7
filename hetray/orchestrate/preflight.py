"""Checks a job must pass before its first stage runs.

``preflight(cfg, runs)``: every input of every stage the job will run, checked in seconds before
any work, so a job submitted to a cluster for hours does not fail at its eval stage because a
data file was never readable. Each check is one ``Check`` (what, ok / problem, detail) in a
``PreflightReport``; every problem is collected (not just the first) and a job with any is
refused with one ``ConfigError`` listing them all. ``hetray run JOB --check`` prints the report
and runs nothing; ``hetray run`` runs it before its first stage. What is checked:

* ``run_dir``: can be created and written.
* ``pipeline.runs``: the sources each run names are convert sources; without convert in
  ``pipeline.stages``, ``preferences/`` of an earlier run is there.
* convert sources: local files and globs exist, are readable and fit their adapter
  (``hetray.unify.convert.plan_source``); ``hf:ORG/NAME[:SPLIT[:CONFIG]]`` ids exist on the hub,
  or are in the local Hugging Face cache (offline: ``HF_HUB_OFFLINE``, or no connection).
* models: the embedder (when embed runs) and the base LLM (when a stage trains or evaluates it):
  bundled, a local folder with a config and a tokenizer, or a hub id (config and tokenizer
  files, from the hub or its cache); no weights are loaded. LoRA ``target_modules`` of every
  training stage the runs use are Linear layers of the base model (built from its config on the
  meta device). The DeepSpeed file exists and is JSON.
* eval suites: the data of every configured suite is read and checked as the eval stage would
  (local files), or resolved on the hub (``hf:`` paths, ``hetray.eval.hub``; WinoBias ``hub``:
  cached, or its download URL answers).
* contamination: ``check_no_contamination`` below.
* shared storage (Ray up with several nodes): every node sees ``run_dir`` and convert's local
  input files as the driver does (``hetray.orchestrate.storage``); with one node, no check.
* resources: each Ray stage's workers x CPUs / GPUs against ``ray.cluster_resources()`` when Ray
  is up; else against what a local Ray on this machine would have (no cluster address), or
  skipped (a cluster address set but not joined).

Hub look-ups use huggingface_hub's own API with a short timeout; the first one that cannot
connect marks the hub unreachable, so an offline check costs no timeouts.

``check_no_contamination``: a job never evaluates on data it trained on. Every file an eval suite
reads (``Suite.files``) is compared, by path and by content, with every file of the sources the
job trains on. The one allowed overlap is a deterministic split: a WinoGrande source with
``holdout: h`` trains on the rows ``eval.winogrande.holdout: h`` does not score
(``hetray.pairs.holdout`` of the ``qID``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hetray.config import ConfigError, JobConfig
from hetray.formats import is_hub
from hetray.stage import content_hash

log = logging.getLogger(__name__)

OK, PROBLEM, SKIPPED = "ok", "problem", "skipped"
TIMEOUT_S = 10  # per hub / download probe
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class Check:
    what: str  # the config key or input checked, e.g. "convert.sources[0] 'winogrande'"
    status: str  # ok | problem | skipped
    detail: str

    def line(self) -> str:
        return f"{'PROBLEM' if self.status == PROBLEM else self.status:<8} {self.what}: {self.detail}"


@dataclass
class PreflightReport:
    job: str
    checks: list[Check] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == PROBLEM]

    def add(self, what: str, status: str, detail: str) -> None:
        self.checks.append(Check(what, status, detail))

    def format(self) -> str:
        return "\n".join(c.line() for c in self.checks)

    def error(self) -> ConfigError:
        lines = "".join(f"\n  - {c.what}: {c.detail}" for c in self.problems)
        n = len(self.problems)
        return ConfigError(f"job {self.job!r}: preflight found {n} problem(s); nothing has run:{lines}")


class _Problem(Exception):
    """A check's finding (its message is the detail)."""


# ---------------------------------------------------------------------------- the check


def preflight(cfg: JobConfig, runs=None, resources: dict | None = None, contamination: bool = True,
              raise_on_problems: bool = True) -> PreflightReport:
    """Check every input of every stage ``runs`` (default: ``plan_runs(cfg)``) will run; raise a
    ConfigError listing every problem (unless ``raise_on_problems`` is False). ``resources``:
    the cluster's, to compare with (default: Ray's when it is up, see the module docstring)."""
    from hetray.orchestrate.pipeline import plan_runs  # pipeline imports this module

    runs = plan_runs(cfg) if runs is None else runs
    plan = _Plan.of(cfg, runs)
    report = PreflightReport(cfg.name)
    hub = Hub()
    _guard(report, "run_dir", lambda: _run_dir(cfg.run_dir))
    if plan.convert:
        for i, s in enumerate(cfg.convert.sources):
            _guard(report, f"convert.sources[{i}] {s.name!r}", lambda s=s, i=i: _source(s, i, hub))
    elif plan.embed or plan.train:  # a later stage reads what an earlier `hetray run` converted
        _guard(report, "preferences", lambda: _converted(cfg.run_dir))
    if cfg.pipeline.runs:
        _guard(report, "pipeline.runs", lambda: _run_sources(cfg, runs))
    if plan.embed:
        _model_check(report, hub, cfg.embed.model, "embed.model", embedder=True)
    if plan.base:
        load_config = _model_check(report, hub, cfg.train.model, "train.model")
        for stage in plan.train:
            what = f"train.{stage}.lora.target_modules"
            targets = getattr(cfg.train, stage).lora.target_modules
            if load_config is None:
                report.add(what, SKIPPED, f"train.model {cfg.train.model!r} could not be resolved")
            else:
                _guard(report, what, lambda t=targets: _lora(t, cfg.train.model, load_config))
    if plan.train and cfg.train.resources.deepspeed:
        _guard(report, "train.resources.deepspeed", lambda: _deepspeed(cfg.train.resources.deepspeed))
    if plan.eval:
        for name in cfg.eval.suites:
            _guard(report, f"eval suite {name}", lambda n=name: _suite(n, cfg, runs, hub))
    if contamination and plan.eval and plan.train:
        _guard(report, "contamination", lambda: _contamination(cfg, runs))
    _shared_storage(report, cfg, plan)
    _resources(report, cfg, plan, resources)
    log.debug("preflight of %r: %d checks, %d problem(s)", cfg.name, len(report.checks), len(report.problems))
    if raise_on_problems and report.problems:
        raise report.error()
    return report


@dataclass
class _Plan:
    """What the job's stages will need (as ``hetray.orchestrate.pipeline._run`` runs them)."""

    convert: bool
    embed: bool
    train: list[str]  # training stages some run trains, in chain order
    eval: bool

    @property
    def base(self) -> bool:  # the base LLM is trained from or evaluated
        return bool(self.train) or self.eval

    @classmethod
    def of(cls, cfg: JobConfig, runs) -> _Plan:
        from hetray.train import STAGES as TRAIN_STAGES

        wants = cfg.pipeline.stages
        selecting = any(r.folder for r in runs) and "select" in wants
        trained = {s for r in runs if r.folder for s in r.train}
        return cls(convert="convert" in wants, embed="embed" in wants or selecting,
                   train=[s for s in TRAIN_STAGES if s in trained], eval="eval" in wants)


def _guard(report: PreflightReport, what: str, check: Callable[[], str]) -> None:
    """One check: its ok detail, or its problem; an unexpected failure is a problem too."""
    try:
        report.add(what, OK, check())
    except _Problem as e:
        report.add(what, PROBLEM, str(e))
    except Exception as e:  # noqa: BLE001 - a preflight lists what fails, it does not crash on it
        report.add(what, PROBLEM, f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------------------- run dir, sources


def _run_dir(run_dir: str) -> str:
    path = Path(run_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise _Problem(f"{path}: {existing} is not a writable folder")
    return f"{path} exists" if existing == path else f"{path} will be created (in {existing})"


def _source(s, i: int, hub: Hub) -> str:
    from hetray.unify.convert import plan_source, resolve_files
    from hetray.unify.sources import adapter_for

    paths = [s.path] if isinstance(s.path, str) else list(s.path)
    hub_paths = [p for p in paths if is_hub(p)]
    if hub_paths and len(paths) == 1:
        adapter_for(s)  # the source's settings fit its format
        return hub.dataset(hub_paths[0], f"convert.sources[{i}] {s.name!r}")
    try:
        plan_source(s)  # files exist, names and columns fit the adapter (as convert checks them)
        files = resolve_files(s.path)
    except ValueError as e:
        raise _Problem(str(e)) from None
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise _Problem(f"not readable: {', '.join(unreadable[:5])}")
    return f"{len(files)} file(s): {_short(files)}"


def _converted(run_dir: str) -> str:
    from hetray.schema import parquet_files

    folder = Path(run_dir) / "preferences"
    if not parquet_files(folder):
        raise _Problem(f"{folder} holds no converted pairs and convert is not in pipeline.stages: add it, "
                       "or run `hetray convert` first")
    return f"{folder} (converted before)"


def _run_sources(cfg: JobConfig, runs) -> str:
    names = {s.name for s in cfg.convert.sources}
    unknown = [f"{r.name}: {', '.join(sorted(set(r.sources) - names))}" for r in runs
               if r.sources and set(r.sources) - names]
    if unknown:
        raise _Problem(f"sources that convert.sources does not name ({'; '.join(unknown)}); "
                       f"convert.sources: {', '.join(sorted(names))}")
    return f"{len(runs)} runs, their sources in convert.sources"


def _short(files: list[str], n: int = 2) -> str:
    shown = ", ".join(os.path.relpath(f) if not os.path.relpath(f).startswith("..") else f for f in files[:n])
    return shown + (f" and {len(files) - n} more" if len(files) > n else "")


# ---------------------------------------------------------------------------- the hub


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return constants.is_offline_mode() or env


class Hub:
    """Hugging Face hub look-ups for one preflight: offline mode (``HF_HUB_OFFLINE``) or the
    first call that cannot connect makes every later one use the local cache only."""

    def __init__(self, timeout: float = TIMEOUT_S):
        self.timeout = timeout
        self.down: str | None = "offline" if _offline() else None

    def _call(self, fn):
        """``fn()``, a hub request; None when the hub cannot be reached (then ``down`` says why)."""
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

        if self.down:
            return None
        try:
            return fn()
        except GatedRepoError:
            raise _Problem("is gated on the hub: accept its licence there and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise _Problem("does not exist on the hub (or is private: set HF_TOKEN)") from None
        except OfflineModeIsEnabled:
            self.down = "offline"
        except HfHubHTTPError as e:
            if getattr(e, "response", None) is not None and e.response.status_code < 500:
                raise _Problem(f"the hub answered: {e}") from None
            self.down = f"it answered {type(e).__name__}"
        except Exception as e:  # noqa: BLE001 - no connection, DNS, timeout: the hub is unreachable
            self.down = f"no connection: {type(e).__name__}"
        return None

    def _unreachable(self, what: str, where: str) -> _Problem:
        return _Problem(f"cannot reach the Hugging Face hub ({self.down}): {what} needed by {where}, and it is "
                        f"not in the local cache: download it where there is network, or give a local path")

    def dataset(self, spec: str, where: str) -> str:
        """``hf:ORG/NAME[:SPLIT[:CONFIG]]``: a local dataset folder, on the hub, or cached."""
        from hetray.eval.hub import parse

        name, split, config = parse(spec)
        if not name:
            raise _Problem(f"{spec!r} names no dataset: the form is hf:ORG/NAME[:SPLIT[:CONFIG]]")
        if os.path.exists(name):
            return f"{spec}: a local dataset folder"
        from huggingface_hub import HfApi

        try:
            info = self._call(lambda: HfApi().dataset_info(name, timeout=self.timeout))
        except _Problem as e:
            raise _Problem(f"{spec} needed by {where}: dataset {name!r} {e}") from None
        if info is None:
            if _dataset_cached(name, config):
                return f"{spec}: in the local cache (hub {self.down})"
            raise self._unreachable(spec, where)
        configs = _dataset_configs(info)
        if config and configs and config not in configs:
            raise _Problem(f"{spec} needed by {where}: dataset {name!r} has no config {config!r} "
                           f"(it has {', '.join(sorted(configs))})")
        return f"{spec}: on the hub"

    def model(self, name: str, where: str, embedder: bool = False) -> tuple[str, str | None]:
        """A hub model id -> (detail, folder holding its config.json or None)."""
        from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

        what = f"model {name!r}"
        try:
            info = self._call(lambda: HfApi().model_info(name, timeout=self.timeout))
        except _Problem as e:
            raise _Problem(f"{what} needed by {where} {e}") from None
        if info is None:  # the cache alone
            def cached(f):
                hit = try_to_load_from_cache(name, f)
                return hit if isinstance(hit, str) else None

            config = cached("config.json") or (cached("modules.json") if embedder else None)
            if config is None:
                raise self._unreachable(what, where)
            if not any(cached(f) for f in TOKENIZER_FILES):
                raise _Problem(f"{what} needed by {where}: its config is in the local cache but no tokenizer file "
                               f"({', '.join(TOKENIZER_FILES)}), and the hub is {self.down}")
            return f"in the local hub cache (hub {self.down})", str(Path(config).parent)
        files = {s.rfilename for s in info.siblings or []}
        if "config.json" not in files and not (embedder and "modules.json" in files):
            raise _Problem(f"{what} needed by {where}: the repo has no config.json (not a transformers model)")
        if not files & set(TOKENIZER_FILES):
            raise _Problem(f"{what} needed by {where}: the repo has no tokenizer ({', '.join(TOKENIZER_FILES)})")
        if "config.json" not in files:
            return "on the hub", None
        try:  # a few KB; a gated repo refuses it here
            config = self._call(lambda: hf_hub_download(name, "config.json", etag_timeout=self.timeout))
        except _Problem as e:
            raise _Problem(f"{what} needed by {where} {e}") from None
        return "on the hub", str(Path(config).parent) if config else None


def _dataset_cached(name: str, config: str | None) -> bool:
    """Whether ``datasets.load_dataset`` finds the dataset offline: the hub cache, or the
    datasets cache (``HF_DATASETS_CACHE``; per config when one is given)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    prepared = prepared / name.replace("/", "___") / (config or "")
    return prepared.is_dir() and any(prepared.iterdir())


def _dataset_configs(info) -> set[str]:
    """Config names the dataset card declares (empty when it declares none)."""
    card = info.card_data.to_dict() if getattr(info, "card_data", None) is not None else {}
    out = set()
    for key in ("configs", "dataset_info"):
        entries = card.get(key) or []
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict) and entry.get("config_name"):
                out.add(entry["config_name"])
    return out


# ---------------------------------------------------------------------------- models


def _model_check(report: PreflightReport, hub: Hub, name: str, what: str, embedder: bool = False):
    """Add the check of one model; return a loader of its config (None: unknown, or not usable)."""
    try:
        detail, load_config = _resolve_model(name, what, hub, embedder)
    except _Problem as e:
        report.add(what, PROBLEM, str(e))
        return None
    except Exception as e:  # noqa: BLE001
        report.add(what, PROBLEM, f"{name}: {type(e).__name__}: {e}")
        return None
    report.add(what, OK, f"{name}: {detail}")
    return load_config


def _resolve_model(name: str, where: str, hub: Hub, embedder: bool):
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from hetray.models import _PACKAGES, DEFAULT_EMBEDDER, DEFAULT_LLM, ModelNotFoundError, _gguf_file, _package_dir

    if name in (DEFAULT_LLM, DEFAULT_EMBEDDER):
        try:
            found = _gguf_file() if name == DEFAULT_LLM else _package_dir(name)
        except ModelNotFoundError as e:
            raise _Problem(str(e)) from None
        return f"bundled (package {_PACKAGES[name]})", (_bundled_config if name == DEFAULT_LLM else None)
    path = Path(name).expanduser()
    if path.exists():
        return _local_model(path, where, hub, embedder)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise _Problem(f"model {name!r} is not a bundled model ({', '.join(_PACKAGES)}) and no such "
                       f"local folder exists") from None
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise _Problem(f"model folder {name!r} does not exist")
    detail, folder = hub.model(name, where, embedder)
    return detail, (_config_loader(folder) if folder else None)


def _local_model(path: Path, where: str, hub: Hub, embedder: bool):
    from hetray.models import adapter_base

    if not path.is_dir():
        raise _Problem(f"{path} is a file, not a model folder")
    adapter = path / "adapter_config.json"
    if adapter.is_file():  # a LoRA adapter: its base model is what loads
        try:
            base = adapter_base(path)  # as the training and eval stages resolve it (relative, bundled, hub)
        except ValueError as e:
            raise _Problem(str(e)) from None
        detail, load_config = _resolve_model(base, where, hub, embedder)
        return f"a LoRA adapter on {base} ({detail})", load_config
    config = path / "config.json"
    if not config.is_file() and not (embedder and (path / "modules.json").is_file()):
        raise _Problem(f"{path} has no config.json: not a transformers checkpoint")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise _Problem(f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)})")
    return "a local checkpoint", (_config_loader(str(path)) if config.is_file() else None)


def _config_loader(folder: str):
    def load():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(folder)

    return load


def _bundled_config():
    """The bundled LLM's config: from its converted checkpoint when one exists (any: they are
    the same model), else read from the GGUF (slower; converts nothing)."""
    from transformers import AutoConfig

    from hetray.models import DEFAULT_LLM, _gguf_file, cache_dir

    converted = sorted(glob.glob(str(cache_dir() / "models" / f"{DEFAULT_LLM}-*" / "config.json")))
    if converted:
        return AutoConfig.from_pretrained(Path(converted[0]).parent)
    gguf = _gguf_file()
    return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)


_LINEAR_NAMES: dict[str, list[str]] = {}


def _lora(targets: list[str], model: str, load_config) -> str:
    """Every target module is a Linear layer of the model (built from its config, no weights)."""
    if model not in _LINEAR_NAMES:
        import torch
        from transformers import AutoModelForCausalLM

        config = load_config()
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
        _LINEAR_NAMES[model] = sorted({n.rsplit(".", 1)[-1] for n, m in built.named_modules()
                                       if isinstance(m, torch.nn.Linear)})
    available = _LINEAR_NAMES[model]
    missing = [t for t in targets if t not in available]
    if missing:
        raise _Problem(f"{', '.join(missing)} not found in {model}; its Linear layers are: {', '.join(available)}")
    return f"{', '.join(targets)} in {model}"


def _deepspeed(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise _Problem(f"DeepSpeed config file {path!r} does not exist (from {Path.cwd()})")
    try:
        json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Problem(f"{path} is not valid JSON: {e}") from None
    return f"{path} is JSON"


# ---------------------------------------------------------------------------- eval data


def _suite(name: str, cfg: JobConfig, runs, hub: Hub) -> str:
    """An eval suite's data, read and checked as the eval stage reads it (nothing downloaded)."""
    from hetray.eval.suites import SUITES

    e = cfg.eval
    if name == "winogrande" and is_hub(e.winogrande.path):
        return hub.dataset(e.winogrande.path, "eval.winogrande.path")
    if name == "winogender" and e.winogender.path and is_hub(e.winogender.path):
        return hub.dataset(e.winogender.path, "eval.winogender.path")
    if name == "winobias" and e.winobias.path == "hub":
        return _winobias_hub(e.winobias)
    if name == "reward":
        if e.reward.pairs:
            if not Path(e.reward.pairs).is_dir():
                raise _Problem(f"eval.reward.pairs: {e.reward.pairs!r} is not a folder")
            return f"pairs from {e.reward.pairs}"
        if not any("reward" in r.train for r in runs):
            raise _Problem("no run trains the reward stage, so there is no reward model to evaluate: add reward "
                           "to a run's train, or drop the suite")
        return "the reward models of the runs that train one"
    try:
        items = SUITES[name].load(e, None)
    except (ValueError, OSError) as err:
        raise _Problem(str(err)) from None
    files = SUITES[name].files(e)
    return f"{len(items)} items" + (f" from {_short(files)}" if files else "")


def _winobias_hub(settings) -> str:
    """``eval.winobias.path: hub``: the files are cached, or their download URL answers."""
    from hetray.eval.winobias import HUB_URL, file_names
    from hetray.models import cache_dir

    missing = [n for n in file_names(settings.splits, settings.types) if not (cache_dir() / "winobias" / n).is_file()]
    if not missing:
        return f"cached in {cache_dir() / 'winobias'}"
    url = HUB_URL + missing[0]
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=TIMEOUT_S).close()
    except (urllib.error.URLError, OSError) as err:
        raise _Problem(f"cannot download {len(missing)} WinoBias file(s) from {HUB_URL} ({err}), and they are not in "
                       f"{cache_dir() / 'winobias'}: put the {{pro,anti}}_stereotyped_type*.txt.* files in a "
                       f"folder and set eval.winobias.path to it") from None
    return f"{len(missing)} file(s) to download from {HUB_URL} (reachable)"


def _contamination(cfg: JobConfig, runs) -> str:
    try:
        check_no_contamination(cfg, runs)
    except ConfigError as e:
        raise _Problem(str(e)) from None
    return "no eval suite reads a file the runs train on"


# ---------------------------------------------------------------------------- shared storage


def _shared_storage(report: PreflightReport, cfg: JobConfig, plan: _Plan) -> None:
    """On a Ray cluster of several nodes: every node sees run_dir (once it exists: ``--check``
    creates nothing) and convert's local input files (``storage.check_shared_storage``)."""
    ray = sys.modules.get("ray")  # not imported: not running in this process
    if ray is None or not ray.is_initialized() or sum(1 for n in ray.nodes() if n.get("Alive")) < 2:
        return
    from hetray.orchestrate.storage import SharedStorageError, check_shared_storage

    files = sorted({f for fs in (_local_inputs(cfg) if plan.convert else {}).values() for f in fs})
    run_dir = cfg.run_dir if Path(cfg.run_dir).is_dir() else None

    def check() -> str:
        try:
            seen = check_shared_storage(run_dir, files)
        except SharedStorageError as e:
            raise _Problem(str(e)) from None
        return seen + ("" if run_dir else f"; run_dir {Path(cfg.run_dir).resolve()} does not exist yet: it is "
                       "checked when the job starts")

    _guard(report, "shared storage", check)


def _local_inputs(cfg: JobConfig) -> dict[int, list[str]]:
    """{index in convert.sources: its local files} (hub sources and missing files left out)."""
    from hetray.unify.convert import resolve_files

    out = {}
    for i, s in enumerate(cfg.convert.sources):
        paths = [s.path] if isinstance(s.path, str) else list(s.path)
        if any(is_hub(p) for p in paths):
            continue
        try:
            out[i] = resolve_files(s.path)
        except ValueError:  # a missing input: its source's check names it, or its stage fails with its own message
            continue
    return out


# ---------------------------------------------------------------------------- resources


def _resources(report: PreflightReport, cfg: JobConfig, plan: _Plan, have: dict | None) -> None:
    needs = _needs(cfg, plan)
    if not needs:
        return
    where = "the Ray cluster"
    if have is None:
        ray = sys.modules.get("ray")  # not imported: not running in this process
        if ray is not None and ray.is_initialized():
            have = ray.cluster_resources()
        elif cfg.ray.address or os.environ.get("RAY_ADDRESS"):
            for what, _ in needs:
                report.add(what, SKIPPED, f"Ray cluster {cfg.ray.address or os.environ['RAY_ADDRESS']} not joined")
            return
        else:
            have, where = _local_resources(cfg), "a local Ray on this machine (no RAY_ADDRESS)"
    for what, need in needs:
        short = [r for r, n in need.items() if n > have.get(r, 0)]
        wanted = ", ".join(f"{n:g} {r}" for r, n in need.items() if n)
        has = ", ".join(f"{have.get(r, 0):g} {r}" for r in need)
        report.add(what, PROBLEM if short else OK, f"needs {wanted}; {where} has {has}")


def _needs(cfg: JobConfig, plan: _Plan) -> list[tuple[str, dict]]:
    """(what, {CPU: n, GPU: n}) of each Ray stage; stages run one at a time, so each alone."""
    out = []
    if plan.embed:
        e = cfg.embed
        gpus = e.num_gpus_per_actor if e.num_gpus_per_actor != "auto" else 0  # auto: GPUs when there are
        out.append((f"resources: embed ({e.num_actors} actors x {e.num_cpus_per_actor:g} CPU, +1 CPU for I/O)",
                    {"CPU": e.num_actors * e.num_cpus_per_actor + 1, "GPU": e.num_actors * gpus}))
    if plan.train:
        r = cfg.train.resources
        gpus = r.gpus_per_worker if r.use_gpu is True else 0
        out.append((f"resources: train ({r.num_workers} workers x {r.cpus_per_worker:g} CPU"
                    + (f" + {gpus:g} GPU" if gpus else "") + ")",
                    {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * gpus}))
    if plan.eval and cfg.eval.num_workers > 1:
        e = cfg.eval
        out.append((f"resources: eval ({e.num_workers} workers x 1 CPU"
                    + (f" + {e.num_gpus_per_worker:g} GPU" if e.num_gpus_per_worker else "") + ")",
                    {"CPU": e.num_workers, "GPU": e.num_workers * e.num_gpus_per_worker}))
    return out


def _local_resources(cfg: JobConfig) -> dict:
    """What ``init_ray`` would start here: the configured CPUs (else all), every visible GPU."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no CUDA: no GPUs
        pass
    return {"CPU": cfg.ray.num_cpus or os.cpu_count() or 1, "GPU": gpus}


# ---------------------------------------------------------------------------- contamination


def _identity(path: str) -> tuple[str, str]:
    return os.path.realpath(path), content_hash(path)


def _trained_sources(cfg: JobConfig, runs) -> set[str]:
    """Names of the convert sources some run trains on (a run without ``sources``: all of them)."""
    return {s for r in runs if r.train for s in (r.sources or [src.name for src in cfg.convert.sources])}


def training_files(cfg: JobConfig, runs) -> dict[int, list[str]]:
    """{index in convert.sources: its local files} for the sources some run trains on."""
    trained = _trained_sources(cfg, runs)
    return {i: files for i, files in _local_inputs(cfg).items() if cfg.convert.sources[i].name in trained}


def check_no_contamination(cfg: JobConfig, runs) -> None:
    """Raise ConfigError when an eval suite reads a file that a trained-on source reads."""
    if "eval" not in cfg.pipeline.stages or not any(r.train for r in runs):
        return
    from hetray.eval.suites import SUITES

    _same_hub_split(cfg, runs)
    sources = training_files(cfg, runs)
    if not sources:
        return
    seen: dict[tuple[str, str] | str, int] = {}
    for i, files in sources.items():
        for f in files:
            real, digest = _identity(f)
            seen[real], seen[digest] = i, i
    for name in cfg.eval.suites:
        for f in SUITES[name].files(cfg.eval):
            if not Path(f).is_file():
                continue
            real, digest = _identity(f)
            i = seen.get(real, seen.get(digest))
            if i is None:
                continue
            s = cfg.convert.sources[i]
            split = getattr(s, "holdout", None)
            if name == "winogrande" and s.format == "winogrande" and split is not None \
                    and cfg.eval.winogrande.holdout == split:
                continue  # trained on the rest of the file: the split is deterministic
            hint = ("set convert.sources[{i}].holdout and eval.winogrande.holdout to the same share "
                    "(a split by qID), or evaluate on another file" if name == "winogrande"
                    else f"evaluate on other files (eval.{name}) or drop the source").format(i=i)
            raise ConfigError(
                f"eval suite {name!r} reads {f}, which source {s.name!r} (convert.sources[{i}]) trains on: "
                f"a job never evaluates on data it trained on; {hint}")


def _same_hub_split(cfg: JobConfig, runs) -> None:
    """An ``hf:`` eval path that names the very split (and config) a trained-on source reads."""
    from hetray.eval.hub import parse

    trained = _trained_sources(cfg, runs)
    read = {}
    for i, s in enumerate(cfg.convert.sources):
        if s.name in trained and isinstance(s.path, str) and is_hub(s.path):
            read[parse(s.path)] = i
    for name in ("winogrande", "winogender"):
        path = getattr(cfg.eval, name).path
        if name in cfg.eval.suites and is_hub(path) and parse(path) in read:
            i = read[parse(path)]
            raise ConfigError(
                f"eval suite {name!r} reads {path}, the split source {cfg.convert.sources[i].name!r} "
                f"(convert.sources[{i}]) trains on: a job never evaluates on data it trained on; evaluate on "
                f"another split (e.g. validation)")
