"""Two Ray nodes give the outputs of one; a node that does not share run_dir is named before any stage.

The slow tests share one subprocess (``multinode``: the session's 2-CPU ``ray_local`` stays
untouched) that runs convert -> embed -> cluster -> select three times through ``run_pipeline``:

1. on one local Ray (2 CPUs), started by hetray as ``hetray run`` starts it;
2. on a simulated two-node cluster (``ray.cluster_utils.Cluster`` on this machine: a head with
   1 CPU and a second node with 2 CPUs and a custom resource), joined through ``ray.address``;
   Ray's state API then says which node ran which task;
3. with a third node added whose processes live in their own mount namespace (``unshare``), with
   an empty tmpfs over the run_dir's parent and a local folder at run_dir's path: that node
   really sees another folder, as a node without the shared filesystem would. The job must be
   refused by the preflight, naming that node. Skipped where ``unshare --mount`` is not allowed.

The per-node probe is a plain function of paths, tested directly below without Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetray.orchestrate.storage import FIX, probe, storage_problems

from conftest import ROOT

QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
# the data stages of the quickstart; 2 k-means restarts instead of 10 (each is a few Ray Data passes)
OVERRIDES = ["pipeline.stages=[convert,embed,cluster,select]", "cluster.n_init=2",
             "ray.include_dashboard=false", "ray.object_store_memory=200000000"]

SCRIPT = r"""
import json, os, signal, subprocess, sys, time
import ray
from ray.cluster_utils import Cluster
from hetray.config import ConfigError, load_config
from hetray.orchestrate.pipeline import run_pipeline
from hetray.orchestrate.preflight import preflight

spec = json.loads(open(sys.argv[1]).read())
out = {}


def job(run_dir, *extra):
    return load_config(spec["job"], [f"run_dir={run_dir}", *spec["overrides"], *extra])


def steps(summary):
    return [f"{s['stage']}:{s['status']}" for s in summary["steps"]]


def alive():
    return [n for n in ray.nodes() if n["Alive"]]


# 1. one node
started = time.time()
out["one"] = steps(run_pipeline(job(spec["one"])))
ray.shutdown()
out["seconds"] = {"one node": round(time.time() - started, 1)}

