"""faiss imported with the BLAS kernels this CPU runs (hetray.selection.blas)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from hetray.selection.blas import CORETYPES, bundled_openblas_version, faiss_blas_env

WHEEL_1_15 = [
    "faiss/__init__.py",
    "faiss_cpu.libs/libgfortran-83c28eba.so.5.0.0",
    "faiss_cpu.libs/libopenblaso-r0-d77a1985.3.15.so",
]


def test_version_of_the_bundled_openblas():
    assert bundled_openblas_version(WHEEL_1_15) == (0, 3, 15)
    assert bundled_openblas_version(["x.libs/libopenblas64_p-r0-0cf96a72.3.23.dev.so"]) is None  # no X.Y.so tail
    assert bundled_openblas_version(["x.libs/libopenblasp-r0.3.21.so"]) == (0, 3, 21)
    assert bundled_openblas_version(["faiss/_swigfaiss.so"]) is None
    assert bundled_openblas_version(None) is None


@pytest.mark.parametrize(
    "bundled, core, env, want",
    [
        ((0, 3, 15), "SkylakeX", {}, {"OPENBLAS_CORETYPE": "SkylakeX"}),
        ((0, 3, 15), "SapphireRapids", {}, {"OPENBLAS_CORETYPE": "SkylakeX"}),
        ((0, 3, 15), "Haswell", {}, {"OPENBLAS_CORETYPE": "Haswell"}),
        ((0, 3, 15), "Zen", {}, {"OPENBLAS_CORETYPE": "Zen"}),
        ((0, 3, 15), "SkylakeX", {"OPENBLAS_CORETYPE": "Prescott"}, {}),  # the user's setting wins
        ((0, 3, 19), "SkylakeX", {}, {}),  # a library that detects new CPUs itself
        (None, "SkylakeX", {}, {}),  # faiss without a bundled OpenBLAS (conda, MKL)
        ((0, 3, 15), "neoversen1", {}, {}),  # not an x86 core type the old library has
        ((0, 3, 15), None, {}, {}),
    ],
)
def test_when_faiss_gets_a_core_type(bundled, core, env, want):
    assert faiss_blas_env(bundled, core, env) == want


PROBE = """
import json, os
from hetray.selection.blas import blas_cores, import_faiss
faiss = import_faiss()
print(json.dumps({"cores": blas_cores(), "env_after": os.environ.get("OPENBLAS_CORETYPE")}))
"""


def _probe(env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _split(cores: dict):
    faiss_core = [c for p, c in cores.items() if "faiss" in p]
    numpy_core = [c for p, c in cores.items() if "numpy" in p]
    return faiss_core, numpy_core


def test_faiss_runs_the_kernels_numpy_runs():
    """In a fresh process: faiss's OpenBLAS runs the kernels of numpy's core type (or the ones
    that type maps to), never Prescott where numpy found better, and the environment is as it
    was. On a CPU newer than faiss's OpenBLAS (this project's Sapphire Rapids machine) a plain
    ``import faiss`` reports Prescott, and so would this test without import_faiss."""
    pytest.importorskip("threadpoolctl")
    got = _probe()
    faiss_core, numpy_core = _split(got["cores"])
    if not faiss_core or not numpy_core:
        pytest.skip(f"faiss or numpy without an OpenBLAS of their own here: {got['cores']}")
    assert got["env_after"] is None  # put back
    if numpy_core[0].lower() in CORETYPES:
        want = CORETYPES[numpy_core[0].lower()]
        assert faiss_core[0].lower() in {want.lower(), numpy_core[0].lower()}, got
    if numpy_core[0] != "Prescott":
        assert faiss_core[0] != "Prescott", got


def test_a_users_core_type_wins():
    pytest.importorskip("threadpoolctl")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("Haswell is an x86 core type")
    got = _probe({"OPENBLAS_CORETYPE": "Haswell"})
    faiss_core, numpy_core = _split(got["cores"])
    if not faiss_core:
        pytest.skip(f"faiss without an OpenBLAS of its own here: {got['cores']}")
    assert got["env_after"] == "Haswell"
    assert faiss_core[0] == "Haswell"
