"""cluster.yaml and jobs/runtime_env.yaml, checked the way Ray reads them, and one real
`ray job submit` of the quickstart's data stages to a job server started here.

The job-server test starts its own head (own temp dir and ports, RAY_ADDRESS unset) so it never
touches the Ray of this test session or of anyone else on the machine, and it stops that head by
its processes, never with `ray stop` (which would stop every Ray here).
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CLUSTER = ROOT / "cluster.yaml"
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"
SMOKE_STAGES = "pipeline.stages=[convert,embed,cluster,select]"  # the data stages: no training


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _runtime_env() -> dict:
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    return parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))  # what `ray job submit --runtime-env` does


def _ray_start(commands: list[str]) -> tuple[dict, list[str]]:
    """The environment assignments and the arguments of the `ray start` in a list of shell commands."""
    for cmd in commands:
        for part in cmd.split(";"):
            words = shlex.split(part)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words[:2] == ["ray", "start"]:
                return env, words[2:]
    raise AssertionError(f"no `ray start` in {commands}")


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _uncommented_keys(path: Path) -> list[str]:
    """Mapping keys with neither a comment on their line nor a comment line right above."""
    text = path.read_text()
    lines = text.splitlines()
    missing = []

    def walk(node):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                row = key.start_mark.line
                if isinstance(value, yaml.ScalarNode) and value.end_mark.line == row and value.style not in ("|", ">"):
                    rest = lines[row][value.end_mark.column:]  # after the value: a '#' inside a string does not count
                else:
                    rest = lines[row][key.end_mark.column:]  # `key:` opening a block, a flow collection or `>-`
                above = next((ln.strip() for ln in reversed(lines[:row]) if ln.strip()), "")
                if "#" not in rest and not above.startswith("#"):
                    missing.append(f"{path.name}:{row + 1}: {lines[row].strip()}")
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text))
    return missing


# ---------------------------------------------------------------- cluster.yaml


def test_cluster_yaml_is_valid_for_ray_up():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = _cluster()
    jsonschema.validate(cluster, schema)  # the file as written
    # what `ray up` does before it talks to AWS: fill in the provider defaults, validate again
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_node_types_and_worker_counts():
    c = _cluster()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != c["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] >= 1
    assert "min_workers" not in head and "max_workers" not in head, "the head is not scaled"
    assert len(workers) == 1
    (gpu,) = workers.values()
    assert gpu["node_config"]["InstanceType"] == "p4de.24xlarge"
    assert gpu["resources"] == {"CPU": 96, "GPU": 8}
    # hetray sizes GPU work (use_gpu: auto, embedding actors, the training check) by the GPUs that
    # are up when a stage starts, so at least one GPU node must be kept up
    assert 1 <= gpu["min_workers"] <= gpu["max_workers"] <= c["max_workers"]
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= c["max_workers"]
    assert 0 < c["idle_timeout_minutes"] <= 60
    assert c["provider"]["type"] == "aws" and c["provider"]["cache_stopped_nodes"] is False


def test_head_runs_the_job_server_on_loopback():
    c = _cluster()
    head_env, head = _ray_start(c["head_start_ray_commands"])
    assert "--head" in head
    assert _flag(head, "--dashboard-host") == "127.0.0.1"  # reached through `ray dashboard`'s SSH tunnel
    assert _flag(head, "--dashboard-port") == "8265"
    assert _flag(head, "--include-dashboard") == "true"
    assert _flag(head, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    worker_env, worker = _ray_start(c["worker_start_ray_commands"])
    assert _flag(worker, "--address") == f"$RAY_HEAD_IP:{_flag(head, '--port')}"
    # the job server runs code from whoever reaches it: token auth on every node, one token
    assert head_env.get("RAY_AUTH_MODE") == worker_env.get("RAY_AUTH_MODE") == "token"
    # every node's workers inherit what init_ray sets for a local Ray (Arrow's thread pool left alone)
    from hetray.orchestrate.ray_init import WORKER_ENV

    for env in (head_env, worker_env, _runtime_env()["env_vars"]):
        assert {k: env.get(k) for k in WORKER_ENV} == WORKER_ENV
    assert c["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_image_pins_ray_2_60_and_a_matching_cuda_torch():
    c = _cluster()
    pyproject = (ROOT / "pyproject.toml").read_text()
    m = re.fullmatch(r"rayproject/ray:(2\.60\.\d+)-py3(\d+)-cu(\d+)(@sha256:[0-9a-f]{64})?", c["docker"]["image"])
    assert m, c["docker"]["image"]
    assert re.search(r'"ray\[[a-z,]+\]==2\.60\.\*"', pyproject) and m.group(1).startswith("2.60.")
    assert (3, int(m.group(2))) >= (3, 10), "pyproject requires Python >= 3.10"
    setup = " ; ".join(c["setup_commands"])
    torch = re.search(r"pip install[^;]* torch==(\S+) --index-url \S+/whl/cu(\d+)", setup)
    assert torch and torch.group(2) == m.group(3), "torch's CUDA build must match the image's CUDA"
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject)  # pyproject's loose torch range
    assert floor and tuple(map(int, torch.group(1).split(".")[:2])) >= tuple(map(int, floor.groups()))
    # hetray itself (and so every pin of pyproject) is installed from the mounted package
    assert "pip install -q /home/ray/hetray-build" in c["setup_commands"]
    mounts = c["file_mounts"]
    assert {mounts[f"/home/ray/hetray/{n}"] for n in ("hetray", "pyproject.toml", "README.md")} == {
        "./hetray", "./pyproject.toml", "./README.md"}
    for local in mounts.values():
        assert local.startswith("~/") or (ROOT / local).exists(), local


def test_shared_storage_is_mounted_for_run_dirs():
    c = _cluster()
    init = " ; ".join(c["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/shared" in init
    assert "-v /mnt/shared:/mnt/shared" in c["docker"]["run_options"]
    env = _runtime_env()["env_vars"]
    assert env["HF_HOME"].startswith("/mnt/shared/") and env["HETRAY_CACHE"].startswith("/mnt/shared/")


def test_every_key_is_commented():
    for path in (CLUSTER, RUNTIME_ENV):
        assert not _uncommented_keys(path), "keys without a comment:\n" + "\n".join(_uncommented_keys(path))


def test_the_comment_check_finds_a_bare_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("# a\na: 1\nb:  # b\n  c: '#not a comment'\n  d: [1]  # d\n")
    assert _uncommented_keys(p) == ["c.yaml:4: c: '#not a comment'"]


# ---------------------------------------------------------------- jobs/runtime_env.yaml


def test_runtime_env_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env()
    unknown = set(env) - RuntimeEnv.known_fields  # RuntimeEnv would take a typo as a plugin name
    assert not unknown, f"not runtime_env fields: {unknown}"
    RuntimeEnv(**env)  # validates every field
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    head = RUNTIME_ENV.read_text().splitlines()[0:5]
    assert head[0].startswith("#") and any("ray job submit" in ln and "--address" in ln for ln in head)
    assert any("--runtime-env jobs/runtime_env.yaml" in ln for ln in head)


def test_runtime_env_excludes_keep_the_upload_small(tmp_path):
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package
    from ray._private.thirdparty.pathspec import PathSpec

    # what `ray job submit` uses: Ray's default excludes, then ours (an allow-list, SECURITY.md)
    excludes = ray_constants.get_runtime_env_default_excludes() + _runtime_env()["excludes"]
    spec = PathSpec.from_lines("gitwildmatch", excludes)  # how Ray matches them
    for path in (".venv", "runs", ".git", "benchmarks", "README.md", ".env", "hetray/__pycache__", "hetray.egg-info"):
        assert spec.match_file(path), f"{path} would be uploaded"
    for path in (".", "hetray", "hetray/cli.py", "jobs", "jobs/quickstart.yaml", "pyproject.toml",
                 "hetray/samples/winogrande.jsonl", "jobs/deepspeed/zero2.json"):
        assert not spec.match_file(path), f"{path} would be left out"
    # the real package `ray job submit` builds from this repository, without .gitignore's help
    pkg = tmp_path / "working_dir.zip"
    create_package(str(ROOT), pkg, include_gitignore=False, excludes=excludes)
    names = zipfile.ZipFile(pkg).namelist()
    assert "hetray/cli.py" in names and "jobs/quickstart.yaml" in names
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"hetray", "jobs", "pyproject.toml"}, top
    assert pkg.stat().st_size < min(GCS_STORAGE_MAX_SIZE // 2, 64 << 20), f"{pkg.stat().st_size} bytes"


# ---------------------------------------------------------------- a real job server


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_of(temp_dir: str) -> dict:
    """The processes of the head started with ``temp_dir``: those naming it on their command line
    (gcs_server, raylet, dashboard, agents, monitors) and all their descendants (workers, the job)."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in p.info["cmdline"] or ()):
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return found


