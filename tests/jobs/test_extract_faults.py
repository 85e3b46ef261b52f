"""Extraction under faults: NaN activations, a killed job, an external Dask scheduler."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from atlas.capture import forward_to
from atlas.extract import cached_model
from atlas.images import decode_image
from atlas.inspect import store_info
from atlas.store import open_store, read_strings
from atlas.testing import TinyNet, make_images, save_poisoned_model
from jobs.extract import run_extract
from tests.conftest import tiny_config

ARRAYS = [
    "activations/layer2", "samples/image", "samples/y", "samples/x", "samples/valid",
    "samples/attribution_class", "samples/attribution_score", "images/top_class", "images/top_prob",
    "images/status",
]


def test_nonfinite_rows_flagged(image_folder, tmp_path):
    torch.manual_seed(0)
    probe = TinyNet().eval()
    paths = sorted(image_folder.glob("*.png"))
    spec_probe = cached_model(save_poisoned_model(tmp_path / "probe.pt", threshold=1e9))
    means = []
    for path in paths:
        x = spec_probe.preprocess([decode_image(path)])
        with torch.no_grad():
            means.append(float(forward_to(probe, x, ["layer2"])["layer2"].mean()))
    threshold = float(np.median(means))
    spec = save_poisoned_model(tmp_path / "poison.pt", threshold=threshold)

    config = tiny_config(spec, image_folder, tmp_path / "s.zarr")
    summary = run_extract(config, progress=False)
    n_poisoned = sum(mean > threshold for mean in means)
    assert 0 < n_poisoned < len(paths)
    assert summary["n_nonfinite_rows"] == n_poisoned * 6
    assert store_info(config.store)["n_nonfinite_rows"] == n_poisoned * 6

    group = open_store(config.store)
    valid = group["samples/valid"][:]
    image_of_row = group["samples/image"][:]
    for index, mean in enumerate(means):
        assert valid[image_of_row == index].all() == (mean <= threshold)


def _extract_command(spec: str, images: Path, store: Path) -> list[str]:
    return [
        sys.executable, "-m", "atlas.cli", "-q", "extract",
        "--images", str(images), "--store", str(store), "--model", spec, "--layer", "layer2",
        "--set", "compute.processes=false", "--set", "extract.positions=random",
        "--set", "extract.per_image=6", "--set", "extract.shard_size=4", "--set", "extract.batch_size=2",
    ]


@pytest.mark.slow
def test_sigkill_then_resume_equals_full_run(tiny_spec, tmp_path):
    images = tmp_path / "images"
    make_images(images, 48, size=160)
    full_store, killed_store = tmp_path / "full.zarr", tmp_path / "killed.zarr"
    subprocess.run(_extract_command(tiny_spec, images, full_store), check=True, timeout=300)

    process = subprocess.Popen(_extract_command(tiny_spec, images, killed_store))
    deadline = time.monotonic() + 240
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            done = int(zarr.open_group(str(killed_store), mode="r")["extract/shard_done"][:].sum())
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError):
            done = 0
        if done >= 2:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert 2 <= done < 12
    assert (killed_store / "sidecar" / "lock.json").exists()

    subprocess.run(_extract_command(tiny_spec, images, killed_store), check=True, timeout=300)
    full, resumed = open_store(full_store), open_store(killed_store)
    for name in ARRAYS:
        left, right = full[name][:], resumed[name][:]
        if name == "images/status":
            left, right = read_strings(full[name]), read_strings(resumed[name])
        np.testing.assert_array_equal(left, right, err_msg=name)
    assert resumed.attrs["stages"]["extract"]["done"]


@pytest.mark.slow
def test_external_scheduler(tiny_spec, image_folder, tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    scheduler = subprocess.Popen(
        ["dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        executable=str(Path(sys.executable).parent / "dask"),
    )
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        import json

        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        worker = subprocess.Popen(
            ["dask", "worker", address, "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"],
            env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            executable=str(Path(sys.executable).parent / "dask"),
        )
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        config = tiny_config(tiny_spec, image_folder, tmp_path / "s.zarr", f"compute.scheduler={address}")
        summary = run_extract(config, progress=False)
        assert summary["n_ok"] == 20
        assert open_store(config.store)["samples/valid"][:].all()
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
