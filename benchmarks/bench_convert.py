"""Benchmark: hetray convert vs a plain single-process pandas conversion, same data, same run.

    python benchmarks/bench_convert.py            # 1M synthetic OASST messages
    python benchmarks/bench_convert.py --large    # and 10M
    python benchmarks/bench_convert.py --sizes 100000   # any sizes

Data: synthetic OASST1-shaped flat messages (raw-export form: ``parent_id``, ``labels`` as
``{name: {value, count}}``), trees of 1 prompt with 2-4 replies and sometimes a follow-up
prompt with its own replies, spread over 8 jsonl shards with the messages of one tree scattered
across shards (so grouping must cross files). Label: toxicity, lower is better.

Reports messages/s and the peak memory (PSS of the whole process tree: driver, raylet and
workers for hetray; the one process for pandas) for each, and the ratios. Results go to
benchmarks/results/bench_convert.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_measured, write_results  # noqa: E402

SHARDS = 8
WORDS = "the a model answer question help why how code python data train good bad kind rude".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_messages(n_messages: int, out_dir: Path, seed: int = 0) -> int:
    """Write ~n_messages synthetic flat OASST messages into SHARDS jsonl files. Returns the count."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [open(out_dir / f"messages-{i:02d}.jsonl", "w") for i in range(SHARDS)]
    written = 0
    tree = 0

    def emit(msg):
        nonlocal written
        files[rng.randrange(SHARDS)].write(json.dumps(msg) + "\n")
        written += 1

    def message(mid, parent, tid, role, score=None):
        labels = None if score is None else {"toxicity": {"value": score, "count": 3}}
        return {
            "message_id": mid, "parent_id": parent, "message_tree_id": tid, "role": role,
            "text": _text(rng, rng.randint(8, 40)), "lang": "en", "review_result": True,
            "deleted": False, "synthetic": False, "rank": None, "labels": labels,
        }

    while written < n_messages:
        tid = f"t{tree:09d}"
        tree += 1
        emit(message(tid, None, tid, "prompter"))
        parents = [tid]
        if rng.random() < 0.5:
            parents.append(f"{tid}-f")
        for depth, parent in enumerate(parents):
            replies = [f"{parent}-r{j}" for j in range(rng.randint(2, 4))]
            for r in replies:
                emit(message(r, parent, tid, "assistant", round(rng.random(), 3)))
            if depth + 1 < len(parents):  # the follow-up prompt answers the first reply
                emit(message(parents[depth + 1], replies[0], tid, "prompter"))
    for f in files:
        f.close()
    return written


PANDAS = textwrap.dedent(
    '''
    import glob, sys, pandas as pd
    src, out = sys.argv[1], sys.argv[2]
    df = pd.concat([pd.read_json(f, lines=True) for f in sorted(glob.glob(src + "/*.jsonl"))])
    df = df[~df.deleted & df.review_result & ~df.synthetic]
    df["score"] = df["labels"].map(lambda l: l["toxicity"]["value"] if isinstance(l, dict) and "toxicity" in l else None)
    prompts = df[df.role == "prompter"][["message_id", "text"]].rename(columns={"message_id": "parent_id", "text": "prompt"})
    replies = df[(df.role == "assistant") & df.score.notna()].sort_values(["parent_id", "score", "message_id"])
    g = replies.groupby("parent_id")
    best, worst = g.head(1).set_index("parent_id"), g.tail(1).set_index("parent_id")
    n = g.size()
    pairs = best[["message_id", "text", "score"]].join(worst[["message_id", "text", "score"]], lsuffix="_c", rsuffix="_r")
    pairs = pairs[(n[pairs.index] >= 2).values & (pairs.score_c != pairs.score_r)]
    pairs = pairs.join(prompts.set_index("parent_id"), how="inner").reset_index()
    pairs["quality"] = (pairs.score_r - pairs.score_c).abs()
    pairs.rename(columns={"text_c": "chosen", "text_r": "rejected"})[["prompt", "chosen", "rejected", "quality"]].to_parquet(out)
    print("PAIRS", len(pairs))
    '''
)

