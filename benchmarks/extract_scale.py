"""A long extraction run: 10,240 images, 2,007,040 activations, wall time and worker memory.

The store is kept at ``stores/bench-2m.zarr`` for the ``scale`` benchmark
(index, project and grid on two million rows). A second, short run of 1,024
images in the same configuration gives the worker's peak memory at a fifth
of the size, to show that it does not grow with the number of images.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from benchmarks.extract import bare_inputs, bare_seconds, job_config, write_images
from jobs.extract import run_extract

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "stores" / "bench-2m.zarr"
N_IMAGES = 10_240
N_SMALL = 1_024
BATCH_SIZE = 32
N_BARE = 1_024


def _config(images: Path, store: Path):
    # A worker process of its own, so that its peak memory is measured apart from this one's.
    return job_config(images, store, BATCH_SIZE, shard_size=256, processes=True)


def _bare_rate(files: list[Path]) -> float:
    """Return images/s of the bare truncated forward pass over ``files``, decoded beforehand."""
    model, tensors = bare_inputs(files, BATCH_SIZE)
    return len(tensors) / bare_seconds(model, tensors, BATCH_SIZE)


def run() -> dict:
    """Extract 1,024 then 10,240 sample crops; return each run's summary and wall time.

    The bare forward pass over the first 1,024 images runs before and after
    the two jobs, so each job's rate has a reference measured in the same run.
    """
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-scale-"))
    runs = {}
    try:
        start = time.perf_counter()
        write_images(work / "images", N_IMAGES)
        logger.info("wrote %d JPEG files in %.0f s", N_IMAGES, time.perf_counter() - start)
        small = work / "small"
        small.mkdir()
        for path in sorted((work / "images").glob("*.jpg"))[:N_SMALL]:
            os.link(path, small / path.name)

        bare_files = sorted(small.glob("*.jpg"))[:N_BARE]
        bare = [_bare_rate(bare_files)]
        for name, images, store in (("small", small, work / "small.zarr"), ("large", work / "images", STORE)):
            if store.exists():
                shutil.rmtree(store)
            start = time.perf_counter()
            summary = run_extract(_config(images, store), force=True, progress=False)
            runs[name] = {**summary, "wall_seconds": time.perf_counter() - start}
        bare.append(_bare_rate(bare_files))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs["bare"] = bare
    return runs


def report(runs: dict) -> str:
    """Format the two runs as the report section."""
    lines = []
    bare = sum(runs["bare"]) / len(runs["bare"])
    for name in ("small", "large"):
        item = runs[name]
        peaks = ", ".join(f"{mib:,.0f}" for mib in item["worker_peak_memory_mib"].values())
        rate = item["n_ok"] / item["wall_seconds"]
        lines.append(
            f"| {item['n_ok']:,} | {item['n_valid_rows']:,} | {item['wall_seconds']:.0f} | "
            f"{rate:.1f} | {rate / bare:.2f} | {peaks} |"
        )
    return f"""## Extraction at scale

`python -m benchmarks.run extract_scale`: `atlas extract` on seeded 256 px crops of the sample
photos, EfficientNet-Lite0 `blocks.4`, all 196 positions per image, batch {BATCH_SIZE}, shards of 256 images,
one Dask worker process (`compute.processes: true`, so that its memory is measured apart from
the driver's) with 2 torch threads, attribution off. The larger store is kept as
`stores/bench-2m.zarr` for the scale benchmark below.

| images | activation rows | wall time (s) | images/s | ratio to bare | worker peak memory (MiB) |
| ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(lines)}

The bare truncated forward pass (same model, batch and threads, {N_BARE:,} decoded images in memory)
ran at {runs['bare'][0]:.1f} images/s before the jobs and {runs['bare'][1]:.1f} after; the ratios use the mean.

Worker peak memory is the worker process's `ru_maxrss`, read through `Client.run` before the
cluster closes; the driver does not load the model.

Machine: {machine()}.
"""
