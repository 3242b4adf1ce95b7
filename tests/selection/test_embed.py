"""The embed stage on local Ray: one unit vector per distinct prompt, equal to a direct encode;
re-runs re-use the stored vectors; a new model or new prompts embed again; clear errors."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetray.config import JobConfig
from hetray.selection.config import EmbedConfig
from hetray.selection.embed import add_prompt_id, embed_stage, plan_calls, run_embed, to_embedding_table
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


def test_plan_calls_gives_every_actor_work_in_wide_calls():
    two = EmbedConfig(batch_size=256, num_actors=2)
    assert plan_calls(20_000, two) == (8, 2500)  # 4 calls per actor, each sorted by length
    assert plan_calls(100, two) == (8, 256)  # never below one encode batch
    assert plan_calls(10_000_000, two) == (10, 4096)  # at most 16 encode batches per call


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

    # same prompts, same config: skipped, nothing rewritten
    before = mtimes(run)
    again = run_embed(job(run))
    assert again["created"] == m["created"] and again["key"] == m["key"]
    assert mtimes(run) == before

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
