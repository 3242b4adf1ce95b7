"""``pipeline.sync_to``: copy a run folder to object storage or another path after each stage.

New or changed files only (size and modification time), judged against an index kept in the
run folder for each destination (``.sync-index-<hash of the destination>.json``): a second
destination gets a complete copy of its own. Files under dot-names (work folders, temp outputs)
stay local.

Links. A run folder links to its job's shared stages (``workspace.derive``); those folders are
copied where they really live, so a linked folder is never entered. A link to a file inside
the run folder is copied as that file. A link that points outside the run folder is skipped
with a warning: following it would copy whatever it names (``/etc/passwd``, a credentials file)
to the destination.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

INDEX_PREFIX = ".sync-index-"


def sync(root: Path, dest: str | None) -> None:
    """Copy the run folder to ``pipeline.sync_to`` (S3/GCS URI or path): new or changed files only."""
    if not dest:
        return
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(dest) if "://" in dest else (pafs.LocalFileSystem(), os.path.abspath(dest))
    base = base.rstrip("/")
    root = Path(root)
    index_path = root / f"{INDEX_PREFIX}{index_key(fs.type_name, base)}.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    changed = 0
    for rel, source in files_to_sync(root):
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a link swapped in since: refused
        except OSError as e:
            log.warning("sync: %s not copied (%s)", root / rel, e)
            continue
        with open(fd, "rb") as src:
            st = os.fstat(src.fileno())
            stamp = [st.st_size, st.st_mtime_ns]
            if index.get(rel) == stamp:
                continue
            target = f"{base}/{rel}"
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(target) as out:
                shutil.copyfileobj(src, out, 1 << 20)
        index[rel] = stamp
        changed += 1
    tmp = index_path.with_name(index_path.name + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(index_path)
    if changed:
        log.info("sync: %d file(s) -> %s", changed, dest)


def index_key(filesystem: str, base: str) -> str:
    """The index's name for a destination: ``/x`` and ``file:///x`` are one destination."""
    return hashlib.sha256(f"{filesystem}:{base}".encode()).hexdigest()[:16]


def files_to_sync(root: Path) -> list[tuple[str, Path]]:
    """(name relative to ``root``, real path) of every file to copy, in name order: dot-names
    left out, linked folders not entered, links out of ``root`` skipped with a warning."""
    real_root = root.resolve()
    found = []
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is listed, never entered
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in dirs:
            if (here / name).is_symlink():
                _inside(here / name, real_root)  # only warns: its target is synced where it lives, if at all
        for name in files:
            if name.startswith("."):
                continue
            path = here / name
            real = path.resolve() if path.is_symlink() else path
            if real is not path and not _inside(path, real_root) or not real.is_file():
                continue  # out of the run folder, dangling, or not a regular file (a socket, a fifo)
            found.append((path.relative_to(root).as_posix(), real))
    return sorted(found)


def _inside(link: Path, real_root: Path) -> bool:
    target = link.resolve()
    if target == real_root or real_root in target.parents:
        return True
    log.warning("sync: %s links outside the run folder (to %s): not copied", link, target)
    return False
