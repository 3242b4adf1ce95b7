"""Importing faiss with the BLAS kernels this CPU can run.

faiss-cpu's Linux wheels bundle their own OpenBLAS (1.15.1: OpenBLAS 0.3.15, from 2021). Before
0.3.19 OpenBLAS's run-time CPU detection fell back to its Prescott (SSE3) kernels for any CPU
model it did not know (OpenMathLib/OpenBLAS#3453, fixed by #3485). On a Sapphire Rapids Xeon
(this project's 2-core machine on 2026-12-08) faiss's OpenBLAS says "Prescott" and one
``IndexFlatL2.search`` of 65,536 x 384 rows against 1,000 centroids takes 1.46 s on one core;
with ``OPENBLAS_CORETYPE=SkylakeX`` it takes 0.32 s, as numpy's own (recent) OpenBLAS does.
Every k-means pass is almost all that search.

``OPENBLAS_CORETYPE`` is read once, when an OpenBLAS library loads. ``import_faiss()`` imports
faiss with it set to the core type numpy's OpenBLAS detected (already loaded, so numpy itself is
untouched), and puts the environment back afterwards, when all of these hold:

- nobody set ``OPENBLAS_CORETYPE`` (a user's setting wins, whatever it says);
- faiss is not loaded yet in this process (the setting cannot reach a loaded library);
- the faiss wheel's bundled OpenBLAS is older than 0.3.19 (the version in its file name);
- numpy's OpenBLAS reports an x86 core type the old library knows (``CORETYPES``; newer Intel
  types map to SkylakeX, whose kernels they run).

Anything else (faiss from conda or built against MKL, an ARM machine, no threadpoolctl) imports
faiss as it is. ``faiss_blas_env`` is the decision alone, so that it can be tested everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

log = logging.getLogger(__name__)

FIXED_IN = (0, 3, 19)  # OpenBLAS's feature-based fallback for unknown x86 CPUs (#3485)
# core types as threadpoolctl / openblas_get_corename spell them -> a name OPENBLAS_CORETYPE of
# OpenBLAS 0.3.15 accepts with the same (or, for the newer ones, the SkylakeX) kernels
CORETYPES = {
    "haswell": "Haswell",
    "skylakex": "SkylakeX",
    "cooperlake": "SkylakeX",  # OPENBLAS_CORETYPE=Cooperlake did not work before 0.3.21 (#3806)
    "sapphirerapids": "SkylakeX",
    "zen": "Zen",
    "sandybridge": "Sandybridge",
}
_VERSION = re.compile(r"libopenblas\w*-r(\d+)(?:-[0-9a-f]+)?\.(\d+)\.(\d+)\.so")


def bundled_openblas_version(files) -> tuple[int, int, int] | None:
    """The version of the OpenBLAS among a wheel's ``files`` (auditwheel names it
    ``libopenblas...-r0-<hash>.3.15.so``), else None."""
    for f in files or ():
        m = _VERSION.search(os.path.basename(str(f)))
        if m:
            return tuple(int(g) for g in m.groups())
    return None


def faiss_blas_env(bundled: tuple[int, int, int] | None, numpy_core: str | None, env) -> dict:
    """``{"OPENBLAS_CORETYPE": ...}`` to import faiss with, or {} (module docstring)."""
    if "OPENBLAS_CORETYPE" in env or bundled is None or bundled >= FIXED_IN or not numpy_core:
        return {}
    core = CORETYPES.get(numpy_core.lower())
    return {"OPENBLAS_CORETYPE": core} if core else {}


def _faiss_wheel_files():
    try:
        from importlib.metadata import PackageNotFoundError, files

        return files("faiss-cpu")
    except (ImportError, PackageNotFoundError):
        return None


def blas_cores() -> dict[str, str]:
    """Loaded BLAS libraries of this process -> the core type each runs (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    return {
        info["filepath"]: info.get("architecture") or "?"
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    }


def _numpy_core() -> str | None:
    import numpy as np  # noqa: F401  (loads numpy's OpenBLAS)

    for path, core in blas_cores().items():
        if "numpy" in path:
            return core
    return None


@contextlib.contextmanager
def _env(values: dict):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def import_faiss():
    """``import faiss``, with its bundled OpenBLAS on this CPU's kernels (module docstring)."""
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    values = faiss_blas_env(bundled_openblas_version(_faiss_wheel_files()), _numpy_core(), os.environ)
    with _env(values):
        import faiss
    if values:
        log.debug("faiss: its OpenBLAS loaded with %s", values)
    return faiss
