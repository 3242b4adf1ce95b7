"""Benchmark: hetray embed vs a single-process ``SentenceTransformer.encode``, same run.

    python benchmarks/bench_embed.py              # 20k prompts (issue 14's size)
    python benchmarks/bench_embed.py --n 2000     # a quick check

Data: ``--n`` synthetic distinct prompts of 10-40 words, as preference pairs in 4 Parquet files.
Same model (the bundled all-MiniLM-L6-v2), same batch size, normalised embeddings.

* ``encode``: a fresh Python process, torch with every core: imports (torch,
  sentence-transformers), model load + one warm-up batch, then ``model.encode(all prompts)``.
  Its end to end is imports + load + encode; its steady state is encode alone.
* ``hetray``: a local Ray (cores + 1 logical CPUs; its start-up is timed but is not part of the
  stage: ``hetray run`` starts Ray once for every stage), then ``run_embed`` end to end, with 1
  actor (torch threads = cores) and with one actor per core (one thread each). The stage's own
  phases come from its manifest (``timings``): actor start-up, model load, waiting for the dedupe
  shuffle, encoding (the steady-state rate), the write after the last call. Apart, in the same
  Ray: the dedupe alone (read -> prompt ids -> hash shuffle, counted), which in the stage runs
  while the actor loads its model.
* Ratios: end to end (hetray's stage wall vs encode's imports + load + encode, and with Ray's
  start-up added); steady state (hetray's prompts/s while encoding vs ``encode``'s); CPU
  efficiency (prompts per CPU second of the process tree, which a busy machine inflates less
  than wall time). With CUDA: the same on the GPU, hetray with one actor per GPU.

Results: benchmarks/results/bench_embed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a an of to in for on with by from about as is was are be can could would should will "
    "what why how when where who which please explain describe write list give tell compare "
    "summarize translate story poem email code python function data model question answer "
    "doctor nurse teacher engineer lawyer she he they her his their because although after "
    "before during the history science music health money travel food weather city country "
    "computer learning language simple short detailed example steps reasons benefits risks"
).split()

# The baseline, in its own process: argv = prompts.json, device, torch threads, batch size.
ENCODE = r"""
import json, sys, time
prompts, device, threads, bs = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0, c0 = time.perf_counter(), time.process_time()
import torch
from hetray.models import load_embedder
if device == "cpu":
    torch.set_num_threads(threads)
