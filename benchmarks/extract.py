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
from benchmarks.common import machine, write_section
from jobs.extract import run_extract

logger = logging.getLogger(__name__)


def _write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(list_items("sample", crops_per_photo=count // 22 + 1)[:count]):
        open_image(item).save(folder / f"{index:05d}.jpg", quality=92)


def run(n_images: int = 512, batch_size: int = 32) -> dict:
    """Measure and return images/s for the bare forward pass and the job, and their ratio."""
    threads = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-extract-"))
    try:
        _write_images(work / "images", n_images)
        files = sorted((work / "images").glob("*.jpg"))

        torch.set_num_threads(threads)
        model = load_model("efficientnet_lite0")
        tensors = [model.transform(open_image(str(path))) for path in files]
        with torch.no_grad():
            forward_to(model.module, torch.stack(tensors[:batch_size]), ["blocks.4"])  # warm-up
            start = time.perf_counter()
            for first in range(0, len(tensors), batch_size):
                forward_to(model.module, torch.stack(tensors[first : first + batch_size]), ["blocks.4"])
            bare_seconds = time.perf_counter() - start

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
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "n_images": n_images,
        "batch_size": batch_size,
        "threads": threads,
        "bare_images_per_s": n_images / bare_seconds,
        "job_images_per_s": summary["n_ok"] / job_seconds,
    }
    result["ratio"] = result["job_images_per_s"] / result["bare_images_per_s"]
    return result


def report(result: dict) -> str:
    """Format the result as the report section."""
    return f"""## Extraction throughput

`python -m benchmarks.run extract`: EfficientNet-Lite0 up to `blocks.4`, {result['n_images']} JPEG crops
of the sample photos, batch {result['batch_size']}, {result['threads']} torch threads, attribution off.
The job time includes starting the Dask cluster, decoding, sampling and writing the store.

| side | images/s |
| --- | ---: |
| bare truncated forward (tensors in memory) | {result['bare_images_per_s']:.1f} |
| `atlas extract` job (files to store) | {result['job_images_per_s']:.1f} |
| ratio job / bare | {result['ratio']:.2f} |

Machine: {machine()}.
"""


def main() -> None:
    result = run()
    write_section("extract", report(result))
    print(report(result))


if __name__ == "__main__":
    main()
