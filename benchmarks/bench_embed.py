"""Benchmark: hetray embed vs a single-process ``SentenceTransformer.encode``, same run.

    python benchmarks/bench_embed.py              # 20k prompts
    python benchmarks/bench_embed.py --n 2000     # a quick check

Data: ``--n`` synthetic distinct prompts of 10-40 words, as preference pairs in 4 Parquet files.
Same model (the bundled all-MiniLM-L6-v2), same batch size, normalised embeddings.

* ``encode``: one process, torch with every core, ``model.encode(all prompts)``; reported with
  and without the model load (the load is part of hetray's time: each actor loads it).
* ``hetray``: ``run_embed`` on a local Ray (cores + 1 logical CPUs), end to end (read, prompt ids,
  dedupe shuffle, actor start with the model load, encode, write), with 1 actor (torch threads =
  cores) and with N actors (one core, one torch thread each). With CUDA: also the baseline on
  the GPU and hetray with one actor per GPU, reported per GPU.

Results: benchmarks/results/bench_embed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

WORDS = (
    "the a an of to in for on with by from about as is was are be can could would should will "
    "what why how when where who which please explain describe write list give tell compare "
    "summarize translate story poem email code python function data model question answer "
    "doctor nurse teacher engineer lawyer she he they her his their because although after "
    "before during the history science music health money travel food weather city country "
    "computer learning language simple short detailed example steps reasons benefits risks"
).split()


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


def bench_encode(prompts: list[str], batch_size: int, device: str) -> dict:
    import torch

    from hetray.models import load_embedder

    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    with TreeCPU() as cpu:
        t0 = time.perf_counter()
        model = load_embedder("all-minilm-l6-v2", device=device)
        model.encode(prompts[:batch_size], batch_size=batch_size)  # warm-up (CUDA kernels, allocator)
        t1 = time.perf_counter()
        model.encode(prompts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
        t2 = time.perf_counter()
    del model
    return {
        "device": device,
        "load_s": round(t1 - t0, 2),
        "encode_s": round(t2 - t1, 2),
        "sentences_per_s": round(len(prompts) / (t2 - t1), 1),
        "sentences_per_s_with_load": round(len(prompts) / (t2 - t0), 1),
        "cpu_s_with_load": cpu.cpu_s,
        "sentences_per_cpu_s": round(len(prompts) / cpu.cpu_s, 1),
        "load_average": round(os.getloadavg()[0], 1),
    }


def bench_hetray(run_dir: Path, batch_size: int, actors: int, cpus: float, gpus) -> dict:
    from hetray.config import JobConfig
    from hetray.orchestrate.ray_init import init_ray
    from hetray.selection.embed import run_embed

    cfg = JobConfig.model_validate({
        "run_dir": str(run_dir),
        "convert": {"sources": [{"name": "bench", "format": "winogrande", "path": "unused"}]},
        "embed": {"batch_size": batch_size, "num_actors": actors, "num_cpus_per_actor": cpus,
                  "num_gpus_per_actor": gpus},
    })
    init_ray(cfg.ray)
    with TreeCPU() as cpu:
        t0 = time.perf_counter()
        m = run_embed(cfg, force=True)
        wall = time.perf_counter() - t0
    return {
        "actors": actors, "cpus_per_actor": cpus, "device": m["device"],
        "wall_s": round(wall, 2), "distinct_prompts": m["distinct_prompts"],
        "sentences_per_s": round(m["distinct_prompts"] / wall, 1),
        "cpu_s": cpu.cpu_s,
        "sentences_per_cpu_s": round(m["distinct_prompts"] / cpu.cpu_s, 1),
        "load_average": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="distinct prompts")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()
    cores = os.cpu_count()
    prompts = make_prompts(args.n)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hetray-bench-embed-"))
    write_preferences(work, prompts)

    import ray
    import torch

    cuda = torch.cuda.is_available()
    baseline = bench_encode(prompts, args.batch_size, "cpu")  # before Ray: nothing else running
    print("encode (cpu):", json.dumps(baseline), flush=True)
    # one logical CPU more than cores: the short read/shuffle/write tasks need a slot beside an
    # actor that reserves every core (hetray refuses to start without one)
    ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False)
    runs = []
    for actors, cpus in ((1, cores), (cores, 1)):
        runs.append(bench_hetray(work, args.batch_size, actors, cpus, 0))
        print("hetray (cpu):", json.dumps(runs[-1]), flush=True)
    gpu = None
    if cuda:
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        gpu = {"gpus": n_gpus, "encode": bench_encode(prompts, args.batch_size, "cuda")}
        gpu["hetray"] = bench_hetray(work, args.batch_size, n_gpus, 1, "auto")
        gpu["hetray"]["sentences_per_s_per_gpu"] = round(gpu["hetray"]["sentences_per_s"] / n_gpus, 1)
        print("gpu:", json.dumps(gpu), flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    for r in runs:
        r["ratio_vs_encode_with_load"] = round(
            r["sentences_per_s"] / baseline["sentences_per_s_with_load"], 3)
        r["ratio_vs_encode_only"] = round(r["sentences_per_s"] / baseline["sentences_per_s"], 3)
        r["cpu_efficiency_vs_encode"] = round(r["sentences_per_cpu_s"] / baseline["sentences_per_cpu_s"], 3)
    result = {"n": args.n, "batch_size": args.batch_size, "encode": baseline, "hetray": runs, "gpu": gpu}
    rows = "\n".join(
        f"| hetray, {r['actors']} actor(s) x {r['cpus_per_actor']:g} CPU | {r['wall_s']} "
        f"| {r['sentences_per_s']} "
        f"| **{r['ratio_vs_encode_with_load']}** | {r['ratio_vs_encode_only']} | {r['cpu_s']} "
        f"| {r['sentences_per_cpu_s']} | {r['cpu_efficiency_vs_encode']} | {r['load_average']} |"
        for r in runs
    )
    e = baseline
    md = (
        f"{args.n:,} distinct prompts of 10-40 words, all-MiniLM-L6-v2, batch size {args.batch_size}, "
        f"{cores} cores.\n\n"
        "| run | wall s | sentences/s | ratio vs encode incl. load | ratio vs encode only "
        "| CPU s | sentences per CPU s | CPU efficiency vs encode | load avg (1 min) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| encode, 1 process, {cores} torch threads | {e['load_s'] + e['encode_s']:.2f} "
        f"| {e['sentences_per_s_with_load']} (encode only {e['sentences_per_s']}) | 1 | | "
        f"{e['cpu_s_with_load']} | {e['sentences_per_cpu_s']} | 1 | {e['load_average']} |\n"
        f"{rows}\n\n"
        "hetray's time is the whole stage (read, dedupe shuffle, actor start + model load, encode, "
        "write), the baseline's the model load (torch already imported) + encode of an in-memory "
        "list, which encode() sorts by length as a whole. CPU s: the CPU time "
        "of the process tree (hetray: driver, Ray's own processes and workers), the work done "
        "whatever else runs on the machine; load avg: the machine's 1-minute load average after "
        "the run (above the core count, other work competed for the cores and wall times are "
        "noisy)."
    )
    if gpu:
        md += (
            f"\n\nGPU ({gpu['gpus']}): encode {gpu['encode']['sentences_per_s']} sentences/s; hetray "
            f"{gpu['hetray']['sentences_per_s_per_gpu']} sentences/s per GPU (whole stage)."
        )
    path = write_results("bench_embed", result, md)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
