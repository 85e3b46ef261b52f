"""Extraction throughput: the `atlas extract` job against the bare truncated forward pass.

Both sides use EfficientNet-Lite0 at blocks.4, the same images, batch size and
torch thread count, in one run. The bare side gets tensors already decoded
and preprocessed in memory; a job decodes files, samples positions and
writes the store, so the ratio is the job's overhead. Two jobs run: the
default one, whose single CPU worker is a thread pool of this process, and
one with a worker process.
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


def job_config(images: Path, store: Path, batch_size: int, shard_size: int, processes: bool | None):
    """Return the benchmark's extraction settings: attribution off, every position, one worker with one task thread."""
    overrides = [
        "extract.attribution=false", f"extract.batch_size={batch_size}", "extract.positions=all",
        f"extract.shard_size={shard_size}", "compute.n_workers=1", "compute.threads_per_worker=1",
    ]
    if processes is not None:
        overrides.append(f"compute.processes={str(processes).lower()}")
    return load_config(overrides=overrides, images=str(images), store=str(store))


def _job(images: Path, store: Path, batch_size: int, processes: bool | None) -> tuple[dict, float]:
    """Run `atlas extract` from files to a new store; return its summary and wall seconds."""
    config = job_config(images, store, batch_size, shard_size=128, processes=processes)
    start = time.perf_counter()
    summary = run_extract(config, progress=False)
    return summary, time.perf_counter() - start


def run(n_images: int = 2048, batch_size: int = 32) -> dict:
    """Measure and return images/s for the bare forward pass and two jobs, and their ratios.

    The first job runs with the default settings, where one CPU worker is a
    thread pool of this process. The second starts a worker process
    (``compute.processes: true``). Bare passes run before, between and after
    the jobs. Each job is compared with the mean of the two passes next to
    it, so a change in the machine's load weighs on both sides of its ratio.
    """
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-extract-"))
    jobs = {}
    try:
        files = write_images(work / "images", n_images)
        model, tensors = bare_inputs(files, batch_size)
        bare = [bare_seconds(model, tensors, batch_size)]
        for name, processes in (("threads", None), ("process", True)):
            summary, seconds = _job(work / "images", work / f"{name}.zarr", batch_size, processes)
            bare.append(bare_seconds(model, tensors, batch_size))
            reference = n_images / ((bare[-2] + bare[-1]) / 2)
            jobs[name] = {"images_per_s": summary["n_ok"] / seconds, "seconds": seconds, "bare_images_per_s": reference}
            jobs[name]["ratio"] = jobs[name]["images_per_s"] / reference
            if processes:
                jobs[name]["worker_peak_mib"] = max(summary["worker_peak_memory_mib"].values())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return {
        "n_images": n_images,
        "batch_size": batch_size,
        "threads": threads,
        "bare_runs_images_per_s": [n_images / seconds for seconds in bare],
        "jobs": jobs,
        "ratio": jobs["threads"]["ratio"],
    }


def report(result: dict) -> str:
    """Format the result as the report section."""
    threads, process = result["jobs"]["threads"], result["jobs"]["process"]
    verdict = "meets" if result["ratio"] >= 0.9 else "misses"
    passes = ", ".join(f"{rate:.1f}" for rate in result["bare_runs_images_per_s"])
    return f"""## Extraction throughput

`python -m benchmarks.run extract`: EfficientNet-Lite0 up to `blocks.4`, {result['n_images']:,} JPEG crops
of the sample photos (256 px), batch {result['batch_size']}, {result['threads']} torch threads, attribution off, all 196
positions per image, shards of 128 images. A job's time is the whole `run_extract` call: starting
the cluster, loading the model in the worker, decoding, sampling and writing the store. The
default job runs its one CPU worker as threads of the calling process (`compute.processes: null`);
the second job starts a worker process (`compute.processes: true`), as several workers or a memory
limit do. The bare pass runs before, between and after the jobs ({passes} images/s); each
job is compared with the mean of the two passes next to it.

| side | images/s | bare images/s next to it | ratio |
| --- | ---: | ---: | ---: |
| `atlas extract`, default: worker threads in this process ({threads['seconds']:.0f} s) | {threads['images_per_s']:.1f} | {threads['bare_images_per_s']:.1f} | {threads['ratio']:.3f} |
| `atlas extract`, one worker process ({process['seconds']:.0f} s) | {process['images_per_s']:.1f} | {process['bare_images_per_s']:.1f} | {process['ratio']:.3f} |

Goal: ratio ≥ 0.9 for the default job; it {verdict} it. The job with a worker process took
{process['seconds'] - threads['seconds']:.0f} s longer. Starting a worker process (spawning it, importing torch and timm there,
loading the weights) took 3 to 3.5 s when timed alone on this machine, and its first batch runs
cold; the rest of the difference is not profiled. Peak resident memory of the worker process:
{process['worker_peak_mib']:.0f} MiB.

Machine: {machine()}.
"""
