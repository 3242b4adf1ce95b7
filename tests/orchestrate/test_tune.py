"""hetray tune: a 2x2 grid (k x fraction) on a synthetic preference set, the tiny Llama, two
reward budgets per trial under ASHA; the held-out bookkeeping; bad tune settings failing before
any trial.

Every Ray Train run costs tens of seconds of process start-up on 2 busy cores, so the grid
trains its reward models from the base model (``train.reward.init: base``: no SFT run per
trial); the SFT step of a trial is the same ``run_sft`` the training tests cover.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from hetray.config import ConfigError, JobConfig
from hetray.orchestrate.tune import cli, eval_metric, heldout_sample, needs_sft, plan_tune, run_tune, write_pairs
from hetray.orchestrate.tune_report import best_row, format_table, write_outputs
from hetray.pairs import held_out
from hetray.schema import PREFERENCE_SCHEMA, make_id
from hetray.stage import read_manifest

TOPICS = ["bake bread", "learn Python", "fix a flat tyre", "save money", "sleep better", "start running",
          "write a CV", "grow tomatoes", "learn chess", "clean a laptop", "cook rice", "study for exams",
          "paint a wall", "train a puppy", "plan a trip", "make coffee", "learn guitar", "reduce stress",
          "back up photos", "tie a tie"]
GOOD = ["Sure! Start small and practise a little every day.", "Happy to help: take it one step at a time.",
        "Good question. Read a short guide first, then try it.", "Of course. Gather what you need and go slowly.",
        "Here is a plan: learn the basics, then practise.", "Thanks for asking! Ask a friend who knows it well."]
BAD = ["Figure it out yourself.", "No idea, go away.", "That is a stupid question.", "Why would anyone care?",
       "Stop asking me things.", "Nobody can help you with that."]
SOURCES = [{"name": "wg", "format": "winogrande", "path": "sample:winogrande.jsonl"}]  # not converted: the pairs are written
SMALL = {"max_length": 64, "per_device_batch_size": 2, "logging_steps": 1, "save_steps": 100, "learning_rate": 1e-3}


def synthetic_pairs(seed: int = 0) -> list[dict]:
    """60 pairs over 40 prompts; 'scored' pairs carry a quality (so the fraction ranks them),
    'plain' pairs have none."""
    rnd = random.Random(seed)
    rows = []
    for i, topic in enumerate(TOPICS):
        for j, prompt in enumerate((f"How do I {topic}?", f"Any tips to {topic}, please?")):
            for n in range(1 + (i + j) % 2):
                scored = (i + n) % 3 != 0
                q = round(rnd.uniform(0.1, 5.0), 3) if scored else None
                rows.append({
                    "pair_id": make_id("tune", str(i), str(j), str(n)), "prompt": prompt,
                    "chosen": rnd.choice(GOOD), "rejected": rnd.choice(BAD),
                    "source": "scored" if scored else "plain", "quality": q,
                    "chosen_score": q, "rejected_score": 0.0 if scored else None,
                    "label": "helpfulness" if scored else None, "provenance": [f"{i}:{j}:{n}"],
                })
    return rows


def job(run: Path, model: str, init: str = "base", **tune) -> JobConfig:
    train = {"model": model, "resources": {"num_workers": 1, "cpus_per_worker": 0.45, "max_failures": 0},
             "sft": SMALL, "reward": {**SMALL, "eval_fraction": 0.3, "init": init}}
    return JobConfig.model_validate({
        "run_dir": str(run), "seed": 1, "convert": {"sources": SOURCES}, "ray": {"num_cpus": 2},
        "embed": {"num_gpus_per_actor": 0}, "cluster": {"n_clusters": 2, "n_init": 2},
        "train": train,
        "tune": {"n_clusters": [2, 3], "fraction": [0.5, 1.0], "sft_steps": 1, "train_steps": 2, "rounds": 2,
                 "eval_pairs": 12, **tune},
    })


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_local) -> Path:
    """A run dir with preferences/ (the real schema) and embeddings/ (the bundled MiniLM)."""
    from hetray.selection.embed import run_embed

    run = tmp_path_factory.mktemp("tune") / "run"
    (run / "preferences").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(synthetic_pairs(), schema=PREFERENCE_SCHEMA),
                   run / "preferences" / "part-00000.parquet")
    (run / "preferences" / "manifest.json").write_text(json.dumps({"stage": "convert", "key": "synthetic"}))
    run_embed(job(run, "unused"))
    return run


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_grid_two_k(root, tiny_llama):
    # two trials (k = 2 and 3, fraction 0.5): every Ray Train start costs 40-100 s on 2 busy cores
    cfg = job(root, tiny_llama, fraction=[0.5])
    embeddings = snapshot(root / "embeddings")
    best = run_tune(cfg)
    out = root / "tune"

    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 2
    assert set(zip(table["n_clusters"], table["fraction"])) == {(2, 0.5), (3, 0.5)}
    assert table["objective"].map(math.isfinite).all() and table["objective"].between(0, 1).all()
    assert (table["objective"] == table["reward_accuracy"]).all()  # the default objective
    assert set(table["status"]) <= {"completed", "stopped"} and (table["status"] == "completed").any()
    done = table[table["status"] == "completed"]
    assert (done["rounds_done"] == 2).all() and (done["reward_steps"] == 2).all()
    assert (table["eval_pairs"] == 12).all()  # every trial is scored on the same held-out pairs
    assert (table["train_pairs"] < table["pairs_selected"]).all()  # held-out prompts are not trained on
    # fraction 0.5 keeps about half of the pairs, for each k
    assert (abs(table["pairs_selected"] - len(synthetic_pairs()) / 2) <= 3).all()
    assert json.loads((out / "trials.json").read_text())[0].keys() >= {"trial", "objective", "status", "wall_time_s"}

    # best.json: the best completed trial of the table
    top = done.sort_values("objective", ascending=False).iloc[0]
    assert best == json.loads((out / "best.json").read_text())
    assert best["objective"] == pytest.approx(top["objective"])
    assert best["objective"] == pytest.approx(done["objective"].max())
    assert best["settings"] == {"n_clusters": int(top["n_clusters"]), "fraction": float(top["fraction"])}
    assert best["trials"] == 2 and best["max_concurrent_trials"] == 4  # floor(2 CPUs / (0.45 + 0.05))

    # shared stages: embeddings untouched, clusters once per k (the job's k in clusters/, k=3 in shared/k3)
    assert snapshot(root / "embeddings") == embeddings
    clusters = {2: root / "clusters", 3: root / "shared" / "k3" / "clusters"}
    first_select = min(json.loads((out / t / "selection" / "manifest.json").read_text())["created"] for t in table["trial"])
    for k, folder in clusters.items():
        m = json.loads((folder / "manifest.json").read_text())
        assert m["config"]["cluster"]["n_clusters"] == k
        assert m["created"] <= first_select  # computed before the trials, never again by them
    assert sorted(p.parent.name for p in root.rglob("clusters/manifest.json") if not p.parent.is_symlink()) == ["clusters", "clusters"]
    for t in table.itertuples():
        link = out / t.trial / "clusters"
        assert link.is_symlink() and link.resolve() == clusters[t.n_clusters].resolve()
        assert (out / t.trial / "embeddings").resolve() == (root / "embeddings").resolve()
        assert not (out / t.trial / "sft").exists()  # reward from the base model: no SFT needed

    assert (out / "objective.png").stat().st_size > 5000


def test_heldout_sample_and_training_pairs(tmp_path):
    """The common held-out sample: pairs of held-out prompts only, at most eval_pairs, the same on
    a re-run; the training pairs: the selection without any held-out prompt, plus that sample."""
    cfg = job(tmp_path, "unused")
    (tmp_path / "preferences").mkdir()
    pairs = synthetic_pairs()
    pq.write_table(pa.Table.from_pylist(pairs, schema=PREFERENCE_SCHEMA), tmp_path / "preferences" / "p.parquet")
    (tmp_path / "preferences" / "manifest.json").write_text(json.dumps({"key": "x"}))
    held = {p["prompt"] for p in pairs if held_out(p["prompt"], 0.3, 1)}
    assert 0 < len(held) < 40

    n = heldout_sample(cfg, tmp_path / "heldout", 5, 0.3, 1)
    sample = pq.read_table(tmp_path / "heldout" / "heldout.parquet").to_pylist()
    assert n == len(sample) == 5 and {r["prompt"] for r in sample} <= held
    manifest = read_manifest(tmp_path / "heldout")
    assert manifest["stage"] == "tune-heldout" and manifest["pairs"] == 5 and manifest["config"]["size"] == 5
    files = snapshot(tmp_path / "heldout")
    assert heldout_sample(cfg, tmp_path / "heldout", 5, 0.3, 1) == 5  # up to date: skipped
    assert snapshot(tmp_path / "heldout") == files
    assert pq.read_table(tmp_path / "heldout" / "heldout.parquet").to_pylist() == sample
    everything = heldout_sample(cfg, tmp_path / "all", 1000, 0.3, 1)
    assert everything == sum(p["prompt"] in held for p in pairs)
    assert not list(tmp_path.glob(".stage-*"))  # the runner's temporary folders are gone

    train_cfg = cfg.model_copy(deep=True)
    train_cfg.train.reward.seed = 1
    rows = write_pairs(tmp_path / "data", [tmp_path / "preferences"], tmp_path / "heldout", train_cfg)
    written = pq.read_table(tmp_path / "data" / "train-00000.parquet").to_pylist()
    assert rows == len(written) == len(pairs) - everything and not {r["prompt"] for r in written} & held
    assert pq.read_table(tmp_path / "data" / "heldout.parquet").to_pylist() == sample
    assert read_manifest(tmp_path / "data")["pairs"] == rows

    # a run that fails half-way leaves the previous pairs and manifest as they were
    before, key = snapshot(tmp_path / "data"), read_manifest(tmp_path / "data")["key"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "part-0.parquet").write_text("not parquet")
    with pytest.raises(Exception):
        write_pairs(tmp_path / "data", [tmp_path / "preferences", tmp_path / "broken"], tmp_path / "heldout", train_cfg)
    assert snapshot(tmp_path / "data") == before and read_manifest(tmp_path / "data")["key"] == key
    assert not list(tmp_path.glob(".stage-*"))


def test_sft_only_when_something_needs_it(tmp_path):
    assert not needs_sft(job(tmp_path, "m", init="base"))
    assert needs_sft(job(tmp_path, "m", init="sft"))
    assert not needs_sft(job(tmp_path, "m", init="base", metric="reward.accuracy"))
    assert needs_sft(job(tmp_path, "m", init="base", metric="winobias.bias"))


def test_eval_metric_asks_run_eval_for_one_suite(tmp_path, monkeypatch):
    import hetray.eval.run

    calls = []

    def fake_run_eval(models, eval_cfg, out_dir, seed=0, reward_model=None):
        calls.append((models, eval_cfg.suites, reward_model))
        return {"model": {eval_cfg.suites[0]: {"bias": 0.25, "accuracy": 0.5}}}

    monkeypatch.setattr(hetray.eval.run, "run_eval", fake_run_eval)
    cfg = job(tmp_path, "m")
    assert eval_metric(cfg, "winobias.bias", tmp_path / "sft" / "merged", None, tmp_path / "e") == 0.25
    assert calls[-1] == ({"model": str(tmp_path / "sft" / "merged")}, ["winobias"], None)
    assert eval_metric(cfg, "reward.accuracy", tmp_path / "r" / "merged", tmp_path / "r", tmp_path / "e") == 0.5
    assert calls[-1][1:] == (["reward"], str(tmp_path / "r"))
    with pytest.raises(KeyError, match="suite winobias has no metric 'bais' .it reports accuracy, bias."):
        eval_metric(cfg, "winobias.bais", tmp_path, None, tmp_path / "e")


def test_best_row_prefers_completed_trials():
    rows = [{"objective": 0.9, "status": "stopped"}, {"objective": 0.6, "status": "completed"},
            {"objective": 0.7, "status": "completed"}, {"objective": None, "status": "error"}]
    assert best_row(rows, "max")["objective"] == 0.7
    assert best_row(rows, "min")["objective"] == 0.6
    assert best_row([{"objective": 0.4, "status": "stopped"}], "max")["objective"] == 0.4


def fake_result(trial, k, fraction, value, rounds, error=None):
    """What ``trial_rows`` reads of one Ray Tune result."""
    metrics = {"trial": trial, "round": rounds, "reward_accuracy": value, "reward_steps": rounds, "pairs_selected": 30,
               "train_pairs": 20, "eval_pairs": 12, "time_total_s": 12.345} if value is not None else {}
    return SimpleNamespace(metrics=metrics, config={"n_clusters": k, "fraction": fraction, "variant": "", "repeat": 0},
                           error=error, path=f"/ray/{trial}")


def test_outputs_from_a_result_grid(tmp_path):
    cfg = job(tmp_path, "unused")
    plan = {"out": str(tmp_path), "budgets": [1, 2], "concurrent": 2}
    results = [fake_result("k3-f0.5", 3, 0.5, 0.75, 2), fake_result("k2-f1", 2, 1.0, 0.9, 1),
               fake_result("k2-f0.5", 2, 0.5, 0.5, 2), fake_result("k3-f1", 3, 1.0, None, 0, RuntimeError("boom\nOOM"))]
    best = write_outputs(cfg, plan, results, started=0.0)

    table = pd.read_csv(tmp_path / "trials.csv")
    assert list(table["trial"]) == ["k2-f0.5", "k2-f1", "k3-f0.5", "k3-f1"]  # in settings order
    assert list(table["status"]) == ["completed", "stopped", "completed", "error"]
    assert table.loc[3, "error"] == "OOM" and math.isnan(table.loc[3, "objective"])
    assert list(table["wall_time_s"][:3]) == [12.3, 12.3, 12.3] and (table["seed"] == 1).all()
    assert json.loads((tmp_path / "trials.json").read_text())[0]["objective"] == 0.5
    # the stopped trial's 0.9 is a smaller budget's: the best completed one wins
    assert best == json.loads((tmp_path / "best.json").read_text())
    assert best["objective"] == 0.75 and best["trial"] == "k3-f0.5" and best["settings"] == {"n_clusters": 3, "fraction": 0.5}
    assert best["overrides"] == ["cluster.n_clusters=3", "select.fraction=0.5"]
    assert (best["trials"], best["completed"], best["stopped_early"], best["errors"]) == (4, 2, 1, 1)
    assert best["reward_budgets"] == [1, 2] and best["max_concurrent_trials"] == 2
    assert (tmp_path / "objective.png").stat().st_size > 5000

    lines = format_table(json.loads((tmp_path / "trials.json").read_text())).splitlines()
    assert lines[0].split() == ["trial", "objective", "reward_accuracy", "status", "rounds_done", "pairs_selected", "wall_time_s"]
    assert lines[3].split() == ["k3-f0.5", "0.7500", "0.7500", "completed", "2", "30", "12.3000"]
    assert lines[4].split() == ["k3-f1", "error", "0"]

    with pytest.raises(RuntimeError, match="no trial gave an objective"):
        write_outputs(cfg, plan, results[3:], started=0.0)


def test_cli_errors_go_to_stderr(tmp_path, capsys, ray_local):
    args = SimpleNamespace(config=str(tmp_path / "missing.yaml"), overrides=[])
    assert cli(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and "hetray tune: error: config file" in err and "missing.yaml" in err

    # another process writes the job's run dir: refused before any work, naming the holder
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job(tmp_path / "run", "unused").model_dump(mode="json")))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from hetray.stage import locked
        with locked({str(tmp_path / "run")!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli(SimpleNamespace(config=str(config), overrides=["tune.fraction=[0.5]"])) == 2
    finally:
        holder.kill()
        holder.wait()
    out, err = capsys.readouterr()
    assert out == "" and f"is being written by another hetray process (pid {holder.pid}" in err
    assert not (tmp_path / "run" / "tune").exists()


@pytest.mark.parametrize("tune, message", [
    ({"fraction": [0, 0.5]}, "greater than 0"),
    ({"fraction": [0.5, 1.5]}, "less than or equal to 1"),
    ({"n_clusters": [0]}, "greater than or equal to 1"),
    ({"labels": ["toxicity"]}, "need tune.label_source"),
    ({"n_clusters": [2, 2]}, "lists a value twice"),
])
def test_bad_tune_section_is_refused_on_load(tmp_path, tune, message):
    with pytest.raises(Exception, match=message):
        job(tmp_path, "unused", **tune)


def test_bad_plan_fails_before_any_trial(tmp_path, ray_local):
    for metric in ("reward_acc", "winobias", "nosuch.bias"):
        with pytest.raises(ConfigError, match=f"tune.metric '{metric}' is not known"):
            plan_tune(job(tmp_path, "unused", metric=metric))
    plan_tune(job(tmp_path, "unused", metric="winobias.bias"))  # a known suite: accepted
    with pytest.raises(ConfigError, match="tune.label_source 'oasst' is not a source"):
        plan_tune(job(tmp_path, "unused", labels=["toxicity"], label_source="oasst"))
    with pytest.raises(ConfigError, match="has no quality label"):
        plan_tune(job(tmp_path, "unused", labels=["x"], label_source="wg"))
    with pytest.raises(ConfigError, match="rounds would repeat a budget"):
        plan_tune(job(tmp_path, "unused", rounds=3, train_steps=2))
    big = job(tmp_path, "unused")
    big.train.resources.num_workers = 5
    with pytest.raises(ConfigError, match="one trial needs 2.3 CPUs"):
        plan_tune(big)
    assert not (tmp_path / "tune").exists()  # nothing was started


@pytest.mark.slow  # embeds the prompts first
def test_too_many_clusters_fail_before_any_trial(root):
    with pytest.raises(ConfigError, match=r"tune.n_clusters: \[500\] > the 40 distinct prompts"):
        run_tune(job(root, "unused", n_clusters=[2, 500]))
    assert not any((root / "tune").glob("k500-*"))
