"""Benchmark: hetray's SFT stage on Ray Train against the same TRL SFTTrainer in-process, same run.

    python benchmarks/bench_train.py               # 30 steps of SmolLM2-135M-Instruct
    python benchmarks/bench_train.py --steps 8     # a quick check

Data: ``--pairs`` synthetic preference pairs (prompt + chosen of 20-60 words each), written as
a run folder's ``preferences/``. Same model, data, TRL config and seed everywhere: LoRA r16,
batch 2 per worker, max length 128, ``--steps`` optimizer steps, no checkpoint before the end.

* ``in-process``: ``hetray.train.sft.build_trainer`` (the exact SFTTrainer the stage builds) in
  this process, no Ray, one torch thread (what a Ray worker with 1 CPU gets).
* ``hetray``: ``run_sft`` on a local Ray with 1 worker, then 2 workers (1 CPU each, gloo).

Two throughputs per run: the training loop's (tokens / HF ``train_runtime``: the Ray report
barrier, DDP and callbacks included, process start and model load not), and end to end
(tokens / wall time of the whole call: hetray's includes starting the Ray Train workers,
imports, model load, merging and writing the outputs). The ratio hetray / in-process of the
first is what Ray costs per step (aim: >= 0.9). Tokens are TRL's ``num_tokens`` (all workers).
Ray's workers run at niceness 0 here (Ray's default is 15), like the baseline process.

Results: benchmarks/results/bench_train.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray starts its workers at niceness 15: on a shared machine they would then lose the CPU to
# everything else while the in-process baseline does not. Same priority for both sides.
os.environ.setdefault("RAY_worker_niceness", "0")

WORDS = (
    "the a of to in for on with by from about as is was are be can would should will please "
    "explain describe write list give compare summarize story email code python function data "
    "model question answer doctor nurse teacher engineer she he they because after before "
    "history science music health money travel food weather city computer learning language "
    "simple short detailed example steps reasons benefits risks first then finally also"
).split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_pairs(run_dir: Path, n: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hetray.schema import PREFERENCE_SCHEMA, pair

    rng = random.Random(seed)
    rows = [pair("bench", sentence(rng, 20, 60), sentence(rng, 20, 60), sentence(rng, 5, 20), [str(i)]) for i in range(n)]
    (run_dir / "preferences").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), run_dir / "preferences" / "part-0.parquet")


def job_config(run_dir: Path, model: str, steps: int, workers: int):
    from hetray.config import JobConfig

    return JobConfig.model_validate({
        "run_dir": str(run_dir), "ray": {"num_cpus": 2},
        "convert": {"sources": [{"name": "unused", "format": "winogrande", "path": "sample:winogrande.jsonl"}]},
        "train": {"model": model, "resources": {"num_workers": workers, "max_failures": 0},
                  "sft": {"max_steps": steps, "per_device_batch_size": 2, "max_length": 128,
                          "learning_rate": 1e-4, "logging_steps": 5, "save_steps": 10**6}},
    })


def throughput(history: list[dict], wall: float) -> dict:
    tokens = max(h["num_tokens"] for h in history if "num_tokens" in h)
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    return {"tokens": int(tokens), "train_runtime_s": round(runtime, 2), "wall_s": round(wall, 2),
            "loop_tokens_per_s": round(tokens / runtime, 1), "e2e_tokens_per_s": round(tokens / wall, 1)}


def in_process(run_dir: Path, model: str, steps: int) -> dict:
    """The stage's own SFTTrainer, built and trained here with one torch thread."""
    import torch

    from hetray.models import CAUSAL
    from hetray.train.driver import StageJob, resolve_base
    from hetray.train.sft import build_trainer

    torch.set_num_threads(1)
    cfg = job_config(run_dir, model, steps, 1)
    started = time.perf_counter()
    job = StageJob(stage="sft", settings=cfg.train.sft, model=resolve_base(model), head=CAUSAL,
                   data_dir=str(run_dir / "preferences"), work_dir=str(run_dir / ".baseline"),
                   out_dir=str(run_dir / ".baseline" / "out"), seed=cfg.seed, use_gpu=False, deepspeed=None,
                   extra={"sft_only": None})
    trainer = build_trainer(job)
    trainer.train()
    return throughput(trainer.state.log_history, time.perf_counter() - started)


