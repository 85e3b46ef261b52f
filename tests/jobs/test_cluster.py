from __future__ import annotations

import os

import dask

from atlas.config import ComputeConfig
from jobs.cluster import dask_client


def _malloc_trim() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_local_workers_start_without_malloc_trim():
    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")
    with dask_client(ComputeConfig(n_workers=2, threads_per_worker=1)) as client:
        values = list(client.run(_malloc_trim).values())

    assert values == [None, None]
    # The process-wide Dask configuration is left as it was.
    assert "MALLOC_TRIM_THRESHOLD_" in dask.config.get("distributed.nanny.pre-spawn-environ")