JOB = """
run_dir: {run_dir}
ray: {{num_cpus: 2}}
convert:
  batch_size: 4096
  sources:
    - name: oasst
      format: oasst
      shape: messages
      path: {src}
      label: toxicity
      direction: lower
"""


def bench(n: int, work: Path) -> dict:
    src = work / f"src-{n}"
    count = make_messages(n, src)
    size_mb = sum(f.stat().st_size for f in src.iterdir()) / 2**20
    job = work / f"job-{n}.yaml"
    job.write_text(JOB.format(run_dir=work / f"run-{n}", src=src))
    hetray = run_measured([sys.executable, "-m", "hetray.cli", "convert", "--config", str(job), "--force"])
    script = work / "pandas_convert.py"
    script.write_text(PANDAS)
    pandas = run_measured([sys.executable, str(script), str(src), str(work / f"pandas-{n}.parquet")])
    manifest = json.loads((work / f"run-{n}" / "preferences" / "manifest.json").read_text())
    pandas_pairs = int(pandas["output_tail"].split("PAIRS")[-1].split()[0])
    shutil.rmtree(src)
    res = {
        "messages": count,
        "input_mib": round(size_mb, 1),
        "hetray": {k: hetray[k] for k in ("wall_s", "peak_mem_mib", "load_avg_1min_after")},
        "pandas": {k: pandas[k] for k in ("wall_s", "peak_mem_mib", "load_avg_1min_after")},
        "hetray_pairs": manifest["totals"]["pairs"],
        "pandas_pairs": pandas_pairs,
    }
    res["hetray"]["messages_per_s"] = round(count / hetray["wall_s"])
    res["pandas"]["messages_per_s"] = round(count / pandas["wall_s"])
    res["throughput_ratio_hetray_over_pandas"] = round(pandas["wall_s"] / hetray["wall_s"], 3)
    res["memory_ratio_hetray_over_pandas"] = round(hetray["peak_mem_mib"] / pandas["peak_mem_mib"], 3)
    print(json.dumps(res, indent=2), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--large", action="store_true", help="also run 10M messages")
    p.add_argument("--sizes", type=int, nargs="*", help="message counts (default 1M, +10M with --large)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()
    sizes = args.sizes or ([1_000_000, 10_000_000] if args.large else [1_000_000])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hetray-bench-convert-"))
    runs = [bench(n, work) for n in sizes]
    rows = "\n".join(
        f"| {r['messages']:,} | {r['input_mib']} | {r['hetray']['messages_per_s']:,} | {r['pandas']['messages_per_s']:,} "
        f"| {r['throughput_ratio_hetray_over_pandas']} | {r['hetray']['peak_mem_mib']} | {r['pandas']['peak_mem_mib']} "
        f"| {r['memory_ratio_hetray_over_pandas']} | {r['hetray_pairs']:,} / {r['pandas_pairs']:,} |"
        for r in runs
    )
    md = (
        "| messages | input MiB | hetray msg/s | pandas msg/s | throughput ratio (hetray/pandas) "
        "| hetray peak MiB | pandas peak MiB | memory ratio | pairs (hetray / pandas) |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + rows + "\n\n"
        "Peak memory is the PSS of the whole process tree (hetray: driver + raylet + Ray workers, "
        "object store shared pages counted once; pandas: its one process), sampled every 0.5 s. "
        "Load averages after each run: "
        + "; ".join(f"{r['messages']:,}: hetray {r['hetray']['load_avg_1min_after']}, pandas {r['pandas']['load_avg_1min_after']}" for r in runs)
        + " (2 cores: above 2 means other work competed)."
    )
    path = write_results("bench_convert", {"runs": runs}, md)
    shutil.rmtree(work, ignore_errors=True)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
