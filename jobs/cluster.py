"""Dask cluster set-up: a local cluster, a CUDA cluster, or an existing scheduler."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

from atlas.config import ComputeConfig
from atlas.errors import ConfigError

logger = logging.getLogger(__name__)

# Module that worker processes import at start (see jobs/worker_setup.py).
WORKER_SETUP = "jobs.worker_setup"


def _cuda_cluster(config: ComputeConfig):
    try:
        import torch
        from dask_cuda import LocalCUDACluster
    except ImportError as error:
        raise ConfigError(
            "compute.device is cuda but dask-cuda is not installed; install it with "
            "`pip install 'activation-atlas[gpu]'` or set compute.device: cpu"
        ) from error
    if not torch.cuda.is_available():
        raise ConfigError("compute.device is cuda but torch sees no CUDA GPU; set compute.device: cpu")
    return LocalCUDACluster(
        threads_per_worker=config.threads_per_worker,
        memory_limit=config.memory_limit or "auto",
        preload=[WORKER_SETUP],
    )


def _worker_environment() -> dict:
    """Return Dask's pre-spawn worker environment without ``MALLOC_TRIM_THRESHOLD_``.

    Measured on a 2-core CPU, EfficientNet-Lite0 forward passes ran 30 % slower
    in a process started with it. The likely cause, not profiled: with a malloc
    tunable set, glibc keeps its mmap threshold fixed, so large tensors become
    fresh mmaps with their page faults. Extraction workers keep one model and
    reuse their buffers, so they do not need the trimming.
    """
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


def use_processes(config: ComputeConfig) -> bool:
    """Return whether the local cluster runs its workers as separate processes.

    ``compute.processes`` decides when set. When it is null, one CPU worker
    without a memory limit runs as threads of this process: a worker process
    would only add its start-up (spawning, importing torch, loading the
    weights: 3 to 3.5 s on a 2-core CPU) and a cold first batch.
    Several workers or a memory limit need processes: the nanny enforces the
    limit and restarts a worker that exceeds it.
    """
    if config.processes is not None:
        return config.processes
    return config.n_workers > 1 or config.memory_limit is not None


@contextmanager
def dask_client(config: ComputeConfig) -> Iterator[Client]:
    """Yield a Dask client for the configured cluster and close what was started on exit.

    ``config.scheduler`` attaches to a running scheduler (nothing is started or
    stopped); otherwise a ``LocalCluster`` (or ``LocalCUDACluster`` for
    ``device: cuda``) lives for the duration of the block.
    """
    cluster = None
    if config.scheduler:
        try:
            client = Client(config.scheduler, timeout="20s")
        except OSError as error:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {config.scheduler} ({error}); "
                "start one with `dask scheduler` or drop --scheduler to use a local cluster"
            ) from error
    else:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": _worker_environment()}):
            if config.device == "cuda":
                cluster = _cuda_cluster(config)
            else:
                processes = use_processes(config)
                logger.debug("local cluster: %d workers as %s", config.n_workers, "processes" if processes else "threads")
                cluster = LocalCluster(
                    n_workers=config.n_workers,
                    threads_per_worker=config.threads_per_worker,
                    processes=processes,
                    memory_limit=config.memory_limit or "auto",
                    **({"preload": [WORKER_SETUP]} if processes else {}),
                    # The scheduler's and workers' HTTP servers run even without a dashboard,
                    # and without an address they listen on every interface: keep them local.
                    # Port 0 avoids clashing with another cluster on 8787.
                    dashboard_address="127.0.0.1:0",
                    worker_dashboard_address="127.0.0.1:0",
                    scheduler_kwargs={"dashboard": config.dashboard},
                )
        client = Client(cluster)
    link = dashboard_link(client, local=cluster is not None) if config.dashboard or cluster is None else None
    if link:
        logger.info("Dask dashboard: %s", link)
    logger.info("Dask scheduler %s with %d workers", client.scheduler.address, len(client.scheduler_info()["workers"]))
    try:
        yield client
    except KeyboardInterrupt:
        if cluster is not None:
            _quiet_distributed(client)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def dashboard_link(client: Client, local: bool) -> str | None:
    """Return the address of the scheduler's dashboard, or None when it runs none.

    A local cluster binds its dashboard to 127.0.0.1, while Dask builds the
    link from the scheduler's host, which is this machine's network address
    for an in-process scheduler.
    """
    if not local:
        return client.dashboard_link or None
    port = client.scheduler_info().get("services", {}).get("dashboard")
    return f"http://127.0.0.1:{port}/status" if port else None


def _set_distributed_level(level: int) -> None:
    logging.getLogger("distributed").setLevel(level)


def _quiet_distributed(client: Client) -> None:
    """Keep Dask to errors in this process and in the workers, before an interrupted job closes its cluster.

    Closing the cluster cancels the shard that is running, and each worker
    would log that as a warning with a traceback.
    """
    _set_distributed_level(logging.ERROR)
    try:
        client.run(_set_distributed_level, logging.ERROR, wait=True)
    except Exception as error:  # noqa: BLE001 - the job is stopping anyway
        logger.debug("could not quiet the workers' Dask logs: %s", error)


def torch_threads_per_task(config: ComputeConfig) -> int:
    """Return the intra-op thread count for each task so workers do not oversubscribe the cores."""
    import os

    if config.scheduler:
        return config.threads_per_worker
    cores = os.cpu_count() or 1
    return max(1, cores // (config.n_workers * config.threads_per_worker))
