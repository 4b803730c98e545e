"""Ray: embedded in-process by default, a cluster when an address is given (config or RAY_ADDRESS)."""

from __future__ import annotations

import logging
import os

import ray

from infra.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig | None = None) -> dict:
    """Start or connect to Ray once per process and return ``ray.cluster_resources()``.

    With no address, Ray runs in this process's machine with ``num_cpus`` and a bounded object
    store (Ray's default takes ~30% of RAM, too much for a laptop or a CI runner).
    """
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting embedded Ray (num_cpus=%s)", cfg.num_cpus)
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            configure_logging=True,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    resources = ray.cluster_resources()
    _configure_ray_data(cfg, int(resources.get("CPU", 1)), embedded=not address)
    return resources


SMALL_CLUSTER_CPUS = 64


def _configure_ray_data(cfg: RayConfig, cpus: int, embedded: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    small = embedded or cpus <= SMALL_CLUSTER_CPUS
    # Ray Data sizes shuffles for big clusters (200 partitions, one aggregator actor each); on a
    # laptop, a CI runner or a small shared cluster each partition costs scheduling time, so the
    # partitions follow the CPUs there.
    partitions = cfg.shuffle_partitions or (max(2, 2 * cpus) if small else None)
    if cfg.shuffle == "sort" or (cfg.shuffle == "auto" and small):
        # Task-based sort shuffle: no aggregator actors. Starting them dominates small jobs, and on a
        # small cluster shared by several jobs (10 pipelines on a 4-CPU head, tests/reliability/
        # test_load.py) each job's actors held CPUs the others' tasks were waiting for.
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if partitions:
        ctx.default_hash_shuffle_parallelism = partitions
        ctx.max_hash_shuffle_aggregators = partitions
        ctx.min_parallelism = partitions
    # Ray Data's progress bars and per-dataset INFO lines flood non-interactive logs; our
    # stages report their own progress.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_operator_progress_bars = False


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
