"""Stage manifests: what a stage read, with which config, what it wrote, how long it took.

Every stage writes ``manifest.json`` into its output folder. A stage whose stored ``key`` (a
hash of its resolved config and the fingerprints of its inputs) equals the key it would run
with now is skipped: that is what makes the pipeline resumable.

Input fingerprints are ``(path, size, mtime_ns)`` per file, as ``make`` does: hashing the
content of a multi-GB input on every run would cost more than the stage saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path

MANIFEST = "manifest.json"
_VERSIONED = ("hetray", "ray", "pyarrow", "torch", "transformers", "trl", "peft", "sentence-transformers")


def fingerprint_files(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": os.path.realpath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def fingerprint_dir(path: str | os.PathLike) -> list[dict]:
    """Fingerprint of a stage output folder: its manifest key, else its files. Paths are
    resolved, so a run that links a shared stage folder sees the same fingerprint as its owner."""
    m = read_manifest(path)
    if m is not None:
        return [{"path": os.path.realpath(path), "key": m["key"]}]
    files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    return fingerprint_files(files)


def stage_key(stage: str, config: dict, inputs: list[dict]) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


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


def new_manifest(stage: str, key: str, config: dict, inputs: list[dict], started: float) -> dict:
    return {
        "stage": stage,
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_time_s": round(time.time() - started, 3),
        "config": config,
        "inputs": inputs,
        "versions": versions(),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }


def is_up_to_date(path: str | os.PathLike, key: str) -> bool:
    m = read_manifest(path)
    return m is not None and m.get("key") == key
