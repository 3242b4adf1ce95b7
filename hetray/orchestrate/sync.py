"""``pipeline.sync_to``: copy a run folder to object storage or another path after each stage."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def sync(root: Path, dest: str | None) -> None:
    """Copy the run folder to ``pipeline.sync_to`` (S3/GCS URI or path): new or changed files only."""
    if not dest:
        return
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(dest) if "://" in dest else (pafs.LocalFileSystem(), os.path.abspath(dest))
    index_path = root / ".sync-index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    local = pafs.LocalFileSystem()
    changed = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == index_path.name or "/." in "/" + path.relative_to(root).as_posix():
            continue  # work folders and temp outputs (dot-names) stay local
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        if index.get(rel) == stamp:
            continue
        target = f"{base.rstrip('/')}/{rel}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(path), target, source_filesystem=local, destination_filesystem=fs)
        index[rel] = stamp
        changed += 1
    index_path.write_text(json.dumps(index))
    if changed:
        log.info("sync: %d file(s) -> %s", changed, dest)
