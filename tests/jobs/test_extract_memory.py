"""Extraction under a Dask worker memory limit smaller than the rows it writes."""

from __future__ import annotations

import math
import threading

import dask
import psutil
import pytest
import torch
from torch import nn

from atlas.config import load_config
from atlas.store import open_store
from atlas.testing import make_images
from jobs.extract import run_extract

# Limit = the calibration run's peak worker RSS times this, so shards have room above the baseline.
LIMIT_FACTOR = 1.3
# The big run's rows exceed the limit by this factor.
ROWS_OVER_LIMIT = 1.15
CHANNELS = 2048
ROW_ARRAYS = ["activations/1", "samples/image", "samples/y", "samples/x", "samples/valid"]


def _save_wide_model(path) -> str:
    """Save a one-convolution model whose layer ``1`` gives (B, 2048, 56, 56) constant maps at 224 px.

    Built from torch.nn classes only, so worker processes unpickle it without
    project code. Zero weights with bias 1 make every activation 1.0, so the
    rows compress to almost nothing on disk while still filling memory.
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, CHANNELS, 4, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 10)
    ).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)
    torch.save(model, path)
    return f"file:{path}"


class _WorkerMemoryMonitor:
    """Polls the resident set size of this process's children (the Dask worker processes)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    self.peak = max(self.peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(self.interval)

    def __enter__(self) -> _WorkerMemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _config(spec: str, images, store, *overrides: str):
    return load_config(
        overrides=[
            "compute.processes=true",
            "compute.n_workers=1",
            "compute.threads_per_worker=1",
            "extract.positions=all",
            "extract.attribution=false",
            "extract.shard_size=4",
            "extract.batch_size=4",
            *overrides,
        ],
        images=str(images),
        store=str(store),
        model=spec,
        layer="1",
    )


def _row_bytes(store) -> int:
    group = open_store(store)
    return sum(group[name].nbytes for name in ROW_ARRAYS)


@pytest.mark.slow
def test_rows_larger_than_worker_limit(tmp_path):
    spec = _save_wide_model(tmp_path / "wide.pt")

    # Calibration: two shards without a limit give the worker's peak RSS, most of it the torch import.
    make_images(tmp_path / "few", 8)
    with _WorkerMemoryMonitor() as calibration:
        run_extract(_config(spec, tmp_path / "few", tmp_path / "few.zarr"), progress=False)
    bytes_per_image = _row_bytes(tmp_path / "few.zarr") // 8
    assert bytes_per_image >= 56 * 56 * CHANNELS * 2
    assert calibration.peak > 0

    limit_mib = int(calibration.peak * LIMIT_FACTOR) // 2**20
    limit = limit_mib * 2**20
    n_images = math.ceil(ROWS_OVER_LIMIT * limit / bytes_per_image)
    make_images(tmp_path / "many", n_images)
    config = _config(spec, tmp_path / "many", tmp_path / "many.zarr", f"compute.memory_limit={limit_mib}MiB")

    # Only the kill at 95 % of the limit stays on, because pausing would stall
    # the run. With allowed-failures 0, one killed worker fails the job.
    memory_settings = {
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": 0.95,
        "distributed.scheduler.allowed-failures": 0,
    }
    with dask.config.set(memory_settings), _WorkerMemoryMonitor() as monitor:
        summary = run_extract(config, progress=False)

    assert summary["n_ok"] == n_images
    assert open_store(config.store)["extract/shard_done"][:].all()
    assert _row_bytes(config.store) > limit
    assert monitor.peak < 0.95 * limit, (monitor.peak, limit, calibration.peak)
