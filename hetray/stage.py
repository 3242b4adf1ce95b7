"""The one stage runner: key, skip, temp folder, manifest, commit.

Every stage of hetray is a function of its settings and its input folders that writes its
output folders in a run directory. ``run_stage(Stage(...), work)`` does the rest, the same way
for all of them:

1. **key**: a hash of the stage's name, its resolved settings, the fingerprints of its inputs
   and hetray's version. An input folder that another stage wrote is fingerprinted by its
   manifest key; any other file by its path *relative to the run directory* (only its name when
   it lies outside), its size and a hash of its content. So a run directory that is moved or
   synced elsewhere is still up to date there, and an upgraded hetray re-runs.
2. **skip** when the manifest of the first output folder holds that key (and ``--force`` is
   not given).
3. **work** writes every output folder into a fresh temporary folder
   ``<run_dir>/.stage-<name>-<id>/new/``.
4. **commit**, crash-safe: a journal (``commit.json``) is written first; the old outputs are set
   aside into ``.../old/`` (not deleted); the new ones are moved into place; the manifest is
   written last: it is the commit point. Only then is the temporary folder removed.

A run killed at any point is repaired at the next start of any stage in that run directory
(``recover``): a commit whose manifest was written is completed, any other is rolled back to
the old outputs, and stale temporary folders are removed. Meanwhile a reader sees no manifest
with the new key, so the stage counts as not done.

A lock file (``<run_dir>/.hetray.lock``) stops two processes from writing one run directory at
once: the second fails at once with ``RunDirBusy`` naming the holder's pid. The lock is
re-entrant within a process (``hetray run`` holds it for the whole job, each stage takes it
again).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import logging

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK_FILE = ".hetray.lock"
TMP_PREFIX = ".stage-"
JOURNAL = "commit.json"
_VERSIONED = ("hetray", "ray", "pyarrow", "torch", "transformers", "trl", "peft", "sentence-transformers")


class RunDirBusy(RuntimeError):
    """Another process is writing this run directory."""


# ---------------------------------------------------------------------------- fingerprints


_hashes: dict[tuple, str] = {}


def content_hash(path: str | os.PathLike) -> str:
    """blake2b of a file's bytes; cached per process by (real path, size, mtime, inode)."""
    st = os.stat(path)
    cache_key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if cache_key not in _hashes:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _hashes[cache_key] = h.hexdigest()
    return _hashes[cache_key]


def _name(path: Path, run_dir: Path | None) -> str:
    """The path relative to the run directory when it lies inside, else just the file name."""
    if run_dir is not None:
        try:
            return path.resolve().relative_to(run_dir.resolve()).as_posix()
        except ValueError:
            pass
    return path.name


def fingerprint(item: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> dict | str:
    """What a stage key hashes for one input: a stage output folder -> its manifest key; a
    folder -> its files (name within it, size, content hash); a file -> its name, size and
    content hash; a string that is no path (a hub id, a bundled model's alias) -> itself."""
    p = Path(item)
    root = Path(run_dir) if run_dir is not None else None
    if isinstance(item, str) and not p.exists():
        return item
    m = read_manifest(p) if p.is_dir() else None
    if m is not None:
        return {"stage": m.get("stage"), "key": m["key"]}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"folder": _name(p, root), "files": [
            [f.relative_to(p).as_posix(), f.stat().st_size, content_hash(f)] for f in files]}
    if p.is_file():
        return {"file": _name(p, root), "size": p.stat().st_size, "hash": content_hash(p)}
    return {"missing": _name(p, root)}


def stage_key(stage: str, config: dict, inputs: list) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "hetray": hetray_version()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def hetray_version() -> str:
    from hetray import __version__

    return __version__


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------- manifests


def read_manifest(path: str | os.PathLike) -> dict | None:
    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def write_manifest(path: str | os.PathLike, manifest: dict) -> Path:
    p = Path(path) / MANIFEST
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, p)
    return p


