from __future__ import annotations

import os

import dask
import pytest

from atlas.config import ComputeConfig
from jobs.cluster import dashboard_link, dask_client, use_processes


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


def test_dashboard_link_local_and_answers(caplog):
    import logging
    import urllib.request

    with caplog.at_level(logging.INFO, logger="jobs.cluster"), dask_client(ComputeConfig()) as client:
        link = dashboard_link(client, local=True)
        logged = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Dask dashboard")]
        with urllib.request.urlopen(link, timeout=20) as response:
            status = response.status

    assert link.startswith("http://127.0.0.1:")
    assert logged == [f"Dask dashboard: {link}"]
    assert status == 200


def _listening_sockets() -> set[tuple[str, int]]:
    import psutil

    return {(item.laddr.ip, item.laddr.port) for item in psutil.Process().net_connections() if item.status == psutil.CONN_LISTEN}


@pytest.mark.parametrize("dashboard", [True, False])
def test_local_cluster_listens_on_loopback(caplog, dashboard):
    import logging

    before = _listening_sockets()
    with caplog.at_level(logging.INFO, logger="jobs.cluster"), dask_client(ComputeConfig(dashboard=dashboard)):
        opened = _listening_sockets() - before

    logged = [record for record in caplog.records if record.getMessage().startswith("Dask dashboard")]
    assert len(logged) == (1 if dashboard else 0)
    assert opened
    assert {host for host, _ in opened} == {"127.0.0.1"}
