"""Shared fixtures: one local Ray for the whole session, and the ../shared/data location."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data"

# Three formats with pairs (WinoGrande, an OASST tree file, a scored CSV): the convert -> select tests' job.
MIXED_SOURCES = [
    {"name": "wg", "format": "winogrande", "path": "sample:winogrande.jsonl"},
    {"name": "oasst", "format": "oasst", "path": str(FIXTURES / "oasst" / "trees.jsonl"), "label": "toxicity"},
    {"name": "scored", "format": "generic", "shape": "scored", "path": str(FIXTURES / "generic" / "scored.csv"),
     "columns": {"scores": ["helpfulness", "toxicity"]}, "label": "helpfulness"},
]

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# No model hub is reachable in CI; without this an unknown hub id retries DNS for ~70 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default; each training run waits for a few
# polls. Set before any Ray starts (workers inherit it): 8 s less per Ray Train run here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# What init_ray sets for the Ray it starts (Ray Data leaves Arrow's thread pool alone), for every Ray
# the tests start, in this process or in a subprocess.
from hetray.orchestrate.ray_init import set_worker_env  # noqa: E402

set_worker_env()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (2 CPUs) shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a `ray start` cluster
    yield ray
    ray.shutdown()


DATA_STAGES = ("convert", "embed", "cluster", "select")


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory) -> SimpleNamespace:
    """`hetray run` of the quickstart's data stages on the bundled samples, once per session, in a
    subprocess as a person runs it (a local Ray of its own). The console test reads its terminal
    page; tests that need those stages done start from a copy of its run_dir (``copy_run``)."""
    cwd = tmp_path_factory.mktemp("quickstart-data")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "hetray.cli", "run", str(ROOT / "jobs" / "quickstart.yaml"), f"run_dir={cwd / 'run'}",
         f"pipeline.stages=[{','.join(DATA_STAGES)}]"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return SimpleNamespace(proc=proc, cwd=cwd, run_dir=cwd / "run")


def copy_run(quickstart_data: SimpleNamespace, dest: Path) -> Path:
    """A copy of the session's quickstart data run at ``dest`` (its links are relative)."""
    assert quickstart_data.proc.returncode == 0, quickstart_data.proc.stderr
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(quickstart_data.run_dir, dest, symlinks=True, ignore=shutil.ignore_patterns("logs"))
    return dest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random 2-layer Llama (3M parameters) with the SmolLM2 tokenizer and chat template:
    training and evaluation plumbing in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetray.models import load_tokenizer

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
