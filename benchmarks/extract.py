"""Extraction throughput: the `atlas extract` job against the bare truncated forward pass.

Both sides use EfficientNet-Lite0 at blocks.4, the same images, batch size and
torch thread count, in one run. The bare side gets tensors already decoded
and preprocessed in memory; the job decodes files, samples positions and
writes the store, so the ratio is the job's overhead.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from atlas.capture import forward_to
from atlas.config import load_config
from atlas.datasets import list_items, open_image
from atlas.models import load_model
from benchmarks.common import machine
from jobs.extract import run_extract

logger = logging.getLogger(__name__)


def write_images(folder: Path, count: int) -> list[Path]:
    """Save ``count`` seeded 256 px crops of the sample photos as JPEG files; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, item in enumerate(list_items("sample", crops_per_photo=count // 22 + 1)[:count]):
        path = folder / f"{index:05d}.jpg"
        open_image(item).save(path, quality=92)
        paths.append(path)
    return paths


def bare_inputs(files: list[Path], batch_size: int):
    """Load the model on every core, decode ``files`` into tensors and warm up; return (model, tensors)."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model("efficientnet_lite0")
    tensors = [model.transform(open_image(str(path))) for path in files]
    with torch.no_grad():
        forward_to(model.module, torch.stack(tensors[:batch_size]), ["blocks.4"])
    return model, tensors


def bare_seconds(model, tensors: list[torch.Tensor], batch_size: int) -> float:
    """Return the seconds of the bare truncated forward pass over ``tensors`` in batches."""
    with torch.no_grad():
        start = time.perf_counter()
        for first in range(0, len(tensors), batch_size):
            forward_to(model.module, torch.stack(tensors[first : first + batch_size]), ["blocks.4"])
        return time.perf_counter() - start


def run(n_images: int = 2048, batch_size: int = 32) -> dict:
    """Measure and return images/s for the bare forward pass and the job, and their ratio.

    The bare pass runs once before and once after the job and the mean counts,
    so a change in the machine's load during the run weighs on both sides.
    """
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-extract-"))
    try:
        files = write_images(work / "images", n_images)
        model, tensors = bare_inputs(files, batch_size)
        bare_before = bare_seconds(model, tensors, batch_size)

        config = load_config(
            overrides=[
                "extract.attribution=false", f"extract.batch_size={batch_size}", "extract.positions=all",
                "extract.shard_size=128", "compute.n_workers=1", "compute.threads_per_worker=1",
            ],
            images=str(work / "images"),
            store=str(work / "bench.zarr"),
        )
        start = time.perf_counter()
        summary = run_extract(config, progress=False)
        job_seconds = time.perf_counter() - start
        bare_after = bare_seconds(model, tensors, batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bare_seconds = (bare_before + bare_after) / 2
    result = {
        "n_images": n_images,
        "batch_size": batch_size,
        "threads": threads,
        "bare_runs_images_per_s": [n_images / bare_before, n_images / bare_after],
        "bare_images_per_s": n_images / bare_seconds,
        "job_images_per_s": summary["n_ok"] / job_seconds,
        "job_seconds": job_seconds,
        "worker_peak_mib": max(summary["worker_peak_memory_mib"].values()),
    }
    result["ratio"] = result["job_images_per_s"] / result["bare_images_per_s"]
    return result


def report(result: dict) -> str:
    """Format the result as the report section."""
    return f"""## Extraction throughput

`python -m benchmarks.run extract`: EfficientNet-Lite0 up to `blocks.4`, {result['n_images']:,} JPEG crops
of the sample photos (256 px), batch {result['batch_size']}, {result['threads']} torch threads, attribution off, all 196
positions per image. The job runs one Dask worker process with one task thread and
{result['threads']} torch threads; its time is the whole `run_extract` call: starting the cluster, loading
the model in the worker, decoding, sampling and writing the store. The bare pass runs
before and after the job ({result['bare_runs_images_per_s'][0]:.1f} and {result['bare_runs_images_per_s'][1]:.1f} images/s); their mean counts.

| side | images/s |
| --- | ---: |
| bare truncated forward (tensors in memory) | {result['bare_images_per_s']:.1f} |
| `atlas extract` job (files to store, {result['job_seconds']:.0f} s) | {result['job_images_per_s']:.1f} |
| ratio job / bare (goal ≥ 0.9: {"meets" if result['ratio'] >= 0.9 else "misses"}) | {result['ratio']:.2f} |

Peak resident memory of the worker: {result['worker_peak_mib']:.0f} MiB.

Machine: {machine()}.
"""