def on_ray(run_dir: Path, model: str, steps: int, workers: int) -> dict:
    from hetray.orchestrate.ray_init import init_ray
    from hetray.train.sft import run_sft

    cfg = job_config(run_dir, model, steps, workers)
    init_ray(cfg.ray)
    started = time.perf_counter()
    run_sft(cfg, force=True)
    history = json.loads((run_dir / "sft" / "metrics.json").read_text())["history"]
    return throughput(history, time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--pairs", type=int, default=400, help="synthetic pairs")
    p.add_argument("--model", default="smollm2-135m-instruct")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        run_dir = Path(tmp) / "run"
        write_pairs(run_dir, args.pairs)
        runs = {"in-process, 1 torch thread": in_process(run_dir, args.model, args.steps)}
        runs["in-process, 1 torch thread"]["load_avg"] = round(os.getloadavg()[0], 1)
        for workers in (1, 2):
            runs[f"hetray, {workers} Ray Train worker(s) x 1 CPU"] = on_ray(run_dir, args.model, args.steps, workers)
            runs[f"hetray, {workers} Ray Train worker(s) x 1 CPU"]["load_avg"] = round(os.getloadavg()[0], 1)

    base = runs["in-process, 1 torch thread"]
    for r in runs.values():
        r["loop_ratio"] = round(r["loop_tokens_per_s"] / base["loop_tokens_per_s"], 3)
        r["e2e_ratio"] = round(r["e2e_tokens_per_s"] / base["e2e_tokens_per_s"], 3)
    one, two = runs["hetray, 1 Ray Train worker(s) x 1 CPU"], runs["hetray, 2 Ray Train worker(s) x 1 CPU"]
    result = {"settings": vars(args) | {"batch_per_worker": 2, "max_length": 128, "lora_r": 16},
              "runs": runs, "ray_vs_in_process_loop_ratio": one["loop_ratio"],
              "two_vs_one_worker_loop_speedup": round(two["loop_tokens_per_s"] / one["loop_tokens_per_s"], 3)}
    lines = [
        f"SFT, {args.model}, LoRA r16, batch 2 per worker, max length 128, {args.steps} steps, "
        f"{args.pairs} synthetic pairs.",
        "",
        "| run | tokens | train loop s | loop tokens/s | **loop ratio** | wall s | end-to-end tokens/s | e2e ratio | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['tokens']} | {r['train_runtime_s']} | {r['loop_tokens_per_s']} | "
                     f"**{r['loop_ratio']}** | {r['wall_s']} | {r['e2e_tokens_per_s']} | {r['e2e_ratio']} | {r['load_avg']} |")
    lines += [
        "",
        f"Ray Train (1 worker) vs in-process, training loop: **{result['ray_vs_in_process_loop_ratio']}** "
        f"(aim >= 0.9); 2 workers vs 1: x{result['two_vs_one_worker_loop_speedup']} "
        "(2 workers on 2 cores: each step does twice the tokens, plus a gloo all-reduce of the LoRA gradients).",
        "Train loop: HF `train_runtime` (steps, Ray reports, DDP; no start-up). Wall: the whole call; hetray's "
        "includes starting the Ray Train workers (imports, model load), merging the adapter and writing outputs, "
        "which is why the end-to-end ratio is lower on runs this short. Load avg: the machine's 1-minute load "
        "after each run; above the core count other work competed for the CPUs.",
    ]
    path = write_results("bench_train", result, "\n".join(lines))
    print("\n".join(lines))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
