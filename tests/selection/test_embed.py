"""The embed stage on local Ray: one unit vector per distinct prompt, equal to a direct encode
and the same bytes run to run; re-runs re-use the stored vectors; a new model or new prompts
embed again; phases timed; Ray's restart notice kept off stderr; clear errors."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from hetray.config import JobConfig
from hetray.selection.config import EmbedConfig
from hetray.selection.embed import (RAY_NOTICE, add_prompt_id, embed_stage, phases, plan_partitions,
                                    ray_notice_to_log, run_embed, to_embedding_table, token_order)
from hetray.models import load_embedder, resolve_embedder
from hetray.schema import PREFERENCE_SCHEMA, embedding_schema, pair, prompt_id
from hetray.schema import parquet_files

PROMPTS = [
    "Who does 'she' refer to in: The nurse helped the doctor because she was kind?",
    "Write a haiku about autumn leaves.",
    "How do I reverse a list in Python?",
    "Explain photosynthesis to a ten year old.",
    "What is the capital of Australia?",
    "Translate 'good morning' into German.",
    "Give me three tips for a job interview.",
    "Why is the sky blue?",
]


def write_preferences(run_dir, prompts, files=2):
    """``prompts`` as preference pairs, spread over ``files`` Parquet files."""
    folder = run_dir / "preferences"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    rows = [pair("x", p, f"good {i}", f"bad {i}", [str(i)]) for i, p in enumerate(prompts)]
    for k in range(files):
        table = pa.Table.from_pylist(rows[k::files], schema=PREFERENCE_SCHEMA)  # drops "kind"
        pq.write_table(table, folder / f"part-{k}.parquet")


def job(run_dir, **embed) -> JobConfig:
    return JobConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "convert": {"sources": [{"name": "x", "format": "winogrande", "path": "x"}]},
            "embed": {"batch_size": 4, **embed},
        }
    )


def read_embeddings(run_dir) -> dict:
    folder = run_dir / "embeddings"
    table = pq.ParquetDataset(parquet_files(folder)).read()
    assert table.schema.equals(embedding_schema(384)), table.schema
    return {r["prompt_id"]: (r["prompt"], np.array(r["vector"], np.float32)) for r in table.to_pylist()}


def mtimes(run_dir) -> dict:
    return {f: os.stat(f).st_mtime_ns for f in parquet_files(run_dir / "embeddings")}


def test_batch_helpers_without_ray():
    batch = add_prompt_id(pa.table({"prompt": ["a", "b", "a"]}))
    assert batch.column("prompt_id").to_pylist() == [prompt_id("a"), prompt_id("b"), prompt_id("a")]
    vectors = np.eye(3, 4, dtype=np.float64)
    table = to_embedding_table(batch["prompt_id"], batch["prompt"], vectors)
    assert table.schema.equals(embedding_schema(4))
    assert table.column("vector").to_pylist()[1] == [0.0, 1.0, 0.0, 0.0]


def test_plan_partitions_gives_every_actor_work_in_one_block_each():
    two = EmbedConfig(batch_size=256, num_actors=2)
    block = 128 << 20
    assert plan_partitions(20_000, 3_000_000, two, block) == 4  # 2 calls per actor
    assert plan_partitions(100, 5_000, two, block) == 4
    assert plan_partitions(10_000_000, 300_000_000, two, block) == 10  # at most 1M prompts each
    # each partition at most half a block: (2 GB of text + 24 B of id a prompt) / 64 MiB = 30.2
    assert plan_partitions(1_000_000, 2_000_000_000, two, block) == 31
    assert plan_partitions(1_000_000, 2_000_000_000, two, None) == 4  # no block size: no byte cap


def test_token_order_puts_most_tokens_first_and_keeps_ties_in_order():
    tokenizer = AutoTokenizer.from_pretrained(resolve_embedder("all-minilm-l6-v2"))
    prompts = ["a b", "one two three four five", "x y", "hello", "supercalifragilistic words here"]
    counts = [len(tokenizer(p)["input_ids"]) for p in prompts]
    order = token_order(tokenizer, prompts, max_length=512).tolist()
    assert [counts[i] for i in order] == sorted(counts, reverse=True)
    ties = [i for i in order if counts[i] == counts[0]]
    assert ties == sorted(ties)  # equal counts: the given order
    assert token_order(tokenizer, prompts, max_length=3).tolist() == [0, 1, 2, 3, 4]  # truncated to 3: all tie
    assert token_order(tokenizer, [], max_length=8).tolist() == []


def test_phases_from_the_actors_timing_files(tmp_path):
    t0 = 1000.0
    lines = {  # two actors; the first starts at +2 s, loads in 3 s, waits 1 s for data
        "a.jsonl": [{"actor": "a", "load": [t0 + 2, t0 + 5]},
                    {"actor": "a", "call": [t0 + 6, t0 + 16], "prompts": 1000, "encode_s": 9.5},
                    {"actor": "a", "call": [t0 + 16, t0 + 26], "prompts": 1000, "encode_s": 9.5}],
        "b.jsonl": [{"actor": "b", "load": [t0 + 3, t0 + 7]},
                    {"actor": "b", "call": [t0 + 7, t0 + 27], "prompts": 2000, "encode_s": 19.0}],
    }
    for name, entries in lines.items():
        (tmp_path / name).write_text("".join(json.dumps(e) + "\n" for e in entries))
    got = phases(tmp_path, t0, t0 + 28, actors=2)
    assert got == {"wall_s": 28.0, "actor_start_s": 2.0, "model_load_s": 4.0, "wait_for_dedupe_s": 1.0,
                   "calls_s": 20.0, "encode_s": 19.0, "steady_prompts_per_s": 200.0, "write_tail_s": 1.0,
                   "calls": 3, "actor_starts": 2}
    assert phases(tmp_path / "missing", t0, t0 + 5, actors=1) == {"wall_s": 5.0}


def test_ray_notice_is_kept_off_stderr_and_the_rest_passes(capfd):
    notice = b"[2026 E 1 1] core_worker.cc:2465: Actor with class name: 'X' " + RAY_NOTICE + b" and max_restarts > 0.\n"
    with ray_notice_to_log():
        os.write(2, b"before\n")
        os.write(2, notice)
        os.write(2, b"progress 1/2\r")
        os.write(2, b"after\n")
    os.write(2, b"restored\n")
    err = capfd.readouterr().err
    assert err == "before\nprogress 1/2\rafter\nrestored\n"


def test_key_changes_with_model_and_prompts_only(tmp_path):
    run = tmp_path / "run"
    write_preferences(run, PROMPTS)
    key = embed_stage(job(run)).key()
    assert embed_stage(job(run)).key() == key
    assert embed_stage(job(run, model="/some/other/model")).key() != key
    assert embed_stage(job(run, batch_size=3, num_actors=2)).key() == key  # resources: same vectors
    write_preferences(run, PROMPTS + ["One more prompt."])
    assert embed_stage(job(run)).key() != key


def test_embed_distinct_prompts_reuse_and_reruns(tmp_path, ray_local):
    run = tmp_path / "run"
    prompts = PROMPTS + PROMPTS[:6] + PROMPTS[2:8]  # 20 pairs, 8 distinct prompts
    write_preferences(run, prompts)

    m = run_embed(job(run))
    got = read_embeddings(run)
    assert len(got) == len(PROMPTS) and m["distinct_prompts"] == 8 and m["prompts"] == 20
    assert m["dim"] == 384 and m["model_path"] == resolve_embedder("all-minilm-l6-v2")
    assert {p for p, _ in got.values()} == set(PROMPTS)
    direct = load_embedder("all-minilm-l6-v2", device="cpu").encode(PROMPTS, normalize_embeddings=True)
    for text, want in zip(PROMPTS, direct):
        text_got, vec = got[prompt_id(text)]
        assert text_got == text
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
        np.testing.assert_allclose(vec, want, atol=1e-5)

    # every partition one actor call, timed
    t = m["timings"]
    assert m["partitions"] == 2 and 1 <= t["calls"] <= 2 and t["actor_starts"] == 1
    assert t["steady_prompts_per_s"] > 0 and 0 < t["encode_s"] <= t["calls_s"] < t["wall_s"]
    assert 0 <= t["actor_start_s"] < t["wall_s"] and 0 < t["model_load_s"] < t["wall_s"]

    # same prompts, same config: skipped, nothing rewritten
    before = mtimes(run)
    again = run_embed(job(run))
    assert again["created"] == m["created"] and again["key"] == m["key"]
    assert mtimes(run) == before

    # forced: embedded again, the same bytes (a partition is the same batches on every run)
    vectors = {pid: vec.tobytes() for pid, (_, vec) in got.items()}
    run_embed(job(run), force=True)
    assert {pid: vec.tobytes() for pid, (_, vec) in read_embeddings(run).items()} == vectors
    before = mtimes(run)

    # a new prompt, another model path (the same weights) and batch size: runs again, and the
    # vectors of the old prompts do not depend on the batch size
    write_preferences(run, prompts + ["A brand new prompt about tides."])
    alias = tmp_path / "minilm"
    alias.symlink_to(resolve_embedder("all-minilm-l6-v2"))
    grown = run_embed(job(run, model=str(alias), batch_size=3))
    assert grown["key"] != m["key"] and grown["model_path"] == str(alias)
    assert grown["distinct_prompts"] == 9 and grown["prompts"] == 21
    assert mtimes(run) != before  # new files
    now = read_embeddings(run)
    assert len(now) == 9
    for pid, (_, vec) in got.items():
        np.testing.assert_allclose(now[pid][1], vec, atol=1e-5)
    assert not list(run.glob(".embed-tmp-*"))


def test_one_prompt_leaves_a_partition_empty_and_writes_one_good_file(tmp_path, ray_local):
    run = tmp_path / "run"
    write_preferences(run, [PROMPTS[0]] * 5)  # 5 pairs, 1 distinct prompt, 2 partitions
    m = run_embed(job(run))
    assert m["partitions"] == 2 and m["distinct_prompts"] == 1 and m["timings"]["calls"] == 1
    files = parquet_files(run / "embeddings")
    assert [pq.read_metadata(f).num_rows for f in files] == [1]
    assert all(pq.read_schema(f).equals(embedding_schema(384)) for f in files)


def test_missing_preferences_says_run_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `hetray convert` first"):
        run_embed(job(tmp_path / "run"))


def test_empty_preferences_say_no_prompts(tmp_path):
    write_preferences(tmp_path / "run", [])
    with pytest.raises(ValueError, match="no prompts to embed"):
        run_embed(job(tmp_path / "run"))
    assert not (tmp_path / "run" / "embeddings").exists()


def test_actors_that_take_every_cpu_are_refused(tmp_path, ray_local):
    write_preferences(tmp_path / "run", PROMPTS)
    with pytest.raises(ValueError, match="lower embed.num_actors"):  # else read tasks never run
        run_embed(job(tmp_path / "run", num_actors=2))