def _stop_head(procs: dict) -> None:
    import psutil

    alive = []
    for p in procs.values():
        try:
            p.terminate()
            alive.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _wait_for_dashboard(url: str, headers: dict, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}/api/version", headers=headers), timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the job server at {url} did not answer")
        time.sleep(1)


def _count_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_data_stages(tmp_path):
    """`ray job submit --runtime-env <our file>` from the repository root, as on the cluster, with
    the quickstart's data stages; only the paths that point at the cluster's /mnt/shared change."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    bin_dir = Path(sys.executable).parent  # the venv: `ray` and `hetray` live here
    assert (bin_dir / "hetray").exists(), f"no hetray command in {bin_dir}: run `make install`"
    temp_dir = tempfile.mkdtemp(prefix="hr-", dir="/tmp")  # short: Ray's socket paths have a length limit
    run_dir = tmp_path / "run"
    gcs, dash, nm, om, agent, agent_grpc, rt_agent, metrics, client_port = _free_ports(9)
    # Token auth as on the cluster, with a token of our own: never ~/.ray/auth_token, which other
    # Rays on this machine may use (Ray 2.60 turns auth on for a head wherever that file exists)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the job's `hetray` is the head's
    headers = {"Authorization": f"Bearer {token}"}

    runtime_env = _runtime_env()
    # the cluster's /mnt/shared does not exist here; the model cache is this machine's (as in
    # test_models), so a stage that resolves the bundled LLM converts it once per machine, not per run
    from hetray.models import cache_dir

    runtime_env["env_vars"].update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
                                   HETRAY_CACHE=os.environ.get("HETRAY_TEST_CACHE") or str(cache_dir()))
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    url = f"http://127.0.0.1:{dash}"
    procs: dict = {}
    phases: dict = {}
    started = time.monotonic()
    try:
        # every port our own (other Rays run here); Ray maps 127.0.0.1 to this host's address,
        # the dashboard and job server stay on 127.0.0.1
        start = subprocess.run(
            [str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--node-manager-port={nm}", f"--object-manager-port={om}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={rt_agent}", f"--metrics-export-port={metrics}",
             f"--ray-client-server-port={client_port}", "--num-cpus=2", "--object-store-memory=300000000",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, cwd=temp_dir, capture_output=True, text=True, timeout=120)
        procs = _processes_of(temp_dir)
        phases["ray start"] = time.monotonic() - started
        assert start.returncode == 0, f"ray start failed:\n{start.stdout}\n{start.stderr}"
        _wait_for_dashboard(url, headers, time.monotonic() + 90)
        phases["job server up"] = time.monotonic() - started

        submission_id = f"hetray-smoke-{os.getpid()}"
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", url, "--runtime-env", str(env_file),
             "--submission-id", submission_id, "--no-wait", "--",
             "hetray", "run", "jobs/quickstart.yaml", f"run_dir={run_dir}", SMOKE_STAGES],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}"

        client = JobSubmissionClient(url, headers=headers)
        deadline = time.monotonic() + 360
        done = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
        while (status := client.get_job_status(submission_id)) not in done:
            assert time.monotonic() < deadline, "job still running:\n" + client.get_job_logs(submission_id)[-6000:]
            time.sleep(2)
        logs = client.get_job_logs(submission_id)
        info = client.get_job_info(submission_id)
        phases["job done"] = time.monotonic() - started
        (tmp_path / "job.log").write_text(logs)  # kept by pytest for a look afterwards
        if info.start_time and info.end_time:
            phases["job (server clock)"] = (info.end_time - info.start_time) / 1000
        assert status == JobStatus.SUCCEEDED, f"job {status}: {info.message}\n{logs[-6000:]}"
    finally:
        procs.update(_processes_of(temp_dir))  # now with the workers and the job's driver
        _stop_head(procs)
        shutil.rmtree(temp_dir, ignore_errors=True)
    wall = time.monotonic() - started

    prefs = json.loads((run_dir / "preferences" / "manifest.json").read_text())
    per_source = {name: c["pairs"] for name, c in prefs["counts"].items()}
    assert set(per_source) == {"winogrande", "oasst", "winobias"} and all(per_source.values())
    assert _count_rows(run_dir / "preferences") == sum(per_source.values())
    assert (run_dir / "embeddings" / "manifest.json").is_file() and (run_dir / "clusters" / "manifest.json").is_file()

    sel = json.loads((run_dir / "selected" / "manifest.json").read_text())
    fraction = 0.6  # jobs/quickstart.yaml: select.fraction
    assert sel["pairs_in"] == sum(per_source.values())
    assert sel["pairs_selected"] == sum(round(fraction * n) for n in per_source.values())  # each source keeps its share
    assert _count_rows(run_dir / "selected") == sel["pairs_selected"]
    assert not any((run_dir / s).exists() for s in ("sft", "reward", "ppo")), "the stage override trained anyway"
    print(f"job server smoke test: {wall:.0f} s from `ray start` to a stopped head; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
