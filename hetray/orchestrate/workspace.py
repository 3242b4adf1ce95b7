"""Runs that share stages: a grid run or a Tune trial reuses the job's converted data,
embeddings and (for the same k) clusters, and owns only what differs.

A job's ``run_dir`` (the *root*) holds the shared stages::

    <root>/preferences/ sft_only/ rejects/ embeddings/ clusters/   convert, embed, cluster (job's k)
    <root>/shared/k<K>/clusters/                                  clusters for another k
    <root>/runs/<selection>/                                      one folder per selection setting

``derive(root_cfg, run_dir, ...)`` makes ``run_dir`` with symbolic links to the shared folders
and returns the job config pointed at it, so every stage module runs unchanged on it: manifest
fingerprints resolve links (``manifest.fingerprint_dir``), so a linked stage is up to date
exactly when its owner is, and is skipped. A linked folder is never written through: the
clusters for a new k are made in ``<root>/shared/k<K>`` (under a file lock, so parallel Tune
trials never compute them twice) before they are linked.
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from hetray import stage as mf

log = logging.getLogger(__name__)

SHARED_DATA = ("preferences", "sft_only", "rejects", "embeddings")


def selection_name(sources: list[str] | None, n_clusters: int, fraction: float) -> str:
    """A folder name that says what a selection is: ``all-k10-f0.4``, ``winogrande-k10-f1``."""
    who = "+".join(sorted(sources)) if sources else "all"
    return f"{who}-k{n_clusters}-f{fraction:g}"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _link(target: Path, link: Path) -> None:
    """Point ``link`` at ``target`` (absolute), replacing an older link; refuse to replace data."""
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} is a real folder, not a link to the shared {target.name}/: remove it")
    link.symlink_to(target, target_is_directory=True)


def _with(cfg, **changes):
    """A copy of a job config with dotted changes (validated like a job file)."""
    from hetray.config import JobConfig, _set_dotted

    data = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        _set_dotted(data, dotted, value)
    return JobConfig.model_validate(data)


def shared_clusters(root_cfg, n_clusters: int) -> Path:
    """The clusters folder for ``n_clusters`` over the root's embeddings, computed once.

    The job's own k lives in ``<root>/clusters``; any other k in ``<root>/shared/k<K>/``, a
    small run folder of its own (links to the embeddings + real clusters/)."""
    from hetray.selection.clustering import run_cluster

    root = Path(root_cfg.run_dir).resolve()
    if n_clusters == root_cfg.cluster.n_clusters:
        with _locked(root / ".locks" / f"k{n_clusters}"):
            run_cluster(root_cfg)  # skipped when up to date
        return root / "clusters"
    home = root / "shared" / f"k{n_clusters}"
    with _locked(root / ".locks" / f"k{n_clusters}"):
        home.mkdir(parents=True, exist_ok=True)
        _link(root / "embeddings", home / "embeddings")
        run_cluster(_with(root_cfg, run_dir=str(home), **{"cluster.n_clusters": n_clusters}))
    return home / "clusters"


def derive(root_cfg, run_dir: str | os.PathLike, *, n_clusters: int | None = None,
           fraction: float | None = None, sources: list[str] | None = None, changes: dict | None = None):
    """Make ``run_dir`` share the root's data stages and return the job config for it.

    The root must already hold ``preferences/`` and ``embeddings/`` (``hetray convert`` and
    ``hetray embed``); clusters for ``n_clusters`` are made here when missing. ``changes`` are
    further dotted settings (``{"train.reward.max_steps": 8}``)."""
    root = Path(root_cfg.run_dir).resolve()
    for name in ("preferences", "embeddings"):
        if mf.read_manifest(root / name) is None:
            raise FileNotFoundError(f"{root / name} is missing: run convert and embed on the job first")
    k = n_clusters or root_cfg.cluster.n_clusters
    clusters = shared_clusters(root_cfg, k)
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    for name in SHARED_DATA:
        if (root / name).exists():
            _link(root / name, run / name)
    _link(clusters, run / "clusters")
    settings = {"run_dir": str(run), "cluster.n_clusters": k, **(changes or {})}
    if fraction is not None:
        settings["select.fraction"] = fraction
    if sources is not None:
        settings["select.sources"] = list(sources)
    return _with(root_cfg, **settings)