t1 = time.perf_counter()
model = load_embedder("all-minilm-l6-v2", device=device)
model.encode(prompts[:bs], batch_size=bs)  # warm-up (kernels, allocator): part of the load
if device == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
model.encode(prompts, batch_size=bs, normalize_embeddings=True, show_progress_bar=False)
if device == "cuda":
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2, "cpu_s": time.process_time() - c0}))
"""


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 40))]
        out.add(" ".join(words).capitalize() + "?")
    return sorted(out, key=lambda _: rng.random())


def write_preferences(run_dir: Path, prompts: list[str], files: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hetray.schema import PREFERENCE_SCHEMA, pair

    folder = run_dir / "preferences"
    folder.mkdir(parents=True)
    rows = [pair("bench", p, "yes", "no", [str(i)]) for i, p in enumerate(prompts)]
    for k in range(files):
        table = pa.Table.from_pylist(rows[k::files], schema=PREFERENCE_SCHEMA)
        pq.write_table(table, folder / f"part-{k}.parquet")


class TreeCPU:
    """CPU seconds used by this process and its descendants (Ray's workers) while inside the
    ``with``; sampled every 0.2 s, so a process loses at most its last 0.2 s. On a shared,
    busy machine wall time says how much CPU we got, CPU time how much work it took."""

    def __enter__(self):
        self.start, self.last = self._sample(), {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())
        self.cpu_s = round(sum(t - self.start.get(pid, 0.0) for pid, t in self.last.items()), 2)

    def _loop(self):
        while not self._stop.wait(0.2):
            self.last.update(self._sample())

    @staticmethod
    def _sample() -> dict:
        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out


def bench_encode(prompts_file: Path, n: int, batch_size: int, device: str) -> dict:
    """Single-process ``encode`` in a fresh interpreter (no Ray, nothing imported before)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", ENCODE, str(prompts_file), device, str(os.cpu_count()), str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the encode baseline failed:\n{proc.stderr[-3000:]}")
    r = {k: round(v, 2) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    end_to_end = r["import_s"] + r["load_s"] + r["encode_s"]
    return {
        "device": device, **r, "end_to_end_s": round(end_to_end, 2),
        "sentences_per_s": round(n / r["encode_s"], 1),
        "sentences_per_s_end_to_end": round(n / end_to_end, 1),
        "sentences_per_cpu_s": round(n / r["cpu_s"], 1),
        "load_average": round(os.getloadavg()[0], 1),
    }


def job(run_dir: Path, batch_size: int, actors: int, cpus: float, gpus):
    from hetray.config import JobConfig

    return JobConfig.model_validate({
        "run_dir": str(run_dir),
        "convert": {"sources": [{"name": "bench", "format": "winogrande", "path": "unused"}]},
        "embed": {"batch_size": batch_size, "num_actors": actors, "num_cpus_per_actor": cpus,
                  "num_gpus_per_actor": gpus},
    })


def bench_hetray(run_dir: Path, batch_size: int, actors: int, cpus: float, gpus) -> dict:
    from hetray.selection.embed import run_embed

    with TreeCPU() as cpu:
        t0 = time.perf_counter()
        m = run_embed(job(run_dir, batch_size, actors, cpus, gpus), force=True)
        wall = time.perf_counter() - t0
    return {
        "actors": actors, "cpus_per_actor": cpus, "device": m["device"], "partitions": m["partitions"],
        "wall_s": round(wall, 2), "distinct_prompts": m["distinct_prompts"],
        "sentences_per_s": round(m["distinct_prompts"] / wall, 1), "phases": m["timings"],
        "cpu_s": cpu.cpu_s, "sentences_per_cpu_s": round(m["distinct_prompts"] / cpu.cpu_s, 1),
        "load_average": round(os.getloadavg()[0], 1),
    }


def bench_dedupe(run_dir: Path, batch_size: int, actors: int) -> dict:
    """The stage's dedupe alone: read -> prompt ids -> hash shuffle with the stage's partitions."""
    from ray.data import DataContext

    from hetray.selection.embed import distinct_prompts, plan_partitions, preference_files

    files, n, text_bytes = preference_files(run_dir)
    partitions = plan_partitions(n, text_bytes, job(run_dir, batch_size, actors, 1, 0).embed,
                                 DataContext.get_current().target_max_block_size)
    with TreeCPU() as cpu:
        t0 = time.perf_counter()
        rows = distinct_prompts(files, partitions).count()
        wall = time.perf_counter() - t0
    return {"partitions": partitions, "rows": rows, "wall_s": round(wall, 2), "cpu_s": cpu.cpu_s}


def ratios(run: dict, encode: dict, ray_start_s: float) -> dict:
    steady = run["phases"].get("steady_prompts_per_s")
    return {
        "end_to_end": round(encode["end_to_end_s"] / run["wall_s"], 3),
        "end_to_end_with_ray_start": round(encode["end_to_end_s"] / (run["wall_s"] + ray_start_s), 3),
        "steady_state": round(steady / encode["sentences_per_s"], 3) if steady else None,
        "cpu_efficiency": round(run["sentences_per_cpu_s"] / encode["sentences_per_cpu_s"], 3),
    }


def markdown(args, cores: int, encode: dict, ray_start_s: float, dedupe: dict, runs: list[dict], gpu) -> str:
    e = encode
    lines = [
        f"{args.n:,} distinct prompts of 10-40 words, all-MiniLM-L6-v2, batch size {args.batch_size}, {cores} cores. "
        "Ratios are throughput ratios (> 1: hetray faster).",
        "",
        "| run | end to end s | sentences/s end to end | **ratio end to end** | ratio incl. Ray start "
        "| steady sentences/s | **ratio steady state** | CPU s | CPU efficiency | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| encode, 1 process, {cores} torch threads | {e['end_to_end_s']} | {e['sentences_per_s_end_to_end']} | 1 | "
        f"| {e['sentences_per_s']} | 1 | {e['cpu_s']} | 1 | {e['load_average']} |",
    ]
    for r in runs:
        q = r["ratios"]
        lines.append(
            f"| hetray, {r['actors']} actor(s) x {r['cpus_per_actor']:g} CPU | {r['wall_s']} | {r['sentences_per_s']} "
            f"| **{q['end_to_end']}** | {q['end_to_end_with_ray_start']} | {r['phases'].get('steady_prompts_per_s')} "
            f"| **{q['steady_state']}** | {r['cpu_s']} | {q['cpu_efficiency']} | {r['load_average']} |")
    lines += [
        "",
        "Fixed costs, seconds (encode: its process; hetray: the stage's phases from its manifest, "
        "on the clock from the start of the dataset's execution):",
        "",
        "| run | imports + model load | actor start-up | wait for dedupe | embedding (inside encode) "
        "| write after the last call "
        "| stage wall | partitions (calls) |",
        "|---|---|---|---|---|---|---|---|",
        f"| encode | {e['import_s']} + {e['load_s']} | | | {e['encode_s']} | | {e['end_to_end_s']} | |",
    ]
    for r in runs:
        p = r["phases"]
        lines.append(
            f"| hetray, {r['actors']} x {r['cpus_per_actor']:g} CPU | {p.get('model_load_s')} "
            f"| {p.get('actor_start_s')} | {p.get('wait_for_dedupe_s')} | {p.get('calls_s')} ({p.get('encode_s')}) | {p.get('write_tail_s')} "
            f"| {r['wall_s']} "
            f"| {r['partitions']} ({p.get('calls')}) |")
    lines += [
        "",
        f"Apart from the stage: Ray's start-up {ray_start_s} s (once per `hetray run`, for every stage); the dedupe "
        f"alone (read, prompt ids, hash shuffle into {dedupe['partitions']} partitions, {dedupe['rows']:,} rows) "
        f"{dedupe['wall_s']} s wall, {dedupe['cpu_s']} CPU s: in the stage it runs while the actor loads its model, "
        "and only `wait for dedupe` of it shows.",
        "",
        "hetray's end to end is `run_embed` (checks, read, dedupe shuffle, actor start + model load, encode, "
        "write); encode's is a fresh process's imports + model load + one warm-up batch + encode of an in-memory "
        "list, which encode() sorts by characters as a whole. Steady state: prompts per second while embedding "
        "(encode: inside encode; hetray: summed over actors, per second of their calls: token counts, Arrow in "
        "and out, encode). hetray encodes each partition in batches of equal token counts, which pads less "
        "than encode's sort by characters. CPU s: the CPU time of the "
        "process tree (hetray: driver, Ray's processes and workers), the work done whatever else runs; load avg: "
        "the machine's 1-minute load average after the run (above the core count, other work competed for the "
        "cores and wall times are noisy).",
    ]
    if gpu:
        lines += ["", f"GPU ({gpu['gpus']}): encode {gpu['encode']['sentences_per_s']} sentences/s "
                  f"({gpu['encode']['sentences_per_s_end_to_end']} end to end); hetray "
                  f"{gpu['hetray']['phases'].get('steady_prompts_per_s')} sentences/s steady "
                  f"({gpu['hetray']['sentences_per_s']} end to end, {gpu['gpus']} actor(s), one per GPU); "
                  f"ratios {json.dumps(gpu['hetray']['ratios'])}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="distinct prompts")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--object-store-memory", type=int, default=2_000_000_000, help="bytes for Ray's object store")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--layouts", nargs="*", default=["1xC", "Cx1"],
                   help="hetray layouts, actors x CPUs each, C = cores (default: 1xC Cx1)")
    args = p.parse_args()
    cores = os.cpu_count()
    try:
        layouts = [tuple(int(v.replace("C", str(cores))) for v in lay.split("x")) for lay in args.layouts]
    except ValueError:
        p.error(f"--layouts: expected ACTORSxCPUS such as 2x1 or 1xC, got {args.layouts}")
    prompts = make_prompts(args.n)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hetray-bench-embed-"))
    write_preferences(work, prompts)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))

    baseline = bench_encode(prompts_file, args.n, args.batch_size, "cpu")  # before Ray: nothing else running
    print("encode (cpu):", json.dumps(baseline), flush=True)

    import ray
    import torch

    t0 = time.perf_counter()
    # one logical CPU more than cores: the short read/shuffle/write tasks need a slot beside an
    # actor that reserves every core (hetray refuses to start without one)
    from hetray.orchestrate.ray_init import set_worker_env  # as init_ray: Arrow's thread pool left alone

    set_worker_env()
    ray.init(address="local", num_cpus=cores + 1, object_store_memory=args.object_store_memory,
             include_dashboard=False, log_to_driver=False)
    ray_start_s = round(time.perf_counter() - t0, 2)
    runs = []
    for actors, cpus in layouts:
        runs.append(bench_hetray(work, args.batch_size, actors, cpus, 0))
        runs[-1]["ratios"] = ratios(runs[-1], baseline, ray_start_s)
        print("hetray (cpu):", json.dumps(runs[-1]), flush=True)
    dedupe = bench_dedupe(work, args.batch_size, 1)
    print("dedupe alone:", json.dumps(dedupe), flush=True)
    gpu = None
    if torch.cuda.is_available():
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        gpu = {"gpus": n_gpus, "encode": bench_encode(prompts_file, args.n, args.batch_size, "cuda")}
        gpu["hetray"] = bench_hetray(work, args.batch_size, n_gpus, 1, "auto")
        gpu["hetray"]["ratios"] = ratios(gpu["hetray"], gpu["encode"], ray_start_s)
        print("gpu:", json.dumps(gpu), flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    result = {"n": args.n, "batch_size": args.batch_size, "ray_start_s": ray_start_s, "encode": baseline,
              "hetray": runs, "dedupe_alone": dedupe, "gpu": gpu}
    path = write_results("bench_embed", result, markdown(args, cores, baseline, ray_start_s, dedupe, runs, gpu))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
