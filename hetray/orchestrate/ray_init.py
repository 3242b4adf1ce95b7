"""Starting or joining Ray, the same way for every stage, and saying so in one line.

A local Ray starts its dashboard on 127.0.0.1 when the machine can afford it
(``ray.include_dashboard: auto``: the dashboard's packages are installed and the machine has
``DASHBOARD_MIN_MEMORY``). Without it, Ray Train's controller cannot reach Ray's State API and
says so every few seconds (in the log file; see ``console``).
"""

from __future__ import annotations

import logging
import os

from hetray.orchestrate import console

log = logging.getLogger(__name__)

DASHBOARD_MIN_MEMORY = 8 << 30  # bytes; the dashboard's processes take ~0.5 GB
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default
# 2 s, sized for clusters). Each training stage waits for a few polls (workers up, each report,
# workers done), so on a local Ray 0.5 s takes ~6 s off every stage; a cluster keeps Ray's default.
LOCAL_TRAIN_POLL_S = "0.5"
# Ray Data 2.60's Parquet reader resizes Arrow's process-wide CPU pool to 32 threads in the worker
# that reads (RAY_DATA_PARQUET_READER_CPU_COUNT). Arrow's query engine (Acero: group_by, join)
# sizes its per-thread state once per process, from the pools' sizes at its first use
# (ThreadIndexer::Capacity), so a worker that ran a group-by or a join before such a read fails
# its next threaded one: "thread index 10 is out of range [0, 10)" (select's percentile task, in a
# worker where the join's tasks had run). 0: Ray leaves Arrow's pool as it is. Set for the Ray
# that init_ray starts (its processes inherit the environment), in cluster.yaml's `ray start`s
# and in jobs/runtime_env.yaml for a cluster.
WORKER_ENV = {"RAY_DATA_PARQUET_READER_CPU_COUNT": "0"}


def set_worker_env() -> None:
    """``WORKER_ENV`` into this process's environment (a value already set there wins), before
    a local Ray starts: its raylet and workers inherit it."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(ray_cfg) -> None:
    """Join the configured cluster (or ``RAY_ADDRESS``, as under ``ray job submit``), else start
    a local Ray with the configured CPUs. A no-op when Ray is already up in this process."""
    import ray

    if ray.is_initialized():
        return
    quiet = not console.verbose()
    if quiet:
        console.adopt_ray_loggers()  # before ray.init: its own start-up lines go to the file too
    common = {"log_to_driver": True, "configure_logging": not quiet}
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, **common)
        what = f"joined the Ray cluster at {address}"
    else:
        dashboard = want_dashboard(ray_cfg.include_dashboard)
        kwargs = {"include_dashboard": dashboard, **common}
        if dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
        if ray_cfg.num_cpus:
            kwargs["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.object_store_memory:
            kwargs["object_store_memory"] = ray_cfg.object_store_memory
        # "local": a new Ray even when a `ray start` cluster runs on this machine (ray.init()
        # alone would join it, and refuse the CPUs set here); join one with ray.address: auto
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_TRAIN_POLL_S)  # before the raylet starts
        set_worker_env()
        context = ray.init(address="local", **kwargs)
        what = "started a local Ray"
    console.route_worker_output()
    console.quiet_ray_data()
    have = ray.cluster_resources()
    gpus = f", {have['GPU']:g} GPUs" if have.get("GPU") else ""
    url = getattr(context, "dashboard_url", None)
    dash = f"dashboard http://{url}" if url else "no dashboard (ray.include_dashboard)"
    log.info("ray: %s (Ray %s): %g CPUs%s; %s", what, ray.__version__, have.get("CPU", 0), gpus, dash)
    if console.log_file() is not None:
        log.info("log: %s (Ray's own logs: %s)", console.shown(console.log_file()), _session_logs())


def want_dashboard(setting) -> bool:
    """``auto``: when its packages are installed and the machine has the memory for it."""
    if setting != "auto":
        return bool(setting)
    try:
        from ray._private.utils import get_dashboard_dependency_error

        if get_dashboard_dependency_error() is not None:
            return False
    except ImportError:
        return False
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return memory >= DASHBOARD_MIN_MEMORY


def _session_logs() -> str:
    try:
        import ray

        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except Exception:  # noqa: BLE001  (only a hint in a log line)
        return "/tmp/ray/session_latest/logs"

