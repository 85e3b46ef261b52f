from __future__ import annotations

import os

import dask

from atlas.config import ComputeConfig
from jobs.cluster import dask_client, use_processes


def _malloc_trim() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_workers_start_without_malloc_trim():
    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")
    with dask_client(ComputeConfig(n_workers=2, threads_per_worker=1)) as client:
        values = list(client.run(_malloc_trim).values())

    assert values == [None, None]
    # The process-wide Dask configuration is left as it was.
    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")


def test_one_cpu_worker_in_process():
    with dask_client(ComputeConfig()) as client:
        assert client.scheduler.address.startswith("inproc://")
        worker_pids = set(client.run(os.getpid).values())

    assert worker_pids == {os.getpid()}


def test_process_choice_rules():
    assert use_processes(ComputeConfig()) is False
    assert use_processes(ComputeConfig(n_workers=2)) is True
    assert use_processes(ComputeConfig(memory_limit="2GiB")) is True
    assert use_processes(ComputeConfig(processes=True)) is True
    assert use_processes(ComputeConfig(n_workers=2, processes=False)) is False


def _ignores_sigint() -> bool:
    import signal

    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_worker_processes_ignore_sigint():
    with dask_client(ComputeConfig(processes=True)) as client:
        values = list(client.run(_ignores_sigint).values())

    assert values == [True]
    # The driver keeps Ctrl-C.
    assert not _ignores_sigint()
