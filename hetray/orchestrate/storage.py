"""Shared storage: every node of the Ray cluster sees ``run_dir`` (and convert's input files).

Stages read and write ``run_dir`` from whichever node their work lands on: Ray Data read, map
and write tasks (convert, embed, cluster, select), Ray Train workers (checkpoints, ``merged/``).
On a multi-node cluster ``run_dir`` must therefore be one folder that every node mounts at the
same path (``cluster.yaml`` mounts EFS at ``/mnt/shared`` on every node). Without it a job does
not fail cleanly: a write task on another node writes into a local folder of the same name, and
the driver's commit finds files missing, or an input read fails on one node only.

``check_shared_storage(run_dir, files)`` proves it at the start, in about a second: the driver
writes a marker file holding a random token into ``run_dir``; one tiny task per alive node,
pinned there (``NodeAffinitySchedulingStrategy``, no CPU asked), runs ``probe``: the marker
must be there with the token (a folder of the same name that is local to the node has no
marker), the node writes a reply file the driver must then see (the other direction), and each
local input file must exist with the driver's size. Every node that fails is named, with what
it saw and what to do; the marker and the replies are removed afterwards. With one node there
is nothing to check (every task runs beside the driver).

``probe`` is a plain function of paths (no Ray): the per-node logic is tested directly, and the
Ray part is tested on a simulated cluster whose second node really cannot see the folder
(``tests/orchestrate/test_multinode.py``). The preflight runs the check (``hetray run``, and
``hetray run --check`` once run_dir exists). Nodes that join after the check are not probed.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from hetray.config import ConfigError

MARKER_PREFIX = ".hetray-storage-"
PROBE_TASK = "hetray-storage-probe"  # the probe tasks' name in Ray's state API and dashboard
TIMEOUT_S = 60  # for every node's probe together: a node that cannot start a task in this time is named
FIX = ("Ray Data tasks and Ray Train workers read and write run_dir on whichever node they run, so run_dir "
       "(and every local input file) must be on storage that every node mounts at the same path: a shared "
       "filesystem such as EFS/NFS (cluster.yaml mounts EFS at /mnt/shared on every node: "
       "run_dir=/mnt/shared/runs/<name>)")


class SharedStorageError(ConfigError):
    """Some node of the Ray cluster does not see run_dir (or an input file) as the driver does."""


def probe(run_dir: str | None, marker: str, token: str, reply: str, files: dict[str, int]) -> dict:
    """What this node sees (run on each node as a Ray task): ``run_dir`` exists and holds
    ``marker`` with ``token``; write ``reply`` there for the driver; each of ``files`` exists
    with the given size. ``run_dir`` None: the files only. -> {"host", "problems", "replied"}."""
    problems, replied = [], False
    if run_dir is not None:
        root = Path(run_dir)
        if not root.is_dir():
            problems.append(f"{run_dir} does not exist on this node")
        else:
            try:
                seen = (root / marker).read_text()
            except FileNotFoundError:
                seen = None
                problems.append(f"{run_dir} exists on this node but is another folder: the marker file "
                                f"{marker} that the driver wrote there is missing")
            except OSError as e:
                seen = None
                problems.append(f"cannot read {root / marker}: {e}")
            if seen is not None and seen != token:
                problems.append(f"{root / marker} holds another token than the driver wrote (another folder)")
            try:
                (root / reply).write_text(token)
                replied = True
            except OSError as e:
                problems.append(f"cannot write in {run_dir}: {e}")
    for path, size in files.items():
        try:
            here = os.stat(path).st_size
        except OSError as e:
            problems.append(f"input file {path} cannot be read on this node ({type(e).__name__})")
            continue
        if here != size:
            problems.append(f"input file {path} has {here} bytes on this node, {size} on the driver")
    return {"host": socket.gethostname(), "problems": problems, "replied": replied}


def node_label(node: dict) -> str:
    """``10.0.1.5 (ip-10-0-1-5, node 3f2a9c01, 8 CPU, 1 GPU)`` for an entry of ``ray.nodes()``."""
    res = node.get("Resources", {})
    have = ", ".join(f"{res[r]:g} {r}" for r in ("CPU", "GPU") if res.get(r))
    return (f"{node.get('NodeManagerAddress', '?')} ({node.get('NodeManagerHostname', '?')}, "
            f"node {node['NodeID'][:8]}" + (f", {have}" if have else "") + ")")


def storage_problems(what: str, seen: dict[str, list[str]], n_nodes: int) -> str | None:
    """{node label: its problems} -> one message naming every node that fails, or None.
    ``what``: what was checked (``run_dir /x and 4 input file(s)``)."""
    bad = {label: p for label, p in seen.items() if p}
    if not bad:
        return None
    lines = "; ".join(f"node {label}: {', '.join(p)}" for label, p in bad.items())
    return f"{len(bad)} of the {n_nodes} Ray nodes do not see {what} as the driver does ({lines}). {FIX}"


def check_shared_storage(run_dir: str | os.PathLike | None, files: list[str] = (), timeout: float = TIMEOUT_S) -> str:
    """Every alive Ray node sees ``run_dir`` (an existing folder, None: skip it) and ``files`` as
    the driver does; raise ``SharedStorageError`` naming the nodes that do not. Needs Ray up.
    Returns what was checked, for a log or preflight line."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    root = None if run_dir is None else str(Path(run_dir).resolve())
    if len(nodes) < 2:
        return "one Ray node: every task runs beside the driver"
    sizes = {str(Path(f).resolve()): os.stat(f).st_size for f in files}
    if root is None and not sizes:
        return "nothing to check (no run_dir yet, no local input file)"
    token = uuid.uuid4().hex
    marker = MARKER_PREFIX + token[:12]
    replies = {n["NodeID"]: f"{marker}.{n['NodeID'][:12]}" for n in nodes}
    if root is not None:
        (Path(root) / marker).write_text(token)
    remote = ray.remote(probe)
    try:
        refs = {remote.options(num_cpus=0, max_retries=0, name=PROBE_TASK,
                               scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(root, marker, token, replies[n["NodeID"]], sizes): n for n in nodes}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        seen = {}
        for ref, node in refs.items():
            label = node_label(node)
            if ref not in done:
                seen[label] = [f"did not run the check within {timeout:g} s"]
                ray.cancel(ref, force=True)
                continue
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the node could not run it: say so, with why
                first = (str(e).splitlines() or [""])[0]
                seen[label] = [f"the check failed there: {type(e).__name__}: {first}"]
                continue
            problems = list(result["problems"])
            if result["replied"] and not (Path(root) / replies[node["NodeID"]]).is_file():
                problems.append(f"it wrote {replies[node['NodeID']]} into {root}, which the driver does not see")
            seen[label] = problems
    finally:
        if root is not None:
            for leftover in Path(root).glob(marker + "*"):
                leftover.unlink(missing_ok=True)
    message = storage_problems(_what(root, sizes), seen, len(nodes))
    if message:
        raise SharedStorageError(message)
    return f"{_what(root, sizes)}: seen by all {len(nodes)} Ray nodes"


def _what(root: str | None, files) -> str:
    return " and ".join(([f"run_dir {root}"] if root is not None else [])
                        + ([f"{len(files)} input file(s)"] if files else []))