# 2. two nodes of different resources
MB = 1 << 20
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "object_store_memory": 100 * MB, "include_dashboard": True, "dashboard_host": "127.0.0.1"})
hidden = None
try:
    second = cluster.add_node(num_cpus=2, resources={"second_node": 1}, object_store_memory=120 * MB)
    cluster.wait_for_nodes()
    out["head"], out["second"] = cluster.head_node.node_id, second.node_id
    cfg = job(spec["two"], f"ray.address={cluster.address}")
    out["seconds"]["cluster start"] = round(time.time() - started - out["seconds"]["one node"], 1)
    out["two"] = steps(run_pipeline(cfg))  # joins the cluster as `hetray run` does
    out["seconds"]["two nodes"] = round(time.time() - started - sum(out["seconds"].values()), 1)
    out["nodes"] = {n["NodeID"]: n["Resources"] for n in alive()}
    report = preflight(cfg, raise_on_problems=False)
    out["storage_check"] = [c.line() for c in report.checks if c.what == "shared storage"]

    from ray.util.state import list_actors, list_tasks

    time.sleep(3)  # task events reach the state API about every second
    tasks = {}
    for t in list_tasks(address=cluster.address, limit=10_000, raise_on_missing_output=False):
        if t.node_id:
            tasks.setdefault(t.node_id, {}).setdefault(t.name, 0)
            tasks[t.node_id][t.name] += 1
    out["tasks"] = tasks
    out["actors"] = {a.class_name: a.node_id for a in list_actors(address=cluster.address, limit=1000,
                                                                     raise_on_missing_output=False)}

    # 3. a third node that sees another folder at run_dir's path
    hide = spec["hidden"]
    os.makedirs(os.path.join(hide, "run"))
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        out["hidden"] = {"skipped": "`unshare --mount` is not allowed here (needs CAP_SYS_ADMIN)"}
    else:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        start = ('mount -t tmpfs tmpfs "$0" && mkdir -p "$0/run" && exec "$1" start --address="$2" --num-cpus=1 '
                 '--resources=\'{"hidden_node": 1}\' --object-store-memory=80000000 --block')
        log = open(spec["hidden_log"], "w")
        hidden = subprocess.Popen(["unshare", "--mount", "sh", "-c", start, hide, ray_cli, cluster.address],
                                  start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while len(alive()) < 3 and time.time() < deadline and hidden.poll() is None:
            time.sleep(1)
        node = [n["NodeID"] for n in alive() if "hidden_node" in n["Resources"]]
        if not node:
            raise RuntimeError(f"the third node did not join; its log: {open(spec['hidden_log']).read()[-3000:]}")
        try:
            run_pipeline(job(os.path.join(hide, "run"), f"ray.address={cluster.address}"))
            error = None
        except ConfigError as e:
            error = str(e)
        out["hidden"] = {"node": node[0], "error": error, "left": sorted(os.listdir(os.path.join(hide, "run")))}
        out["seconds"]["third node"] = round(time.time() - started - sum(out["seconds"].values()), 1)
finally:
    if hidden is not None:  # the third node's processes: its own session, ended by its id
        os.killpg(hidden.pid, signal.SIGTERM)
        try:
            hidden.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(hidden.pid, signal.SIGKILL)
            hidden.wait()
        time.sleep(2)
        ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split()
        left = [int(p) for p, s in zip(ps[::2], ps[1::2]) if int(s) == hidden.pid]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        out.setdefault("hidden", {})["leftover_processes"] = left
    ray.shutdown()
    cluster.shutdown()
    open(sys.argv[2], "w").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def multinode(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("multinode")
    spec = {"job": str(QUICKSTART), "overrides": OVERRIDES, "one": str(tmp / "one"), "two": str(tmp / "two"),
            "hidden": str(tmp / "hidden"), "hidden_log": str(tmp / "hidden-node.log")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp / "spec.json"), str(tmp / "out.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return {**json.loads((tmp / "out.json").read_text()), "one_dir": tmp / "one", "two_dir": tmp / "two",
            "hidden_dir": tmp / "hidden"}


def _rows(folder: Path, key: list[str] | None = None) -> pa.Table:
    """Every row of a stage folder's Parquet files, in ``key`` order (None: every string and
    integer column). Files are written in the order tasks finish, so only their contents compare."""
    files = sorted(folder.rglob("*.parquet"))
    assert files, f"no Parquet files in {folder}"
    table = pa.concat_tables(pq.read_table(f) for f in files)
    key = key or [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_integer(f.type)]
    return table.sort_by([(k, "ascending") for k in key])


def _stable(item):
    """A manifest without its date and its floats (timings, rates, inertia: the data's floats are
    compared above): keys, counts, cells, settings and versions stay."""
    if isinstance(item, dict):
        return {k: _stable(v) for k, v in item.items() if k != "created"}
    if isinstance(item, list):
        return [_stable(v) for v in item]
    return None if isinstance(item, float) else item


@pytest.mark.slow
def test_two_nodes_write_what_one_node_writes(multinode):
    data = ["convert:ran", "embed:ran", "cluster:ran", "select:ran"]
    assert multinode["one"] == data and multinode["two"] == data
    one, two = multinode["one_dir"], multinode["two_dir"]

    # data: exact, every column, every row (pairs, rejects, vectors, cluster ids, D_train)
    for folder, key in [("preferences", ["pair_id"]), ("rejects", None), ("embeddings", ["prompt_id"]),
                        ("selected", ["pair_id"])]:
        a, b = _rows(one / folder, key), _rows(two / folder, key)
        assert a.num_rows > 0 and a.equals(b), folder
    a, b = (_rows(run / "clusters" / "assignments", ["prompt_id"]) for run in (one, two))
    assert a.select(["prompt_id", "cluster"]).equals(b.select(["prompt_id", "cluster"]))
    # Float sums of k-means: each Lloyd pass adds per-block partial sums in the order the blocks
    # finish, and float addition is not associative, so centroids, distances and inertia agree to
    # float32 rounding, not always bit for bit (measured: 1e-8 on centroids, 1.2e-7 on distances
    # in one run; equal in another).
    np.testing.assert_allclose(a["distance"].to_numpy(), b["distance"].to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.load(one / "clusters" / "centroids.npy"), np.load(two / "clusters" / "centroids.npy"),
                               rtol=0, atol=1e-6)
    for folder in ("preferences", "embeddings", "clusters", "selected"):
        manifests = [json.loads((run / folder / "manifest.json").read_text()) for run in (one, two)]
        assert _stable(manifests[0]) == _stable(manifests[1]), folder  # the same stage keys, counts, cells
    assert (one / "selected_report" / "report.md").read_text() == (two / "selected_report" / "report.md").read_text()


@pytest.mark.slow
def test_the_second_node_did_part_of_the_work(multinode):
    head, second = multinode["head"], multinode["second"]
    assert multinode["nodes"][head]["CPU"] == 1 and multinode["nodes"][second]["CPU"] == 2
    assert "second_node" in multinode["nodes"][second] and "second_node" not in multinode["nodes"][head]

    def data_tasks(node):  # Ray Data's read / map / shuffle / write tasks of the stages
        return {n: c for n, c in multinode["tasks"].get(node, {}).items()
                if any(w in n for w in ("Read", "MapBatches", "Shuffle", "Aggregate", "Write"))}

    assert sum(data_tasks(second).values()) >= 3 and sum(data_tasks(head).values()) >= 1, multinode["tasks"]
    assert multinode["storage_check"] == [
        f"ok       shared storage: run_dir {multinode['two_dir']} and 4 input file(s): seen by all 2 Ray nodes"]


@pytest.mark.slow
def test_a_node_that_sees_another_run_dir_is_named_before_any_stage(multinode):
    hidden = multinode["hidden"]
    if "skipped" in hidden:
        pytest.skip(hidden["skipped"])
    assert hidden["leftover_processes"] == []
    error, run_dir = hidden["error"], multinode["hidden_dir"] / "run"
    assert error is not None, "the job ran although a node cannot see run_dir"
    assert "preflight found 1 problem(s); nothing has run" in error
    assert (f"shared storage: 1 of the 3 Ray nodes do not see run_dir {run_dir} and 4 input file(s) as the driver "
            "does (node ") in error
    assert f"node {hidden['node'][:8]}" in error
    assert multinode["head"][:8] not in error and multinode["second"][:8] not in error  # only the node that fails
    assert f"{run_dir} exists on this node but is another folder: the marker file" in error
    assert "cluster.yaml mounts EFS at /mnt/shared" in error
    assert hidden["left"] == [".hetray.lock"]  # no stage folder, no marker left behind


# ---------------------------------------------------------------------------- the probe, without Ray


def test_the_probe_sees_the_marker_and_the_input_files(tmp_path):
    run_dir, data = tmp_path / "run", tmp_path / "data.jsonl"
    run_dir.mkdir()
    (run_dir / ".m").write_text("token-1")
    data.write_text("{}\n")
    seen = probe(str(run_dir), ".m", "token-1", ".m.node1", {str(data): 3})
    assert seen["problems"] == [] and seen["replied"]
    assert (run_dir / ".m.node1").read_text() == "token-1"  # the reply the driver looks for


def test_the_probe_names_what_this_node_does_not_see(tmp_path):
    local, data = tmp_path / "run", tmp_path / "data.jsonl"
    local.mkdir()  # a folder at run_dir's path, but not the driver's: no marker in it
    data.write_text("{}\n")
    seen = probe(str(local), ".m", "token-1", ".m.node1", {str(data): 99, str(tmp_path / "gone.jsonl"): 1})
    assert seen["problems"] == [
        f"{local} exists on this node but is another folder: the marker file .m that the driver wrote there is missing",
        f"input file {data} has 3 bytes on this node, 99 on the driver",
        f"input file {tmp_path / 'gone.jsonl'} cannot be read on this node (FileNotFoundError)",
    ]
    (local / ".m").write_text("token-2")  # another job's marker
    assert probe(str(local), ".m", "token-1", ".m.n", {})["problems"] == [
        f"{local / '.m'} holds another token than the driver wrote (another folder)"]
    missing = probe(str(tmp_path / "absent"), ".m", "t", ".m.n", {})
    assert missing["problems"] == [f"{tmp_path / 'absent'} does not exist on this node"] and not missing["replied"]
    assert probe(None, ".m", "t", ".m.n", {str(data): 3}) == {"host": seen["host"], "problems": [], "replied": False}


def test_the_message_names_only_the_nodes_that_fail():
    seen = {"10.0.0.1 (head, node aaaa1111, 8 CPU)": [],
            "10.0.0.2 (w1, node bbbb2222, 8 CPU, 1 GPU)": ["/mnt/shared/runs/x does not exist on this node"]}
    message = storage_problems("run_dir /mnt/shared/runs/x", seen, 2)
    assert message == ("1 of the 2 Ray nodes do not see run_dir /mnt/shared/runs/x as the driver does (node 10.0.0.2 "
                       f"(w1, node bbbb2222, 8 CPU, 1 GPU): /mnt/shared/runs/x does not exist on this node). {FIX}")
    assert storage_problems("/x", {"a": [], "b": []}, 2) is None
