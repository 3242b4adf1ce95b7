"""Runs that share stages: a grid run or a Tune trial reuses the job's converted data,
embeddings and (for the same k) clusters, and owns only what differs.

A job's ``run_dir`` (the *root*) holds the shared stages::

    <root>/preferences/ sft_only/ rejects/ embeddings/ clusters/   convert, embed, cluster (job's k)
    <root>/shared/k<K>/clusters/                                  clusters for another k
    <root>/runs/<selection>/                                      one folder per selection setting

``shared_clusters(root_cfg, k)`` runs the cluster stage for ``k`` once (the job's own k in
``<root>/clusters``, any other in ``<root>/shared/k<K>``). ``derive(root_cfg, run_dir, clusters)``
then makes ``run_dir`` with relative symbolic links to the shared folders and returns the job
config pointed at it, so every stage module runs unchanged on it: a stage folder is
fingerprinted by its manifest key, so a linked stage is up to date exactly when its owner is.
A linked folder is never written through.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from hetray.stage import read_manifest

log = logging.getLogger(__name__)

SHARED_DATA = ("preferences", "sft_only", "rejects", "embeddings")


def selection_name(sources: list[str] | None, n_clusters: int, fraction: float) -> str:
    """A folder name that says what a selection is: ``all-k10-f0.4``, ``winogrande-k10-f1``.
    Source names come from the job file, so each is made safe first (``sanitise_run_name``)."""
    who = "+".join(sorted(sanitise_run_name(s) for s in sources)) if sources else "all"
    return f"{who}-k{n_clusters}-f{fraction:g}"


def sanitise_run_name(name: str) -> str:
    """``name`` as one safe path component: characters other than ``A-Za-z0-9._-`` become ``_``
    and a leading dot too (no ``..``, no hidden folder); a changed name gets a short hash of the
    original, so two names that differ only in such characters keep apart (``a/b`` ->
    ``a_b-<hash>``, ``../../etc`` -> ``_._.._etc-<hash>``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    safe = "_" + safe[1:] if safe.startswith(".") else safe or "_"
    if safe == name and name:
        return name
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def run_folder(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` resolved, refused unless it lies inside ``root`` (a run folder never escapes
    its job's run_dir, whatever the job file names)."""
    base = Path(root).resolve()
    folder = (base / name).resolve()
    if folder != base and base not in folder.parents:
        raise ValueError(f"run folder {name!r} resolves to {folder}, outside run_dir {base}")
    return folder


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
    """Point ``link`` at ``target`` by a relative path (a moved tree keeps working); replace an
    older link; refuse to replace data."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        raise FileExistsError(f"{link} is a real folder, not a link to the shared {target.name}/: remove it")
    link.symlink_to(rel, target_is_directory=True)


def with_settings(cfg, **changes):
    """A copy of a job config with dotted changes (validated like a job file)."""
    from hetray.config import JobConfig, set_dotted

    data = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        set_dotted(data, dotted, value)
    return JobConfig.model_validate(data)


def clusters_folder(root_cfg, n_clusters: int) -> Path:
    """Where the clusters for ``n_clusters`` live (``shared_clusters`` makes them)."""
    root = Path(root_cfg.run_dir).resolve()
    return root / "clusters" if n_clusters == root_cfg.cluster.n_clusters else root / "shared" / f"k{n_clusters}" / "clusters"


def shared_clusters(root_cfg, n_clusters: int, force: bool = False) -> Path:
    """The clusters folder for ``n_clusters`` over the root's embeddings, computed once.

    The job's own k lives in ``<root>/clusters``; any other k in ``<root>/shared/k<K>/``, a
    small run folder of its own (links to the embeddings + real clusters/). A file lock keeps
    parallel Tune trials from computing one k twice."""
    from hetray.selection.clustering import run_cluster

    root = Path(root_cfg.run_dir).resolve()
    with _locked(root / ".locks" / f"k{n_clusters}"):
        if n_clusters == root_cfg.cluster.n_clusters:
            run_cluster(root_cfg, force=force)  # skipped when up to date
            return clusters_folder(root_cfg, n_clusters)
        home = clusters_folder(root_cfg, n_clusters).parent
        home.mkdir(parents=True, exist_ok=True)
        _link(root / "embeddings", home / "embeddings")
        run_cluster(with_settings(root_cfg, run_dir=str(home), **{"cluster.n_clusters": n_clusters}), force=force)
    return clusters_folder(root_cfg, n_clusters)


def derive(root_cfg, run_dir: str | os.PathLike, clusters: Path, *, fraction: float | None = None,
           sources: list[str] | None = None, changes: dict | None = None):
    """Make ``run_dir`` share the root's data stages and the given ``clusters/`` folder (from
    ``shared_clusters``), and return the job config for it. ``changes`` are further dotted
    settings (``{"train.reward.max_steps": 8}``)."""
    root = Path(root_cfg.run_dir).resolve()
    for name in ("preferences", "embeddings"):
        if read_manifest(root / name) is None:
            raise FileNotFoundError(f"{root / name} is missing: run convert and embed on the job first")
    m = read_manifest(clusters)
    if m is None:
        raise FileNotFoundError(f"{clusters} is missing: run the cluster stage first")
    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    for name in SHARED_DATA:
        if (root / name).exists():
            _link(root / name, run / name)
    _link(Path(clusters).resolve(), run / "clusters")
    settings = {"run_dir": str(run), "cluster.n_clusters": m["config"]["cluster"]["n_clusters"], **(changes or {})}
    if fraction is not None:
        settings["select.fraction"] = fraction
    if sources is not None:
        settings["select.sources"] = list(sources)
    return with_settings(root_cfg, **settings)
