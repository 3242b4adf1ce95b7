"""Benchmark: hetray convert vs a plain single-process pandas conversion, same data, same run.

    python benchmarks/bench_convert.py                       # 1M rows of each shape
    python benchmarks/bench_convert.py --large               # 1M and 10M
    python benchmarks/bench_convert.py --sizes 100000 --shapes oasst hh   # any sizes / shapes

Shapes (synthetic, written to disk in 8 jsonl shards, then converted by both):

* ``oasst``: OASST1-shaped flat messages (raw-export form: ``parent_id``, ``labels`` as
  ``{name: {value, count}}``), trees of 1 prompt with 2-4 replies and sometimes a follow-up
  prompt with its own replies, the messages of one tree scattered across the shards (grouping
  must cross files). Label: toxicity, lower is better. Size = messages.
* ``hh``: Anthropic HH-RLHF-shaped rows (``chosen`` / ``rejected`` transcripts sharing a
  history of 0-1 exchanges and a last question; ~400 bytes a row, shorter than real HH so that
  10M rows fit pandas in memory). Size = rows.
* ``winogrande``: WinoGrande-shaped rows (``qID``, ``sentence`` with a ``_``, two options,
  ``answer``); one qID in a thousand repeats an earlier one (kept once). Size = rows.

hetray runs ``hetray convert`` (a local Ray on every core; the object store capped by
``ray.object_store_memory``, ``--object-store-mib``); pandas runs the same conversion in one
process (``read_json(lines=True)``, vectorised ``str`` methods, ``groupby``; it writes the pairs
only, no rejects and no counts). Reported per shape and size: rows/s of each, the throughput ratio
hetray/pandas, peak memory (PSS of the whole process tree: driver, GCS, raylet, Ray workers and
the object store's shared pages counted once; the one process for pandas) and its ratio, pairs
from each, and the load average. Results: benchmarks/results/bench_convert.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
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
    return " ".join(rng.choices(WORDS, k=n))


class Shards:
    """SHARDS jsonl files; ``write`` puts a row in a random one."""

    def __init__(self, out_dir: Path, rng: random.Random, name: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.rng = rng
        self.files = [open(out_dir / f"{name}-{i:02d}.jsonl", "w") for i in range(SHARDS)]
        self.written = 0

    def write(self, row: dict) -> None:
        self.files[self.rng.randrange(SHARDS)].write(json.dumps(row) + "\n")
        self.written += 1

    def close(self) -> int:
        for f in self.files:
            f.close()
        return self.written


def make_oasst(n: int, out_dir: Path, seed: int = 0) -> int:
    """~n synthetic flat OASST messages. Returns the count."""
    rng = random.Random(seed)
    out = Shards(out_dir, rng, "messages")

    def message(mid, parent, tid, role, score=None):
        labels = None if score is None else {"toxicity": {"value": score, "count": 3}}
        return {
            "message_id": mid, "parent_id": parent, "message_tree_id": tid, "role": role,
            "text": _text(rng, rng.randint(8, 40)), "lang": "en", "review_result": True,
            "deleted": False, "synthetic": False, "rank": None, "labels": labels,
        }

    tree = 0
    while out.written < n:
        tid = f"t{tree:09d}"
        tree += 1
        out.write(message(tid, None, tid, "prompter"))
        parents = [tid]
        if rng.random() < 0.5:
            parents.append(f"{tid}-f")
        for depth, parent in enumerate(parents):
            replies = [f"{parent}-r{j}" for j in range(rng.randint(2, 4))]
            for r in replies:
                out.write(message(r, parent, tid, "assistant", round(rng.random(), 3)))
            if depth + 1 < len(parents):  # the follow-up prompt answers the first reply
                out.write(message(parents[depth + 1], replies[0], tid, "prompter"))
    return out.close()


def make_hh(n: int, out_dir: Path, seed: int = 0) -> int:
    """n synthetic HH-RLHF rows. Returns the count."""
    rng = random.Random(seed)
    out = Shards(out_dir, rng, "hh")
    for _ in range(n):
        history = "".join(f"\n\nHuman: {_text(rng, rng.randint(4, 15))}\n\nAssistant: {_text(rng, rng.randint(4, 15))}"
                          for _ in range(rng.randint(0, 1)))
        prompt = f"{history}\n\nHuman: {_text(rng, rng.randint(4, 15))}\n\nAssistant:"
        out.write({"chosen": f"{prompt} good {_text(rng, rng.randint(4, 20))}",
                   "rejected": f"{prompt} bad {_text(rng, rng.randint(4, 20))}"})
    return out.close()


def make_winogrande(n: int, out_dir: Path, seed: int = 0) -> int:
    """n synthetic WinoGrande rows, one qID in a thousand repeated. Returns the count."""
    rng = random.Random(seed)
    out = Shards(out_dir, rng, "winogrande")
    for i in range(n):
        q = rng.randrange(i) if i and rng.random() < 0.001 else i
        out.write({"qID": f"q{q:010d}", "sentence": f"{_text(rng, rng.randint(5, 15))} _ {_text(rng, rng.randint(3, 10))}.",
                   "option1": _text(rng, 2), "option2": _text(rng, 3), "answer": rng.choice("12")})
    return out.close()


PANDAS_READ = '''
import glob, sys, pandas as pd
src, out = sys.argv[1], sys.argv[2]
df = pd.concat([pd.read_json(f, lines=True) for f in sorted(glob.glob(src + "/*.jsonl"))], ignore_index=True)
'''
PANDAS = {
    "oasst": '''
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
pairs = pairs.rename(columns={"text_c": "chosen", "text_r": "rejected"})[["prompt", "chosen", "rejected", "quality"]]
''',
    "hh": '''
c = df["chosen"].str.rpartition("\\n\\nAssistant:")
r = df["rejected"].str.rpartition("\\n\\nAssistant:")
pairs = pd.DataFrame({"prompt": c[0] + c[1], "other": r[0] + r[1], "chosen": c[2].str.strip(), "rejected": r[2].str.strip()})
pairs = pairs[(c[1] != "") & (r[1] != "") & (pairs.prompt == pairs.other) & (pairs.chosen != "") & (pairs.rejected != "")
              & (pairs.chosen != pairs.rejected)][["prompt", "chosen", "rejected"]]
''',
    "winogrande": '''
df = df[df.answer.astype(str).str.strip().isin(["1", "2"]) & df.sentence.str.contains("_", regex=False)
        & (df.option1.str.strip() != df.option2.str.strip())]
df = df.drop_duplicates("qID", keep="first")
one = df.answer.astype(str).str.strip() == "1"
pairs = pd.DataFrame({"prompt": df.sentence, "chosen": df.option1.where(one, df.option2),
                      "rejected": df.option2.where(one, df.option1)})
''',
}
PANDAS_WRITE = '''
pairs.to_parquet(out)
print("PAIRS", len(pairs))
'''

SOURCES = {
    "oasst": "{name: oasst, format: oasst, shape: messages, path: SRC, label: toxicity, direction: lower}",
    "hh": "{name: hh, format: hh, path: SRC}",
    "winogrande": "{name: winogrande, format: winogrande, path: SRC}",
}
MAKE = {"oasst": make_oasst, "hh": make_hh, "winogrande": make_winogrande}
UNIT = {"oasst": "messages", "hh": "rows", "winogrande": "rows"}


def bench(shape: str, n: int, work: Path, object_store: int) -> dict:
    src = work / f"src-{shape}-{n}"
    count = MAKE[shape](n, src)
    size_mb = sum(f.stat().st_size for f in src.iterdir()) / 2**20
    job = work / f"job-{shape}-{n}.yaml"
    job.write_text(
        f"run_dir: {work / f'run-{shape}-{n}'}\n"
        f"ray: {{object_store_memory: {object_store}, include_dashboard: false}}\n"
        f"convert:\n  sources:\n    - {SOURCES[shape].replace('SRC', str(src))}\n"
    )
    hetray = run_measured([sys.executable, "-m", "hetray.cli", "convert", "--config", str(job), "--force"])
    script = work / f"pandas_{shape}.py"
    script.write_text(textwrap.dedent(PANDAS_READ + PANDAS[shape] + PANDAS_WRITE))
    pandas = run_measured([sys.executable, str(script), str(src), str(work / f"pandas-{shape}-{n}.parquet")])
    manifest = json.loads((work / f"run-{shape}-{n}" / "preferences" / "manifest.json").read_text())
    shutil.rmtree(src)
    shutil.rmtree(work / f"run-{shape}-{n}", ignore_errors=True)
    keys = ("wall_s", "peak_mem_mib", "peak_by_process_mib", "load_avg_1min_after", "load_avg_1min_during")
    res = {
        "shape": shape, "rows": count, "unit": UNIT[shape], "input_mib": round(size_mb, 1),
        "hetray": {k: hetray[k] for k in keys}, "pandas": {k: pandas[k] for k in keys},
        "hetray_pairs": manifest["totals"]["pairs"],
        "pandas_pairs": int(pandas["output_tail"].split("PAIRS")[-1].split()[0]),
        "hetray_wall_in_stage_s": manifest.get("wall_time_s"),
    }
    res["hetray"]["rows_per_s"] = round(count / hetray["wall_s"])
    res["pandas"]["rows_per_s"] = round(count / pandas["wall_s"])
    res["throughput_ratio_hetray_over_pandas"] = round(pandas["wall_s"] / hetray["wall_s"], 3)
    res["memory_ratio_hetray_over_pandas"] = round(hetray["peak_mem_mib"] / pandas["peak_mem_mib"], 3)
    print(json.dumps(res, indent=2), flush=True)
    return res


def _markdown(runs: list[dict], object_store: int) -> str:
    rows = "\n".join(
        f"| {r['shape']} | {r['rows']:,} {r['unit']} | {r['input_mib']} | {r['hetray']['wall_s']} ({r['hetray_wall_in_stage_s']}) "
        f"| {r['pandas']['wall_s']} | {r['hetray']['rows_per_s']:,} "
        f"| {r['pandas']['rows_per_s']:,} | {r['throughput_ratio_hetray_over_pandas']} | {r['hetray']['peak_mem_mib']} "
        f"| {r['pandas']['peak_mem_mib']} | {r['memory_ratio_hetray_over_pandas']} "
        f"| {r['hetray_pairs']:,} / {r['pandas_pairs']:,} "
        f"| {r['hetray']['load_avg_1min_during']['mean'] if r['hetray']['load_avg_1min_during'] else '-'} / "
        f"{r['pandas']['load_avg_1min_during']['mean'] if r['pandas']['load_avg_1min_during'] else '-'} |"
        for r in runs
    )
    flat = []
    for shape in dict.fromkeys(r["shape"] for r in runs):
        sized = sorted((r for r in runs if r["shape"] == shape), key=lambda r: r["rows"])
        if len(sized) > 1:
            flat.append(f"{shape}: peak at {sized[-1]['rows']:,} / peak at {sized[0]['rows']:,} = "
                        f"{sized[-1]['hetray']['peak_mem_mib'] / sized[0]['hetray']['peak_mem_mib']:.2f}")
    return (
        "| shape | size | input MiB | hetray s (in stage) | pandas s | hetray rows/s | pandas rows/s "
        "| throughput ratio (hetray/pandas) | hetray peak MiB | pandas peak MiB | memory ratio | pairs (hetray / pandas) "
        "| mean load (hetray / pandas) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + rows + "\n\n"
        + (("Memory growth of hetray (goal: at most 1.2): " + "; ".join(flat) + ".\n\n") if flat else "")
        + f"hetray: `hetray convert` on a local Ray with every core of the machine and "
        f"`ray.object_store_memory` = {object_store / 2**20:.0f} MiB; wall time includes starting Python and "
        "Ray (in stage: the stage's own wall time from its manifest, the rest is start-up, the summary and exit). pandas: one process, the same conversion, pairs only. Peak memory is the PSS of the whole process "
        "tree (hetray: driver, GCS, raylet, Ray workers, object store shared pages counted once; pandas: its one "
        "process), sampled every 0.5 s. Load: mean 1-minute load average while each ran (above the core count: "
        "other work competed, timings are not comparable)."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--large", action="store_true", help="also run 10M of each shape")
    p.add_argument("--sizes", type=int, nargs="*", help="rows (messages) per shape (default 1M, +10M with --large)")
    p.add_argument("--shapes", nargs="*", choices=list(MAKE), default=list(MAKE))
    p.add_argument("--object-store-mib", type=int, default=1536, help="ray.object_store_memory for hetray")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = p.parse_args()
    sizes = args.sizes or ([1_000_000, 10_000_000] if args.large else [1_000_000])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hetray-bench-convert-"))
    object_store = args.object_store_mib << 20
    runs = [bench(shape, n, work, object_store) for shape in args.shapes for n in sizes]
    md = _markdown(runs, object_store)
    path = write_results("bench_convert", {"object_store_memory": object_store, "cpus": os.cpu_count(), "runs": runs}, md)
    shutil.rmtree(work, ignore_errors=True)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
