"""Starting or joining Ray, the same way for every stage."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(ray_cfg) -> None:
    """Join the configured cluster (or ``RAY_ADDRESS``, as under ``ray job submit``), else start
    a local Ray with the configured CPUs. A no-op when Ray is already up in this process."""
    import ray

    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs = {"include_dashboard": False}
    if ray_cfg.num_cpus:
        kwargs["num_cpus"] = ray_cfg.num_cpus
    if ray_cfg.object_store_memory:
        kwargs["object_store_memory"] = ray_cfg.object_store_memory
    ray.init(**kwargs)
    log.info("started a local Ray: %s", ray.cluster_resources())