def is_up_to_date(path: str | os.PathLike, key: str) -> bool:
    m = read_manifest(path)
    return m is not None and m.get("key") == key


# ---------------------------------------------------------------------------- the lock


_held: dict[str, list] = {}  # real path of a run dir -> [open lock file, depth]
_held_guard = threading.Lock()


@contextmanager
def locked(run_dir: str | os.PathLike):
    """Hold ``<run_dir>/.hetray.lock`` (re-entrant in this process). Another process that holds
    it makes this raise ``RunDirBusy`` at once, naming its pid."""
    root = Path(run_dir).resolve()
    key = str(root)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            entered = False
        else:
            root.mkdir(parents=True, exist_ok=True)
            fh = open(root / LOCK_FILE, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise RunDirBusy(
                    f"{root} is being written by another hetray process (pid {holder}, lock file "
                    f"{root / LOCK_FILE}): wait for it to finish, or use another run_dir") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            _held[key] = [fh, 1]
            entered = True
    try:
        if entered:
            recover(root)
        yield root
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fh = _held.pop(key)[0]
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()


# ---------------------------------------------------------------------------- commit and repair


def _commit(root: Path, tmp: Path, outputs: tuple[str, ...], manifest: dict) -> None:
    """new outputs in ``tmp/new`` -> their places; the old ones wait in ``tmp/old`` until the
    manifest (the commit point) is written."""
    (tmp / JOURNAL).write_text(json.dumps({"outputs": list(outputs), "key": manifest["key"]}))
    (tmp / "old").mkdir()
    for name in outputs:  # 1. set the old outputs aside
        if (root / name).exists() or (root / name).is_symlink():
            os.replace(root / name, tmp / "old" / name)
    for name in outputs:  # 2. the new ones into place
        if (tmp / "new" / name).exists():
            os.replace(tmp / "new" / name, root / name)
    write_manifest(root / outputs[0], manifest)  # 3. the commit point
    shutil.rmtree(tmp, ignore_errors=True)  # 4. the old outputs go


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def recover(run_dir: str | os.PathLike) -> list[str]:
    """Repair what a killed stage left in ``run_dir``: finish a commit whose manifest was
    written, roll any other back to the old outputs, remove temporary folders. Call it only while
    holding the run directory's lock (``locked`` does). Returns what was done, one line each."""
    root = Path(run_dir)
    done = []
    for tmp in sorted(root.glob(f"{TMP_PREFIX}*")):
        journal = tmp / JOURNAL
        if journal.is_file():
            j = json.loads(journal.read_text())
            outputs = j["outputs"]
            if is_up_to_date(root / outputs[0], j["key"]):
                done.append(f"{tmp.name}: commit of {', '.join(outputs)} had finished; removed the old outputs")
            else:
                for name in outputs:
                    old, new, here = tmp / "old" / name, tmp / "new" / name, root / name
                    if old.exists() or old.is_symlink():  # set aside: the place holds new or nothing
                        _remove(here)
                        os.replace(old, here)
                    elif not new.exists():  # moved in, with nothing old to restore
                        _remove(here)
                done.append(f"{tmp.name}: rolled back an unfinished commit of {', '.join(outputs)}")
        else:
            done.append(f"{tmp.name}: removed the outputs of a stage that did not finish")
        shutil.rmtree(tmp, ignore_errors=True)
    for line in done:
        log.warning("recovered %s: %s", root, line)
    return done


# ---------------------------------------------------------------------------- the runner


@dataclass
class Stage:
    """One stage in one run directory: what it reads and writes, and the settings it hashes."""

    name: str  # "convert", "train-sft", ...
    run_dir: str | os.PathLike
    outputs: tuple[str, ...]  # folders under run_dir; the manifest goes into the first
    config: dict  # resolved settings that decide the outputs
    inputs: list = field(default_factory=list)  # folders, files, or plain strings (model ids)
    required: tuple[str, ...] = ()  # files or folders inside outputs[0] that must exist to skip

    @property
    def root(self) -> Path:
        return Path(self.run_dir).resolve()

    @property
    def out_dir(self) -> Path:
        return self.root / self.outputs[0]

    def fingerprints(self) -> list:
        return [fingerprint(i, self.root) for i in self.inputs]

    def key(self) -> str:
        return stage_key(self.name, self.config, self.fingerprints())

    def up_to_date(self, key: str | None = None) -> bool:
        key = key or self.key()
        return is_up_to_date(self.out_dir, key) and all((self.root / o).exists() for o in self.outputs) and all(
            (self.out_dir / r).exists() for r in self.required)


@contextmanager
def block_size(nbytes: int):
    """Ray Data's ``target_max_block_size`` for the datasets made inside; put back afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = nbytes
    try:
        yield
    finally:
        ctx.target_max_block_size = saved


def stage_task(fn):
    """``fn`` as a Ray task of one CPU for a stage's own fan-out (a task per file). Scheduled
    ``SPREAD``, as Ray Data schedules its tasks (``DataContext.scheduling_strategy``): over the
    nodes, and outside the placement group of a Ray Tune trial that runs the stage (a trial
    holds 0.05 CPU, ``tune.trial_cpus``: a task captured in it could never be placed)."""
    import ray

    return ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(fn)


def wait_tasks(refs: list, what: str):
    """The results of Ray tasks ``refs`` as each finishes (a task's error raised here), logging
    ``what: i/n`` for progress."""
    import ray

    pending = list(refs)
    for done in range(1, len(pending) + 1):
        ready, pending = ray.wait(pending, num_returns=1)
        result = ray.get(ready[0])
        log.info("%s: %d/%d", what, done, len(refs))
        yield result


def require_ray(stage: str) -> None:
    """Stages never start Ray (only the command line and the conductor do): fail clearly."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{stage}: Ray is not running; start it first "
                           "(hetray.orchestrate.ray_init.init_ray, as `hetray` does)")


def new_manifest(stage: Stage, key: str, fingerprints: list, started: float) -> dict:
    return {
        "stage": stage.name,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(time.time() - started, 3),
        "config": stage.config,
        "inputs": fingerprints,
        "versions": versions(),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }


def run_stage(stage: Stage, work: Callable[[Path], dict | None], force: bool = False) -> dict:
    """Skip ``stage`` when up to date, else ``work(tmp)`` and commit. Returns the manifest.

    ``work`` gets a temporary folder that holds an empty folder per output; it writes the
    outputs there and returns extra manifest fields (counts, metrics). If it raises, the old
    outputs stay as they were.
    """
    with locked(stage.root) as root:
        fingerprints = stage.fingerprints()
        key = stage_key(stage.name, stage.config, fingerprints)
        where = _shown(stage.out_dir)
        if not force and stage.up_to_date(key):
            log.info("[%s] up to date, skipped: %s (key %s)", stage.name, where, key)
            return read_manifest(stage.out_dir)
        started = time.time()
        log.info("[%s] started -> %s", stage.name, where)
        tmp = root / f"{TMP_PREFIX}{stage.name}-{uuid.uuid4().hex[:8]}"
        for name in stage.outputs:
            (tmp / "new" / name).mkdir(parents=True)
        try:
            extra = work(tmp / "new") or {}
            manifest = new_manifest(stage, key, fingerprints, started)
            manifest.update(extra)
            _commit(root, tmp, stage.outputs, manifest)
        except BaseException as e:
            log.info("[%s] failed after %.1f s: %s", stage.name, time.time() - started, type(e).__name__)
            raise
        finally:
            if not (tmp / JOURNAL).exists():  # failed before the commit began: nothing to repair
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("[%s] done in %.1f s", stage.name, time.time() - started)
        return manifest


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies inside it (shorter on a terminal)."""
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)
